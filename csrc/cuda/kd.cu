// Distillation KL rows on CUDA (docs/kernels.md §5). One block per row: the two softmax
// normalizers come from one online pass over the row, and the later passes re-read the row (from
// cache); the backward recomputes everything from the logits.
#include "dinv_cuda.cuh"

#include <torch/library.h>

#include <tuple>

namespace dinv::gpu {
namespace {

// q_j*a_j with a_j = log q_j − log p_j, and 0 where q_j == 0 (xlogy convention: an underflowed
// or −inf teacher logit contributes nothing rather than 0*(−inf) = NaN).
template <typename acc>
__device__ __forceinline__ acc kd_term(acc q, acc a) {
  return q > acc(0) ? q * a : acc(0);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    kd_rows_kernel(Logits<scalar_t> s, Logits<scalar_t> t, int64_t K, acc_t<scalar_t> inv_t,
                   acc_t<scalar_t>* __restrict__ out) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  RowSoftmax<acc> ps, pt;
  row_softmaxes(s, t, b, K, inv_t, ps, pt);
  acc r = 0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc zs = s.z(b, j, inv_t), zt = t.z(b, j, inv_t);
    r += kd_term(pt.prob(zt), pt.log_prob(zt) - ps.log_prob(zs));
  }
  r = block_reduce(r, Add{}, acc(0));
  if (threadIdx.x == 0) out[b] = r;
}

// ds_j = g/T * (p_j − q_j),  dt_j = g/T * q_j*(a_j − Σ_k q_k a_k).
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    kd_rows_backward_kernel(const acc_t<scalar_t>* __restrict__ grad_rows, Logits<scalar_t> s,
                            Logits<scalar_t> t, int64_t K, acc_t<scalar_t> inv_t,
                            LogitGrads<scalar_t> ds, LogitGrads<scalar_t> dt) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  RowSoftmax<acc> ps, pt;
  row_softmaxes(s, t, b, K, inv_t, ps, pt);
  acc kl = 0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc zs = s.z(b, j, inv_t), zt = t.z(b, j, inv_t);
    kl += kd_term(pt.prob(zt), pt.log_prob(zt) - ps.log_prob(zs));
  }
  kl = block_allreduce(kl, Add{}, acc(0));
  const acc g = grad_rows[b] * inv_t;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc zs = s.z(b, j, inv_t), zt = t.z(b, j, inv_t);
    const acc p = ps.prob(zs), q = pt.prob(zt);
    ds.store(b, j, g * (p - q));
    dt.store(b, j, g * kd_term(q, pt.log_prob(zt) - ps.log_prob(zs) - kl));
  }
}

at::Tensor kd_rows_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                        double T) {
  check_logits(student_logits, teacher_logits, T, "kd_rows");
  const c10::cuda::OptionalCUDAGuard guard(student_logits.device());
  const LogitPair logits = promote_logits(student_logits, teacher_logits);
  const at::Tensor& s = logits.s;
  const at::Tensor& t = logits.t;
  const int64_t B = s.size(0), K = s.size(1);
  at::Tensor out = at::empty({B}, s.options().dtype(acc_type(s)));
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dinv_kd_rows", [&] {
    using acc = acc_t<scalar_t>;
    kd_rows_kernel<scalar_t>
        <<<static_cast<unsigned>(B), row_threads(K), 0, at::cuda::getCurrentCUDAStream()>>>(
            logits_of<scalar_t>(s), logits_of<scalar_t>(t), K, static_cast<acc>(1.0 / T),
            out.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kd_rows_backward_cuda(const at::Tensor& grad_rows,
                                                         const at::Tensor& student_logits,
                                                         const at::Tensor& teacher_logits,
                                                         double T) {
  constexpr const char* op = "kd_rows_backward";
  check_logits(student_logits, teacher_logits, T, op);
  const c10::cuda::OptionalCUDAGuard guard(student_logits.device());
  const LogitPair logits = promote_logits(student_logits, teacher_logits);
  const at::Tensor& s = logits.s;
  const at::Tensor& t = logits.t;
  const at::Tensor g = grad_rows_tensor(grad_rows, s, op);
  at::Tensor ds = at::empty_like(s);
  at::Tensor dt = at::empty_like(t);
  const int64_t B = s.size(0), K = s.size(1);
  if (B > 0 && K > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dinv_kd_bwd", [&] {
      using acc = acc_t<scalar_t>;
      kd_rows_backward_kernel<scalar_t>
          <<<static_cast<unsigned>(B), row_threads(K), 0, at::cuda::getCurrentCUDAStream()>>>(
              g.const_data_ptr<acc>(), logits_of<scalar_t>(s), logits_of<scalar_t>(t), K,
              static_cast<acc>(1.0 / T), logit_grads_of<scalar_t>(ds),
              logit_grads_of<scalar_t>(dt));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {ds.to(student_logits.scalar_type()), dt.to(teacher_logits.scalar_type())};
}

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  m.impl("kd_rows", &dinv::gpu::kd_rows_cuda);
  m.impl("kd_rows_backward", &dinv::gpu::kd_rows_backward_cuda);
}

// Distillation KL rows on CUDA (docs/kernels.md §5). One block per row: the two softmax
// normalizers come from one online pass over the row, and the later passes re-read the row (from
// cache); the backward recomputes everything from the logits.
#include "dinv_cuda.cuh"

#include <torch/library.h>

#include <tuple>

namespace dinv::gpu {
namespace {

// q_j*a_j with a_j = log q_j − log p_j, and 0 where q_j == 0 (xlogy convention: an underflowed
// or −inf teacher logit contributes nothing rather than 0*(−inf) = NaN). A NaN q (a NaN or +inf
// teacher logit) stays NaN, as on CPU: `q > 0 ? ...` would have silently zeroed the row.
template <typename acc>
__device__ __forceinline__ acc kd_term(acc q, acc a) {
  return q == acc(0) ? acc(0) : q * a;
}

// This thread's share of row b's KL, Σ_j q_j*a_j: the terms j = threadIdx.x + i*blockDim.x.
template <typename scalar_t>
__device__ __forceinline__ acc_t<scalar_t> kd_row_partial(const Logits<scalar_t>& s,
                                                          const Logits<scalar_t>& t, int64_t b,
                                                          int64_t K, acc_t<scalar_t> inv_t,
                                                          const RowSoftmax<acc_t<scalar_t>>& ps,
                                                          const RowSoftmax<acc_t<scalar_t>>& pt) {
  using acc = acc_t<scalar_t>;
  acc r = 0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc zs = s.z(b, j, inv_t), zt = t.z(b, j, inv_t);
    r += kd_term(pt.prob(zt), pt.log_prob(zt) - ps.log_prob(zs));
  }
  return r;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    kd_rows_kernel(Logits<scalar_t> s, Logits<scalar_t> t, int64_t K, acc_t<scalar_t> inv_t,
                   acc_t<scalar_t>* __restrict__ out) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  RowSoftmax<acc> ps, pt;
  row_softmaxes(s, t, b, K, inv_t, ps, pt);
  const acc r = block_reduce(kd_row_partial(s, t, b, K, inv_t, ps, pt), Add{}, acc(0));
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
  const acc kl = block_allreduce(kd_row_partial(s, t, b, K, inv_t, ps, pt), Add{}, acc(0));
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
  return launch_rows("kd_rows", student_logits, teacher_logits, T, [](auto type) {
    return kd_rows_kernel<typename decltype(type)::type>;
  });
}

std::tuple<at::Tensor, at::Tensor> kd_rows_backward_cuda(const at::Tensor& grad_rows,
                                                         const at::Tensor& student_logits,
                                                         const at::Tensor& teacher_logits,
                                                         double T) {
  return launch_rows_backward(
      "kd_rows_backward", grad_rows, student_logits, teacher_logits, T, [](auto type) {
        return kd_rows_backward_kernel<typename decltype(type)::type>;
      });
}

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  m.impl("kd_rows", &dinv::gpu::kd_rows_cuda);
  m.impl("kd_rows_backward", &dinv::gpu::kd_rows_backward_cuda);
}

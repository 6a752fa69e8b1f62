// Jensen-Shannon competition rows on CUDA (docs/kernels.md §4). One block per row: the two
// softmax normalizers come from one online pass over the row, and the later passes re-read the
// row (from cache) rather than storing probabilities; the backward recomputes everything from
// the logits.
#include "dinv_cuda.cuh"

#include <torch/library.h>

#include <tuple>

namespace dinv::gpu {
namespace {

// torch.clamp(v, 0.01, 0.99): NaN passes through.
template <typename acc>
__device__ __forceinline__ acc clamp_prob(acc v) {
  const acc lo = acc(0.01), hi = acc(0.99);
  return v < lo ? lo : (v > hi ? hi : v);
}

// Where torch.clamp passes the gradient: lo <= v <= hi, inclusive.
template <typename acc>
__device__ __forceinline__ bool in_clamp(acc v) {
  return v >= acc(0.01) && v <= acc(0.99);
}

// mc_j*(log mc_j − ½ log pc_j − ½ log qc_j)
template <typename acc>
__device__ __forceinline__ acc js_term(acc p, acc q) {
  const acc mc = clamp_prob((p + q) * acc(0.5));
  return mc * (dlog(mc) - acc(0.5) * dlog(clamp_prob(p)) - acc(0.5) * dlog(clamp_prob(q)));
}

// gp_j, gq_j: the row sum's gradient with respect to p_j and q_j.
template <typename acc>
__device__ __forceinline__ void js_grads(acc p, acc q, acc& gp, acc& gq) {
  const acc m = (p + q) * acc(0.5);
  const acc pc = clamp_prob(p), qc = clamp_prob(q), mc = clamp_prob(m);
  const acc gm =
      in_clamp(m) ? dlog(mc) + acc(1) - acc(0.5) * dlog(pc) - acc(0.5) * dlog(qc) : acc(0);
  gp = (in_clamp(p) ? acc(-0.5) * mc / pc : acc(0)) + acc(0.5) * gm;
  gq = (in_clamp(q) ? acc(-0.5) * mc / qc : acc(0)) + acc(0.5) * gm;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    js_rows_kernel(Logits<scalar_t> s, Logits<scalar_t> t, int64_t K, acc_t<scalar_t> inv_t,
                   acc_t<scalar_t>* __restrict__ out) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  RowSoftmax<acc> ps, pt;
  row_softmaxes(s, t, b, K, inv_t, ps, pt);
  acc r = 0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    r += js_term(ps.prob(s.z(b, j, inv_t)), pt.prob(t.z(b, j, inv_t)));
  }
  r = block_reduce(r, Add{}, acc(0));
  if (threadIdx.x == 0) out[b] = r;
}

// ds_j = g/T * p_j*(gp_j − Σ_k p_k gp_k), dt_j likewise with q, gq.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    js_rows_backward_kernel(const acc_t<scalar_t>* __restrict__ grad_rows, Logits<scalar_t> s,
                            Logits<scalar_t> t, int64_t K, acc_t<scalar_t> inv_t,
                            LogitGrads<scalar_t> ds, LogitGrads<scalar_t> dt) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  RowSoftmax<acc> ps, pt;
  row_softmaxes(s, t, b, K, inv_t, ps, pt);
  Sums<acc, 2> dots{};
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc p = ps.prob(s.z(b, j, inv_t)), q = pt.prob(t.z(b, j, inv_t));
    acc gp, gq;
    js_grads(p, q, gp, gq);
    dots.v[0] += p * gp;
    dots.v[1] += q * gq;
  }
  dots = block_allreduce(dots, AddSums{}, Sums<acc, 2>{});
  const acc g = grad_rows[b] * inv_t;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const acc p = ps.prob(s.z(b, j, inv_t)), q = pt.prob(t.z(b, j, inv_t));
    acc gp, gq;
    js_grads(p, q, gp, gq);
    ds.store(b, j, g * p * (gp - dots.v[0]));
    dt.store(b, j, g * q * (gq - dots.v[1]));
  }
}

at::Tensor js_rows_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                        double T) {
  return launch_rows("js_rows", student_logits, teacher_logits, T, [](auto type) {
    return js_rows_kernel<typename decltype(type)::type>;
  });
}

std::tuple<at::Tensor, at::Tensor> js_rows_backward_cuda(const at::Tensor& grad_rows,
                                                         const at::Tensor& student_logits,
                                                         const at::Tensor& teacher_logits,
                                                         double T) {
  return launch_rows_backward(
      "js_rows_backward", grad_rows, student_logits, teacher_logits, T, [](auto type) {
        return js_rows_backward_kernel<typename decltype(type)::type>;
      });
}

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  m.impl("js_rows", &dinv::gpu::js_rows_cuda);
  m.impl("js_rows_backward", &dinv::gpu::js_rows_backward_cuda);
}

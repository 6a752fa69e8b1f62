// Distillation KL rows on CUDA (docs/kernels.md §5), one block per row (see the row ops in
// dinv_cuda.cuh).
#include "dinv_cuda.cuh"

namespace dinv::gpu {
namespace {

// r = Σ_j q_j*a_j with a_j = log q_j − log p_j.
struct KdRows {
  static constexpr const char* kName = "kd_rows";
  static constexpr const char* kBackwardName = "kd_rows_backward";

  // q*a, and 0 where q == 0 (xlogy convention: an underflowed or −inf teacher logit contributes
  // nothing rather than 0*(−inf) = NaN). A NaN q (a NaN or +inf teacher logit) stays NaN, as on
  // CPU: `q > 0 ? ...` would have silently zeroed the row.
  template <typename acc>
  static __device__ __forceinline__ acc kd_term(acc q, acc a) {
    return q == acc(0) ? acc(0) : q * a;
  }

  template <typename acc>
  static __device__ __forceinline__ acc value_term(const ClassProbs<acc>& c) {
    return kd_term(c.q, c.log_q - c.log_p);
  }

  // Only the teacher's gradient reads the row's KL.
  static __device__ __forceinline__ bool needs_dots(bool, bool teacher_grad) {
    return teacher_grad;
  }

  template <typename acc>
  static __device__ __forceinline__ Sums<acc, 2> dot_terms(const ClassProbs<acc>& c) {
    return {{acc(0), value_term(c)}};
  }

  // ds_j = g * (p_j − q_j),  dt_j = g * q_j*(a_j − Σ_k q_k a_k).
  template <typename acc>
  static __device__ __forceinline__ void grads(const ClassProbs<acc>& c, const Sums<acc, 2>& dots,
                                               acc g, acc& ds, acc& dt) {
    ds = g * (c.p - c.q);
    dt = g * kd_term(c.q, c.log_q - c.log_p - dots.v[1]);
  }
};

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  dinv::gpu::impl_row_op<dinv::gpu::KdRows>(m);
}

// CPU kernels of the distillation KL rows (docs/kernels.md section 5): one row per work item;
// the backward recomputes both softmaxes from the logits.
#include <torch/library.h>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

// r = Σ_j q_j (log q_j − log p_j) of one row.
struct KdRows {
  static constexpr const char* kName = "kd_rows";
  static constexpr const char* kBackwardName = "kd_rows_backward";
  // row_pair's scratch; the backward writes a = log q − log p over the logits zs.
  static constexpr int64_t kScratchRows = 4;

  // log q_j − log p_j
  template <typename acc>
  DINV_INLINE static acc log_ratio(const RowPair<acc>& r, int64_t j) {
    return r.qs.log_prob(r.zt[j]) - r.ps.log_prob(r.zs[j]);
  }

  template <typename scalar_t, typename acc = acc_t<scalar_t>>
  DINV_INLINE static acc value(const scalar_t* s, const scalar_t* t, int64_t K, acc T,
                               acc* scratch) {
    const RowPair<acc> r = row_pair(s, t, K, T, scratch);
    return lane_sum<acc>(K, [&](int64_t j) {
      // xlogy: an underflowed q_j contributes 0, not NaN
      return r.q[j] == acc(0) ? acc(0) : r.q[j] * log_ratio(r, j);
    });
  }

  // ds_j = g/T (p_j − q_j), dt_j = g/T q_j (a_j − Σ_k q_k a_k) of one row.
  template <typename scalar_t, typename acc = acc_t<scalar_t>>
  DINV_INLINE static void grads(acc grad, const scalar_t* s, const scalar_t* t, int64_t K, acc T,
                                acc* scratch, scalar_t* ds, scalar_t* dt) {
    const RowPair<acc> r = row_pair(s, t, K, T, scratch);
    const acc *p = r.p, *q = r.q;
    const acc scale = grad / T;
    if (ds) {
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) ds[j] = static_cast<scalar_t>(scale * (p[j] - q[j]));
    }
    if (!dt) return;  // only the teacher's gradient needs the row's KL
    acc* a = r.zs;
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) a[j] = log_ratio(r, j);
    const acc q_dot_a =
        lane_sum<acc>(K, [&](int64_t j) { return q[j] == acc(0) ? acc(0) : q[j] * a[j]; });
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) {
      const acc g = scale * q[j] * (a[j] - q_dot_a);  // unconditional: the select vectorizes
      dt[j] = static_cast<scalar_t>(q[j] == acc(0) ? acc(0) : g);
    }
  }
};

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  dinv::cpu::impl_row_op<dinv::cpu::KdRows>(m);
}

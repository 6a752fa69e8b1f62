// CPU kernels of the Jensen-Shannon competition rows (docs/kernels.md section 4): one row per
// work item; the backward recomputes both softmaxes from the logits.
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

// The fixed clamp bounds of the probabilities.
template <typename acc>
constexpr acc kLo = acc(0.01);
template <typename acc>
constexpr acc kHi = acc(0.99);

template <typename acc>
DINV_INLINE acc clamp_prob(acc v) {
  return std::min(std::max(v, kLo<acc>), kHi<acc>);
}

// torch.clamp passes the gradient where lo <= v <= hi.
template <typename acc>
DINV_INLINE bool inside_clamp(acc v) {
  return kLo<acc> <= v && v <= kHi<acc>;
}

// Rows use a scratch of 4K acc values: the softmaxes p and q, then the gradients gp and gq of
// the row's loss with respect to them (backward only).
constexpr int64_t kScratchRows = 4;

// r = Σ_j mc_j (log mc_j − ½ log pc_j − ½ log qc_j) of one row.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
DINV_INLINE acc js_row(const scalar_t* s, const scalar_t* t, int64_t K, acc T, acc* scratch) {
  acc *p = scratch, *q = p + K;
  softmax_row(s, K, T, p, p);
  softmax_row(t, K, T, q, q);
  return lane_sum<acc>(K, [&](int64_t j) {
    const acc mc = clamp_prob((p[j] + q[j]) * acc(0.5));
    return mc * (log_simd(mc) - acc(0.5) * log_simd(clamp_prob(p[j])) -
                 acc(0.5) * log_simd(clamp_prob(q[j])));
  });
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
DINV_INLINE void js_row_backward(acc grad, const scalar_t* s, const scalar_t* t, int64_t K,
                                 acc T, acc* scratch, scalar_t* ds, scalar_t* dt) {
  acc *p = scratch, *q = p + K, *gp = q + K, *gq = gp + K;
  softmax_row(s, K, T, p, p);
  softmax_row(t, K, T, q, q);
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) {
    const acc m = (p[j] + q[j]) * acc(0.5);
    const acc mc = clamp_prob(m), pc = clamp_prob(p[j]), qc = clamp_prob(q[j]);
    // Computed unconditionally so that the selects below vectorize.
    const acc log_terms =
        log_simd(mc) + acc(1) - acc(0.5) * log_simd(pc) - acc(0.5) * log_simd(qc);
    const acc gm = inside_clamp(m) ? log_terms : acc(0);
    gp[j] = (inside_clamp(p[j]) ? acc(-0.5) * mc / pc : acc(0)) + acc(0.5) * gm;
    gq[j] = (inside_clamp(q[j]) ? acc(-0.5) * mc / qc : acc(0)) + acc(0.5) * gm;
  }
  const acc p_dot_gp = lane_sum<acc>(K, [&](int64_t j) { return p[j] * gp[j]; });
  const acc q_dot_gq = lane_sum<acc>(K, [&](int64_t j) { return q[j] * gq[j]; });
  // Through the softmaxes of s/T and t/T.
  const acc scale = grad / T;
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) {
    ds[j] = static_cast<scalar_t>(scale * p[j] * (gp[j] - p_dot_gp));
    dt[j] = static_cast<scalar_t>(scale * q[j] * (gq[j] - q_dot_gq));
  }
}

DINV_ISA_CLONES float js_row_fp32(const float* s, const float* t, int64_t K, float T,
                                  float* scratch) {
  return js_row(s, t, K, T, scratch);
}

DINV_ISA_CLONES void js_row_backward_fp32(float grad, const float* s, const float* t, int64_t K,
                                          float T, float* scratch, float* ds, float* dt) {
  js_row_backward(grad, s, t, K, T, scratch, ds, dt);
}

at::Tensor js_rows(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T) {
  return rows_forward(
      student_logits, teacher_logits, T, kScratchRows,
      [](const auto* s, const auto* t, int64_t K, auto T_acc, auto* scratch) {
        return js_row(s, t, K, T_acc, scratch);
      },
      js_row_fp32);
}

std::tuple<at::Tensor, at::Tensor> js_rows_backward(const at::Tensor& grad_rows,
                                                    const at::Tensor& student_logits,
                                                    const at::Tensor& teacher_logits, double T) {
  return rows_backward(
      grad_rows, student_logits, teacher_logits, T, kScratchRows,
      [](auto grad, const auto* s, const auto* t, int64_t K, auto T_acc, auto* scratch, auto* ds,
         auto* dt) { js_row_backward(grad, s, t, K, T_acc, scratch, ds, dt); },
      js_row_backward_fp32);
}

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  m.impl("js_rows", &dinv::cpu::js_rows);
  m.impl("js_rows_backward", &dinv::cpu::js_rows_backward);
}

// CPU kernels of the distillation KL rows (docs/kernels.md section 5): one row per work item;
// the backward recomputes both softmaxes from the logits.
#include <torch/library.h>

#include <tuple>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

// log q_j − log p_j of a row from the scaled logits and their softmax normalizations.
template <typename acc>
DINV_INLINE acc log_ratio(acc zt, acc zs, const SoftmaxRow<acc>& qs, const SoftmaxRow<acc>& ps) {
  return ((zt - qs.max_z) - qs.log_sum) - ((zs - ps.max_z) - ps.log_sum);
}

// Rows use a scratch of 4K acc values: z = logits / T of both rows and their softmaxes p and q.
constexpr int64_t kScratchRows = 4;

// r = Σ_j q_j (log q_j − log p_j) of one row.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
DINV_INLINE acc kd_row(const scalar_t* s, const scalar_t* t, int64_t K, acc T, acc* scratch) {
  acc *zs = scratch, *zt = zs + K, *p = zt + K, *q = p + K;
  const auto ps = softmax_row(s, K, T, zs, p);
  const auto qs = softmax_row(t, K, T, zt, q);
  return lane_sum<acc>(K, [&](int64_t j) {
    // xlogy: an underflowed q_j contributes 0, not NaN
    return q[j] == acc(0) ? acc(0) : q[j] * log_ratio(zt[j], zs[j], qs, ps);
  });
}

// ds_j = g/T (p_j − q_j), dt_j = g/T q_j (a_j − Σ_k q_k a_k) of one row, a = log q − log p.
template <typename scalar_t, typename acc = acc_t<scalar_t>>
DINV_INLINE void kd_row_backward(acc grad, const scalar_t* s, const scalar_t* t, int64_t K,
                                 acc T, acc* scratch, scalar_t* ds, scalar_t* dt) {
  acc *zs = scratch, *zt = zs + K, *p = zt + K, *q = p + K;
  const auto ps = softmax_row(s, K, T, zs, p);
  const auto qs = softmax_row(t, K, T, zt, q);
  const acc scale = grad / T;
  acc* a = zs;  // a_j = log q_j − log p_j, written over zs
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) {
    ds[j] = static_cast<scalar_t>(scale * (p[j] - q[j]));
    a[j] = log_ratio(zt[j], zs[j], qs, ps);
  }
  const acc q_dot_a =
      lane_sum<acc>(K, [&](int64_t j) { return q[j] == acc(0) ? acc(0) : q[j] * a[j]; });
#pragma omp simd
  for (int64_t j = 0; j < K; ++j) {
    const acc g = scale * q[j] * (a[j] - q_dot_a);  // unconditional: the select vectorizes
    dt[j] = static_cast<scalar_t>(q[j] == acc(0) ? acc(0) : g);
  }
}

DINV_ISA_CLONES float kd_row_fp32(const float* s, const float* t, int64_t K, float T,
                                  float* scratch) {
  return kd_row(s, t, K, T, scratch);
}

DINV_ISA_CLONES void kd_row_backward_fp32(float grad, const float* s, const float* t, int64_t K,
                                          float T, float* scratch, float* ds, float* dt) {
  kd_row_backward(grad, s, t, K, T, scratch, ds, dt);
}

at::Tensor kd_rows(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T) {
  return rows_forward(
      student_logits, teacher_logits, T, kScratchRows,
      [](const auto* s, const auto* t, int64_t K, auto T_acc, auto* scratch) {
        return kd_row(s, t, K, T_acc, scratch);
      },
      kd_row_fp32);
}

std::tuple<at::Tensor, at::Tensor> kd_rows_backward(const at::Tensor& grad_rows,
                                                    const at::Tensor& student_logits,
                                                    const at::Tensor& teacher_logits, double T) {
  return rows_backward(
      grad_rows, student_logits, teacher_logits, T, kScratchRows,
      [](auto grad, const auto* s, const auto* t, int64_t K, auto T_acc, auto* scratch, auto* ds,
         auto* dt) { kd_row_backward(grad, s, t, K, T_acc, scratch, ds, dt); },
      kd_row_backward_fp32);
}

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  m.impl("kd_rows", &dinv::cpu::kd_rows);
  m.impl("kd_rows_backward", &dinv::cpu::kd_rows_backward);
}

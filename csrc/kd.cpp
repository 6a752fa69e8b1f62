// CPU kernels of the distillation KL rows (docs/kernels.md section 5): one row per work item;
// the backward recomputes both softmaxes from the logits.
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

// log q_j − log p_j of a row from the scaled logits and their softmax normalizations.
template <typename acc>
acc log_ratio(acc zt, acc zs, const SoftmaxRow<acc>& qs, const SoftmaxRow<acc>& ps) {
  return ((zt - qs.max_z) - qs.log_sum) - ((zs - ps.max_z) - ps.log_sum);
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void kd_rows_kernel(const RowLogits& logits, acc T, acc* out) {
  const int64_t K = logits.classes();
  const scalar_t* student = logits.student.const_data_ptr<scalar_t>();
  const scalar_t* teacher = logits.teacher.const_data_ptr<scalar_t>();
  const int64_t student_stride = logits.student.stride(0);
  const int64_t teacher_stride = logits.teacher.stride(0);
  at::parallel_for(0, logits.rows(), grain_for(K), [&](int64_t begin, int64_t end) {
    // z = logits / T of both rows, and the student's softmax p (unused but for its
    // normalization) and the teacher's q.
    std::vector<acc> zs(K), zt(K), p(K), q(K);
    for (int64_t b = begin; b < end; ++b) {
      const auto ps = softmax_row(student + b * student_stride, K, T, zs.data(), p.data());
      const auto qs = softmax_row(teacher + b * teacher_stride, K, T, zt.data(), q.data());
      out[b] = lane_sum<acc>(K, [&](int64_t j) {
        // xlogy: an underflowed q_j contributes 0, not NaN
        return q[j] == acc(0) ? acc(0) : q[j] * log_ratio(zt[j], zs[j], qs, ps);
      });
    }
  });
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void kd_rows_backward_kernel(const acc* grad_rows, const RowLogits& logits, acc T,
                             scalar_t* grad_student, scalar_t* grad_teacher) {
  const int64_t K = logits.classes();
  const scalar_t* student = logits.student.const_data_ptr<scalar_t>();
  const scalar_t* teacher = logits.teacher.const_data_ptr<scalar_t>();
  const int64_t student_stride = logits.student.stride(0);
  const int64_t teacher_stride = logits.teacher.stride(0);
  at::parallel_for(0, logits.rows(), grain_for(K), [&](int64_t begin, int64_t end) {
    // z = logits / T, p and q; then a_j = log q_j − log p_j in place of zs.
    std::vector<acc> zs(K), zt(K), p(K), q(K);
    for (int64_t b = begin; b < end; ++b) {
      const auto ps = softmax_row(student + b * student_stride, K, T, zs.data(), p.data());
      const auto qs = softmax_row(teacher + b * teacher_stride, K, T, zt.data(), q.data());
      const acc scale = grad_rows[b] / T;
      scalar_t* ds = grad_student + b * K;
      scalar_t* dt = grad_teacher + b * K;
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) {
        ds[j] = static_cast<scalar_t>(scale * (p[j] - q[j]));
        zs[j] = log_ratio(zt[j], zs[j], qs, ps);
      }
      const acc q_dot_a =
          lane_sum<acc>(K, [&](int64_t j) { return q[j] == acc(0) ? acc(0) : q[j] * zs[j]; });
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) {
        const acc grad = scale * q[j] * (zs[j] - q_dot_a);  // unconditional: the select vectorizes
        dt[j] = static_cast<scalar_t>(q[j] == acc(0) ? acc(0) : grad);
      }
    }
  });
}

at::Tensor kd_rows(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T) {
  const RowLogits logits = row_logits(student_logits, teacher_logits, T);
  const auto dtype = logits.student.scalar_type();
  at::Tensor out = at::empty({logits.rows()}, logits.student.options().dtype(acc_dtype(dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kd_rows", [&] {
    using acc = acc_t<scalar_t>;
    kd_rows_kernel<scalar_t>(logits, static_cast<acc>(T), out.mutable_data_ptr<acc>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kd_rows_backward(const at::Tensor& grad_rows,
                                                    const at::Tensor& student_logits,
                                                    const at::Tensor& teacher_logits, double T) {
  const RowLogits logits = row_logits(student_logits, teacher_logits, T);
  const auto dtype = logits.student.scalar_type();
  const at::Tensor grads = row_grads(grad_rows, logits.rows(), acc_dtype(dtype));
  at::Tensor grad_student = at::empty(logits.student.sizes(), logits.student.options());
  at::Tensor grad_teacher = at::empty(logits.teacher.sizes(), logits.teacher.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kd_rows_backward", [&] {
    using acc = acc_t<scalar_t>;
    kd_rows_backward_kernel<scalar_t>(grads.const_data_ptr<acc>(), logits, static_cast<acc>(T),
                                      grad_student.mutable_data_ptr<scalar_t>(),
                                      grad_teacher.mutable_data_ptr<scalar_t>());
  });
  // Gradients in each input's own dtype (they differ only when the logits' dtypes do).
  return {grad_student.to(student_logits.scalar_type()),
          grad_teacher.to(teacher_logits.scalar_type())};
}

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  m.impl("kd_rows", &dinv::cpu::kd_rows);
  m.impl("kd_rows_backward", &dinv::cpu::kd_rows_backward);
}

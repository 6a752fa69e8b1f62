// CPU kernels of the distillation KL rows (docs/kernels.md section 5): one row per work item;
// the backward recomputes both softmaxes from the logits.
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void kd_rows_kernel(const RowLogits& logits, acc T, acc* out) {
  const int64_t K = logits.classes();
  const scalar_t* student = logits.student.const_data_ptr<scalar_t>();
  const scalar_t* teacher = logits.teacher.const_data_ptr<scalar_t>();
  const int64_t student_stride = logits.student.stride(0);
  const int64_t teacher_stride = logits.teacher.stride(0);
  at::parallel_for(0, logits.rows(), grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc> p(K), q(K);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* s = student + b * student_stride;
      const scalar_t* t = teacher + b * teacher_stride;
      const auto ps = softmax_row(s, K, T, p.data());
      const auto qs = softmax_row(t, K, T, q.data());
      out[b] = lane_sum<acc>(K, [&](int64_t j) {
        const acc log_q = (static_cast<acc>(t[j]) / T - qs.max_z) - qs.log_sum;
        const acc log_p = (static_cast<acc>(s[j]) / T - ps.max_z) - ps.log_sum;
        // xlogy: an underflowed q_j contributes 0, not NaN
        return q[j] == acc(0) ? acc(0) : q[j] * (log_q - log_p);
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
    // p and q, then a_j = log q_j - log p_j in place of p once the student gradient is written.
    std::vector<acc> p(K), q(K);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* s = student + b * student_stride;
      const scalar_t* t = teacher + b * teacher_stride;
      const auto ps = softmax_row(s, K, T, p.data());
      const auto qs = softmax_row(t, K, T, q.data());
      const acc scale = grad_rows[b] / T;
      scalar_t* ds = grad_student + b * K;
      scalar_t* dt = grad_teacher + b * K;
      for (int64_t j = 0; j < K; ++j) {
        ds[j] = static_cast<scalar_t>(scale * (p[j] - q[j]));
        const acc log_q = (static_cast<acc>(t[j]) / T - qs.max_z) - qs.log_sum;
        const acc log_p = (static_cast<acc>(s[j]) / T - ps.max_z) - ps.log_sum;
        p[j] = log_q - log_p;
      }
      const acc q_dot_a =
          lane_sum<acc>(K, [&](int64_t j) { return q[j] == acc(0) ? acc(0) : q[j] * p[j]; });
      for (int64_t j = 0; j < K; ++j) {
        dt[j] = static_cast<scalar_t>(q[j] == acc(0) ? acc(0) : scale * q[j] * (p[j] - q_dot_a));
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

// CPU kernels of the Jensen-Shannon competition rows (docs/kernels.md section 4): one row per
// work item; the backward recomputes both softmaxes from the logits.
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

// The fixed clamp bounds of the probabilities.
template <typename acc>
constexpr acc kLo = acc(0.01);
template <typename acc>
constexpr acc kHi = acc(0.99);

template <typename acc>
acc clamp_prob(acc v) {
  return std::min(std::max(v, kLo<acc>), kHi<acc>);
}

// torch.clamp passes the gradient where lo <= v <= hi.
template <typename acc>
bool inside_clamp(acc v) {
  return kLo<acc> <= v && v <= kHi<acc>;
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void js_rows_kernel(const RowLogits& logits, acc T, acc* out) {
  const int64_t K = logits.classes();
  const scalar_t* student = logits.student.const_data_ptr<scalar_t>();
  const scalar_t* teacher = logits.teacher.const_data_ptr<scalar_t>();
  const int64_t student_stride = logits.student.stride(0);
  const int64_t teacher_stride = logits.teacher.stride(0);
  at::parallel_for(0, logits.rows(), grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc> p(K), q(K);
    for (int64_t b = begin; b < end; ++b) {
      softmax_row(student + b * student_stride, K, T, p.data(), p.data());
      softmax_row(teacher + b * teacher_stride, K, T, q.data(), q.data());
      out[b] = lane_sum<acc>(K, [&](int64_t j) {
        const acc mc = clamp_prob((p[j] + q[j]) * acc(0.5));
        return mc * (log_simd(mc) - acc(0.5) * log_simd(clamp_prob(p[j])) -
                     acc(0.5) * log_simd(clamp_prob(q[j])));
      });
    }
  });
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
void js_rows_backward_kernel(const acc* grad_rows, const RowLogits& logits, acc T,
                             scalar_t* grad_student, scalar_t* grad_teacher) {
  const int64_t K = logits.classes();
  const scalar_t* student = logits.student.const_data_ptr<scalar_t>();
  const scalar_t* teacher = logits.teacher.const_data_ptr<scalar_t>();
  const int64_t student_stride = logits.student.stride(0);
  const int64_t teacher_stride = logits.teacher.stride(0);
  at::parallel_for(0, logits.rows(), grain_for(K), [&](int64_t begin, int64_t end) {
    // p and q, then the gradients gp and gq of the row's loss with respect to them.
    std::vector<acc> p(K), q(K), gp(K), gq(K);
    for (int64_t b = begin; b < end; ++b) {
      softmax_row(student + b * student_stride, K, T, p.data(), p.data());
      softmax_row(teacher + b * teacher_stride, K, T, q.data(), q.data());
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
      const acc scale = grad_rows[b] / T;
      scalar_t* ds = grad_student + b * K;
      scalar_t* dt = grad_teacher + b * K;
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) {
        ds[j] = static_cast<scalar_t>(scale * p[j] * (gp[j] - p_dot_gp));
        dt[j] = static_cast<scalar_t>(scale * q[j] * (gq[j] - q_dot_gq));
      }
    }
  });
}

at::Tensor js_rows(const at::Tensor& student_logits, const at::Tensor& teacher_logits, double T) {
  const RowLogits logits = row_logits(student_logits, teacher_logits, T);
  const auto dtype = logits.student.scalar_type();
  at::Tensor out = at::empty({logits.rows()}, logits.student.options().dtype(acc_dtype(dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "js_rows", [&] {
    using acc = acc_t<scalar_t>;
    js_rows_kernel<scalar_t>(logits, static_cast<acc>(T), out.mutable_data_ptr<acc>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> js_rows_backward(const at::Tensor& grad_rows,
                                                    const at::Tensor& student_logits,
                                                    const at::Tensor& teacher_logits, double T) {
  const RowLogits logits = row_logits(student_logits, teacher_logits, T);
  const auto dtype = logits.student.scalar_type();
  const at::Tensor grads = row_grads(grad_rows, logits.rows(), acc_dtype(dtype));
  at::Tensor grad_student = at::empty(logits.student.sizes(), logits.student.options());
  at::Tensor grad_teacher = at::empty(logits.teacher.sizes(), logits.teacher.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "js_rows_backward", [&] {
    using acc = acc_t<scalar_t>;
    js_rows_backward_kernel<scalar_t>(grads.const_data_ptr<acc>(), logits, static_cast<acc>(T),
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
  m.impl("js_rows", &dinv::cpu::js_rows);
  m.impl("js_rows_backward", &dinv::cpu::js_rows_backward);
}

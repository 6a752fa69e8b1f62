// Helpers shared by the CPU kernels (csrc/*.cpp): dtype mapping, argument checks, Welford/Chan
// statistics and the [N, C, S] view of a channel-first tensor. The math is in docs/kernels.md.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

// Row kernels in fp32 are also compiled for AVX2 and the dynamic loader picks the variant the CPU
// supports (GCC function multiversioning): the package is built for baseline x86-64, while ATen
// dispatches its own kernels to AVX2/AVX-512 at run time. The math helpers the clones call are
// forced inline so that they are compiled for the clone's target too. Both variants do the same
// arithmetic in the same order: "avx2" enables no FMA contraction, and every reduction has a
// fixed lane order.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DINV_ISA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define DINV_ISA_CLONES
#endif
#define DINV_INLINE [[gnu::always_inline]] inline

namespace dinv::cpu {

// Accumulation ("acc") type: fp32 for fp16/bf16/fp32, fp64 for fp64.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Work is cut into pieces of about this many elements, a size at which the per-piece
// bookkeeping is negligible and that still spreads small tensors over the threads.
constexpr int64_t kElementsPerPiece = 1 << 15;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Grain (in work items) for at::parallel_for so that each thread gets at least about
// kElementsPerPiece elements: below that, waking threads costs more than it saves.
inline int64_t grain_for(int64_t elements_per_item) {
  return std::max<int64_t>(1, kElementsPerPiece / std::max<int64_t>(1, elements_per_item));
}

inline void check_floating_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dinv: ", name, " must be a CPU tensor, got ", t.device());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "dinv: ", name, " must be float64, float32, float16 or bfloat16, got ", dtype);
}

// A per-channel [C] vector (statistics, BN parameters) as a contiguous acc-dtype tensor.
inline at::Tensor channel_vector(const at::Tensor& t, int64_t channels, at::ScalarType acc,
                                 const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "dinv: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_floating_point(), "dinv: ", name, " must be floating point, got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "dinv: ", name, " must have shape [",
              channels, "], got ", t.sizes());
  return t.to(acc).contiguous();
}

// term(0) + ... + term(n-1) over kLanes independent partial sums, added pairwise at the end.
// The compiler vectorizes the lanes into several accumulator registers, so the loop is not bound
// by the latency of one chain of additions, and the rounding error grows like n/kLanes, not n.
template <typename acc, typename Term>
DINV_INLINE acc lane_sum(int64_t n, const Term& term) {
  constexpr int64_t kLanes = 16;
  acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) lanes[lane] += term(i + lane);
  }
  for (int64_t lane = 0; i < n; ++i, ++lane) lanes[lane] += term(i);
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  }
  return lanes[0];
}

// Running statistics of a set of values: how many, their mean and the sum of squared
// deviations from that mean (M2).
template <typename acc>
struct MeanM2 {
  int64_t count = 0;
  acc mean = 0;
  acc m2 = 0;
};

// Chan et al.'s pairwise combination of two disjoint sets' statistics.
template <typename acc>
MeanM2<acc> chan_merge(const MeanM2<acc>& a, const MeanM2<acc>& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const int64_t count = a.count + b.count;
  const acc b_fraction = static_cast<acc>(b.count) / static_cast<acc>(count);
  const acc delta = b.mean - a.mean;
  return {count, a.mean + delta * b_fraction,
          a.m2 + b.m2 + delta * delta * static_cast<acc>(a.count) * b_fraction};
}

// Merges part(0) .. part(count-1) as a balanced tree, so rounding grows with log(count)
// rather than count.
template <typename acc, typename Part>
MeanM2<acc> merge_tree(int64_t begin, int64_t end, const Part& part) {
  if (end - begin == 1) return part(begin);
  const int64_t mid = begin + (end - begin) / 2;
  return chan_merge(merge_tree<acc>(begin, mid, part), merge_tree<acc>(mid, end, part));
}

// A channel-first tensor seen as [N, C, S] (S = product of the dims after the channel dim),
// with element (n, c, s) at data + n*sN + c*sC + s*sS. When S == 1 the batch dim is moved into
// S (N = 1, S = batch): a [B, C] input then has one "spatial" row per sample, which the kernels
// treat like a channels_last image.
struct NcsLayout {
  int64_t N, C, S;
  int64_t sN, sC, sS;
  int64_t numel() const { return N * C * S; }
};

inline void check_channel_first(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() >= 2, "dinv: ", name, " must have at least 2 dims [N, C, ...], got ",
              x.sizes());
}

// The [N, C, S] layout of t, or nothing when its strides cannot express it (dims after the
// channel dim that do not collapse into one, e.g. a transposed H and W).
inline std::optional<NcsLayout> ncs_layout(const at::Tensor& t) {
  const int64_t N = t.size(0), C = t.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < t.dim(); ++d) S *= t.size(d);
  if (S == 1) return NcsLayout{1, C, N, 0, t.stride(1), t.stride(0)};
  const auto strides = at::detail::computeStride(t.sizes(), t.strides(), at::DimVector{N, C, S});
  if (!strides) return std::nullopt;
  return NcsLayout{N, C, S, (*strides)[0], (*strides)[1], (*strides)[2]};
}

// x in a layout that has an [N, C, S] view (x itself unless its strides have none).
inline at::Tensor ncs_readable(const at::Tensor& x) {
  return ncs_layout(x) ? x : x.contiguous();
}

// The output of an elementwise op "like x" (at::empty_like(x): same shape, dtype and, for
// dense x, strides), together with an input that has exactly the output's strides, so that one
// [N, C, S] layout indexes both. When the output's strides have no [N, C, S] view the kernel
// writes a contiguous buffer that finish() copies into the output.
class NcsLikeOutput {
 public:
  explicit NcsLikeOutput(const at::Tensor& x) : result_(at::empty_like(x)) {
    if (ncs_layout(result_)) {
      target_ = result_;
      input_ = x.strides() == result_.strides() ? x : at::empty_like(result_).copy_(x);
    } else {
      input_ = x.contiguous();
      target_ = at::empty_like(input_);
    }
    layout_ = *ncs_layout(target_);
  }
  // x with the strides of target().
  const at::Tensor& input() const { return input_; }
  // Where the kernel writes.
  const at::Tensor& target() const { return target_; }
  const NcsLayout& layout() const { return layout_; }
  at::Tensor finish() {
    if (!target_.is_same(result_)) result_.copy_(target_);
    return result_;
  }

 private:
  at::Tensor result_, target_, input_;
  NcsLayout layout_{};
};

// The student and teacher logits of a row op as [B, K] tensors of one dtype (promoted when
// they differ), each row contiguous (rows may still be any distance apart).
struct RowLogits {
  at::Tensor student, teacher;
  int64_t rows() const { return student.size(0); }
  int64_t classes() const { return student.size(1); }
};

inline RowLogits row_logits(const at::Tensor& student, const at::Tensor& teacher, double T) {
  TORCH_CHECK(student.dim() == 2, "dinv: student_logits must be [B, K], got ", student.sizes());
  TORCH_CHECK(teacher.sizes() == student.sizes(), "dinv: teacher_logits must have the shape ",
              student.sizes(), " of student_logits, got ", teacher.sizes());
  check_floating_cpu(student, "student_logits");
  check_floating_cpu(teacher, "teacher_logits");
  TORCH_CHECK(T > 0, "dinv: the temperature T must be positive, got ", T);
  const auto dtype = at::promote_types(student.scalar_type(), teacher.scalar_type());
  const auto rows_contiguous = [dtype](const at::Tensor& t) {
    const at::Tensor same_dtype = t.to(dtype);
    return same_dtype.stride(1) == 1 ? same_dtype : same_dtype.contiguous();
  };
  return {rows_contiguous(student), rows_contiguous(teacher)};
}

// grad_rows of a row op's backward: acc [B], made contiguous.
inline at::Tensor row_grads(const at::Tensor& grad_rows, int64_t rows, at::ScalarType acc) {
  TORCH_CHECK(grad_rows.device().is_cpu(), "dinv: grad_rows must be a CPU tensor, got ",
              grad_rows.device());
  TORCH_CHECK(grad_rows.is_floating_point(), "dinv: grad_rows must be floating point, got ",
              grad_rows.scalar_type());
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == rows,
              "dinv: grad_rows must have shape [", rows, "], got ", grad_rows.sizes());
  return grad_rows.to(acc).contiguous();
}

// Runs row(b, student_row, teacher_row, scratch) for every row b of the logits, rows spread over
// the threads; scratch is a per-thread acc buffer of scratch_rows * K values.
template <typename scalar_t, typename Row>
void for_each_row(const RowLogits& logits, int64_t scratch_rows, const Row& row) {
  using acc = acc_t<scalar_t>;
  const int64_t K = logits.classes();
  const scalar_t* student = logits.student.const_data_ptr<scalar_t>();
  const scalar_t* teacher = logits.teacher.const_data_ptr<scalar_t>();
  const int64_t student_stride = logits.student.stride(0);
  const int64_t teacher_stride = logits.teacher.stride(0);
  at::parallel_for(0, logits.rows(), grain_for(K), [&](int64_t begin, int64_t end) {
    std::vector<acc> scratch(scratch_rows * K);
    for (int64_t b = begin; b < end; ++b) {
      row(b, student + b * student_stride, teacher + b * teacher_stride, scratch.data());
    }
  });
}

// A row op (js.cpp, kd.cpp) is a struct of static members:
//   kName, kBackwardName                   its schema names;
//   kScratchRows                           per-row acc scratch, in units of K values;
//   value(s, t, K, T, scratch) -> acc      the row's value (docs/kernels.md);
//   grads(g, s, t, K, T, scratch, ds, dt)  writes g times the row's gradients with respect to
//                                          the student's and the teacher's logits; ds or dt is
//                                          null for a gradient nobody asked for, whose work
//                                          grads then skips;
// value and grads are DINV_INLINE templates over (scalar_t, acc), so that their fp32 instances
// below, compiled with DINV_ISA_CLONES, inline them. rows_forward<Op> and rows_backward<Op> are
// the op's kernels, registered under its schema names.
template <typename Op>
DINV_ISA_CLONES float row_value_fp32(const float* s, const float* t, int64_t K, float T,
                                     float* scratch) {
  return Op::value(s, t, K, T, scratch);
}

template <typename Op>
DINV_ISA_CLONES void row_grads_fp32(float grad, const float* s, const float* t, int64_t K,
                                    float T, float* scratch, float* ds, float* dt) {
  Op::grads(grad, s, t, K, T, scratch, ds, dt);
}

// The forward: the acc [B] row values (acc of the logits' promoted dtype).
template <typename Op>
at::Tensor rows_forward(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                        double T) {
  const RowLogits logits = row_logits(student_logits, teacher_logits, T);
  const auto dtype = logits.student.scalar_type();
  const int64_t K = logits.classes();
  at::Tensor out = at::empty({logits.rows()}, logits.student.options().dtype(acc_dtype(dtype)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dinv_rows", [&] {
    using acc = acc_t<scalar_t>;
    const acc T_acc = static_cast<acc>(T);
    acc* values = out.mutable_data_ptr<acc>();
    for_each_row<scalar_t>(logits, Op::kScratchRows, [&](int64_t b, const scalar_t* s,
                                                         const scalar_t* t, acc* scratch) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        values[b] = row_value_fp32<Op>(s, t, K, T_acc, scratch);
      } else {
        values[b] = Op::value(s, t, K, T_acc, scratch);
      }
    });
  });
  return out;
}

// A row op's gradient output: contiguous like `logits`, or empty when not asked for.
inline at::Tensor logit_grad_tensor(const at::Tensor& logits, bool wanted) {
  return wanted ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
}

// The backward: the gradients of the student's and the teacher's logits, each contiguous in its
// own logits' dtype (they differ only when the logits' dtypes do); a gradient not asked for
// (student_grad / teacher_grad false) is an empty tensor and is not computed.
template <typename Op>
std::tuple<at::Tensor, at::Tensor> rows_backward(const at::Tensor& grad_rows,
                                                 const at::Tensor& student_logits,
                                                 const at::Tensor& teacher_logits, double T,
                                                 bool student_grad, bool teacher_grad) {
  const RowLogits logits = row_logits(student_logits, teacher_logits, T);
  const auto dtype = logits.student.scalar_type();
  const int64_t K = logits.classes();
  const at::Tensor grads = row_grads(grad_rows, logits.rows(), acc_dtype(dtype));
  at::Tensor grad_student = logit_grad_tensor(logits.student, student_grad);
  at::Tensor grad_teacher = logit_grad_tensor(logits.teacher, teacher_grad);
  if (student_grad || teacher_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dinv_rows_backward", [&] {
      using acc = acc_t<scalar_t>;
      const acc T_acc = static_cast<acc>(T);
      const acc* g = grads.const_data_ptr<acc>();
      scalar_t* ds = student_grad ? grad_student.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* dt = teacher_grad ? grad_teacher.mutable_data_ptr<scalar_t>() : nullptr;
      for_each_row<scalar_t>(logits, Op::kScratchRows, [&](int64_t b, const scalar_t* s,
                                                           const scalar_t* t, acc* scratch) {
        scalar_t* ds_b = ds ? ds + b * K : nullptr;
        scalar_t* dt_b = dt ? dt + b * K : nullptr;
        if constexpr (std::is_same_v<scalar_t, float>) {
          row_grads_fp32<Op>(g[b], s, t, K, T_acc, scratch, ds_b, dt_b);
        } else {
          Op::grads(g[b], s, t, K, T_acc, scratch, ds_b, dt_b);
        }
      });
    });
  }
  return {grad_student.to(student_logits.scalar_type()),
          grad_teacher.to(teacher_logits.scalar_type())};
}

// Registers Op's kernels under its schema names Op::kName and Op::kBackwardName.
template <typename Op>
void impl_row_op(torch::Library& m) {
  m.impl(Op::kName, &rows_forward<Op>);
  m.impl(Op::kBackwardName, &rows_backward<Op>);
}

// Normalization of a softmax row: prob[j] = exp(z_j - max_z) / sum and
// log prob[j] = (z_j - max_z) - log_sum.
template <typename acc>
struct SoftmaxRow {
  acc max_z;
  acc log_sum;
  DINV_INLINE acc log_prob(acc z) const { return (z - max_z) - log_sum; }
};

// exp and log that vectorize. std::exp/std::log are library calls, which keep `#pragma omp simd`
// loops scalar (vector math needs -ffast-math here); these are branch-free polynomials with
// Cephes' expf/logf coefficients, within about 2 ulp of the rounded result. fp64 (the gradcheck
// dtype, where accuracy matters more than speed) keeps the library calls.
//
// exp_simd: for x <= 88 (softmax exponents are <= 0). Results below FLT_MIN flush to 0.
DINV_INLINE float exp_simd(float x) {
  constexpr float kMin = -87.33654475f;  // log(FLT_MIN)
  const float xc = std::min(std::max(x, kMin), 88.0f);
  // x = n ln2 + r with |r| <= ln2/2: n rounded to nearest by the 1.5 * 2^23 trick (floor and
  // nearbyint are calls without SSE4.1); ln2 split in two (Cody-Waite) so that r is exact.
  constexpr float kRound = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const float result = p * two_n;  // computed unconditionally: the select below then vectorizes
  return x < kMin ? 0.0f : result;
}
inline double exp_simd(double x) {
  return std::exp(x);
}

// log_simd: for positive normal x (the callers' arguments are clamped probabilities).
DINV_INLINE float log_simd(float x) {
  // x = m 2^e with m in [sqrt(1/2), sqrt(2)), log x = e ln2 + log1p(m - 1).
  const int32_t bits = std::bit_cast<int32_t>(x);
  const float m1 = std::bit_cast<float>((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const bool halve = m1 > 1.41421356f;
  const float e = static_cast<float>((bits >> 23) - 127 + (halve ? 1 : 0));
  const float f = m1 * (halve ? 0.5f : 1.0f) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z + e * -2.12194440e-4f - 0.5f * z;
  return (f + y) + e * 0.693359375f;
}
inline double log_simd(double x) {
  return std::log(x);
}

// Numerically stable softmax of one row of z = logits / T: writes z[0 .. classes) and
// prob[0 .. classes); z may be prob (then only the probabilities remain).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
DINV_INLINE SoftmaxRow<acc> softmax_row(const scalar_t* logits, int64_t classes, acc T, acc* z,
                                        acc* prob) {
  acc max_z = -std::numeric_limits<acc>::infinity();
#pragma omp simd reduction(max : max_z)
  for (int64_t j = 0; j < classes; ++j) {
    z[j] = static_cast<acc>(logits[j]) / T;
    max_z = std::max(max_z, z[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < classes; ++j) prob[j] = exp_simd(z[j] - max_z);
  const acc sum = lane_sum<acc>(classes, [prob](int64_t j) { return prob[j]; });
  const acc inv_sum = acc(1) / sum;
#pragma omp simd
  for (int64_t j = 0; j < classes; ++j) prob[j] *= inv_sum;
  return {max_z, std::log(sum)};
}

// The two softmaxes of a row op's row pair, in a scratch of 4K acc values: the scaled logits zs,
// zt (which the op may overwrite once it has read them) and the probabilities p, q.
template <typename acc>
struct RowPair {
  acc *zs, *zt, *p, *q;
  SoftmaxRow<acc> ps, qs;
};

template <typename scalar_t, typename acc = acc_t<scalar_t>>
DINV_INLINE RowPair<acc> row_pair(const scalar_t* s, const scalar_t* t, int64_t K, acc T,
                                  acc* scratch) {
  acc *zs = scratch, *zt = zs + K, *p = zt + K, *q = p + K;
  const SoftmaxRow<acc> ps = softmax_row(s, K, T, zs, p);
  const SoftmaxRow<acc> qs = softmax_row(t, K, T, zt, q);
  return {zs, zt, p, q, ps, qs};
}

}  // namespace dinv::cpu

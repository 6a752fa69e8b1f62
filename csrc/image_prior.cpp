// CPU kernels of the image priors, total variation and L2 (docs/kernels.md section 3): one pass
// over x forward, one backward.
//
// x [N, C, H, W] is walked as lines of the W dimension. In the generic layout (contiguous NCHW
// and anything else) a line is one (n, c, h) row, whose right-hand neighbour of element k is
// k + 1. In channels_last a line is a whole (n, h) row of W*C contiguous elements, whose right-hand
// neighbour of element k = w*C + c is k + C: the same loops then run over contiguous memory.
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

struct TvLayout {
  int64_t planes;           // N*C, or N when a line spans all channels
  int64_t plane_channels;   // C, or 1 when a line spans all channels
  int64_t sN, sC;           // plane p = (n, c) = (p / plane_channels, p % plane_channels)
  int64_t lines_per_plane;  // H
  int64_t line_stride;      // stride of H
  int64_t len;              // elements per line: W, or W*C
  int64_t elem_stride;      // stride between the elements of a line
  int64_t step;             // index distance from an element to its right-hand neighbour
  int64_t lines() const { return planes * lines_per_plane; }
  int64_t line_offset(int64_t line) const {
    const int64_t plane = line / lines_per_plane, h = line % lines_per_plane;
    return plane / plane_channels * sN + plane % plane_channels * sC + h * line_stride;
  }
};

TvLayout tv_layout(const at::Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (C > 1 && x.stride(1) == 1 && x.stride(3) == C) {  // channels_last: (w, c) is contiguous
    return {N, 1, x.stride(0), 0, H, x.stride(2), W * C, 1, C};
  }
  return {N * C, C, x.stride(0), x.stride(1), H, x.stride(2), W, x.stride(3), 1};
}

void check_prior_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "dinv: image_prior expects x of shape [N, C, H, W], got ", x.sizes());
  check_floating_cpu(x, "x");
}

template <typename acc>
acc sign(acc d) {
  return static_cast<acc>((d > 0) - (d < 0));
}

// The TV sums of one line, both powers: l1[k] += Σ|d_k|, l2[k] += Σ d_k² over the differences the
// line's elements anchor (element (h, w) anchors d_k(h, w) of docs/kernels.md); returns the line's
// Σ x². `below` is the next line down, or null for the last line of a plane (which has no
// vertical differences).
template <bool kUnitStride, typename scalar_t, typename acc = acc_t<scalar_t>>
acc line_sums(const scalar_t* line, const scalar_t* below, const TvLayout& layout, acc* l1,
              acc* l2) {
  const int64_t es = kUnitStride ? 1 : layout.elem_stride;
  const int64_t right = layout.step * es;              // address distance to the right neighbour
  const int64_t paired = std::max<int64_t>(0, layout.len - layout.step);  // have a right neighbour
  const auto load = [es](const scalar_t* p, int64_t k) { return static_cast<acc>(p[k * es]); };
  acc a1 = 0, a2 = 0, a3 = 0, a4 = 0, q1 = 0, q2 = 0, q3 = 0, q4 = 0, sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t k = 0; k < layout.len; ++k) sq += load(line, k) * load(line, k);
  if (below) {
#pragma omp simd reduction(+ : a1, a2, a3, a4, q1, q2, q3, q4)
    for (int64_t k = 0; k < paired; ++k) {
      const acc x0 = load(line, k), x1 = load(line + right, k);
      const acc y0 = load(below, k), y1 = load(below + right, k);
      const acc d1 = x0 - x1, d2 = x0 - y0, d3 = y0 - x1, d4 = x0 - y1;
      a1 += std::abs(d1), a2 += std::abs(d2), a3 += std::abs(d3), a4 += std::abs(d4);
      q1 += d1 * d1, q2 += d2 * d2, q3 += d3 * d3, q4 += d4 * d4;
    }
    for (int64_t k = paired; k < layout.len; ++k) {
      const acc d2 = load(line, k) - load(below, k);
      a2 += std::abs(d2), q2 += d2 * d2;
    }
  } else {
#pragma omp simd reduction(+ : a1, q1)
    for (int64_t k = 0; k < paired; ++k) {
      const acc d1 = load(line, k) - load(line + right, k);
      a1 += std::abs(d1), q1 += d1 * d1;
    }
  }
  l1[0] += a1, l1[1] += a2, l1[2] += a3, l1[3] += a4;
  l2[0] += q1, l2[1] += q2, l2[2] += q3, l2[3] += q4;
  return sq;
}

// partials [tasks, 8] (the l1 then l2 sums of each task's lines) and line_sq [lines].
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void prior_sums_kernel(const TvLayout& layout, const scalar_t* x, acc* partials, acc* line_sq,
                       int64_t lines_per_task, int64_t tasks) {
  const bool unit_stride = layout.elem_stride == 1;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      acc* l1 = partials + 8 * task;
      const int64_t last = std::min(layout.lines(), (task + 1) * lines_per_task);
      for (int64_t line = task * lines_per_task; line < last; ++line) {
        const scalar_t* a = x + layout.line_offset(line);
        const bool has_below = line % layout.lines_per_plane + 1 < layout.lines_per_plane;
        const scalar_t* below = has_below ? a + layout.line_stride : nullptr;
        line_sq[line] = unit_stride ? line_sums<true>(a, below, layout, l1, l1 + 4)
                                    : line_sums<false>(a, below, layout, l1, l1 + 4);
      }
    }
  });
}

// The contribution of one family of differences (power 1 when kSign: sign(d); else d) to a line's
// gradient, gathered from the line itself, the one above (null on the first line of a plane) and
// the one below (null on the last): + where an element is a difference's first operand, − where
// it is the second (docs/kernels.md).
template <bool kSign, bool kUnitStride, typename scalar_t, typename acc = acc_t<scalar_t>>
void add_tv_grad(const scalar_t* line, const scalar_t* above, const scalar_t* below,
                 const TvLayout& layout, const acc* coef, acc* grad) {
  const int64_t es = kUnitStride ? 1 : layout.elem_stride;
  const int64_t len = layout.len, step = layout.step;
  const int64_t right = step * es;
  const int64_t paired = std::max<int64_t>(0, len - step);
  const auto load = [es](const scalar_t* p, int64_t k) { return static_cast<acc>(p[k * es]); };
  const auto slope = [](acc d) { return kSign ? sign(d) : d; };
  const acc c1 = coef[0], c2 = coef[1], c3 = coef[2], c4 = coef[3];

  // d1 = x[h, w] - x[h, w+1]
#pragma omp simd
  for (int64_t k = 0; k < paired; ++k) grad[k] += c1 * slope(load(line, k) - load(line + right, k));
#pragma omp simd
  for (int64_t k = step; k < len; ++k) grad[k] -= c1 * slope(load(line - right, k) - load(line, k));
  // The terms with a neighbouring line `other` (the one below or above) in which this element is
  // the first operand of (this − other's element in the column) with coefficient c_column and of
  // (this − other's right-hand element) with c_right, and the second operand of (other's
  // left-hand element − this) with c_left. (Written as `this − other` for the line above too:
  // −c·slope(a − b) = c·slope(b − a) exactly.)
  const auto add_neighbour = [&](const scalar_t* other, acc c_column, acc c_right, acc c_left) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) grad[k] += c_column * slope(load(line, k) - load(other, k));
#pragma omp simd
    for (int64_t k = 0; k < paired; ++k) {
      grad[k] += c_right * slope(load(line, k) - load(other + right, k));
    }
#pragma omp simd
    for (int64_t k = step; k < len; ++k) {
      grad[k] -= c_left * slope(load(other - right, k) - load(line, k));
    }
  };
  // below: d2 = x[h, w] − x[h+1, w], d4 = x[h, w] − x[h+1, w+1], d3 = x[h+1, w-1] − x[h, w];
  // above: d2 = x[h-1, w] − x[h, w], d3 = x[h, w] − x[h-1, w+1], d4 = x[h-1, w-1] − x[h, w]
  if (below) add_neighbour(below, c2, c4, c3);
  if (above) add_neighbour(above, c2, c3, c4);
}

// Which terms the backward computes: a family whose four coefficients are all zero (e.g. the
// Inverter's default tv_l1 = 0) is skipped, which halves the backward's arithmetic.
struct PriorTerms {
  bool l1, l2;
};

template <bool kUnitStride, typename scalar_t, typename acc = acc_t<scalar_t>>
void line_grad(const scalar_t* line, const scalar_t* above, const scalar_t* below,
               const TvLayout& layout, PriorTerms terms, const acc* tv_coef, acc sq_coef,
               acc* grad, scalar_t* out) {
  const int64_t es = kUnitStride ? 1 : layout.elem_stride;
#pragma omp simd
  for (int64_t k = 0; k < layout.len; ++k) grad[k] = sq_coef * static_cast<acc>(line[k * es]);
  if (terms.l1) add_tv_grad<true, kUnitStride>(line, above, below, layout, tv_coef, grad);
  if (terms.l2) add_tv_grad<false, kUnitStride>(line, above, below, layout, tv_coef + 4, grad);
#pragma omp simd
  for (int64_t k = 0; k < layout.len; ++k) out[k * es] = static_cast<scalar_t>(grad[k]);
}

// x and out share strides (and so the layout).
template <typename scalar_t, typename acc = acc_t<scalar_t>>
void prior_backward_kernel(const TvLayout& layout, const scalar_t* x, PriorTerms terms,
                           const acc* tv_coef, const acc* sq_coef, scalar_t* out) {
  const bool unit_stride = layout.elem_stride == 1;
  const int64_t lines_per_image = layout.lines_per_plane * layout.plane_channels;
  at::parallel_for(0, layout.lines(), grain_for(layout.len), [&](int64_t begin, int64_t end) {
    std::vector<acc> grad(layout.len);
    for (int64_t line = begin; line < end; ++line) {
      const int64_t offset = layout.line_offset(line);
      const int64_t h = line % layout.lines_per_plane;
      const scalar_t* a = x + offset;
      const scalar_t* above = h > 0 ? a - layout.line_stride : nullptr;
      const scalar_t* below = h + 1 < layout.lines_per_plane ? a + layout.line_stride : nullptr;
      const acc image_coef = sq_coef[line / lines_per_image];
      if (unit_stride) {
        line_grad<true>(a, above, below, layout, terms, tv_coef, image_coef, grad.data(),
                        out + offset);
      } else {
        line_grad<false>(a, above, below, layout, terms, tv_coef, image_coef, grad.data(),
                         out + offset);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> image_prior_sums(const at::Tensor& x) {
  check_prior_input(x);
  const TvLayout layout = tv_layout(x);
  const int64_t N = x.size(0);
  const auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  if (x.numel() == 0) return {at::zeros({2, 4}, acc_options), at::zeros({N}, acc_options)};
  // Per-task partial sums and per-line squares, added up by torch's (cascaded) sums: fixed tasks
  // keep the result independent of the thread count.
  const int64_t lines_per_task = ceil_div(kElementsPerPiece, layout.len);
  const int64_t tasks = ceil_div(layout.lines(), lines_per_task);
  at::Tensor partials = at::zeros({tasks, 8}, acc_options);
  at::Tensor line_sq = at::empty({layout.lines()}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "image_prior_sums",
                                  [&] {
    using acc = acc_t<scalar_t>;
    prior_sums_kernel<scalar_t>(layout, x.const_data_ptr<scalar_t>(),
                                partials.mutable_data_ptr<acc>(), line_sq.mutable_data_ptr<acc>(),
                                lines_per_task, tasks);
  });
  // Lines are numbered image by image in both layouts.
  return {partials.sum(0).view({2, 4}), line_sq.view({N, -1}).sum(1)};
}

at::Tensor image_prior_backward(const at::Tensor& x_in, const at::Tensor& tv_coef,
                                const at::Tensor& sq_coef) {
  check_prior_input(x_in);
  const int64_t N = x_in.size(0);
  const auto acc_type = acc_dtype(x_in.scalar_type());
  TORCH_CHECK(tv_coef.device().is_cpu() && sq_coef.device().is_cpu(),
              "dinv: tv_coef and sq_coef must be CPU tensors, got ", tv_coef.device(), " and ",
              sq_coef.device());
  TORCH_CHECK(tv_coef.is_floating_point() && tv_coef.numel() == 8,
              "dinv: tv_coef must be a floating tensor of shape [2, 4], got ",
              tv_coef.scalar_type(), " ", tv_coef.sizes());
  TORCH_CHECK(sq_coef.is_floating_point() && sq_coef.dim() == 1 && sq_coef.size(0) == N,
              "dinv: sq_coef must be a floating tensor of shape [", N, "], got ",
              sq_coef.scalar_type(), " ", sq_coef.sizes());
  const at::Tensor tv_acc = tv_coef.reshape({8}).to(acc_type).contiguous();
  const at::Tensor sq_acc = sq_coef.to(acc_type).contiguous();
  const PriorTerms terms{tv_acc.narrow(0, 0, 4).ne(0).any().item<bool>(),
                         tv_acc.narrow(0, 4, 4).ne(0).any().item<bool>()};
  at::Tensor out = at::empty_like(x_in);
  if (out.numel() == 0) return out;
  // empty_like keeps x's strides when x is dense; otherwise read a copy of x in out's strides.
  const at::Tensor x = x_in.strides() == out.strides() ? x_in : at::empty_like(out).copy_(x_in);
  const TvLayout layout = tv_layout(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "image_prior_backward", [&] {
    using acc = acc_t<scalar_t>;
    prior_backward_kernel<scalar_t>(layout, x.const_data_ptr<scalar_t>(), terms,
                                    tv_acc.const_data_ptr<acc>(), sq_acc.const_data_ptr<acc>(),
                                    out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  m.impl("image_prior_sums", &dinv::cpu::image_prior_sums);
  m.impl("image_prior_backward", &dinv::cpu::image_prior_backward);
}

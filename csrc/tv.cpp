// CPU kernels of the total-variation loss (docs/kernels.md section 3).
//
// x [N, C, H, W] is walked as lines of the W dimension. In the generic layout (contiguous NCHW
// and anything else) a line is one (n, c, h) row, whose right-hand neighbour of element k is
// k + 1. In channels_last a line is a whole (n, h) row of W*C contiguous elements, whose right-hand
// neighbour of element k = w*C + c is k + C: the same loops then run over contiguous memory.
#include <torch/library.h>

#include <cmath>
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

void check_tv_input(const at::Tensor& x, int64_t power) {
  TORCH_CHECK(x.dim() == 4, "dinv: tv expects x of shape [N, C, H, W], got ", x.sizes());
  check_floating_cpu(x, "x");
  TORCH_CHECK(power == 1 || power == 2, "dinv: tv power must be 1 or 2, got ", power);
}

template <int kPower, typename acc>
acc tv_term(acc d) {
  if constexpr (kPower == 1) {
    return std::abs(d);
  } else {
    return d * d;
  }
}

// d/dd of tv_term, without the factor 2 of power 2 (the caller's coef carries it).
template <int kPower, typename acc>
acc tv_slope(acc d) {
  if constexpr (kPower == 1) {
    return static_cast<acc>((d > 0) - (d < 0));
  } else {
    return d;
  }
}

// Adds the line's terms of the four differences to sums[0..3]. `below` is the next line down,
// or null for the last line of a plane (which has no vertical differences).
template <int kPower, bool kUnitStride, typename scalar_t, typename acc = acc_t<scalar_t>>
void line_sums(const scalar_t* line, const scalar_t* below, const TvLayout& layout, acc* sums) {
  const int64_t es = kUnitStride ? 1 : layout.elem_stride;
  const int64_t right = layout.step * es;              // address distance to the right neighbour
  const int64_t paired = std::max<int64_t>(0, layout.len - layout.step);  // have a right neighbour
  acc s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  if (below) {
#pragma omp simd reduction(+ : s1, s2, s3, s4)
    for (int64_t k = 0; k < paired; ++k) {
      const acc a0 = static_cast<acc>(line[k * es]), a1 = static_cast<acc>(line[k * es + right]);
      const acc b0 = static_cast<acc>(below[k * es]), b1 = static_cast<acc>(below[k * es + right]);
      s1 += tv_term<kPower>(a0 - a1);
      s2 += tv_term<kPower>(a0 - b0);
      s3 += tv_term<kPower>(b0 - a1);
      s4 += tv_term<kPower>(a0 - b1);
    }
#pragma omp simd reduction(+ : s2)
    for (int64_t k = paired; k < layout.len; ++k) {
      s2 += tv_term<kPower>(static_cast<acc>(line[k * es]) - static_cast<acc>(below[k * es]));
    }
  } else {
#pragma omp simd reduction(+ : s1)
    for (int64_t k = 0; k < paired; ++k) {
      s1 += tv_term<kPower>(static_cast<acc>(line[k * es]) -
                            static_cast<acc>(line[k * es + right]));
    }
  }
  sums[0] += s1;
  sums[1] += s2;
  sums[2] += s3;
  sums[3] += s4;
}

template <int kPower, typename scalar_t, typename acc = acc_t<scalar_t>>
void tv_sums_kernel(const TvLayout& layout, const scalar_t* x, acc* partials,
                    int64_t lines_per_task, int64_t tasks) {
  const bool unit_stride = layout.elem_stride == 1;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      acc* sums = partials + 4 * task;
      const int64_t last = std::min(layout.lines(), (task + 1) * lines_per_task);
      for (int64_t line = task * lines_per_task; line < last; ++line) {
        const scalar_t* a = x + layout.line_offset(line);
        const bool has_below = line % layout.lines_per_plane + 1 < layout.lines_per_plane;
        const scalar_t* below = has_below ? a + layout.line_stride : nullptr;
        if (unit_stride) {
          line_sums<kPower, true>(a, below, layout, sums);
        } else {
          line_sums<kPower, false>(a, below, layout, sums);
        }
      }
    }
  });
}

// Gradient of one line, gathered from the line itself, the one above (null on the first line of a
// plane) and the one below (null on the last): see docs/kernels.md for which differences an
// element enters first (+) and second (-). grad is an acc scratch line of layout.len elements.
template <int kPower, bool kUnitStride, typename scalar_t, typename acc = acc_t<scalar_t>>
void line_grad(const scalar_t* line, const scalar_t* above, const scalar_t* below,
               const TvLayout& layout, const acc* coef, acc* grad, scalar_t* out) {
  const int64_t es = kUnitStride ? 1 : layout.elem_stride;
  const int64_t len = layout.len, step = layout.step;
  const int64_t right = step * es;
  const int64_t paired = std::max<int64_t>(0, len - step);
  const auto load = [es](const scalar_t* p, int64_t k) { return static_cast<acc>(p[k * es]); };
  const acc c1 = coef[0], c2 = coef[1], c3 = coef[2], c4 = coef[3];

  // d1 = x[h, w] - x[h, w+1]
#pragma omp simd
  for (int64_t k = 0; k < paired; ++k) {
    grad[k] = c1 * tv_slope<kPower>(load(line, k) - load(line + right, k));
  }
  for (int64_t k = paired; k < len; ++k) grad[k] = 0;
#pragma omp simd
  for (int64_t k = step; k < len; ++k) {
    grad[k] -= c1 * tv_slope<kPower>(load(line - right, k) - load(line, k));
  }
  if (below) {
    // first operand of d2 = x[h, w] - x[h+1, w] and of d4 = x[h, w] - x[h+1, w+1];
    // second operand of d3 = x[h+1, w-1] - x[h, w]
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      grad[k] += c2 * tv_slope<kPower>(load(line, k) - load(below, k));
    }
#pragma omp simd
    for (int64_t k = 0; k < paired; ++k) {
      grad[k] += c4 * tv_slope<kPower>(load(line, k) - load(below + right, k));
    }
#pragma omp simd
    for (int64_t k = step; k < len; ++k) {
      grad[k] -= c3 * tv_slope<kPower>(load(below - right, k) - load(line, k));
    }
  }
  if (above) {
    // second operand of d2 = x[h-1, w] - x[h, w] and of d4 = x[h-1, w-1] - x[h, w];
    // first operand of d3 = x[h, w] - x[h-1, w+1]
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      grad[k] -= c2 * tv_slope<kPower>(load(above, k) - load(line, k));
    }
#pragma omp simd
    for (int64_t k = 0; k < paired; ++k) {
      grad[k] += c3 * tv_slope<kPower>(load(line, k) - load(above + right, k));
    }
#pragma omp simd
    for (int64_t k = step; k < len; ++k) {
      grad[k] -= c4 * tv_slope<kPower>(load(above - right, k) - load(line, k));
    }
  }
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k * es] = static_cast<scalar_t>(grad[k]);
}

// x and out share strides (and so the layout).
template <int kPower, typename scalar_t, typename acc = acc_t<scalar_t>>
void tv_backward_kernel(const TvLayout& layout, const scalar_t* x, const acc* coef,
                        scalar_t* out) {
  const bool unit_stride = layout.elem_stride == 1;
  at::parallel_for(0, layout.lines(), grain_for(layout.len), [&](int64_t begin, int64_t end) {
    std::vector<acc> grad(layout.len);
    for (int64_t line = begin; line < end; ++line) {
      const int64_t offset = layout.line_offset(line);
      const int64_t h = line % layout.lines_per_plane;
      const scalar_t* a = x + offset;
      const scalar_t* above = h > 0 ? a - layout.line_stride : nullptr;
      const scalar_t* below = h + 1 < layout.lines_per_plane ? a + layout.line_stride : nullptr;
      if (unit_stride) {
        line_grad<kPower, true>(a, above, below, layout, coef, grad.data(), out + offset);
      } else {
        line_grad<kPower, false>(a, above, below, layout, coef, grad.data(), out + offset);
      }
    }
  });
}

at::Tensor tv_sums(const at::Tensor& x, int64_t power) {
  check_tv_input(x, power);
  const TvLayout layout = tv_layout(x);
  const auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  if (x.numel() == 0) return at::zeros({4}, acc_options);
  // Per-task partial sums, added up by torch's (cascaded) sum: fixed tasks keep the result
  // independent of the thread count.
  const int64_t lines_per_task = ceil_div(kElementsPerPiece, layout.len);
  const int64_t tasks = ceil_div(layout.lines(), lines_per_task);
  at::Tensor partials = at::zeros({tasks, 4}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_sums", [&] {
    using acc = acc_t<scalar_t>;
    const auto kernel = power == 1 ? tv_sums_kernel<1, scalar_t> : tv_sums_kernel<2, scalar_t>;
    kernel(layout, x.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<acc>(),
           lines_per_task, tasks);
  });
  return partials.sum(0);
}

at::Tensor tv_backward(const at::Tensor& x_in, const at::Tensor& coef, int64_t power) {
  check_tv_input(x_in, power);
  const auto acc_type = acc_dtype(x_in.scalar_type());
  TORCH_CHECK(coef.device().is_cpu(), "dinv: coef must be a CPU tensor, got ", coef.device());
  TORCH_CHECK(coef.is_floating_point() && coef.numel() == 4,
              "dinv: coef must be a floating tensor of 4 elements, got ", coef.scalar_type(), " ",
              coef.sizes());
  const at::Tensor coef_acc = coef.reshape({4}).to(acc_type).contiguous();
  at::Tensor out = at::empty_like(x_in);
  if (out.numel() == 0) return out;
  // empty_like keeps x's strides when x is dense; otherwise read a copy of x in out's strides.
  const at::Tensor x = x_in.strides() == out.strides() ? x_in : at::empty_like(out).copy_(x_in);
  const TvLayout layout = tv_layout(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "tv_backward", [&] {
    using acc = acc_t<scalar_t>;
    const auto kernel =
        power == 1 ? tv_backward_kernel<1, scalar_t> : tv_backward_kernel<2, scalar_t>;
    kernel(layout, x.const_data_ptr<scalar_t>(), coef_acc.const_data_ptr<acc>(),
           out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  m.impl("tv_sums", &dinv::cpu::tv_sums);
  m.impl("tv_backward", &dinv::cpu::tv_backward);
}

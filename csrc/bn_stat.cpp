// CPU kernels of the per-channel statistics and of the fused eval-mode BatchNorm
// (docs/kernels.md sections 1 and 2).
//
// The input is seen as [N, C, S] (NcsLayout) and walked by one of two paths:
//  - planes (contiguous NCHW, and any other strides): the work items are chunks of the (n, c)
//    planes, walked along S with a contiguous, vectorized inner loop when S has stride 1;
//  - rows (channels_last NHWC, and [B, C] inputs): the work items are rows (n, s), each holding
//    the C channels contiguously, so the inner loop runs over channels.
// Either way x is read from memory once; partial statistics are merged per channel with Chan's
// formula in a fixed order, so the results do not depend on the number of threads.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

// Statistics are accumulated for x - pivot_c, the pivot of a channel being its first element:
// the means that get merged are then of the order of the spread of x rather than of |mean|, and
// keep their precision in fp32 even when |mean| >> std.
//
// Both paths cut the work into chunks of about this many elements (8 KiB of fp32). A chunk is
// summed, then re-read from L1 to sum the squared deviations from its own mean (two-pass
// accuracy for the price of one pass over memory), then merged with Chan's formula.
constexpr int64_t kCacheChunk = 2048;

// Element (n, c, s) of an [N, C, S] tensor sits at data + n*sN + c*sC + s*sS.
template <typename T>
struct NcsPtr {
  T* data;
  int64_t sN, sC, sS;
  NcsPtr(T* data, const NcsLayout& layout)
      : data(data), sN(layout.sN), sC(layout.sC), sS(layout.sS) {}
  T* at(int64_t n, int64_t c, int64_t s) const { return data + n * sN + c * sC + s * sS; }
};

// Start of chunk i when [0, total) is cut into `chunks` chunks of sizes differing by at most 1.
int64_t chunk_begin(int64_t i, int64_t chunks, int64_t total) {
  return i * total / chunks;
}

// Whether the rows path serves a layout whose tensors all have unit channel / spatial strides
// as given: it needs contiguous channels, and is preferred unless the planes are contiguous too
// (then C == 1 or S == 1, and the inner loop should run over the dim that is not 1).
bool use_rows(const NcsLayout& layout, bool unit_channel_stride, bool unit_spatial_stride) {
  return unit_channel_stride && layout.C > 1 && (layout.S == 1 || !unit_spatial_stride);
}

// ---------------------------------------------------------------------------------------------
// Statistics, optionally fused with writing the eval-mode BatchNorm output.

// y = (x - running_mean_c) * scale_c + bias_c, with scale_c = weight_c / sqrt(running_var_c + eps).
template <typename acc>
struct BnAffine {
  const acc* running_mean = nullptr;
  const acc* scale = nullptr;
  const acc* bias = nullptr;
};

// Statistics of x - pivot over one plane chunk of len elements at x[i * stride] (stride 1 when
// kUnitStride), also writing y[i * stride] when kFused.
template <bool kUnitStride, bool kFused, typename scalar_t, typename acc = acc_t<scalar_t>>
MeanM2<acc> chunk_stats(const scalar_t* x, scalar_t* y, int64_t stride, int64_t len, acc pivot,
                        acc running_mean, acc scale, acc bias) {
  const int64_t step = kUnitStride ? 1 : stride;
  const acc sum = lane_sum<acc>(len, [&](int64_t i) {
    const acc v = static_cast<acc>(x[i * step]);
    if constexpr (kFused) y[i * step] = static_cast<scalar_t>((v - running_mean) * scale + bias);
    return v - pivot;
  });
  const acc mean = sum / static_cast<acc>(len);
  const acc m2 = lane_sum<acc>(len, [&](int64_t i) {
    const acc d = (static_cast<acc>(x[i * step]) - pivot) - mean;
    return d * d;
  });
  return {len, mean, m2};
}

template <typename scalar_t, typename acc = acc_t<scalar_t>>
std::vector<acc> channel_pivots(const NcsLayout& layout, const scalar_t* x) {
  std::vector<acc> pivot(layout.C);
  for (int64_t c = 0; c < layout.C; ++c) pivot[c] = static_cast<acc>(x[c * layout.sC]);
  return pivot;
}

// Writes the merged statistics of channel c (of x - pivot_c) as the mean and biased variance of x.
template <typename acc>
void store_channel(const MeanM2<acc>& total, acc pivot, acc* mean, acc* var) {
  *mean = pivot + total.mean;
  *var = total.m2 / static_cast<acc>(total.count);
}

template <bool kFused, typename scalar_t, typename acc = acc_t<scalar_t>>
void stats_planes(const NcsLayout& layout, const scalar_t* x, scalar_t* y,
                  const BnAffine<acc>& bn, acc* mean, acc* var) {
  const int64_t N = layout.N, C = layout.C, S = layout.S;
  const int64_t chunks = ceil_div(S, kCacheChunk);
  const int64_t units = N * C * chunks;
  const NcsPtr<const scalar_t> xp(x, layout);
  const NcsPtr<scalar_t> yp(y, layout);
  const std::vector<acc> pivot = channel_pivots(layout, x);
  // Indexed [c][n][chunk], so that the parts of one channel are adjacent for the merge.
  std::vector<MeanM2<acc>> parts(units);
  at::parallel_for(0, units, grain_for(S / chunks), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {  // (n, c, chunk): memory order for NCHW
      const int64_t chunk = unit % chunks, c = unit / chunks % C, n = unit / chunks / C;
      const int64_t s0 = chunk_begin(chunk, chunks, S);
      const int64_t len = chunk_begin(chunk + 1, chunks, S) - s0;
      acc running_mean = 0, scale = 0, bias = 0;
      if constexpr (kFused) {
        running_mean = bn.running_mean[c];
        scale = bn.scale[c];
        bias = bn.bias[c];
      }
      const scalar_t* xc = xp.at(n, c, s0);
      scalar_t* yc = kFused ? yp.at(n, c, s0) : nullptr;
      parts[(c * N + n) * chunks + chunk] =
          layout.sS == 1 ? chunk_stats<true, kFused>(xc, yc, 1, len, pivot[c], running_mean,
                                                     scale, bias)
                         : chunk_stats<false, kFused>(xc, yc, layout.sS, len, pivot[c],
                                                      running_mean, scale, bias);
    }
  });
  const int64_t parts_per_channel = N * chunks;
  at::parallel_for(0, C, grain_for(parts_per_channel), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const MeanM2<acc>* channel_parts = parts.data() + c * parts_per_channel;
      const auto total = merge_tree<acc>(0, parts_per_channel,
                                         [&](int64_t i) { return channel_parts[i]; });
      store_channel(total, pivot[c], mean + c, var + c);
    }
  });
}

template <bool kFused, typename scalar_t, typename acc = acc_t<scalar_t>>
void stats_rows(const NcsLayout& layout, const scalar_t* x, scalar_t* y, const BnAffine<acc>& bn,
                acc* mean, acc* var) {
  const int64_t C = layout.C, S = layout.S;
  const int64_t rows = layout.N * S;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kCacheChunk / C);
  const std::vector<acc> pivot = channel_pivots(layout, x);
  // Tasks are fixed row ranges (not per-thread ones) so the merge order is thread-independent.
  const int64_t rows_per_task = ceil_div(kElementsPerPiece, C);
  const int64_t tasks = ceil_div(rows, rows_per_task);
  // Running statistics of each task, of x - pivot.
  std::vector<int64_t> task_count(tasks, 0);
  std::vector<acc> task_mean(tasks * C, 0), task_m2(tasks * C, 0);
  const auto row_data = [&](int64_t row) { return row / S * layout.sN + row % S * layout.sS; };
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> chunk_mean(C), chunk_m2(C);
    for (int64_t task = begin; task < end; ++task) {
      acc* run_mean = task_mean.data() + task * C;
      acc* run_m2 = task_m2.data() + task * C;
      int64_t count = 0;
      const int64_t task_end = std::min(rows, (task + 1) * rows_per_task);
      for (int64_t first = task * rows_per_task; first < task_end; first += rows_per_chunk) {
        const int64_t last = std::min(task_end, first + rows_per_chunk);
        std::fill(chunk_mean.begin(), chunk_mean.end(), acc(0));
        for (int64_t row = first; row < last; ++row) {
          const int64_t offset = row_data(row);
          const scalar_t* xr = x + offset;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc v = static_cast<acc>(xr[c]);
            chunk_mean[c] += v - pivot[c];
            if constexpr (kFused) {
              y[offset + c] =
                  static_cast<scalar_t>((v - bn.running_mean[c]) * bn.scale[c] + bn.bias[c]);
            }
          }
        }
        const int64_t chunk_count = last - first;
        const acc chunk_rows = static_cast<acc>(chunk_count);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) chunk_mean[c] /= chunk_rows;
        std::fill(chunk_m2.begin(), chunk_m2.end(), acc(0));
        for (int64_t row = first; row < last; ++row) {
          const scalar_t* xr = x + row_data(row);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const acc d = (static_cast<acc>(xr[c]) - pivot[c]) - chunk_mean[c];
            chunk_m2[c] += d * d;
          }
        }
        // Chan's merge of the chunk into the running statistics; every channel has the same
        // counts, so the weights are scalars.
        const acc chunk_fraction = chunk_rows / static_cast<acc>(count + chunk_count);
        const acc cross_weight = static_cast<acc>(count) * chunk_fraction;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const acc delta = chunk_mean[c] - run_mean[c];
          run_mean[c] += delta * chunk_fraction;
          run_m2[c] += chunk_m2[c] + delta * delta * cross_weight;
        }
        count += chunk_count;
      }
      task_count[task] = count;
    }
  });
  at::parallel_for(0, C, grain_for(tasks), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const auto total = merge_tree<acc>(0, tasks, [&](int64_t t) {
        return MeanM2<acc>{task_count[t], task_mean[t * C + c], task_m2[t * C + c]};
      });
      store_channel(total, pivot[c], mean + c, var + c);
    }
  });
}

// Biased mean and variance per channel of x; when kFused also writes y (same strides as x).
template <bool kFused, typename scalar_t, typename acc = acc_t<scalar_t>>
void channel_stats_kernel(const NcsLayout& layout, const scalar_t* x, scalar_t* y,
                          const BnAffine<acc>& bn, acc* mean, acc* var) {
  if (layout.N * layout.S == 0) {  // statistics of nothing, as torch.mean / torch.var give
    std::fill(mean, mean + layout.C, std::numeric_limits<acc>::quiet_NaN());
    std::fill(var, var + layout.C, std::numeric_limits<acc>::quiet_NaN());
    return;
  }
  if (use_rows(layout, layout.sC == 1, layout.sS == 1)) {
    stats_rows<kFused>(layout, x, y, bn, mean, var);
  } else {
    stats_planes<kFused>(layout, x, y, bn, mean, var);
  }
}

// ---------------------------------------------------------------------------------------------
// Elementwise backward passes: out(n, c, s) = Op::apply(op.coef(c), in(n, c, s)...).

// out[i] = op(in[i]...) over len elements at stride 1 (kUnitStride) or at their own strides;
// each input is a (pointer, stride) pair.
template <bool kUnitStride, typename scalar_t, typename Op, typename Coef, typename... In>
void map_segment(const Coef& coef, int64_t len, scalar_t* out, int64_t out_stride, In... in) {
  using acc = acc_t<scalar_t>;
  if constexpr (kUnitStride) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      out[i] = static_cast<scalar_t>(Op::apply(coef, static_cast<acc>(in.first[i])...));
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      out[i * out_stride] = static_cast<scalar_t>(
          Op::apply(coef, static_cast<acc>(in.first[i * in.second])...));
    }
  }
}

template <typename scalar_t, typename Op, typename... In>
void ncs_map(const NcsLayout& layout, const Op& op, NcsPtr<scalar_t> out,
             NcsPtr<In>... in) {
  const int64_t N = layout.N, C = layout.C, S = layout.S;
  const bool unit_spatial = out.sS == 1 && ((in.sS == 1) && ...);
  const bool unit_channel = out.sC == 1 && ((in.sC == 1) && ...);
  if (use_rows(layout, unit_channel, unit_spatial)) {
    at::parallel_for(0, N * S, grain_for(C), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / S, s = row % S;
        scalar_t* o = out.at(n, 0, s);
        const auto apply_row = [&](const auto*... p) {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            o[c] = static_cast<scalar_t>(
                Op::apply(op.coef(c), static_cast<acc_t<scalar_t>>(p[c])...));
          }
        };
        apply_row(in.at(n, 0, s)...);
      }
    });
    return;
  }
  // Planes, cut into chunks so that a few large planes still spread over the threads.
  const int64_t chunks = ceil_div(S, kElementsPerPiece);
  at::parallel_for(0, N * C * chunks, grain_for(S / chunks), [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t chunk = unit % chunks, c = unit / chunks % C, n = unit / chunks / C;
      const int64_t s0 = chunk_begin(chunk, chunks, S);
      const int64_t len = chunk_begin(chunk + 1, chunks, S) - s0;
      const auto coef = op.coef(c);
      if (unit_spatial) {
        map_segment<true, scalar_t, Op>(coef, len, out.at(n, c, s0), 1,
                                        std::make_pair(in.at(n, c, s0), int64_t(1))...);
      } else {
        map_segment<false, scalar_t, Op>(coef, len, out.at(n, c, s0), out.sS,
                                         std::make_pair(in.at(n, c, s0), in.sS)...);
      }
    }
  });
}

// dx = grad_mean_c/M + (2*grad_var_c/M) * (x - mean_c)
template <typename acc>
struct StatsGrad {
  const acc* mean;
  const acc* mean_coef;  // grad_mean / M
  const acc* var_coef;   // 2 * grad_var / M
  struct Coef {
    acc mean, mean_coef, var_coef;
  };
  Coef coef(int64_t c) const { return {mean[c], mean_coef[c], var_coef[c]}; }
  static acc apply(const Coef& k, acc x) { return k.mean_coef + k.var_coef * (x - k.mean); }
};

// dx = grad_y * weight_c/sqrt(running_var_c + eps) + the StatsGrad term
template <typename acc>
struct BnGrad {
  const acc* scale;
  StatsGrad<acc> stats;
  struct Coef {
    acc scale;
    typename StatsGrad<acc>::Coef stats;
  };
  Coef coef(int64_t c) const { return {scale[c], stats.coef(c)}; }
  static acc apply(const Coef& k, acc x, acc grad_y) {
    return grad_y * k.scale + StatsGrad<acc>::apply(k.stats, x);
  }
};

// ---------------------------------------------------------------------------------------------
// Operators.

// weight_c / sqrt(running_var_c + eps), weight = 1 when absent; acc [C].
at::Tensor bn_scale(const std::optional<at::Tensor>& weight, const at::Tensor& running_var,
                    double eps, int64_t C, at::ScalarType acc) {
  at::Tensor scale = (channel_vector(running_var, C, acc, "running_var") + eps).rsqrt();
  if (weight) scale = scale * channel_vector(*weight, C, acc, "weight");
  return scale.contiguous();
}

// The per-channel factors of the statistics' gradient, acc [C].
struct StatsGradCoefs {
  at::Tensor mean;       // mean_c
  at::Tensor mean_coef;  // grad_mean_c / M
  at::Tensor var_coef;   // 2 * grad_var_c / M
  StatsGradCoefs(const at::Tensor& mean_in, const at::Tensor& grad_mean,
                 const at::Tensor& grad_var, const NcsLayout& layout, at::ScalarType acc) {
    const int64_t C = layout.C;
    const double inv_count = 1.0 / static_cast<double>(layout.N * layout.S);
    mean = channel_vector(mean_in, C, acc, "mean");
    mean_coef = (channel_vector(grad_mean, C, acc, "grad_mean") * inv_count).contiguous();
    var_coef = (channel_vector(grad_var, C, acc, "grad_var") * (2.0 * inv_count)).contiguous();
  }
  template <typename acc>
  StatsGrad<acc> op() const {
    return {mean.const_data_ptr<acc>(), mean_coef.const_data_ptr<acc>(),
            var_coef.const_data_ptr<acc>()};
  }
};

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& x_in) {
  check_channel_first(x_in, "x");
  check_floating_cpu(x_in, "x");
  const at::Tensor x = ncs_readable(x_in);
  const NcsLayout layout = *ncs_layout(x);
  const auto acc_options = x.options().dtype(acc_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({layout.C}, acc_options);
  at::Tensor var = at::empty({layout.C}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats", [&] {
    using acc = acc_t<scalar_t>;
    scalar_t* no_output = nullptr;
    channel_stats_kernel<false>(layout, x.const_data_ptr<scalar_t>(), no_output, BnAffine<acc>{},
                                mean.mutable_data_ptr<acc>(), var.mutable_data_ptr<acc>());
  });
  return {mean, var};
}

at::Tensor channel_stats_backward(const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& grad_mean, const at::Tensor& grad_var) {
  check_channel_first(x, "x");
  check_floating_cpu(x, "x");
  const auto acc_type = acc_dtype(x.scalar_type());
  NcsLikeOutput dx(x);
  const NcsLayout& layout = dx.layout();
  if (layout.numel() == 0) return dx.finish();
  const StatsGradCoefs coefs(mean, grad_mean, grad_var, layout, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_backward", [&] {
        using acc = acc_t<scalar_t>;
        ncs_map(layout, coefs.op<acc>(),
                NcsPtr<scalar_t>(dx.target().mutable_data_ptr<scalar_t>(), layout),
                NcsPtr<const scalar_t>(dx.input().const_data_ptr<scalar_t>(), layout));
      });
  return dx.finish();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stats_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps) {
  check_channel_first(x, "x");
  check_floating_cpu(x, "x");
  const auto acc_type = acc_dtype(x.scalar_type());
  const int64_t C = x.size(1);
  const at::Tensor running_mean_acc = channel_vector(running_mean, C, acc_type, "running_mean");
  const at::Tensor scale = bn_scale(weight, running_var, eps, C, acc_type);
  const at::Tensor bias_acc = bias ? channel_vector(*bias, C, acc_type, "bias")
                                   : at::zeros({C}, x.options().dtype(acc_type));
  NcsLikeOutput y(x);
  const auto acc_options = x.options().dtype(acc_type);
  at::Tensor mean = at::empty({C}, acc_options);
  at::Tensor var = at::empty({C}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_forward", [&] {
        using acc = acc_t<scalar_t>;
        const BnAffine<acc> bn{running_mean_acc.const_data_ptr<acc>(), scale.const_data_ptr<acc>(),
                               bias_acc.const_data_ptr<acc>()};
        channel_stats_kernel<true>(y.layout(), y.input().const_data_ptr<scalar_t>(),
                                   y.target().mutable_data_ptr<scalar_t>(), bn,
                                   mean.mutable_data_ptr<acc>(), var.mutable_data_ptr<acc>());
      });
  return {y.finish(), mean, var};
}

at::Tensor bn_stats_backward(const at::Tensor& grad_y_in, const at::Tensor& x,
                             const at::Tensor& mean, const at::Tensor& grad_mean,
                             const at::Tensor& grad_var, const std::optional<at::Tensor>& weight,
                             const at::Tensor& running_var, double eps) {
  check_channel_first(x, "x");
  check_floating_cpu(x, "x");
  TORCH_CHECK(grad_y_in.device().is_cpu(), "dinv: grad_y must be a CPU tensor, got ",
              grad_y_in.device());
  TORCH_CHECK(grad_y_in.sizes() == x.sizes(), "dinv: grad_y must have the shape of x ",
              x.sizes(), ", got ", grad_y_in.sizes());
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), "dinv: grad_y must have the dtype of x (",
              x.scalar_type(), "), got ", grad_y_in.scalar_type());
  const auto acc_type = acc_dtype(x.scalar_type());
  const int64_t C = x.size(1);
  NcsLikeOutput dx(x);
  const NcsLayout& layout = dx.layout();
  if (layout.numel() == 0) return dx.finish();
  const at::Tensor grad_y = ncs_readable(grad_y_in);
  const NcsLayout grad_y_layout = *ncs_layout(grad_y);
  const at::Tensor scale = bn_scale(weight, running_var, eps, C, acc_type);
  const StatsGradCoefs coefs(mean, grad_mean, grad_var, layout, acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_backward", [&] {
        using acc = acc_t<scalar_t>;
        const BnGrad<acc> op{scale.const_data_ptr<acc>(), coefs.op<acc>()};
        ncs_map(layout, op, NcsPtr<scalar_t>(dx.target().mutable_data_ptr<scalar_t>(), layout),
                NcsPtr<const scalar_t>(dx.input().const_data_ptr<scalar_t>(), layout),
                NcsPtr<const scalar_t>(grad_y.const_data_ptr<scalar_t>(), grad_y_layout));
      });
  return dx.finish();
}

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  m.impl("channel_stats", &dinv::cpu::channel_stats);
  m.impl("channel_stats_backward", &dinv::cpu::channel_stats_backward);
  m.impl("bn_stats_forward", &dinv::cpu::bn_stats_forward);
  m.impl("bn_stats_backward", &dinv::cpu::bn_stats_backward);
}

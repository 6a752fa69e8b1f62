// Total variation on CUDA (docs/kernels.md §3): the four neighbour-difference sums in one pass,
// and their gradient as a gather.
//
// A thread owns a vertical strip of kStrip rows of one column (n, c, w) and keeps the rows it
// needs in registers, all loaded up front so that they are in flight together; each element is
// fetched from DRAM about once (the neighbouring columns and the strip's halo rows are the
// neighbouring threads' data and come from cache). Consecutive threads take consecutive columns
// w for NCHW-like layouts and consecutive channels c for channels_last, so loads coalesce.
#include "dinv_cuda.cuh"

#include <torch/library.h>

#include <algorithm>

namespace dinv::gpu {
namespace {

constexpr int kStrip = 8;  // rows per thread

// x (or dx) as [N, C, H, W] with its strides; `strips` = ceil(H / kStrip).
struct TVGeom {
  int64_t N, C, H, W, strips;
  int64_t sn, sc, sh, sw;
  bool c_fast;  // consecutive work units take consecutive channels (channels_last)
};

// Work unit u → (n, c, first row, w).
__device__ __forceinline__ void unit_coords(const TVGeom& g, int64_t u, int64_t& n, int64_t& c,
                                            int64_t& h0, int64_t& w) {
  int64_t q, hs;
  if (g.c_fast) {  // u = ((n*strips + hs)*W + w)*C + c
    q = div_fast(u, g.C);
    c = u - q * g.C;
    u = q;
    q = div_fast(u, g.W);
    w = u - q * g.W;
    u = q;
    n = div_fast(u, g.strips);
    hs = u - n * g.strips;
  } else {  // u = ((n*C + c)*strips + hs)*W + w
    q = div_fast(u, g.W);
    w = u - q * g.W;
    u = q;
    q = div_fast(u, g.strips);
    hs = u - q * g.strips;
    n = div_fast(q, g.C);
    c = q - n * g.C;
  }
  h0 = hs * kStrip;
}

template <typename acc>
__device__ __forceinline__ acc tv_pow(acc d, int power) {
  return power == 1 ? fabs(d) : d * d;
}

// d(|d|^p)/dd up to the factor the caller folds into coef: d for p = 2, sign(d) for p = 1.
template <typename acc>
__device__ __forceinline__ acc tv_slope(acc d, int power) {
  return power == 2 ? d : static_cast<acc>((d > acc(0)) - (d < acc(0)));
}

// Per-block partial sums [gridDim.x, 4] of |d_k|^power, grid-stride over work units.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    tv_sums_kernel(const scalar_t* __restrict__ x, TVGeom g, int power, int64_t units,
                   acc_t<scalar_t>* __restrict__ partial) {
  using acc = acc_t<scalar_t>;
  Sums<acc, 4> s{};
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * kBlock) {
    int64_t n, c, h0, w;
    unit_coords(g, u, n, c, h0, w);
    const scalar_t* col = x + n * g.sn + c * g.sc + w * g.sw;
    const bool right = w + 1 < g.W;
    // Rows h0 .. h0+kStrip (one below the strip for the vertical differences), columns w, w+1.
    acc a[kStrip + 1], b[kStrip + 1];
#pragma unroll
    for (int i = 0; i <= kStrip; ++i) {
      const int64_t h = h0 + i;
      a[i] = h < g.H ? static_cast<acc>(col[h * g.sh]) : acc(0);
      b[i] = h < g.H && right ? static_cast<acc>(col[h * g.sh + g.sw]) : acc(0);
    }
#pragma unroll
    for (int i = 0; i < kStrip; ++i) {
      const int64_t h = h0 + i;
      if (h >= g.H) break;
      const bool down = h + 1 < g.H;
      if (right) s.v[0] += tv_pow(a[i] - b[i], power);  // d1 = x[h,w] − x[h,w+1]
      if (down) s.v[1] += tv_pow(a[i] - a[i + 1], power);  // d2 = x[h,w] − x[h+1,w]
      if (down && right) {
        s.v[2] += tv_pow(a[i + 1] - b[i], power);  // d3 = x[h+1,w] − x[h,w+1]
        s.v[3] += tv_pow(a[i] - b[i + 1], power);  // d4 = x[h,w] − x[h+1,w+1]
      }
    }
  }
  s = block_reduce(s, AddSums{}, Sums<acc, 4>{});
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) partial[blockIdx.x * 4 + k] = s.v[k];
  }
}

// out[k] = Σ partial[:, k] in a fixed order (one block).
template <typename acc>
__global__ void __launch_bounds__(kBlock)
    tv_sums_final_kernel(const acc* __restrict__ partial, int64_t blocks, acc* __restrict__ out) {
  Sums<acc, 4> s{};
  for (int64_t i = threadIdx.x; i < blocks; i += kBlock) {
#pragma unroll
    for (int k = 0; k < 4; ++k) s.v[k] += partial[i * 4 + k];
  }
  s = block_reduce(s, AddSums{}, Sums<acc, 4>{});
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = s.v[k];
  }
}

// dx by gathering, for every element, the terms of the (up to 8) differences it takes part in.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    tv_backward_kernel(const scalar_t* __restrict__ x, TVGeom g, scalar_t* __restrict__ dx,
                       TVGeom gd, const acc_t<scalar_t>* __restrict__ coef, int power,
                       int64_t units) {
  using acc = acc_t<scalar_t>;
  const acc c1 = coef[0], c2 = coef[1], c3 = coef[2], c4 = coef[3];
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * kBlock) {
    int64_t n, c, h0, w;
    unit_coords(g, u, n, c, h0, w);
    const scalar_t* col = x + n * g.sn + c * g.sc + w * g.sw;
    const bool left = w >= 1, right = w + 1 < g.W;
    // Window: v[i][j] = x[h0 − 1 + i, w − 1 + j], zero outside the image (never used there).
    acc v[kStrip + 2][3];
#pragma unroll
    for (int i = 0; i < kStrip + 2; ++i) {
      const int64_t h = h0 - 1 + i;
      const bool row = h >= 0 && h < g.H;
      v[i][0] = row && left ? static_cast<acc>(col[h * g.sh - g.sw]) : acc(0);
      v[i][1] = row ? static_cast<acc>(col[h * g.sh]) : acc(0);
      v[i][2] = row && right ? static_cast<acc>(col[h * g.sh + g.sw]) : acc(0);
    }
    scalar_t* out = dx + n * gd.sn + c * gd.sc + w * gd.sw;
#pragma unroll
    for (int i = 0; i < kStrip; ++i) {
      const int64_t h = h0 + i;
      if (h >= g.H) break;
      const bool up = h >= 1, down = h + 1 < g.H;
      const acc* above = v[i];
      const acc* here = v[i + 1];
      const acc* below = v[i + 2];
      const acc x0 = here[1];
      // Each difference is formed exactly as in the forward (first − second operand), so its
      // sign matches; + where x[h,w] is the first operand, − where it is the second.
      acc grad = 0;
      if (right) grad += c1 * tv_slope(x0 - here[2], power);           // d1(h, w)
      if (left) grad -= c1 * tv_slope(here[0] - x0, power);            // d1(h, w−1)
      if (down) grad += c2 * tv_slope(x0 - below[1], power);           // d2(h, w)
      if (up) grad -= c2 * tv_slope(above[1] - x0, power);             // d2(h−1, w)
      if (up && right) grad += c3 * tv_slope(x0 - above[2], power);    // d3(h−1, w)
      if (down && left) grad -= c3 * tv_slope(below[0] - x0, power);   // d3(h, w−1)
      if (down && right) grad += c4 * tv_slope(x0 - below[2], power);  // d4(h, w)
      if (up && left) grad -= c4 * tv_slope(above[0] - x0, power);     // d4(h−1, w−1)
      out[h * gd.sh] = static_cast<scalar_t>(grad);
    }
  }
}

void check_tv(const at::Tensor& x, int64_t power, const char* op) {
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(power == 1 || power == 2, op, ": power must be 1 or 2, got ", power);
}

TVGeom tv_geom(const at::Tensor& x, const at::Tensor& layout_of) {
  TVGeom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.strips = ceil_div(g.H, kStrip);
  g.sn = x.stride(0);
  g.sc = x.stride(1);
  g.sh = x.stride(2);
  g.sw = x.stride(3);
  g.c_fast = layout_of.stride(1) == 1 && g.C > 1 && layout_of.stride(3) != 1;
  return g;
}

int64_t tv_units(const TVGeom& g) {
  return g.N * g.C * g.strips * g.W;
}

// Grid-stride launches: a few waves of resident blocks at most.
unsigned tv_blocks(int64_t units) {
  return static_cast<unsigned>(std::min(ceil_div(units, kBlock), 4 * resident_blocks()));
}

at::Tensor tv_sums_cuda(const at::Tensor& x, int64_t power) {
  check_tv(x, power, "tv_sums");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto acc_opts = x.options().dtype(acc_type(x));
  if (x.numel() == 0) return at::zeros({4}, acc_opts);
  const TVGeom g = tv_geom(x, x);
  const int64_t units = tv_units(g);
  const unsigned blocks = tv_blocks(units);
  at::Tensor partial = at::empty({static_cast<int64_t>(blocks), 4}, acc_opts);
  at::Tensor out = at::empty({4}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dinv_tv_sums", [&] {
    using acc = acc_t<scalar_t>;
    tv_sums_kernel<scalar_t><<<blocks, kBlock, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), g, static_cast<int>(power), units,
        partial.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tv_sums_final_kernel<acc><<<1, kBlock, 0, stream>>>(partial.const_data_ptr<acc>(), blocks,
                                                        out.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor tv_backward_cuda(const at::Tensor& x, const at::Tensor& coef, int64_t power) {
  constexpr const char* op = "tv_backward";
  check_tv(x, power, op);
  check_input(coef, op, "coef");
  check_same_device(coef, x, op, "coef");
  TORCH_CHECK(coef.numel() == 4, op, ": coef must have 4 elements, got ", coef.sizes());
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  const at::Tensor k = coef.to(acc_type(x)).contiguous();
  const TVGeom g = tv_geom(x, x);
  const TVGeom gd = tv_geom(dx, x);
  const int64_t units = tv_units(g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dinv_tv_bwd", [&] {
    using acc = acc_t<scalar_t>;
    tv_backward_kernel<scalar_t>
        <<<tv_blocks(units), kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), g, dx.data_ptr<scalar_t>(), gd,
            k.const_data_ptr<acc>(), static_cast<int>(power), units);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  m.impl("tv_sums", &dinv::gpu::tv_sums_cuda);
  m.impl("tv_backward", &dinv::gpu::tv_backward_cuda);
}

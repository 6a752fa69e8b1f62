// Image priors on CUDA (docs/kernels.md §3): the total-variation sums of both powers and the
// per-image sums of squares from one pass over x, and their gradient as a gather.
//
// A thread owns a vertical strip of kStrip rows of one column (n, c, w) and keeps the rows it
// needs in registers, all loaded up front so that they are in flight together; each element is
// fetched from DRAM about once (the neighbouring columns and the strip's halo rows are the
// neighbouring threads' data and come from cache). Consecutive threads take consecutive columns
// w for NCHW-like layouts and consecutive channels c for channels_last, so loads coalesce.
//
// Work units are numbered image by image, so the units of one image are a contiguous range in
// either order. The forward gives every image the same number of blocks and keeps each block
// inside its image: a block's partial Σx² then belongs to one image, and a second small kernel
// sums the blocks' partials in an order fixed by the shape and the SM count (no atomics:
// deterministic on a given device model).
#include "dinv_cuda.cuh"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

namespace dinv::gpu {
namespace {

constexpr int kStrip = 8;  // rows per thread
constexpr int kDiffs = 4;  // neighbour differences d1 .. d4
constexpr int kTvSums = 2 * kDiffs;  // Σ|d_k| then Σd_k²: the row-major order of tv [2, 4]
// A forward block's partial sums: the TV sums, then Σx² over the block's part of its image.
constexpr int kSq = kTvSums;  // where Σx² sits in a partial row
constexpr int kPartial = kTvSums + 1;

// x (or dx) as [N, C, H, W] with its strides; `strips` = ceil(H / kStrip) and `image_units` =
// C*strips*W, the work units of one image.
struct ImageGeom {
  int64_t C, H, W, strips, image_units;
  int64_t sn, sc, sh, sw;
  bool c_fast;  // consecutive work units take consecutive channels (channels_last)
};

// Work unit v of an image (0 <= v < image_units) → (c, first row, w).
__device__ __forceinline__ void unit_coords(const ImageGeom& g, int64_t v, int64_t& c,
                                            int64_t& h0, int64_t& w) {
  int64_t q, hs;
  if (g.c_fast) {  // v = (hs*W + w)*C + c
    q = div_fast(v, g.C);
    c = v - q * g.C;
    hs = div_fast(q, g.W);
    w = q - hs * g.W;
  } else {  // v = (c*strips + hs)*W + w
    q = div_fast(v, g.W);
    w = v - q * g.W;
    c = div_fast(q, g.strips);
    hs = q - c * g.strips;
  }
  h0 = hs * kStrip;
}

// Adds |d| and d² of difference k to a partial row.
template <typename acc>
__device__ __forceinline__ void add_diff(Sums<acc, kPartial>& s, int k, acc d) {
  s.v[k] += fabs(d);
  s.v[kDiffs + k] += d * d;
}

// The weights of one difference in the backward: `l1` = tv_coef[0, k] multiplies sign(d),
// `l2` = tv_coef[1, k] multiplies d.
template <typename acc>
struct DiffCoef {
  acc l1, l2;

  __device__ __forceinline__ acc slope(acc d) const {
    return l1 * static_cast<acc>((d > acc(0)) - (d < acc(0))) + l2 * d;
  }
};

// Per-block partial sums [N, blocks_per_image, kPartial]: block b works on image
// n = b / blocks_per_image and grid-strides over that image's units.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    image_prior_sums_kernel(const scalar_t* __restrict__ x, ImageGeom g, int64_t blocks_per_image,
                            acc_t<scalar_t>* __restrict__ partial) {
  using acc = acc_t<scalar_t>;
  const int64_t block = blockIdx.x;
  const int64_t n = div_fast(block, blocks_per_image);
  const scalar_t* image = x + n * g.sn;
  Sums<acc, kPartial> s{};
  for (int64_t v = (block - n * blocks_per_image) * kBlock + threadIdx.x; v < g.image_units;
       v += blocks_per_image * kBlock) {
    int64_t c, h0, w;
    unit_coords(g, v, c, h0, w);
    const scalar_t* col = image + c * g.sc + w * g.sw;
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
      // Σx² over the strip's own rows only: the halo row belongs to the next strip.
      s.v[kSq] += a[i] * a[i];
      if (right) add_diff(s, 0, a[i] - b[i]);     // d1 = x[h,w] − x[h,w+1]
      if (down) add_diff(s, 1, a[i] - a[i + 1]);  // d2 = x[h,w] − x[h+1,w]
      if (down && right) {
        add_diff(s, 2, a[i + 1] - b[i]);  // d3 = x[h+1,w] − x[h,w+1]
        add_diff(s, 3, a[i] - b[i + 1]);  // d4 = x[h,w] − x[h+1,w+1]
      }
    }
  }
  s = block_reduce(s, AddSums{}, Sums<acc, kPartial>{});
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kPartial; ++k) partial[block * kPartial + k] = s.v[k];
  }
}

// sq[n] = Σ partial[n, :, kSq] (block n < N) and tv = Σ partial[:, :, :kTvSums] (block N),
// each in an order fixed by the shape.
template <typename acc>
__global__ void __launch_bounds__(kBlock)
    image_prior_final_kernel(const acc* __restrict__ partial, int64_t N, int64_t blocks_per_image,
                             acc* __restrict__ tv, acc* __restrict__ sq) {
  const int64_t n = blockIdx.x;
  if (n < N) {
    const acc* rows = partial + n * blocks_per_image * kPartial;
    acc s = 0;
    for (int64_t j = threadIdx.x; j < blocks_per_image; j += kBlock) s += rows[j * kPartial + kSq];
    s = block_reduce(s, Add{}, acc(0));
    if (threadIdx.x == 0) sq[n] = s;
    return;
  }
  const int64_t rows = N * blocks_per_image;
  Sums<acc, kTvSums> s{};
#pragma unroll 4
  for (int64_t r = threadIdx.x; r < rows; r += kBlock) {
#pragma unroll
    for (int k = 0; k < kTvSums; ++k) s.v[k] += partial[r * kPartial + k];
  }
  s = block_reduce(s, AddSums{}, Sums<acc, kTvSums>{});
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kTvSums; ++k) tv[k] = s.v[k];
  }
}

// dx by gathering, for every element, the terms of the (up to 8) differences it takes part in,
// plus its own sq_coef[n]·x term.
template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    image_prior_backward_kernel(const scalar_t* __restrict__ x, ImageGeom g,
                                scalar_t* __restrict__ dx, ImageGeom gd,
                                const acc_t<scalar_t>* __restrict__ tv_coef,
                                const acc_t<scalar_t>* __restrict__ sq_coef, int64_t units) {
  using acc = acc_t<scalar_t>;
  const DiffCoef<acc> k1{tv_coef[0], tv_coef[kDiffs]}, k2{tv_coef[1], tv_coef[kDiffs + 1]},
      k3{tv_coef[2], tv_coef[kDiffs + 2]}, k4{tv_coef[3], tv_coef[kDiffs + 3]};
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; u < units;
       u += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t n = div_fast(u, g.image_units);
    int64_t c, h0, w;
    unit_coords(g, u - n * g.image_units, c, h0, w);
    const acc sq = sq_coef[n];
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
      acc grad = sq * x0;
      if (right) grad += k1.slope(x0 - here[2]);           // d1(h, w)
      if (left) grad -= k1.slope(here[0] - x0);            // d1(h, w−1)
      if (down) grad += k2.slope(x0 - below[1]);           // d2(h, w)
      if (up) grad -= k2.slope(above[1] - x0);             // d2(h−1, w)
      if (up && right) grad += k3.slope(x0 - above[2]);    // d3(h−1, w)
      if (down && left) grad -= k3.slope(below[0] - x0);   // d3(h, w−1)
      if (down && right) grad += k4.slope(x0 - below[2]);  // d4(h, w)
      if (up && left) grad -= k4.slope(above[0] - x0);     // d4(h−1, w−1)
      out[h * gd.sh] = static_cast<scalar_t>(grad);
    }
  }
}

void check_image(const at::Tensor& x, const char* op) {
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got ", x.sizes());
}

ImageGeom image_geom(const at::Tensor& x, const at::Tensor& layout_of) {
  ImageGeom g;
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.strips = ceil_div(g.H, kStrip);
  g.image_units = g.C * g.strips * g.W;
  g.sn = x.stride(0);
  g.sc = x.stride(1);
  g.sh = x.stride(2);
  g.sw = x.stride(3);
  g.c_fast = layout_of.stride(1) == 1 && g.C > 1 && layout_of.stride(3) != 1;
  return g;
}

std::tuple<at::Tensor, at::Tensor> image_prior_sums_cuda(const at::Tensor& x) {
  constexpr const char* op = "image_prior_sums";
  check_image(x, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const auto acc_opts = x.options().dtype(acc_type(x));
  const int64_t N = x.size(0);
  if (x.numel() == 0) return {at::zeros({2, kDiffs}, acc_opts), at::zeros({N}, acc_opts)};
  const ImageGeom g = image_geom(x, x);
  // A few waves of resident blocks in all, but at least one block per image and no more than
  // its units fill.
  const int64_t blocks_per_image = std::clamp(ceil_div(4 * resident_blocks(), N), int64_t{1},
                                              ceil_div(g.image_units, kBlock));
  const int64_t blocks = N * blocks_per_image;
  // The final kernel takes one block more.
  TORCH_CHECK(blocks < std::numeric_limits<int32_t>::max(), op, ": too many images (", N, ")");
  at::Tensor partial = at::empty({N, blocks_per_image, kPartial}, acc_opts);
  at::Tensor tv = at::empty({2, kDiffs}, acc_opts);
  at::Tensor sq = at::empty({N}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "dinv_image_prior_sums", [&] {
        using acc = acc_t<scalar_t>;
        image_prior_sums_kernel<scalar_t><<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), g, blocks_per_image, partial.data_ptr<acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        image_prior_final_kernel<acc><<<static_cast<unsigned>(N + 1), kBlock, 0, stream>>>(
            partial.const_data_ptr<acc>(), N, blocks_per_image, tv.data_ptr<acc>(),
            sq.data_ptr<acc>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {tv, sq};
}

at::Tensor image_prior_backward_cuda(const at::Tensor& x, const at::Tensor& tv_coef,
                                     const at::Tensor& sq_coef) {
  constexpr const char* op = "image_prior_backward";
  check_image(x, op);
  check_input(tv_coef, op, "tv_coef");
  check_same_device(tv_coef, x, op, "tv_coef");
  check_input(sq_coef, op, "sq_coef");
  check_same_device(sq_coef, x, op, "sq_coef");
  const int64_t N = x.size(0);
  TORCH_CHECK(tv_coef.numel() == kTvSums, op, ": tv_coef must have shape [2, ", kDiffs,
              "], got ", tv_coef.sizes());
  TORCH_CHECK(sq_coef.dim() == 1 && sq_coef.size(0) == N, op, ": sq_coef must have shape [", N,
              "], got ", sq_coef.sizes());
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  if (x.numel() == 0) return dx;
  // The kernel reads it flat: the weights of sign(d_k) (row 0), then those of d_k (row 1).
  const at::Tensor tv_k = tv_coef.reshape({kTvSums}).to(acc_type(x)).contiguous();
  const at::Tensor sq_k = sq_coef.to(acc_type(x)).contiguous();
  const ImageGeom g = image_geom(x, x);
  const ImageGeom gd = image_geom(dx, x);
  const int64_t units = N * g.image_units;
  // Grid-stride: a few waves of resident blocks at most.
  const auto blocks =
      static_cast<unsigned>(std::min(ceil_div(units, kBlock), 4 * resident_blocks()));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "dinv_image_prior_bwd", [&] {
        using acc = acc_t<scalar_t>;
        image_prior_backward_kernel<scalar_t>
            <<<blocks, kBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
                x.const_data_ptr<scalar_t>(), g, dx.data_ptr<scalar_t>(), gd,
                tv_k.const_data_ptr<acc>(), sq_k.const_data_ptr<acc>(), units);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return dx;
}

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  m.impl("image_prior_sums", &dinv::gpu::image_prior_sums_cuda);
  m.impl("image_prior_backward", &dinv::gpu::image_prior_backward_cuda);
}

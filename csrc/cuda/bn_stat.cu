// BatchNorm statistics on CUDA (docs/kernels.md §1-2): channel_stats and its backward, and the
// fused eval-mode BatchNorm forward that also returns the batch statistics, and its backward.
//
// x is viewed as [N, C, S] (S = product of the dims >= 2) and walked in one of two ways:
//  - "rows" (contiguous NCHW and any generic layout): grid (C, chunks); a block owns one channel
//    and a chunk of its M = N*S elements, which its threads walk as a flattened (n, s) index,
//    16 bytes at a time when s is contiguous.
//  - "cols" (channels_last, [N, C]: channel stride 1): grid (C / (bx*VEC), chunks); threadIdx.x
//    spans channels (coalesced), each thread owning VEC adjacent channels, threadIdx.y spans the
//    rows (n, s) of a chunk.
// Statistics are Welford/Chan: per thread in registers, merged per block in a fixed order, and
// when a channel spans several chunks the per-chunk partials are merged by a second small kernel
// (no atomics: deterministic for a given shape and SM count, which sets the chunking).
#include "dinv_cuda.cuh"

#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <tuple>

namespace dinv::gpu {
namespace {

constexpr int kUnroll = 4;  // independent 16-byte loads in flight per thread
constexpr int kSweeps = 4;  // preferred unrolled sweeps per block: amortizes its reduction

// Strides of one tensor over the [N, C, S] view, in elements. `s` is the stride between
// consecutive traversal units along S (16-byte vectors in the vectorized rows walk).
struct Strides3 {
  int64_t n, c, s;
};

// Position (n, s) in the plane of one channel, advanced by a fixed stride without division.
struct Step {
  int64_t dn, ds;  // the stride as whole rows and remainder (ds < per_row)
};

struct Cursor {
  int64_t n, s;

  Cursor() = default;
  __device__ Cursor(int64_t i, int64_t per_row) : n(div_fast(i, per_row)), s(i - n * per_row) {}

  __device__ __forceinline__ void advance(Step st, int64_t per_row) {
    n += st.dn;
    s += st.ds;
    if (s >= per_row) {
      s -= per_row;
      ++n;
    }
  }
  __device__ __forceinline__ int64_t offset(const Strides3& t) const { return n * t.n + s * t.s; }
};

// What a kernel walks: `units` per channel (vectors for rows, rows for cols), `per_row` of them
// per n, `chunk` of them per block; `step` is the per-thread stride as a Step.
struct Extent {
  int64_t C, per_row, units, chunk;
  Step step;
};

// Eval-mode BatchNorm applied while x is read: y = (x − running_mean)*scale + bias with
// scale = weight/sqrt(running_var + eps).
template <typename scalar_t>
struct BNForward {
  using acc = acc_t<scalar_t>;
  ChannelParam<scalar_t> weight, bias, running_mean, running_var;
  acc eps;

  __device__ __forceinline__ void channel(int64_t c, acc& center, acc& scale, acc& shift) const {
    center = running_mean[c];
    scale = weight[c] * drsqrt(running_var[c] + eps);
    shift = bias[c];
  }
};

// dx = (x − mean)*a + g [+ grad_y*k] with a = 2*grad_var/M, g = grad_mean/M and
// k = weight/sqrt(running_var + eps); (x − mean) is formed first so that no cancellation
// against a folded constant happens.
template <typename scalar_t>
struct BNBackward {
  using acc = acc_t<scalar_t>;
  ChannelParam<scalar_t> mean, grad_mean, grad_var, weight, running_var;
  acc inv_m, eps;

  __device__ __forceinline__ void channel(int64_t c, bool has_gy, acc& mu, acc& a, acc& g,
                                          acc& k) const {
    mu = mean[c];
    a = acc(2) * grad_var[c] * inv_m;
    g = grad_mean[c] * inv_m;
    k = has_gy ? weight[c] * drsqrt(running_var[c] + eps) : acc(0);
  }
};

// Where a block's statistics go: the final [C] mean/var when a channel is one chunk, otherwise
// the [C, chunks] partials merged by stats_finalize_kernel.
template <typename acc>
struct StatsOut {
  Welford<acc>* part;
  acc* mean;
  acc* var;
  int64_t chunks;

  __device__ __forceinline__ void store(int64_t c, int64_t chunk, const Welford<acc>& w) const {
    if (chunks == 1) {
      mean[c] = w.mean;
      var[c] = w.m2 / w.n;
    } else {
      part[c * chunks + chunk] = w;
    }
  }
};

// Walks positions first, first + stride, ... < end of a channel plane, handing the body kUnroll
// positions at a time (so that their loads are all in flight together), then the rest one by one.
template <typename Body>
__device__ __forceinline__ void sweep(Body& body, int64_t first, int64_t end, int stride,
                                      const Extent& e) {
  Cursor cur(first, e.per_row);
  int64_t i = first;
  for (; i + static_cast<int64_t>(kUnroll - 1) * stride < end; i += kUnroll * stride) {
    Cursor at[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      at[u] = cur;
      cur.advance(e.step, e.per_row);
    }
    body.template visit<kUnroll>(at);
  }
  for (; i < end; i += stride) {
    body.template visit<1>(&cur);
    cur.advance(e.step, e.per_row);
  }
}

// Per-thread channel range of a launch: rows → the block's channel; cols → VEC channels.
template <int VEC, bool COLS>
struct ThreadChannels {
  static constexpr int kCount = COLS ? VEC : 1;  // channels a thread owns
  // The owned channel that element j of a loaded vector belongs to.
  __host__ __device__ static constexpr int of(int j) { return COLS ? j : 0; }
};

// What a thread walks of a launch: its first channel c0 (rows: the block's channel; cols: the
// first of its VEC channels) and the units first, first + stride, ... < end of its block's chunk.
struct ThreadWork {
  int64_t c0, first, end;
  int stride;
};

template <int VEC, bool COLS>
__device__ __forceinline__ ThreadWork thread_work(const Extent& e) {
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * e.chunk;
  const int64_t end = begin + e.chunk < e.units ? begin + e.chunk : e.units;
  if constexpr (COLS) {
    return {(static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC,
            begin + threadIdx.y, end, static_cast<int>(blockDim.y)};
  } else {
    return {static_cast<int64_t>(blockIdx.x), begin + threadIdx.x, end, kBlock};
  }
}

// out_j = (v_j − center_c)·scale_c + shift_c for the VEC values of one loaded vector, c the
// channel element j belongs to: the per-channel affine map both passes write (BN's y, and dx).
template <typename Ch, int VEC, typename acc>
__device__ __forceinline__ void channel_affine(const acc* v, const acc* center, const acc* scale,
                                               const acc* shift, acc* out) {
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int ch = Ch::of(j);
    out[j] = (v[j] - center[ch]) * scale[ch] + shift[ch];
  }
}

template <typename scalar_t, int VEC, bool COLS, bool WRITE_Y>
struct StatsBody {
  using acc = acc_t<scalar_t>;
  using Ch = ThreadChannels<VEC, COLS>;
  const scalar_t* x;
  Strides3 xs;
  scalar_t* y;
  Strides3 ys;
  acc center[Ch::kCount], scale[Ch::kCount], shift[Ch::kCount];
  Welford<acc> w[Ch::kCount];

  template <int K>
  __device__ __forceinline__ void visit(const Cursor* at) {
    acc v[K][VEC];
#pragma unroll
    for (int u = 0; u < K; ++u) load_vec<VEC>(x + at[u].offset(xs), v[u]);
    if constexpr (WRITE_Y) {
#pragma unroll
      for (int u = 0; u < K; ++u) {
        acc out[VEC];
        channel_affine<Ch, VEC>(v[u], center, scale, shift, out);
        store_vec<VEC>(y + at[u].offset(ys), out);
      }
    }
    if constexpr (COLS) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc col[K];
#pragma unroll
        for (int u = 0; u < K; ++u) col[u] = v[u][j];
        welford_add<K>(w[j], col);
      }
    } else {
      welford_add<K * VEC>(w[0], &v[0][0]);
    }
  }
};

template <typename scalar_t>
struct StatsArgs {
  const scalar_t* x;
  Strides3 xs;
  scalar_t* y;
  Strides3 ys;
  BNForward<scalar_t> bn;
  Extent e;
  StatsOut<acc_t<scalar_t>> out;
};

// Per-channel Welford statistics of x (and y when WRITE_Y) for one chunk per block.
template <typename scalar_t, int VEC, bool COLS, bool WRITE_Y>
__global__ void __launch_bounds__(kBlock) stats_kernel(StatsArgs<scalar_t> a) {
  using acc = acc_t<scalar_t>;
  using Ch = ThreadChannels<VEC, COLS>;
  const auto [c0, first, end, stride] = thread_work<VEC, COLS>(a.e);
  const bool active = c0 < a.e.C;

  StatsBody<scalar_t, VEC, COLS, WRITE_Y> body;
  body.x = a.x + c0 * a.xs.c;
  body.xs = a.xs;
  body.y = WRITE_Y ? a.y + c0 * a.ys.c : nullptr;
  body.ys = a.ys;
#pragma unroll
  for (int j = 0; j < Ch::kCount; ++j) {
    body.w[j] = {0, 0, 0};
    if (WRITE_Y && active) a.bn.channel(c0 + j, body.center[j], body.scale[j], body.shift[j]);
  }
  if (active) sweep(body, first, end, stride, a.e);

  if constexpr (COLS) {
    // Tree over threadIdx.y (a power of two) through shared memory: the rows of a channel
    // live in one column of threads.
    __shared__ Welford<acc> spill[(kBlock / 2) * VEC];
    const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
    for (int h = blockDim.y / 2; h > 0; h /= 2) {
      if (ty >= h && ty < 2 * h) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) spill[((ty - h) * bx + tx) * VEC + j] = body.w[j];
      }
      __syncthreads();
      if (ty < h) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          body.w[j] = WelfordMerge{}(body.w[j], spill[(ty * bx + tx) * VEC + j]);
        }
      }
      __syncthreads();
    }
    if (ty == 0 && active) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) a.out.store(c0 + j, blockIdx.y, body.w[j]);
    }
  } else {
    const Welford<acc> w = block_reduce(body.w[0], WelfordMerge{}, Welford<acc>{0, 0, 0});
    if (threadIdx.x == 0) a.out.store(c0, blockIdx.y, w);
  }
}

// Merges the [C, chunks] partials in a fixed order: one block per channel (the channels_last
// plans leave thousands of partials per channel, too many for a warp to merge serially).
template <typename acc>
__global__ void __launch_bounds__(kBlock)
    stats_finalize_kernel(const Welford<acc>* __restrict__ part, int64_t chunks,
                          acc* __restrict__ mean, acc* __restrict__ var) {
  const int64_t c = blockIdx.x;
  Welford<acc> w{0, 0, 0};
  for (int64_t k = threadIdx.x; k < chunks; k += kBlock) {
    w = WelfordMerge{}(w, part[c * chunks + k]);
  }
  w = block_reduce(w, WelfordMerge{}, Welford<acc>{0, 0, 0});
  if (threadIdx.x == 0) {
    mean[c] = w.mean;
    var[c] = w.m2 / w.n;
  }
}

template <typename scalar_t, int VEC, bool COLS, bool HAS_GY>
struct BackwardBody {
  using acc = acc_t<scalar_t>;
  using Ch = ThreadChannels<VEC, COLS>;
  const scalar_t* x;
  Strides3 xs;
  const scalar_t* gy;
  Strides3 gs;
  scalar_t* dx;
  Strides3 ds;
  acc mu[Ch::kCount], a[Ch::kCount], g[Ch::kCount], k[Ch::kCount];

  template <int K>
  __device__ __forceinline__ void visit(const Cursor* at) {
    acc v[K][VEC];
    [[maybe_unused]] acc gv[K][VEC];
#pragma unroll
    for (int u = 0; u < K; ++u) {
      load_vec<VEC>(x + at[u].offset(xs), v[u]);
      if constexpr (HAS_GY) load_vec<VEC>(gy + at[u].offset(gs), gv[u]);
    }
#pragma unroll
    for (int u = 0; u < K; ++u) {
      acc out[VEC];
      channel_affine<Ch, VEC>(v[u], mu, a, g, out);
      if constexpr (HAS_GY) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] += gv[u][j] * k[Ch::of(j)];
      }
      store_vec<VEC>(dx + at[u].offset(ds), out);
    }
  }
};

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* x;
  Strides3 xs;
  const scalar_t* gy;
  Strides3 gs;
  scalar_t* dx;
  Strides3 ds;
  BNBackward<scalar_t> p;
  Extent e;
};

// One elementwise pass: dx from x (and grad_y) with per-channel coefficients held in registers.
template <typename scalar_t, int VEC, bool COLS, bool HAS_GY>
__global__ void __launch_bounds__(kBlock) backward_kernel(BackwardArgs<scalar_t> a) {
  using Ch = ThreadChannels<VEC, COLS>;
  const auto [c0, first, end, stride] = thread_work<VEC, COLS>(a.e);
  if (c0 >= a.e.C) return;

  BackwardBody<scalar_t, VEC, COLS, HAS_GY> body;
  body.x = a.x + c0 * a.xs.c;
  body.xs = a.xs;
  body.gy = HAS_GY ? a.gy + c0 * a.gs.c : nullptr;
  body.gs = a.gs;
  body.dx = a.dx + c0 * a.ds.c;
  body.ds = a.ds;
#pragma unroll
  for (int j = 0; j < Ch::kCount; ++j) {
    a.p.channel(c0 + j, HAS_GY, body.mu[j], body.a[j], body.g[j], body.k[j]);
  }
  sweep(body, first, end, stride, a.e);
}

// ---------------------------------------------------------------------------------------------
// Host side.

// The [N, C, S] geometry. With S == 1 (e.g. a 2-D [N, C] input) N takes the place of S, so that
// a channel's elements are still walked along the one dimension that can be contiguous.
struct Problem {
  int64_t N, C, S;
  bool swapped;

  explicit Problem(const at::Tensor& x) : N(x.size(0)), C(x.size(1)), S(1), swapped(false) {
    for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
    if (S == 1) {
      std::swap(N, S);
      swapped = true;
    }
  }
  int64_t M() const { return N * S; }

  // t's strides over this view; nullopt when t's dims >= 2 do not collapse into one stride
  // (e.g. transposed spatial dims).
  std::optional<Strides3> strides(const at::Tensor& t) const {
    Strides3 st{t.stride(0), t.stride(1), 1};
    int64_t outer = -1;  // the stride the next outer non-trivial dim must have to collapse
    for (int64_t d = t.dim() - 1; d >= 2; --d) {
      if (t.size(d) == 1) continue;
      if (outer < 0) {
        st.s = t.stride(d);
      } else if (t.stride(d) != outer) {
        return std::nullopt;
      }
      outer = t.stride(d) * t.size(d);
    }
    if (swapped) return Strides3{0, st.c, st.n};
    return st;
  }
};

// An input as the kernels read it: a view when its dims collapse, else a contiguous copy (only
// for exotic layouts).
struct Input3 {
  at::Tensor t;
  Strides3 st;

  Input3(const at::Tensor& src, const Problem& p) : t(src) {
    auto st_opt = p.strides(t);
    if (!st_opt) {
      t = src.contiguous();
      st_opt = p.strides(t);
    }
    st = *st_opt;
  }
};

// An output like x (at::empty_like keeps x's layout). When that layout has no [N, C, S] view the
// kernels write a contiguous buffer that finish() copies in.
struct Output3 {
  at::Tensor out, buf;
  Strides3 st;

  Output3(const at::Tensor& x, const Problem& p) : out(at::empty_like(x)), buf(out) {
    auto st_opt = p.strides(out);
    if (!st_opt) {
      buf = at::empty(x.sizes(), x.options());
      st_opt = p.strides(buf);
    }
    st = *st_opt;
  }
  at::Tensor finish() {
    if (!buf.is_same(out)) out.copy_(buf);
    return out;
  }
};

struct Operand {
  const void* ptr;
  Strides3 st;
};

// The traversal of one launch. Operand strides given to kernels come from unit().
struct Plan {
  bool cols;
  int vec;
  dim3 grid, block;
  Extent e;

  Strides3 unit(const Strides3& st) const {
    return cols ? st : Strides3{st.n, st.c, st.s * vec};
  }
};

// Chunks per channel (grid.y): ~kSweeps unrolled sweeps of the block per chunk on big inputs,
// enough blocks for several waves on small ones, never under one sweep per block.
int64_t pick_chunks(int64_t units, int64_t per_sweep, int64_t blocks_across) {
  const int64_t fill = ceil_div(4 * resident_blocks(), blocks_across);
  const int64_t preferred = ceil_div(units, per_sweep * kSweeps);
  const int64_t most = std::min<int64_t>(ceil_div(units, per_sweep), 65535);
  return std::max<int64_t>(1, std::min(std::max(fill, preferred), most));
}

// Whether every operand allows VEC-element (16-byte) accesses along the traversal.
bool vectorizable(const Problem& p, bool cols, int vec, std::initializer_list<Operand> ops) {
  if ((cols ? p.C : p.S) % vec != 0) return false;
  for (const Operand& o : ops) {
    if (!aligned16(o.ptr)) return false;
    const int64_t along = cols ? o.st.c : o.st.s;
    const int64_t across = cols ? o.st.s : o.st.c;  // the stride of the other inner dim
    if (along != 1) return false;
    if (p.N > 1 && o.st.n % vec != 0) return false;
    if ((cols ? p.S : p.C) > 1 && across % vec != 0) return false;
  }
  return true;
}

// ops.begin() is x, whose layout picks the traversal.
Plan make_plan(const Problem& p, int vec, std::initializer_list<Operand> ops) {
  TORCH_CHECK(p.C <= std::numeric_limits<int32_t>::max(), "dinv: too many channels: ", p.C);
  Plan plan;
  plan.cols = ops.begin()->st.c == 1 && p.C > 1;
  plan.vec = vectorizable(p, plan.cols, vec, ops) ? vec : 1;
  plan.e.C = p.C;
  if (plan.cols) {
    const int64_t cv = p.C / plan.vec;
    int bx = 1;
    while (bx < kWarp && bx < cv) bx *= 2;
    const int by = kBlock / bx;
    const int64_t gx = ceil_div(cv, bx);
    plan.e.per_row = p.S;
    plan.e.units = p.M();
    plan.e.chunk = ceil_div(plan.e.units, pick_chunks(plan.e.units, by * kUnroll, gx));
    plan.e.step = {by / p.S, by % p.S};
    plan.grid = dim3(static_cast<unsigned>(gx),
                     static_cast<unsigned>(ceil_div(plan.e.units, plan.e.chunk)));
    plan.block = dim3(bx, by);
  } else {
    plan.e.per_row = p.S / plan.vec;
    plan.e.units = p.N * plan.e.per_row;
    plan.e.chunk = ceil_div(plan.e.units, pick_chunks(plan.e.units, kBlock * kUnroll, p.C));
    plan.e.step = {kBlock / plan.e.per_row, kBlock % plan.e.per_row};
    plan.grid = dim3(static_cast<unsigned>(p.C),
                     static_cast<unsigned>(ceil_div(plan.e.units, plan.e.chunk)));
    plan.block = dim3(kBlock);
  }
  return plan;
}

// The kernels are instantiated per vector width and traversal, which the plan picks at run time:
// launches kernel_of(std::integral_constant<int, VEC>{}, std::bool_constant<COLS>{}), the kernel
// instance for the plan's, on the plan's grid with `args`.
template <typename scalar_t, typename Args, typename KernelOf>
void launch_plan(const Plan& plan, const Args& args, const KernelOf& kernel_of) {
  constexpr int V = kVec<scalar_t>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto vec, auto cols) {
    kernel_of(vec, cols)<<<plan.grid, plan.block, 0, stream>>>(args);
  };
  if (plan.cols) {
    if (plan.vec == V) {
      launch(std::integral_constant<int, V>{}, std::true_type{});
    } else {
      launch(std::integral_constant<int, 1>{}, std::true_type{});
    }
  } else {
    if (plan.vec == V) {
      launch(std::integral_constant<int, V>{}, std::false_type{});
    } else {
      launch(std::integral_constant<int, 1>{}, std::false_type{});
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, bool WRITE_Y>
void launch_stats(const Plan& plan, const StatsArgs<scalar_t>& args) {
  launch_plan<scalar_t>(plan, args, [](auto vec, auto cols) {
    return stats_kernel<scalar_t, decltype(vec)::value, decltype(cols)::value, WRITE_Y>;
  });
}

template <typename scalar_t, bool HAS_GY>
void launch_backward(const Plan& plan, const BackwardArgs<scalar_t>& args) {
  launch_plan<scalar_t>(plan, args, [](auto vec, auto cols) {
    return backward_kernel<scalar_t, decltype(vec)::value, decltype(cols)::value, HAS_GY>;
  });
}

// BatchNorm parameters of bn_stats_forward, checked and ready for channel_param.
struct BNTensors {
  at::Tensor weight, bias, running_mean, running_var;
  double eps;
};

// channel_stats, and bn_stats_forward when `bn` is given: the statistics of x and y from one
// read of x. Returns (y or undefined, mean, var).
std::tuple<at::Tensor, at::Tensor, at::Tensor> stats_impl(const at::Tensor& x,
                                                          const BNTensors* bn) {
  const Problem p(x);
  const auto acc_opts = x.options().dtype(acc_type(x));
  at::Tensor mean = at::empty({p.C}, acc_opts);
  at::Tensor var = at::empty({p.C}, acc_opts);
  std::optional<Output3> y;
  if (bn) y.emplace(x, p);
  if (p.C == 0) return {bn ? y->out : at::Tensor(), mean, var};
  if (p.M() == 0) {  // statistics of nothing, as torch.var_mean gives them
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {bn ? y->out : at::Tensor(), mean, var};
  }
  const Input3 in(x, p);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dinv_stats", [&] {
    using acc = acc_t<scalar_t>;
    const Plan plan = bn ? make_plan(p, kVec<scalar_t>,
                                     {{in.t.const_data_ptr(), in.st}, {y->buf.data_ptr(), y->st}})
                         : make_plan(p, kVec<scalar_t>, {{in.t.const_data_ptr(), in.st}});
    const int64_t chunks = plan.grid.y;
    at::Tensor part;
    if (chunks > 1) part = at::empty({p.C * chunks, 3}, acc_opts);

    StatsArgs<scalar_t> args{};
    args.x = in.t.const_data_ptr<scalar_t>();
    args.xs = plan.unit(in.st);
    args.e = plan.e;
    args.out = {chunks > 1 ? reinterpret_cast<Welford<acc>*>(part.data_ptr<acc>()) : nullptr,
                mean.data_ptr<acc>(), var.data_ptr<acc>(), chunks};
    if (bn) {
      args.y = y->buf.data_ptr<scalar_t>();
      args.ys = plan.unit(y->st);
      args.bn = {channel_param<scalar_t>(bn->weight, acc(1)),
                 channel_param<scalar_t>(bn->bias, acc(0)),
                 channel_param<scalar_t>(bn->running_mean, acc(0)),
                 channel_param<scalar_t>(bn->running_var, acc(1)), static_cast<acc>(bn->eps)};
      launch_stats<scalar_t, true>(plan, args);
    } else {
      launch_stats<scalar_t, false>(plan, args);
    }
    if (chunks > 1) {
      const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
      stats_finalize_kernel<acc><<<static_cast<unsigned>(p.C), kBlock, 0, stream>>>(
          reinterpret_cast<const Welford<acc>*>(part.const_data_ptr<acc>()), chunks,
          mean.data_ptr<acc>(), var.data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {bn ? y->finish() : at::Tensor(), mean, var};
}

// channel_stats_backward, and bn_stats_backward when grad_y is given.
at::Tensor backward_impl(const at::Tensor& x, const at::Tensor* grad_y, const at::Tensor& mean,
                         const at::Tensor& grad_mean, const at::Tensor& grad_var,
                         const at::Tensor& weight, const at::Tensor& running_var, double eps) {
  const Problem p(x);
  Output3 dx(x, p);
  if (x.numel() == 0) return dx.out;
  const Input3 in(x, p);
  std::optional<Input3> gy;
  if (grad_y) gy.emplace(*grad_y, p);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dinv_stats_bwd",
                                  [&] {
    using acc = acc_t<scalar_t>;
    const Plan plan =
        gy ? make_plan(p, kVec<scalar_t>,
                       {{in.t.const_data_ptr(), in.st},
                        {gy->t.const_data_ptr(), gy->st},
                        {dx.buf.data_ptr(), dx.st}})
           : make_plan(p, kVec<scalar_t>,
                       {{in.t.const_data_ptr(), in.st}, {dx.buf.data_ptr(), dx.st}});
    BackwardArgs<scalar_t> args{};
    args.x = in.t.const_data_ptr<scalar_t>();
    args.xs = plan.unit(in.st);
    args.dx = dx.buf.data_ptr<scalar_t>();
    args.ds = plan.unit(dx.st);
    args.e = plan.e;
    args.p = {channel_param<scalar_t>(mean, acc(0)),
              channel_param<scalar_t>(grad_mean, acc(0)),
              channel_param<scalar_t>(grad_var, acc(0)),
              channel_param<scalar_t>(weight, acc(1)),
              channel_param<scalar_t>(running_var, acc(1)),
              static_cast<acc>(1.0 / static_cast<double>(p.M())),
              static_cast<acc>(eps)};
    if (gy) {
      args.gy = gy->t.const_data_ptr<scalar_t>();
      args.gs = plan.unit(gy->st);
      launch_backward<scalar_t, true>(plan, args);
    } else {
      launch_backward<scalar_t, false>(plan, args);
    }
  });
  return dx.finish();
}

void check_x(const at::Tensor& x, const char* op) {
  check_input(x, op, "x");
  TORCH_CHECK(x.dim() >= 2, op, ": x must have at least 2 dims [N, C, ...], got ", x.sizes());
}

// A required per-channel input.
at::Tensor required_channel(const at::Tensor& t, const at::Tensor& x, const char* op,
                            const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  return channel_tensor(t, x, x.size(1), op, name);
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cuda(const at::Tensor& x) {
  check_x(x, "channel_stats");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  auto [y, mean, var] = stats_impl(x, nullptr);
  return {mean, var};
}

at::Tensor channel_stats_backward_cuda(const at::Tensor& x, const at::Tensor& mean,
                                       const at::Tensor& grad_mean, const at::Tensor& grad_var) {
  constexpr const char* op = "channel_stats_backward";
  check_x(x, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return backward_impl(x, nullptr, required_channel(mean, x, op, "mean"),
                       required_channel(grad_mean, x, op, "grad_mean"),
                       required_channel(grad_var, x, op, "grad_var"), at::Tensor(), at::Tensor(),
                       0.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_stats_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& running_mean,
    const at::Tensor& running_var, double eps) {
  constexpr const char* op = "bn_stats_forward";
  check_x(x, op);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const BNTensors bn{channel_tensor(weight, x, x.size(1), op, "weight"),
                     channel_tensor(bias, x, x.size(1), op, "bias"),
                     required_channel(running_mean, x, op, "running_mean"),
                     required_channel(running_var, x, op, "running_var"), eps};
  return stats_impl(x, &bn);
}

at::Tensor bn_stats_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& grad_mean,
                                  const at::Tensor& grad_var,
                                  const std::optional<at::Tensor>& weight,
                                  const at::Tensor& running_var, double eps) {
  constexpr const char* op = "bn_stats_backward";
  check_x(x, op);
  check_input(grad_y, op, "grad_y");
  check_same_device(grad_y, x, op, "grad_y");
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y has shape ", grad_y.sizes(),
              " but x has ", x.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y is ",
              grad_y.scalar_type(), " but x is ", x.scalar_type());
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  return backward_impl(x, &grad_y, required_channel(mean, x, op, "mean"),
                       required_channel(grad_mean, x, op, "grad_mean"),
                       required_channel(grad_var, x, op, "grad_var"),
                       channel_tensor(weight, x, x.size(1), op, "weight"),
                       required_channel(running_var, x, op, "running_var"), eps);
}

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  m.impl("channel_stats", &dinv::gpu::channel_stats_cuda);
  m.impl("channel_stats_backward", &dinv::gpu::channel_stats_backward_cuda);
  m.impl("bn_stats_forward", &dinv::gpu::bn_stats_forward_cuda);
  m.impl("bn_stats_backward", &dinv::gpu::bn_stats_backward_cuda);
}

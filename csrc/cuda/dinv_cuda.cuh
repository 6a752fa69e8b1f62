// Helpers shared by the dinv CUDA kernels (csrc/cuda/*.cu): accumulation types, vector loads,
// deterministic warp/block reductions, Welford/Chan and online-softmax merges, per-channel
// parameter reads, host-side checks and the row ops' launches. The math of every op is in
// docs/kernels.md.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace dinv::gpu {

constexpr int kWarp = 32;
// Threads per block of every kernel (row kernels may use fewer for short rows).
constexpr int kBlock = 256;

// Accumulation type: fp32 for fp16/bf16/fp32, fp64 for fp64.
template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;

// Elements per 16-byte vector access.
template <typename scalar_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(scalar_t));

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Loads VEC consecutive elements (VEC > 1: one 16-byte access, `p` 16-byte aligned) and upcasts
// them.
template <int VEC, typename scalar_t, typename acc>
__device__ __forceinline__ void load_vec(const scalar_t* p, acc* out) {
  if constexpr (VEC == 1) {
    out[0] = static_cast<acc>(*p);
  } else {
    static_assert(sizeof(Vec<scalar_t, VEC>) == sizeof(uint4), "vectors are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    Vec<scalar_t, VEC> v;
    memcpy(&v, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc>(v.v[i]);
  }
}

// Rounds VEC values once to scalar_t and stores them (VEC > 1: one 16-byte access). The store is
// written in PTX because nvcc splits an ordinary 16-byte struct store into four 32-bit stores in
// some of the kernels.
template <int VEC, typename scalar_t, typename acc>
__device__ __forceinline__ void store_vec(scalar_t* p, const acc* in) {
  if constexpr (VEC == 1) {
    *p = static_cast<scalar_t>(in[0]);
  } else {
    static_assert(sizeof(Vec<scalar_t, VEC>) == sizeof(uint4), "vectors are 16 bytes");
    Vec<scalar_t, VEC> v;
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.v[i] = static_cast<scalar_t>(in[i]);
    uint4 raw;
    memcpy(&raw, &v, sizeof(raw));
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)),
                 "r"(raw.x), "r"(raw.y), "r"(raw.z), "r"(raw.w)
                 : "memory");
  }
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// a / b for a >= 0, b > 0. 64-bit division is a long emulated sequence on the GPU, and the
// operands almost always fit 32 bits.
__device__ __forceinline__ int64_t div_fast(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  return a / b;
}

// Math in the accumulation type, overloaded for float and double.
__device__ __forceinline__ float dexp(float v) { return expf(v); }
__device__ __forceinline__ double dexp(double v) { return exp(v); }
__device__ __forceinline__ float dlog(float v) { return logf(v); }
__device__ __forceinline__ double dlog(double v) { return log(v); }
__device__ __forceinline__ float drsqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double drsqrt(double v) { return rsqrt(v); }

// ---------------------------------------------------------------------------------------------
// Deterministic reductions: a fixed shuffle-down tree per warp, then one warp over the per-warp
// results. The combine order never depends on timing, so results are bitwise reproducible.

// __shfl_down_sync for any trivially copyable type made of 32-bit words.
template <typename T>
__device__ __forceinline__ T shfl_down(const T& v, int delta) {
  static_assert(sizeof(T) % sizeof(int) == 0, "shuffled types must be made of 32-bit words");
  constexpr int kWords = sizeof(T) / sizeof(int);
  int w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_down_sync(0xffffffffu, w[i], delta);
  T r;
  memcpy(&r, w, sizeof(T));
  return r;
}

// The reduction of the warp's 32 values, valid in lane 0. All lanes must be active.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d /= 2) v = op(v, shfl_down(v, d));
  return v;
}

// The reduction over a 1-D block (blockDim.x a multiple of 32), valid in thread 0.
// `identity` pads the last warp's missing lanes.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T per_warp[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_reduce(v, op);
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_reduce(lane < static_cast<int>(blockDim.x / kWarp) ? per_warp[lane] : identity, op);
  }
  return v;
}

// block_reduce broadcast to every thread. Safe to call repeatedly: each call's writes happen
// after a barrier that every reader of the previous call has passed.
template <typename T, typename Op>
__device__ T block_allreduce(T v, Op op, T identity) {
  __shared__ T result;
  v = block_reduce(v, op, identity);
  if (threadIdx.x == 0) result = v;
  __syncthreads();
  return result;
}

struct Add {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// N sums reduced together (one pass through the reduction instead of N).
template <typename acc, int N>
struct Sums {
  acc v[N];
};

struct AddSums {
  template <typename acc, int N>
  __device__ __forceinline__ Sums<acc, N> operator()(Sums<acc, N> a, const Sums<acc, N>& b) const {
#pragma unroll
    for (int i = 0; i < N; ++i) a.v[i] += b.v[i];
    return a;
  }
};

// ---------------------------------------------------------------------------------------------
// Welford statistics: count, mean and sum of squared deviations (M2). The count is kept in acc
// like the rest (exact up to 2^24 in fp32, and only ever used in ratios beyond that).

template <typename acc>
struct Welford {
  acc n, mean, m2;
};

// Chan's parallel merge. Either side may be empty.
struct WelfordMerge {
  template <typename acc>
  __device__ __forceinline__ Welford<acc> operator()(const Welford<acc>& a,
                                                     const Welford<acc>& b) const {
    const acc n = a.n + b.n;
    if (n == acc(0)) return a;
    const acc delta = b.mean - a.mean;
    const acc r = b.n / n;
    return {n, a.mean + delta * r, a.m2 + b.m2 + delta * delta * a.n * r};
  }
};

// Adds K register values: their exact two-pass statistics, merged with Chan's formula. One
// division per K elements instead of one per element.
template <int K, typename acc>
__device__ __forceinline__ void welford_add(Welford<acc>& w, const acc* v) {
  acc sum = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) sum += v[i];
  const acc mean = sum * (acc(1) / acc(K));
  acc m2 = 0;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    const acc d = v[i] - mean;
    m2 += d * d;
  }
  const acc n = w.n + acc(K);
  const acc delta = mean - w.mean;
  const acc r = acc(K) / n;
  w.mean += delta * r;
  w.m2 += m2 + delta * delta * w.n * r;
  w.n = n;
}

// ---------------------------------------------------------------------------------------------
// Online softmax normalizer: running max and Σ exp(z − max).

template <typename acc>
struct MaxSum {
  acc max, sum;
};

template <typename acc>
__device__ __forceinline__ MaxSum<acc> maxsum_identity() {
  return {-std::numeric_limits<acc>::infinity(), acc(0)};
}

template <typename acc>
__device__ __forceinline__ void maxsum_add(MaxSum<acc>& a, acc z) {
  if (z > a.max) {
    a.sum = a.sum * dexp(a.max - z) + acc(1);
    a.max = z;
  } else if (z != -std::numeric_limits<acc>::infinity()) {
    // Skipping −inf keeps exp(−inf − (−inf)) = NaN out; a NaN z falls through and propagates.
    a.sum += dexp(z - a.max);
  }
}

struct MaxSumMerge {
  template <typename acc>
  __device__ __forceinline__ MaxSum<acc> operator()(const MaxSum<acc>& a,
                                                    const MaxSum<acc>& b) const {
    const acc m = a.max > b.max ? a.max : b.max;
    if (m == -std::numeric_limits<acc>::infinity()) return a;
    return {m, a.sum * dexp(a.max - m) + b.sum * dexp(b.max - m)};
  }
};

// ---------------------------------------------------------------------------------------------
// Rows of [B, K] logits for the one-block-per-row kernels (js, kd).

template <typename scalar_t>
struct Logits {
  const scalar_t* p;
  int64_t row_stride, col_stride;

  // The logit scaled by 1/T, in acc.
  __device__ __forceinline__ acc_t<scalar_t> z(int64_t b, int64_t j, acc_t<scalar_t> inv_t) const {
    return static_cast<acc_t<scalar_t>>(p[b * row_stride + j * col_stride]) * inv_t;
  }
};

template <typename scalar_t>
struct LogitGrads {
  scalar_t* p;
  int64_t row_stride, col_stride;

  __device__ __forceinline__ void store(int64_t b, int64_t j, acc_t<scalar_t> v) const {
    p[b * row_stride + j * col_stride] = static_cast<scalar_t>(v);
  }
};

// softmax(z) of a row from its normalizer (max, Σ exp(z − max)).
template <typename acc>
struct RowSoftmax {
  acc max, inv_sum, log_sum;

  __device__ __forceinline__ acc prob(acc z) const { return dexp(z - max) * inv_sum; }
  __device__ __forceinline__ acc log_prob(acc z) const { return z - max - log_sum; }
};

template <typename acc>
struct MaxSumPair {
  MaxSum<acc> s, t;
};

struct MaxSumPairMerge {
  template <typename acc>
  __device__ __forceinline__ MaxSumPair<acc> operator()(const MaxSumPair<acc>& a,
                                                        const MaxSumPair<acc>& b) const {
    return {MaxSumMerge{}(a.s, b.s), MaxSumMerge{}(a.t, b.t)};
  }
};

// The softmaxes of row b of the student and the teacher logits (scaled by 1/T), computed by the
// whole block with one online pass over the row; every thread receives them.
template <typename scalar_t>
__device__ void row_softmaxes(const Logits<scalar_t>& s, const Logits<scalar_t>& t, int64_t b,
                              int64_t K, acc_t<scalar_t> inv_t, RowSoftmax<acc_t<scalar_t>>& ps,
                              RowSoftmax<acc_t<scalar_t>>& pt) {
  using acc = acc_t<scalar_t>;
  MaxSumPair<acc> m{maxsum_identity<acc>(), maxsum_identity<acc>()};
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    maxsum_add(m.s, s.z(b, j, inv_t));
    maxsum_add(m.t, t.z(b, j, inv_t));
  }
  m = block_allreduce(m, MaxSumPairMerge{},
                      MaxSumPair<acc>{maxsum_identity<acc>(), maxsum_identity<acc>()});
  ps = {m.s.max, acc(1) / m.s.sum, dlog(m.s.sum)};
  pt = {m.t.max, acc(1) / m.t.sum, dlog(m.t.sum)};
}

// ---------------------------------------------------------------------------------------------
// A per-channel [C] tensor read in place on the device and upcast to acc: BatchNorm parameters
// may be fp32 or x's dtype (fp64 under gradcheck), and reading them as they are saves a
// conversion launch per parameter. An absent tensor reads as `fallback` for every channel.

enum class ParamKind : int { kAbsent, kSame, kFloat, kDouble };

template <typename scalar_t>
struct ChannelParam {
  using acc = acc_t<scalar_t>;
  const void* ptr;
  ParamKind kind;
  acc fallback;

  __device__ __forceinline__ acc operator[](int64_t c) const {
    switch (kind) {
      case ParamKind::kSame:
        return static_cast<acc>(static_cast<const scalar_t*>(ptr)[c]);
      case ParamKind::kFloat:
        return static_cast<acc>(static_cast<const float*>(ptr)[c]);
      case ParamKind::kDouble:
        return static_cast<acc>(static_cast<const double*>(ptr)[c]);
      default:
        return fallback;
    }
  }
};

// `t` from channel_tensor (undefined when absent).
template <typename scalar_t>
ChannelParam<scalar_t> channel_param(const at::Tensor& t, acc_t<scalar_t> fallback) {
  if (!t.defined()) return {nullptr, ParamKind::kAbsent, fallback};
  const auto type = t.scalar_type();
  const ParamKind kind = type == c10::CppTypeToScalarType<scalar_t>::value ? ParamKind::kSame
                         : type == at::kFloat                              ? ParamKind::kFloat
                                                                           : ParamKind::kDouble;
  return {t.const_data_ptr(), kind, fallback};
}

// ---------------------------------------------------------------------------------------------
// Host-side checks and launch sizing.

inline at::ScalarType acc_type(const at::Tensor& x) {
  return at::toOpMathType(x.scalar_type());
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(supported_dtype(t.scalar_type()), op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& x, const char* op,
                              const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// A per-channel [C] input, contiguous, in a dtype channel_param reads (x's, fp32 or fp64);
// undefined when absent.
inline at::Tensor channel_tensor(const std::optional<at::Tensor>& p, const at::Tensor& x,
                                 int64_t C, const char* op, const char* name) {
  if (!p.has_value() || !p->defined()) return {};
  const at::Tensor& t = *p;
  check_same_device(t, x, op, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [", C,
              "], got ", t.sizes());
  const auto type = t.scalar_type();
  if (type == x.scalar_type() || type == at::kFloat || type == at::kDouble) return t.contiguous();
  return t.to(acc_type(x)).contiguous();
}

// Arguments of the row ops: logits CUDA, same device, 2-D [B, K], same shape; T > 0.
inline void check_logits(const at::Tensor& s, const at::Tensor& t, double T, const char* op) {
  check_input(s, op, "student_logits");
  check_input(t, op, "teacher_logits");
  check_same_device(t, s, op, "teacher_logits");
  TORCH_CHECK(s.dim() == 2, op, ": logits must be 2-D [B, K], got ", s.sizes());
  TORCH_CHECK(s.sizes() == t.sizes(), op, ": student_logits ", s.sizes(),
              " and teacher_logits ", t.sizes(), " differ in shape");
  TORCH_CHECK(s.size(0) <= std::numeric_limits<int32_t>::max(), op, ": too many rows");
  TORCH_CHECK(T > 0, op, ": the temperature T must be positive, got ", T);
}

// Both logits in their promoted dtype (a copy only when the dtypes differ).
struct LogitPair {
  at::Tensor s, t;
};

inline LogitPair promote_logits(const at::Tensor& s, const at::Tensor& t) {
  const auto type = at::promoteTypes(s.scalar_type(), t.scalar_type());
  return {s.to(type), t.to(type)};
}

template <typename scalar_t>
Logits<scalar_t> logits_of(const at::Tensor& t) {
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

// Per-row grad_rows: acc [B].
inline at::Tensor grad_rows_tensor(const at::Tensor& g, const at::Tensor& logits,
                                   const char* op) {
  check_input(g, op, "grad_rows");
  check_same_device(g, logits, op, "grad_rows");
  TORCH_CHECK(g.dim() == 1 && g.size(0) == logits.size(0), op, ": grad_rows must have shape [",
              logits.size(0), "], got ", g.sizes());
  return g.to(acc_type(logits)).contiguous();
}

// Threads per row block: a power of two from one warp to kBlock, about one per logit.
inline int row_threads(int64_t K) {
  int threads = kWarp;
  while (threads < kBlock && threads < K) threads *= 2;
  return threads;
}

// Blocks of kBlock threads that keep every SM of the current device fully occupied.
inline int64_t resident_blocks() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return static_cast<int64_t>(prop->multiProcessorCount) *
         (prop->maxThreadsPerMultiProcessor / kBlock);
}

// ---------------------------------------------------------------------------------------------
// The row ops (js.cu, kd.cu): one block of row_threads(K) threads per row of [B, K] logits; the two
// softmax normalizers come from one online pass over the row, and the later passes re-read the
// row (from cache) rather than storing probabilities; the backward recomputes everything from the
// logits. An op is a struct of static members, the __device__ ones given one class's
// ClassProbs:
//   kName, kBackwardName          the schema names, for error messages and registration;
//   value_term(c)                 the class's term of the row value (acc);
//   needs_dots(student, teacher)  whether the gradients asked for read the row's dots;
//   dot_terms(c)                  the class's terms of the row's two dots (Sums<acc, 2>);
//   grads(c, dots, g, ds, dt)     the class's gradients, g = grad_rows[b]/T.
// rows_forward_cuda<Op> and rows_backward_cuda<Op> are the op's kernels (impl_row_op registers
// them).

// Class j of a row: both probabilities and their logs. The op functions are inlined, so what an op
// does not read (e.g. KD's value never reads p) is not computed.
template <typename acc>
struct ClassProbs {
  acc p, q, log_p, log_q;
};

template <typename scalar_t>
__device__ __forceinline__ ClassProbs<acc_t<scalar_t>> class_probs(
    const Logits<scalar_t>& s, const Logits<scalar_t>& t, int64_t b, int64_t j,
    acc_t<scalar_t> inv_t, const RowSoftmax<acc_t<scalar_t>>& ps,
    const RowSoftmax<acc_t<scalar_t>>& pt) {
  const acc_t<scalar_t> zs = s.z(b, j, inv_t), zt = t.z(b, j, inv_t);
  return {ps.prob(zs), pt.prob(zt), ps.log_prob(zs), pt.log_prob(zt)};
}

template <typename Op, typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    rows_kernel(Logits<scalar_t> s, Logits<scalar_t> t, int64_t K, acc_t<scalar_t> inv_t,
                acc_t<scalar_t>* __restrict__ out) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  RowSoftmax<acc> ps, pt;
  row_softmaxes(s, t, b, K, inv_t, ps, pt);
  acc r = 0;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    r += Op::value_term(class_probs(s, t, b, j, inv_t, ps, pt));
  }
  r = block_reduce(r, Add{}, acc(0));
  if (threadIdx.x == 0) out[b] = r;
}

// student_grad / teacher_grad are the same for the whole grid, so their branches (and the
// barriers of the dots' reduction inside one) are uniform.
template <typename Op, typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    rows_backward_kernel(const acc_t<scalar_t>* __restrict__ grad_rows, Logits<scalar_t> s,
                         Logits<scalar_t> t, int64_t K, acc_t<scalar_t> inv_t,
                         LogitGrads<scalar_t> ds, LogitGrads<scalar_t> dt, bool student_grad,
                         bool teacher_grad) {
  using acc = acc_t<scalar_t>;
  const int64_t b = blockIdx.x;
  RowSoftmax<acc> ps, pt;
  row_softmaxes(s, t, b, K, inv_t, ps, pt);
  Sums<acc, 2> dots{};
  if (Op::needs_dots(student_grad, teacher_grad)) {
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
      dots = AddSums{}(dots, Op::dot_terms(class_probs(s, t, b, j, inv_t, ps, pt)));
    }
    dots = block_allreduce(dots, AddSums{}, Sums<acc, 2>{});
  }
  const acc g = grad_rows[b] * inv_t;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    acc gs, gt;
    Op::grads(class_probs(s, t, b, j, inv_t, ps, pt), dots, g, gs, gt);
    if (student_grad) ds.store(b, j, gs);
    if (teacher_grad) dt.store(b, j, gt);
  }
}

// The forward: the acc [B] row values (acc of the logits' promoted dtype).
template <typename Op>
at::Tensor rows_forward_cuda(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                             double T) {
  check_logits(student_logits, teacher_logits, T, Op::kName);
  const c10::cuda::OptionalCUDAGuard guard(student_logits.device());
  const LogitPair logits = promote_logits(student_logits, teacher_logits);
  const at::Tensor& s = logits.s;
  const at::Tensor& t = logits.t;
  const int64_t B = s.size(0), K = s.size(1);
  at::Tensor out = at::empty({B}, s.options().dtype(acc_type(s)));
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dinv_rows", [&] {
    using acc = acc_t<scalar_t>;
    rows_kernel<Op, scalar_t>
        <<<static_cast<unsigned>(B), row_threads(K), 0, at::cuda::getCurrentCUDAStream()>>>(
            logits_of<scalar_t>(s), logits_of<scalar_t>(t), K, static_cast<acc>(1.0 / T),
            out.data_ptr<acc>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// A gradient output of the backward: contiguous like `logits`, or empty when not asked for.
inline at::Tensor logit_grad_tensor(const at::Tensor& logits, bool wanted) {
  return wanted ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
}

template <typename scalar_t>
LogitGrads<scalar_t> logit_grads_of(const at::Tensor& grad, bool wanted) {
  if (!wanted) return {nullptr, 0, 0};
  return {grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1)};
}

// The backward: the gradients of the student's and the teacher's logits, each contiguous in its
// logits' dtype; one not asked for is an empty tensor and is not computed.
template <typename Op>
std::tuple<at::Tensor, at::Tensor> rows_backward_cuda(const at::Tensor& grad_rows,
                                                      const at::Tensor& student_logits,
                                                      const at::Tensor& teacher_logits, double T,
                                                      bool student_grad, bool teacher_grad) {
  check_logits(student_logits, teacher_logits, T, Op::kBackwardName);
  const c10::cuda::OptionalCUDAGuard guard(student_logits.device());
  const LogitPair logits = promote_logits(student_logits, teacher_logits);
  const at::Tensor& s = logits.s;
  const at::Tensor& t = logits.t;
  const at::Tensor g = grad_rows_tensor(grad_rows, s, Op::kBackwardName);
  at::Tensor ds = logit_grad_tensor(s, student_grad);
  at::Tensor dt = logit_grad_tensor(t, teacher_grad);
  const int64_t B = s.size(0), K = s.size(1);
  if (B > 0 && K > 0 && (student_grad || teacher_grad)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, s.scalar_type(), "dinv_rows_backward", [&] {
          using acc = acc_t<scalar_t>;
          rows_backward_kernel<Op, scalar_t><<<static_cast<unsigned>(B), row_threads(K), 0,
                                               at::cuda::getCurrentCUDAStream()>>>(
              g.const_data_ptr<acc>(), logits_of<scalar_t>(s), logits_of<scalar_t>(t), K,
              static_cast<acc>(1.0 / T), logit_grads_of<scalar_t>(ds, student_grad),
              logit_grads_of<scalar_t>(dt, teacher_grad), student_grad, teacher_grad);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {ds.to(student_logits.scalar_type()), dt.to(teacher_logits.scalar_type())};
}

// Registers Op's kernels under its schema names Op::kName and Op::kBackwardName.
template <typename Op>
void impl_row_op(torch::Library& m) {
  m.impl(Op::kName, &rows_forward_cuda<Op>);
  m.impl(Op::kBackwardName, &rows_backward_cuda<Op>);
}

}  // namespace dinv::gpu

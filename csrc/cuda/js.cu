// Jensen-Shannon competition rows on CUDA (docs/kernels.md §4): the reference code's clamped
// formula (js_rows) and the true Jensen-Shannon divergence (jsd_rows), one block per row (see the
// row ops in dinv_cuda.cuh).
#include "dinv_cuda.cuh"

#include <limits>

namespace dinv::gpu {
namespace {

// torch.clamp(v, 0.01, 0.99): NaN passes through.
template <typename acc>
__device__ __forceinline__ acc clamp_prob(acc v) {
  const acc lo = acc(0.01), hi = acc(0.99);
  return v < lo ? lo : (v > hi ? hi : v);
}

// Where torch.clamp passes the gradient: lo <= v <= hi, inclusive.
template <typename acc>
__device__ __forceinline__ bool in_clamp(acc v) {
  return v >= acc(0.01) && v <= acc(0.99);
}

// r = Σ_j mc_j*(log mc_j − ½ log pc_j − ½ log qc_j) on p, q, m clamped to [0.01, 0.99].
struct JsRows {
  static constexpr const char* kName = "js_rows";
  static constexpr const char* kBackwardName = "js_rows_backward";

  template <typename acc>
  static __device__ __forceinline__ acc value_term(const ClassProbs<acc>& c) {
    const acc mc = clamp_prob((c.p + c.q) * acc(0.5));
    return mc * (dlog(mc) - acc(0.5) * dlog(clamp_prob(c.p)) - acc(0.5) * dlog(clamp_prob(c.q)));
  }

  // {gp_j, gq_j}: the row value's gradient with respect to p_j and q_j.
  template <typename acc>
  static __device__ __forceinline__ Sums<acc, 2> prob_grads(const ClassProbs<acc>& c) {
    const acc m = (c.p + c.q) * acc(0.5);
    const acc pc = clamp_prob(c.p), qc = clamp_prob(c.q), mc = clamp_prob(m);
    const acc gm =
        in_clamp(m) ? dlog(mc) + acc(1) - acc(0.5) * dlog(pc) - acc(0.5) * dlog(qc) : acc(0);
    return {{(in_clamp(c.p) ? acc(-0.5) * mc / pc : acc(0)) + acc(0.5) * gm,
             (in_clamp(c.q) ? acc(-0.5) * mc / qc : acc(0)) + acc(0.5) * gm}};
  }

  static __device__ __forceinline__ bool needs_dots(bool, bool) { return true; }

  // {p_j gp_j, q_j gq_j}
  template <typename acc>
  static __device__ __forceinline__ Sums<acc, 2> dot_terms(const ClassProbs<acc>& c) {
    const Sums<acc, 2> gpq = prob_grads(c);
    return {{c.p * gpq.v[0], c.q * gpq.v[1]}};
  }

  // ds_j = g * p_j*(gp_j − Σ_k p_k gp_k), dt_j likewise with q, gq.
  template <typename acc>
  static __device__ __forceinline__ void grads(const ClassProbs<acc>& c, const Sums<acc, 2>& dots,
                                               acc g, acc& ds, acc& dt) {
    const Sums<acc, 2> gpq = prob_grads(c);
    ds = g * c.p * (gpq.v[0] - dots.v[0]);
    dt = g * c.q * (gpq.v[1] - dots.v[1]);
  }
};

// r = ½ Σ_j (wp_j + wq_j), the KL terms wp_j = p_j log(p_j/m_j), wq_j = q_j log(q_j/m_j) of
// m = (p+q)/2, 0 where the probability is 0 (underflow).
struct JsdRows {
  static constexpr const char* kName = "jsd_rows";
  static constexpr const char* kBackwardName = "jsd_rows_backward";

  // {wp_j, wq_j}. log m_j is taken of p_j + q_j floored at the smallest normal, so that no log of
  // 0 or of a subnormal is taken (those arise only where both weights are (nearly) 0); the floor
  // and the selects keep NaN.
  template <typename acc>
  static __device__ __forceinline__ Sums<acc, 2> dot_terms(const ClassProbs<acc>& c) {
    constexpr acc kTiny = std::numeric_limits<acc>::min();
    const acc sum = c.p + c.q;
    const acc log_m = dlog(sum < kTiny ? kTiny : sum) - acc(0.69314718055994530942);
    return {{c.p == acc(0) ? acc(0) : c.p * (c.log_p - log_m),
             c.q == acc(0) ? acc(0) : c.q * (c.log_q - log_m)}};
  }

  template <typename acc>
  static __device__ __forceinline__ acc value_term(const ClassProbs<acc>& c) {
    const Sums<acc, 2> w = dot_terms(c);
    return acc(0.5) * (w.v[0] + w.v[1]);
  }

  static __device__ __forceinline__ bool needs_dots(bool, bool) { return true; }

  // ds_j = g/2 (wp_j − p_j Σ_k wp_k), dt_j likewise with q.
  template <typename acc>
  static __device__ __forceinline__ void grads(const ClassProbs<acc>& c, const Sums<acc, 2>& dots,
                                               acc g, acc& ds, acc& dt) {
    const Sums<acc, 2> w = dot_terms(c);
    ds = acc(0.5) * g * (w.v[0] - c.p * dots.v[0]);
    dt = acc(0.5) * g * (w.v[1] - c.q * dots.v[1]);
  }
};

}  // namespace
}  // namespace dinv::gpu

TORCH_LIBRARY_IMPL(dinv, CUDA, m) {
  dinv::gpu::impl_row_op<dinv::gpu::JsRows>(m);
  dinv::gpu::impl_row_op<dinv::gpu::JsdRows>(m);
}

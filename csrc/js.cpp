// CPU kernels of the Jensen-Shannon competition rows (docs/kernels.md section 4): the reference
// code's clamped formula (js_rows) and the true Jensen-Shannon divergence (jsd_rows). One row per
// work item; the backward recomputes both softmaxes from the logits.
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "dinv_cpu.h"

namespace dinv::cpu {
namespace {

// The fixed clamp bounds of the probabilities.
template <typename acc>
constexpr acc kLo = acc(0.01);
template <typename acc>
constexpr acc kHi = acc(0.99);

template <typename acc>
DINV_INLINE acc clamp_prob(acc v) {
  return std::min(std::max(v, kLo<acc>), kHi<acc>);
}

// torch.clamp passes the gradient where lo <= v <= hi.
template <typename acc>
DINV_INLINE bool inside_clamp(acc v) {
  return kLo<acc> <= v && v <= kHi<acc>;
}

// The reference code's formula: r = Σ_j mc_j (log mc_j − ½ log pc_j − ½ log qc_j).
struct JsRows {
  static constexpr const char* kName = "js_rows";
  static constexpr const char* kBackwardName = "js_rows_backward";
  // row_pair's scratch; the backward writes the gradients gp and gq of the row's value with
  // respect to p and q over the logits zs and zt.
  static constexpr int64_t kScratchRows = 4;

  template <typename scalar_t, typename acc = acc_t<scalar_t>>
  DINV_INLINE static acc value(const scalar_t* s, const scalar_t* t, int64_t K, acc T,
                               acc* scratch) {
    const RowPair<acc> r = row_pair(s, t, K, T, scratch);
    return lane_sum<acc>(K, [&](int64_t j) {
      const acc mc = clamp_prob((r.p[j] + r.q[j]) * acc(0.5));
      return mc * (log_simd(mc) - acc(0.5) * log_simd(clamp_prob(r.p[j])) -
                   acc(0.5) * log_simd(clamp_prob(r.q[j])));
    });
  }

  template <typename scalar_t, typename acc = acc_t<scalar_t>>
  DINV_INLINE static void grads(acc grad, const scalar_t* s, const scalar_t* t, int64_t K, acc T,
                                acc* scratch, scalar_t* ds, scalar_t* dt) {
    const RowPair<acc> r = row_pair(s, t, K, T, scratch);
    const acc *p = r.p, *q = r.q;
    acc *gp = r.zs, *gq = r.zt;
    // Both gradients in one loop, whichever is wanted: they share the logs.
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
    // Through the softmaxes of s/T and t/T.
    const acc scale = grad / T;
    if (ds) through_softmax(p, gp, K, scale, ds);
    if (dt) through_softmax(q, gq, K, scale, dt);
  }

  // out_j = scale * prob_j * (g_j − Σ_k prob_k g_k).
  template <typename scalar_t, typename acc>
  DINV_INLINE static void through_softmax(const acc* prob, const acc* g, int64_t K, acc scale,
                                          scalar_t* out) {
    const acc dot = lane_sum<acc>(K, [&](int64_t j) { return prob[j] * g[j]; });
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) out[j] = static_cast<scalar_t>(scale * prob[j] * (g[j] - dot));
  }
};

// The true divergence: r = ½ Σ_j (wp_j + wq_j) with the KL terms wp_j = p_j log(p_j/m_j) and
// wq_j = q_j log(q_j/m_j), m = (p+q)/2; a term whose probability is 0 (underflow) is 0.
struct JsdRows {
  static constexpr const char* kName = "jsd_rows";
  static constexpr const char* kBackwardName = "jsd_rows_backward";
  // row_pair's scratch; the backward writes wp and wq over the logits zs and zt.
  static constexpr int64_t kScratchRows = 4;

  // wp_j and wq_j of class j. log m_j is taken of p_j + q_j floored at the smallest normal: the
  // log of 0 or of a subnormal only arises where both probabilities are (nearly) 0, and there
  // their weights make the floor irrelevant. NaN passes the floor.
  template <typename acc>
  DINV_INLINE static void kl_terms(const RowPair<acc>& r, int64_t j, acc& wp, acc& wq) {
    constexpr acc kTiny = std::numeric_limits<acc>::min();
    const acc p = r.p[j], q = r.q[j], sum = p + q;
    const acc log_m = log_simd(sum < kTiny ? kTiny : sum) - acc(0.69314718055994530942);
    // unconditional, so that the selects vectorize
    const acc tp = p * (r.ps.log_prob(r.zs[j]) - log_m), tq = q * (r.qs.log_prob(r.zt[j]) - log_m);
    wp = p == acc(0) ? acc(0) : tp;
    wq = q == acc(0) ? acc(0) : tq;
  }

  template <typename scalar_t, typename acc = acc_t<scalar_t>>
  DINV_INLINE static acc value(const scalar_t* s, const scalar_t* t, int64_t K, acc T,
                               acc* scratch) {
    const RowPair<acc> r = row_pair(s, t, K, T, scratch);
    return acc(0.5) * lane_sum<acc>(K, [&](int64_t j) {
      acc wp, wq;
      kl_terms(r, j, wp, wq);
      return wp + wq;
    });
  }

  // ds_j = g/(2T) (wp_j − p_j Σ_k wp_k), dt_j likewise with q.
  template <typename scalar_t, typename acc = acc_t<scalar_t>>
  DINV_INLINE static void grads(acc grad, const scalar_t* s, const scalar_t* t, int64_t K, acc T,
                                acc* scratch, scalar_t* ds, scalar_t* dt) {
    const RowPair<acc> r = row_pair(s, t, K, T, scratch);
    acc *wp = r.zs, *wq = r.zt;  // each written over the logit it is computed from
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) kl_terms(r, j, wp[j], wq[j]);
    const acc scale = grad / (acc(2) * T);
    if (ds) through_softmax(r.p, wp, K, scale, ds);
    if (dt) through_softmax(r.q, wq, K, scale, dt);
  }

  // out_j = scale * (w_j − prob_j Σ_k w_k).
  template <typename scalar_t, typename acc>
  DINV_INLINE static void through_softmax(const acc* prob, const acc* w, int64_t K, acc scale,
                                          scalar_t* out) {
    const acc kl = lane_sum<acc>(K, [&](int64_t j) { return w[j]; });
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) out[j] = static_cast<scalar_t>(scale * (w[j] - prob[j] * kl));
  }
};

}  // namespace
}  // namespace dinv::cpu

TORCH_LIBRARY_IMPL(dinv, CPU, m) {
  dinv::cpu::impl_row_op<dinv::cpu::JsRows>(m);
  dinv::cpu::impl_row_op<dinv::cpu::JsdRows>(m);
}

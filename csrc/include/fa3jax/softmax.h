// Online softmax in the exp2 domain over row-major views (rows, cols) of GMMA accumulators.
// Scores are kept in "raw" units r (= q.k, or softcap*tanh(q.k*scale/softcap) with softcap);
// p = exp2(r * scale_log2 - max * scale_log2), and lse = max * lse_scale + log(sum).
#pragma once

#include <cmath>
#include "mask.h"
#include "utils.h"

namespace fa3jax {

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];
  float row_sum[kRows];  // per-thread partial sums (reduced across the quad at the end)

  CUTE_DEVICE void init() {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // Turns scores S (rows, cols) into probabilities in place; o_scale[r] receives the factor by which the
  // running output of row r must be multiplied (0 on a row's first non-empty block).
  template <class TS>
  CUTE_DEVICE void step(TS& S, float scale_log2, float (&o_scale)[kRows]) {
    static_assert(decltype(size<0>(S))::value == kRows);
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float mx = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(S); ++c) mx = fmaxf(mx, S(r, c));
      mx = quad_max(mx);
      float const base = (mx == -INFINITY ? 0.f : mx) * scale_log2;
      o_scale[r] = exp2f(row_max[r] * scale_log2 - base);  // exp2(-inf) = 0 on the first block
      // The sum starts from the first term instead of 0 (one FADD per row less; exact: 0 + p == p for p >= +0).
      float sum;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(S); ++c) {
        float p = exp2f(fmaf(S(r, c), scale_log2, -base));
        S(r, c) = p;
        sum = c == 0 ? p : sum + p;
      }
      row_sum[r] = fmaf(row_sum[r], o_scale[r], sum);
      row_max[r] = mx;
    }
  }

  // Final normalization factors and natural-log LSE. Rows that saw no key: inv 0, lse -inf.
  CUTE_DEVICE void finalize(float lse_scale, float (&inv)[kRows], float (&lse)[kRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float sum = quad_sum(row_sum[r]);
      bool empty = !(sum > 0.f);
      inv[r] = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : row_max[r] * lse_scale + __logf(sum);
    }
  }

  // finalize() with an attention sink (natural-log logit `sink`) in every row's denominator; it carries no value,
  // so it only rescales: with m = max * scale_log2 and s = sink * log2 e, M = max(m, s),
  // l = sum * 2^(m - M) + 2^(s - M), inv = 2^(m - M) / l, lse = (M + log2 l) * ln 2.
  // Rows that saw no key: inv 0, lse = sink exactly (also when the sink is -inf).
  CUTE_DEVICE void finalize_with_sink(float scale_log2, float sink, float (&inv)[kRows], float (&lse)[kRows]) {
    float sinks[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) sinks[r] = sink;
    finalize_with_sinks(scale_log2, sinks, inv, lse);
  }
  // The same with one sink per row (GQA packing: a tile's rows belong to different query heads).
  CUTE_DEVICE void finalize_with_sinks(float scale_log2, float const (&sink)[kRows], float (&inv)[kRows],
                                       float (&lse)[kRows]) {
    constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float const s = sink[r] * kLog2e;
      float const sum = quad_sum(row_sum[r]);
      bool const empty = !(sum > 0.f);
      float const m = row_max[r] * scale_log2;  // the same product step() subtracted from the exponents
      float const top = fmaxf(m, s);            // finite unless the row is empty and the sink -inf
      float const alpha = exp2f(m - top);
      float const l = fmaf(sum, alpha, exp2f(s - top));
      inv[r] = empty ? 0.f : alpha / l;
      lse[r] = empty ? sink[r] : (top + __log2f(l)) * kLn2;
    }
  }
};

// Softcap (optional) then masking (mask.h) of one S tile. rc: identity coordinates of the tile, same view as S.
template <bool kMask, bool kSoftcap, class TS, class TC>
CUTE_DEVICE void transform_scores(TS& S, TC const& rc, int q_lo_tile, int n0, int shift, int seqlen_k, int left,
                                  int right, float softcap_pre, float softcap) {
  if constexpr (kSoftcap) {
    CUTE_UNROLL
    for (int i = 0; i < size(S); ++i) S(i) = softcap * tanh_approx(S(i) * softcap_pre);
  }
  if constexpr (kMask) apply_mask(S, rc, q_lo_tile, n0, shift, seqlen_k, left, right);
}

}  // namespace fa3jax

// The attention mask, in one place: the element rule, the key blocks a query block touches (forward, dQ) and the
// query blocks a key block touches (dK/dV), and which of those blocks need element-wise masking.
// Mirrors fa3jax/masking.py: query i may see key j iff 0 <= i < seqlen_q, 0 <= j < seqlen_k and, with
// diag = i + (seqlen_k - seqlen_q) (bottom-right alignment), (left < 0 or j >= diag - left) and
// (right < 0 or j <= diag + right). Causal is (left, 0). Windows: -1 = unbounded.
#pragma once

#include <cute/config.hpp>
#include <cute/tensor.hpp>

namespace fa3jax {

// The element rule, host and device (tests compare the block ranges below against it).
CUTE_HOST_DEVICE bool mask_allows(int i, int j, int seqlen_q, int seqlen_k, int left, int right) {
  int const diag = i + seqlen_k - seqlen_q;
  return i >= 0 && i < seqlen_q && j >= 0 && j < seqlen_k && (left < 0 || j >= diag - left) &&
         (right < 0 || j <= diag + right);
}

// The element rule as one interval per key: key j allows exactly the queries q0 + [lo, hi) among q0 + [0, rows)
// (0 <= lo <= hi <= rows; empty where j is no key or q0 no query). Two compares per element instead of the
// rule's six (the 128-row backward tile builds its mask from it); 64-bit sums, so no length overflows.
CUTE_HOST_DEVICE void mask_key_queries(int j, int q0, int rows, int seqlen_q, int seqlen_k, int left, int right,
                                       int& lo, int& hi) {
  int64_t const d = int64_t(j) - seqlen_k + seqlen_q - q0;  // j - diag(q0 + ql) = d - ql
  int64_t l = 0, h = int64_t(seqlen_q) - q0;
  if (j < 0 || j >= seqlen_k || q0 < 0) h = 0;
  if (right >= 0) l = d - right > l ? d - right : l;       // j <= diag + right
  if (left >= 0) h = d + left + 1 < h ? d + left + 1 : h;  // j >= diag - left
  h = h < rows ? h : rows;
  h = h > 0 ? h : 0;
  l = l < h ? l : h;
  lo = int(l), hi = int(h);
}

// One query block: its key blocks [n_min, n_max) and which of them need the element mask.
template <int kBlockM, int kBlockN>
struct QBlockMask {
  int q_lo, q_hi;  // valid query rows of this block: [q_lo, q_hi)
  int n_min, n_max;  // key blocks [n_min, n_max)
  int shift, seqlen_k, left, right;

  CUTE_HOST_DEVICE QBlockMask(int m_block, int seqlen_q, int seqlen_k_, int left_, int right_)
      : seqlen_k(seqlen_k_), left(left_), right(right_) {
    q_lo = m_block * kBlockM;
    q_hi = min(q_lo + kBlockM, seqlen_q);
    shift = seqlen_k - seqlen_q;
    int lo = 0, hi = seqlen_k;
    if (left >= 0) lo = max(0, q_lo + shift - left);
    if (right >= 0) hi = min(seqlen_k, (q_hi - 1) + shift + right + 1);
    n_min = lo / kBlockN;
    n_max = (q_hi <= q_lo || hi <= lo) ? n_min : (hi + kBlockN - 1) / kBlockN;
  }

  CUTE_HOST_DEVICE int num_blocks() const { return n_max - n_min; }

  // True unless every (row in [q_lo, q_hi), key in the block) pair is allowed.
  CUTE_HOST_DEVICE bool needs_mask(int n_block) const {
    int n0 = n_block * kBlockN, n1 = n0 + kBlockN;  // keys [n0, n1)
    if (n1 > seqlen_k) return true;
    if (left >= 0 && n0 < (q_hi - 1) + shift - left) return true;
    if (right >= 0 && n1 - 1 > q_lo + shift + right) return true;
    return false;
  }

  // The blocks of [n_min, n_max) that need no mask form one contiguous range [lo, hi): each condition above
  // holds for all blocks from some index up (n1 > seqlen_k, the right bound) or below (the left bound). The
  // mainloop tests a block against this range (two integer ops) instead of evaluating needs_mask per block
  // (about 12 uniform-datapath instructions per key block in the SASS). Scans from both ends, so the cost per
  // tile is the number of masked blocks. lo == hi when every block needs a mask.
  CUTE_HOST_DEVICE void unmasked_range(int& lo, int& hi) const {
    hi = n_max;
    while (hi > n_min && needs_mask(hi - 1)) --hi;
    lo = n_min;
    while (lo < hi && needs_mask(lo)) ++lo;
  }
};

// One key block: the query blocks [m_min, m_max) that see any of its keys, and which of them need the element
// mask. Keys as rows and queries as columns, this is a query-block mask of the transposed problem with the
// window's sides swapped (j >= i + shift - left <=> i <= j - shift + left).
template <int kBlockM, int kBlockN>
struct KBlockMask {
  QBlockMask<kBlockN, kBlockM> t;  // the transposed problem
  int m_min, m_max;  // query blocks [m_min, m_max)

  CUTE_HOST_DEVICE KBlockMask(int n_block, int seqlen_q, int seqlen_k, int left, int right)
      : t(n_block, seqlen_k, seqlen_q, right, left), m_min(t.n_min), m_max(t.n_max) {}

  CUTE_HOST_DEVICE int num_blocks() const { return m_max - m_min; }

  // True unless every (row in the query block, key in the key block) pair is allowed; rows past seqlen_q and
  // keys past seqlen_k both count (a backward must not let zero-filled rows or keys into dK/dV or dQ).
  CUTE_HOST_DEVICE bool needs_mask(int m_block) const { return t.q_hi - t.q_lo < kBlockN || t.needs_mask(m_block); }
  // The query blocks that need no mask, one contiguous range [lo, hi) (QBlockMask::unmasked_range; lo == hi for a
  // partial key block), so that the backward tests a block with two integer ops instead of needs_mask per step.
  CUTE_HOST_DEVICE void unmasked_range(int& lo, int& hi) const {
    t.unmasked_range(lo, hi);
    if (t.q_hi - t.q_lo < kBlockN) lo = hi;
  }
};

// Element mask of one score tile S (rows, cols) in place: disallowed scores -> -inf. rc: identity coordinates
// of the tile in the same view; the tile's first row is query q_lo_tile, its first column key n0.
template <class TS, class TC>
CUTE_DEVICE void apply_mask(TS& S, TC const& rc, int q_lo_tile, int n0, int shift, int seqlen_k, int left,
                            int right) {
  CUTE_UNROLL
  for (int r = 0; r < cute::size<0>(S); ++r) {
    int const diag = q_lo_tile + int(cute::get<0>(rc(r, 0))) + shift;
    int const lo = left >= 0 ? diag - left : 0;
    int const hi = right >= 0 ? min(diag + right, seqlen_k - 1) : seqlen_k - 1;  // inclusive
    CUTE_UNROLL
    for (int c = 0; c < cute::size<1>(S); ++c) {
      int const col = n0 + int(cute::get<1>(rc(r, c)));
      if (col < lo || col > hi) S(r, c) = -INFINITY;
    }
  }
}

// KV cache (fa3jax/backends/base.py KVCacheArgs): batch row b sees its cache keys at positions [leftpad,
// cache_len) and its seqlen_new appended keys at [cache_len, cache_len + seqlen_new); the mask reads key position
// j - leftpad against the key length cache_len + seqlen_new - leftpad (fa3jax/backends/xla.py _kvcache_keys). The
// kernel walks "virtual" key blocks: [0, nc) read the cache (block n: positions [n N, n N + N)), [nc, nc + nn)
// the appended keys (block nc + t: positions cache_len + [t N, t N + N)), so a block never mixes two sources.
// Positions below are in mask units (j - leftpad), as the element rule above takes them.
template <int kBlockM, int kBlockN>
struct KVBlockMask {
  int q_lo, q_hi;    // valid query rows of this block: [q_lo, q_hi)
  int n_min, n_max;  // virtual key blocks [n_min, n_max)
  int shift, seqlen_k, left, right;  // the element rule's terms (seqlen_k: cache_len + seqlen_new - leftpad)
  int cache_len, leftpad, nc;        // nc: cache blocks

  // cache_len in [0, capacity], leftpad in [0, cache_len], seqlen_new >= 0 (the kernel clamps them first).
  // pack > 1 (GQA packing): the tile's rows are the seqlen_q * pack (query, head-in-group) pairs of one kv head,
  // packed row R = query * pack + head-in-group, so rows [m_block M, m_block M + M) hold queries
  // [R0 / pack, (R1 - 1) / pack]: the block's query range, which the key range below is computed from.
  CUTE_HOST_DEVICE KVBlockMask(int m_block, int seqlen_q, int cache_len_, int leftpad_, int seqlen_new, int left_,
                               int right_, int pack = 1)
      : left(left_), right(right_), cache_len(cache_len_), leftpad(leftpad_) {
    seqlen_k = cache_len + seqlen_new - leftpad;
    shift = seqlen_k - seqlen_q;
    nc = (cache_len + kBlockN - 1) / kBlockN;
    int const r0 = m_block * kBlockM, r1 = min(r0 + kBlockM, seqlen_q * pack);  // packed rows
    q_lo = r0 / pack;
    q_hi = r1 > r0 ? (r1 - 1) / pack + 1 : q_lo;
    int lo = 0, hi = seqlen_k;  // visible mask positions of the block's rows
    if (left >= 0) lo = max(0, q_lo + shift - left);
    if (right >= 0) hi = min(seqlen_k, (q_hi - 1) + shift + right + 1);
    n_min = n_max = 0;
    if (q_hi <= q_lo || hi <= lo) return;
    int const plo = lo + leftpad, phi = hi + leftpad;  // cache positions
    // Cache part [plo, min(phi, cache_len)), appended part [max(plo, cache_len), phi): when both are non-empty
    // the first ends with block nc - 1 and the second starts with block nc, so the range is contiguous.
    bool const has_cache = plo < min(phi, cache_len), has_new = max(plo, cache_len) < phi;
    n_min = has_cache ? plo / kBlockN : nc + (max(plo, cache_len) - cache_len) / kBlockN;
    n_max = has_new ? nc + (phi - cache_len + kBlockN - 1) / kBlockN : (min(phi, cache_len) + kBlockN - 1) / kBlockN;
  }

  // Split-KV: keeps part `split` of `num_splits` contiguous parts of [n_min, n_max), ceil(blocks / num_splits)
  // blocks each (the last ones shorter or empty). Per row, so that a short row's splits are short too; every
  // block test below is per block, so a part needs nothing else.
  CUTE_HOST_DEVICE void keep_split(int split, int num_splits) {
    if (num_splits <= 1) return;
    int const per = (n_max - n_min + num_splits - 1) / num_splits;
    int const lo = min(n_min + split * per, n_max);
    n_max = min(lo + per, n_max);
    n_min = lo;
  }

  CUTE_HOST_DEVICE int num_blocks() const { return n_max - n_min; }
  CUTE_HOST_DEVICE bool is_cache(int n) const { return n < nc; }

  // Virtual block n: mask position of its column 0 and the columns' valid mask positions [kmin, kend) (cache
  // keys from leftpad to cache_len, or the appended keys; page_ok false: a paged block whose page index is out of
  // range, none).
  CUTE_HOST_DEVICE void block_cols(int n, bool page_ok, int& n0, int& kmin, int& kend) const {
    if (n < nc) {
      n0 = n * kBlockN - leftpad;
      kmin = 0;
      kend = page_ok ? cache_len - leftpad : 0;
    } else {
      n0 = cache_len + (n - nc) * kBlockN - leftpad;
      kmin = cache_len - leftpad;
      kend = seqlen_k;
    }
  }

  // True unless every (row in [q_lo, q_hi), column of block n) pair is allowed.
  CUTE_HOST_DEVICE bool needs_mask(int n0, int kmin, int kend) const {
    int const n1 = n0 + kBlockN;
    if (n0 < kmin || n1 > kend) return true;
    if (left >= 0 && n0 < (q_hi - 1) + shift - left) return true;
    if (right >= 0 && n1 - 1 > q_lo + shift + right) return true;
    return false;
  }
};

// Element mask of one score tile with an explicit valid column range [kmin, kend) (KV cache blocks): like
// apply_mask, with the tile's columns at mask positions n0 + c. qrow[r]: the query index of the thread's row r
// (with GQA packing not the tile row itself: KVBlockMask's pack). kill: columns c (the thread's c-th, bit c) masked
// whatever their position: keys on a page whose index is out of range (kv_colmask_col).
template <class TS, class TC, int kRows>
CUTE_DEVICE void apply_mask_range(TS& S, TC const& rc, int const (&qrow)[kRows], int n0, int shift, int kmin,
                                  int kend, int left, int right, uint32_t kill = 0) {
  static_assert(decltype(cute::size<1>(S))::value <= 32);
  static_assert(decltype(cute::size<0>(S))::value == kRows);
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    int const diag = qrow[r] + shift;
    int const lo = left >= 0 ? max(diag - left, kmin) : kmin;
    int const hi = right >= 0 ? min(diag + right, kend - 1) : kend - 1;  // inclusive
    CUTE_UNROLL
    for (int c = 0; c < cute::size<1>(S); ++c) {
      int const col = n0 + int(cute::get<1>(rc(r, c)));
      if (col < lo || col > hi || ((kill >> c) & 1u)) S(r, c) = -INFINITY;
    }
  }
}

// KV cache, paged blocks spanning pages: a thread's accumulator column c (of size<1>(S) <= 32) is
// 8 (c / 2) + 2 (lane % 4) + c % 2 (the SM90 accumulator layout; test_layouts checks it), so the 4 lanes of a quad
// need 4 masks of 32 bits: kv_colmask_col is the column that bit c of quad lane q's mask stands for.
CUTE_HOST_DEVICE constexpr int kv_colmask_col(int q, int c) { return 8 * (c / 2) + 2 * q + c % 2; }

}  // namespace fa3jax

// Which key blocks a query block touches, and which of those need element-wise masking.
// Mirrors fa3jax/masking.py: key j is allowed for query i iff j < seqlen_k and, with diag = i + sk - sq,
// (left < 0 or j >= diag - left) and (right < 0 or j <= diag + right).
#pragma once

#include <cute/config.hpp>

namespace fa3jax {

template <int kBlockM, int kBlockN>
struct BlockInfo {
  int q_lo, q_hi;  // valid query rows of this block: [q_lo, q_hi)
  int n_min, n_max;  // key blocks [n_min, n_max)
  int shift, seqlen_k, left, right;

  CUTE_HOST_DEVICE BlockInfo(int m_block, int seqlen_q, int seqlen_k_, int left_, int right_)
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

}  // namespace fa3jax

// Where one batch entry's sequence lives: the first query / key row of sequence `batch` in q, out and k, v (rows
// of heads x d elements) and its lengths. The one place kernels get per-sequence offsets and lengths from, so
// that a varlen (packed, cu_seqlens) kernel differs from the dense one only in how SeqInfo is made.
#pragma once

#include <cstdint>

#include <cute/config.hpp>

namespace fa3jax {

struct SeqInfo {
  int64_t offset_q, offset_k;  // first row of the sequence in q/out and in k/v
  int seqlen_q, seqlen_k;

  // Dense batch: every sequence has the call's lengths and sits at batch * seqlen.
  CUTE_HOST_DEVICE static SeqInfo dense(int batch, int seqlen_q, int seqlen_k) {
    return {int64_t(batch) * seqlen_q, int64_t(batch) * seqlen_k, seqlen_q, seqlen_k};
  }
  // Packed batch (attn_params.h VarlenSeqs): offsets from cu_seqlens, keys optionally cut to seqused_k. Clamped
  // so that any values keep [offset, offset + length) inside [0, total): offsets into [0, total], ends into
  // [offset, total], seqused_k into [0, length]. (Hostile but in-range values may still make sequences overlap;
  // fa3jax/validation.py makes them non-decreasing first.)
  CUTE_HOST_DEVICE static SeqInfo varlen(int batch, int const* cu_seqlens_q, int const* cu_seqlens_k,
                                         int const* seqused_k, int total_q, int total_k) {
    int q0, q1, k0, k1;
    rows(batch, cu_seqlens_q, total_q, q0, q1);
    rows(batch, cu_seqlens_k, total_k, k0, k1);
    int const sk = seqused_k ? clamp(seqused_k[batch], 0, k1 - k0) : k1 - k0;
    return {int64_t(q0), int64_t(k0), q1 - q0, sk};
  }

  // Rows [r0, r1) of sequence `batch` in a packed tensor of `total` rows (cu_seqlens_q or _k), clamped as above.
  CUTE_HOST_DEVICE static void rows(int batch, int const* cu_seqlens, int total, int& r0, int& r1) {
    r0 = clamp(cu_seqlens[batch], 0, total);
    r1 = clamp(cu_seqlens[batch + 1], r0, total);
  }

  // Rows of a packed tensor outside every sequence: [0, first) and [last, total), clamped as above.
  CUTE_HOST_DEVICE static void uncovered(int batch, int const* cu_seqlens, int total, int& first, int& last) {
    first = clamp(cu_seqlens[0], 0, total);
    last = clamp(cu_seqlens[batch], first, total);
  }

 private:
  CUTE_HOST_DEVICE static int clamp(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

// One batch row of a KV-cache call (attn_params.h KVCacheSeqs), clamped so that any values stay inside the caches:
// cache_len into [0, capacity - seqlen_new] (validation's rule), leftpad into [0, cache_len], the contiguous
// cache's slot (batch_idx, else the row itself) into [0, cache_slots).
struct KVCacheSeq {
  int cache_len, leftpad, slot;

  CUTE_HOST_DEVICE static KVCacheSeq make(int batch, int const* cache_seqlens, int const* leftpad,
                                          int const* batch_idx, int capacity, int seqlen_new, int cache_slots) {
    int const cap = capacity - seqlen_new > 0 ? capacity - seqlen_new : 0;
    int const len = clamp(cache_seqlens[batch], 0, cap);
    int const lp = leftpad ? clamp(leftpad[batch], 0, len) : 0;
    int const slot = clamp(batch_idx ? batch_idx[batch] : batch, 0, cache_slots > 0 ? cache_slots - 1 : 0);
    return {len, lp, slot};
  }

 private:
  CUTE_HOST_DEVICE static int clamp(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

}  // namespace fa3jax

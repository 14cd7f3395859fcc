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
    int const q0 = clamp(cu_seqlens_q[batch], 0, total_q), q1 = clamp(cu_seqlens_q[batch + 1], q0, total_q);
    int const k0 = clamp(cu_seqlens_k[batch], 0, total_k), k1 = clamp(cu_seqlens_k[batch + 1], k0, total_k);
    int const sk = seqused_k ? clamp(seqused_k[batch], 0, k1 - k0) : k1 - k0;
    return {int64_t(q0), int64_t(k0), q1 - q0, sk};
  }

  // Rows of q outside every sequence: [0, first) and [last, total_q), clamped as above.
  CUTE_HOST_DEVICE static void uncovered_q(int batch, int const* cu_seqlens_q, int total_q, int& first, int& last) {
    first = clamp(cu_seqlens_q[0], 0, total_q);
    last = clamp(cu_seqlens_q[batch], first, total_q);
  }

 private:
  CUTE_HOST_DEVICE static int clamp(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }
};

}  // namespace fa3jax

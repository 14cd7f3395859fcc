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
  // Packed batch (attn_params.h VarlenSeqs): offsets from cu_seqlens, keys optionally cut to seqused_k.
  CUTE_HOST_DEVICE static SeqInfo varlen(int batch, int const* cu_seqlens_q, int const* cu_seqlens_k,
                                         int const* seqused_k) {
    int const q0 = cu_seqlens_q[batch], k0 = cu_seqlens_k[batch];
    int const sk = seqused_k ? seqused_k[batch] : cu_seqlens_k[batch + 1] - k0;
    return {int64_t(q0), int64_t(k0), cu_seqlens_q[batch + 1] - q0, sk};
  }
};

}  // namespace fa3jax

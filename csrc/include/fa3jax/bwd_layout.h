// Layout of the backward's fp32 dQ accumulator (BwdWorkspace::dq_accum), shared by the main kernel, which adds
// into it, and the postprocess, which reads it. Plain C++ (host and device), no CuTe.
//
// dq_accum holds one tile of kBwdBlockM x d floats per (batch, query head, query block), tiles in that order.
// Inside a tile, consumer warpgroup w owns columns [w * C, (w + 1) * C) (C = d / warpgroups) and stores them in
// its accumulator-register order, values v..v+3 (v % 4 == 0) of thread t as one 16-byte group at
// w * kBwdBlockM * C + (v / 4) * 512 + 4 * t + v % 4: a warp's 16-byte stores or vector reductions then cover 512
// contiguous bytes (conflict-free in shared memory, whole sectors in L2). The register order is the m64nCk16 fp32
// accumulator's (PTX ISA, wgmma register fragments):
// row = 16 * warp + lane / 4 + 8 * ((v / 2) % 2), col = 2 * (lane % 4) + v % 2 + 8 * (v / 4).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA3JAX_HOST_DEVICE __host__ __device__
#else
#define FA3JAX_HOST_DEVICE
#endif

namespace fa3jax {

inline constexpr int kBwdBlockM = 64;  // query rows per step of the main kernel (one WGMMA M)

// Index of element (row, col) of a tile, 0 <= row < kBwdBlockM, 0 <= col < d; cols_per_wg = C above.
FA3JAX_HOST_DEVICE inline int dq_tile_index(int row, int col, int cols_per_wg) {
  int const w = col / cols_per_wg, c = col - w * cols_per_wg;
  int const warp = row / 16, r = row % 16;
  int const t = warp * 32 + (r % 8) * 4 + (c % 8) / 2;
  int const v = (c / 8) * 4 + (r / 8) * 2 + (c % 2);
  return w * kBwdBlockM * cols_per_wg + (v / 4) * 512 + 4 * t + v % 4;
}

// Per-row buffers (delta, lse_log2, dq_accum rows, turn counters per 64 rows) are indexed by padded "stat rows".
// Dense: (batch, query head, query rows padded to kBwdBlockM). Varlen: (query head, stat rows), where the sequence
// b starting at packed row q0 begins at bwd_varlen_pad_start(q0, b) = (q0 / 64 + b) * 64: in-order sequences stay
// disjoint, each padded to whole 64-row blocks, and any clamped q0 + length <= total_q stays below
// bwd_varlen_stat_rows(total_q, batch).
FA3JAX_HOST_DEVICE inline int64_t bwd_varlen_stat_rows(int total_q, int batch) {
  return (int64_t(total_q) / kBwdBlockM + batch + 1) * kBwdBlockM;
}
FA3JAX_HOST_DEVICE inline int64_t bwd_varlen_pad_start(int q0, int batch_index) {
  return (int64_t(q0) / kBwdBlockM + batch_index) * kBwdBlockM;
}

// Consumer warpgroups of the main kernel for a head dim (one per 64 keys of its key block): fixed by the policy,
// which the postprocess must agree with; bwd_dispatch.cc checks it against the compiled traits.
inline constexpr int kBwdNumMmaWG = 2;

}  // namespace fa3jax

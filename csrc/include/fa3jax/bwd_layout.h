// Layout of the backward's fp32 dQ accumulator (BwdWorkspace::dq_accum), shared by the main kernel, which adds
// into it, and the postprocess, which reads it. Plain C++ (host and device), no CuTe.
//
// dq_accum holds one tile of tile_m x d floats per (batch, query head, query block), tiles in that order; tile_m is
// the main kernel's query rows per step: kBwdBlockM (64) or, for the calls bwd_tile_m picks it for, 80
// (kBwdBlockMWide) or 128 (kBwdBlockMTall). A tile is one slice of tile_m * d / 2 floats per consumer warpgroup w,
// slice w at w * tile_m * d / 2 (kBwdNumMmaWG = 2), and a warpgroup stores its dQ accumulator into its slice in register order, values
// v..v+3 (v % 4 == 0) of thread t as one 16-byte group at (v / 4) * 512 + 4 * t + v % 4: a warp's 16-byte stores or
// vector reductions then cover 512 contiguous bytes (conflict-free in shared memory, whole sectors in L2). The
// register order is the m64nNk16 fp32 accumulator's (PTX ISA, wgmma register fragments):
// acc_row = 16 * warp + lane / 4 + 8 * ((v / 2) % 2), acc_col = 2 * (lane % 4) + v % 2 + 8 * (v / 4).
// Which part of the tile a warpgroup owns, and how, depends on tile_m:
// * 64: dQ = dS K, warpgroup w owns the columns [w * C, (w + 1) * C), C = d / 2 (acc_row = query, acc_col = column
//   in the slice);
// * 80 (no WGMMA M): dQ^T = K^T dS^T, columns as for 64 with C = 64 (acc_row = column in the slice, acc_col =
//   query);
// * 128 (FA3's d=64 tile): dQ = dS K with the warpgroups along queries, w owns the queries [64 w, 64 w + 64) and
//   every column (acc_row = query - 64 w, acc_col = column).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA3JAX_HOST_DEVICE __host__ __device__
#else
#define FA3JAX_HOST_DEVICE
#endif

namespace fa3jax {

inline constexpr int kBwdBlockM = 64;      // query rows per step of the main kernel (one WGMMA M): every call
inline constexpr int kBwdBlockMWide = 80;  // FA3's non-causal d=128 tile (policy block_m=80; bwd_tile_m)
inline constexpr int kBwdBlockMTall = 128;  // FA3's d=64 tile (policy bwd64.block_m=128; bwd_tile_m)
// Consumer warpgroups of the main kernel for a head dim (one per 64 keys of its key block): fixed by the policy,
// which the postprocess must agree with; bwd_dispatch.cc checks it against the compiled traits.
inline constexpr int kBwdNumMmaWG = 2;

// Queries on the accumulators' N side (dQ^T = K^T dS^T): every tile height that is no multiple of WGMMA's M.
FA3JAX_HOST_DEVICE constexpr bool bwd_dq_swapped(int tile_m) { return tile_m % 64 != 0; }
// Warpgroups along queries in dQ (one WGMMA M of queries each): the 128-row tile.
FA3JAX_HOST_DEVICE constexpr bool bwd_dq_rows_split(int tile_m) { return tile_m == kBwdNumMmaWG * 64; }
// The tile serves every dense call (masks, softcap, deterministic): the 128-row tile, as in FA3; the 80-row one
// only unmasked calls without softcap, not deterministic (FA3 keeps 64 rows for causal d=128).
FA3JAX_HOST_DEVICE constexpr bool bwd_tile_serves_all_dense(int tile_m) { return tile_m == kBwdBlockMTall; }

// Position of (acc_row, acc_col) of one warpgroup's m64nN accumulator in its slice (register order above).
FA3JAX_HOST_DEVICE inline int dq_acc_index(int acc_row, int acc_col) {
  int const warp = acc_row / 16, r = acc_row % 16;
  int const t = warp * 32 + (r % 8) * 4 + (acc_col % 8) / 2;
  int const v = (acc_col / 8) * 4 + (r / 8) * 2 + (acc_col % 2);
  return (v / 4) * 512 + 4 * t + v % 4;
}

// Index of element (row, col) of a tile, 0 <= row < tile_m, 0 <= col < kd (the tile's width, the kernel's d).
FA3JAX_HOST_DEVICE inline int dq_tile_index(int row, int col, int kd, int tile_m = kBwdBlockM) {
  int const slice = tile_m * kd / kBwdNumMmaWG;  // floats per warpgroup
  if (bwd_dq_rows_split(tile_m)) return row / 64 * slice + dq_acc_index(row % 64, col);
  int const cols = kd / kBwdNumMmaWG, w = col / cols, c = col - w * cols;
  return w * slice + (bwd_dq_swapped(tile_m) ? dq_acc_index(c, row) : dq_acc_index(row, c));
}

// (row, col) of the tile element stored at index i, 0 <= i < tile_m * kd: the inverse of dq_tile_index (the register
// order above, read backwards), so the postprocess can read a tile in stored order with 16-byte loads.
FA3JAX_HOST_DEVICE inline void dq_tile_coords(int i, int kd, int tile_m, int& row, int& col) {
  int const slice = tile_m * kd / kBwdNumMmaWG;
  int const w = i / slice, s = i - w * slice;
  int const v = (s / 512) * 4 + s % 4, t = (s % 512) / 4, lane = t % 32;
  int const acc_row = 16 * (t / 32) + lane / 4 + 8 * ((v / 2) % 2);
  int const acc_col = 2 * (lane % 4) + v % 2 + 8 * (v / 4);
  if (bwd_dq_rows_split(tile_m)) {
    row = 64 * w + acc_row;
    col = acc_col;
    return;
  }
  int const cols = kd / kBwdNumMmaWG;
  bool const swapped = bwd_dq_swapped(tile_m);
  row = swapped ? acc_col : acc_row;
  col = w * cols + (swapped ? acc_row : acc_col);
}

// Deterministic dQ, rotated order (bwd_mainloop.h DqOrder): where each of a sequence's num_n key blocks sees all
// of its num_m query blocks, key block n walks them from dq_rotated_first(n) on, wrapping, so that in lockstep the
// key blocks reach a query block one by one (in descending order all reach block 0 at once: a wavefront of
// num_n - 1 steps). n reaches block m at step t = (m - n) mod num_m; m's partials are added by ascending t, equal t
// (num_n > num_m) by descending n. dq_rotated_turn is n's place in that order, the number of key blocks before it:
// each earlier t's residue r (m, m - 1, ... mod num_m) holds num_n / num_m key blocks, one more where
// r < num_n % num_m; then n + num_m, n + 2 num_m, ... share n's t. test_layouts checks it against a sort.
FA3JAX_HOST_DEVICE inline int dq_rotated_first(int n, int num_m) { return n % num_m; }
FA3JAX_HOST_DEVICE inline int dq_rotated_turn(int n, int m, int num_n, int num_m) {
  int const s = n % num_m, q = num_n / num_m, rho = num_n % num_m;
  int t, c;  // c: residues of the earlier t below rho
  if (m >= s) {
    t = m - s;  // residues s + 1 .. m
    c = (m < rho - 1 ? m : rho - 1) - s;
    c = c > 0 ? c : 0;
  } else {
    t = m - s + num_m;  // residues 0 .. m and s + 1 .. num_m - 1
    c = (m + 1 < rho ? m + 1 : rho) + (rho - 1 - s > 0 ? rho - 1 - s : 0);
  }
  return t * q + c + (num_n - 1 - n) / num_m;
}

// Dense stat rows per (batch, query head): seqlen_q padded to whole tiles.
FA3JAX_HOST_DEVICE inline int64_t bwd_padded_rows(int seqlen_q, int tile_m) {
  return (int64_t(seqlen_q) + tile_m - 1) / tile_m * tile_m;
}

// Per-row buffers (delta, lse_log2, dq_accum rows, turn counters per tile) are indexed by padded "stat rows".
// Dense: (batch, query head, query rows padded to tile_m, bwd_padded_rows). Varlen (always 64-row tiles): (query
// head, stat rows), where the sequence b starting at packed row q0 begins at bwd_varlen_pad_start(q0, b) = (q0 / 64 + b) * 64: in-order sequences stay
// disjoint, each padded to whole 64-row blocks, and any clamped q0 + length <= total_q stays below
// bwd_varlen_stat_rows(total_q, batch).
FA3JAX_HOST_DEVICE inline int64_t bwd_varlen_stat_rows(int total_q, int batch) {
  return (int64_t(total_q) / kBwdBlockM + batch + 1) * kBwdBlockM;
}
FA3JAX_HOST_DEVICE inline int64_t bwd_varlen_pad_start(int q0, int batch_index) {
  return (int64_t(q0) / kBwdBlockM + batch_index) * kBwdBlockM;
}

}  // namespace fa3jax

// Host-only check (runs without a GPU) of the register-layout reinterpretations and key-block ranges the kernel
// relies on:
//  * acc_rowcol: every (r, c) of a thread's accumulator view has row = f(r) only, and columns come in
//    adjacent pairs (c, c+1) -> (col, col+1);
//  * acc_to_a_regs: the S accumulator (64xN per warpgroup) reinterpreted as the register A operand of the
//    P V GEMM holds, for every thread and value, the same (row, k) coordinate the RS MMA expects;
//  * the Q operand tile depends only on the warpgroup (the mainloop partitions it from the warpgroup's first
//    thread), and every thread's K / V operand tile starts at the operand's first element (gmma_desc_at);
//  * mask.h against its element rule: a query block's key blocks and a key block's query blocks are exactly
//    those holding an allowed pair, needs_mask is true iff a block holds a disallowed pair, and
//    QBlockMask::unmasked_range agrees with needs_mask on every key block (KBlockMask's on every query block); mask_key_queries' interval per key is
//    exactly the allowed queries of a tile, lengths near INT_MAX included;
//  * mask.h's KVBlockMask (the KV-cache forward's virtual key blocks: cache blocks, then appended-key blocks; GQA
//    packing's query ranges, split-KV's parts)
//    against the element rule on each row's key positions: the block range holds every allowed key and no block
//    without one, a block marked unmasked holds only allowed keys, and block_cols maps columns to positions;
//  * the persistent scheduler's unit order (a bijection onto the tiles);
//  * the backward's varlen stat rows (bwd_layout.h): every sequence's padded rows stay inside the buffer for any
//    cu_seqlens (clamped as the kernels clamp them), and in-order sequences never share a row;
//  * the KV-cache forward's paged loads of blocks spanning pages: a K / V^T stage keeps each 64-column slice as rows
//    of 128 bytes swizzled by row % 8 (kv_chunk_offset, where the page gather writes and where a 128-byte-swizzled
//    TMA box of 64 columns x 8k rows starting on a swizzle atom lands), and kv_colmask_col names each thread's
//    accumulator columns (the consumers' page mask);
//  * the backward's register layouts per policy (check_bwd), MLA ones included, and of the 80-row tile (dQ
//    transposed: its accumulator order against dq_tile_index's 80-row case) and the 128-row one (dQ with the
//    warpgroups along queries), and the stat reads in column pairs; instantiating the traits also checks at
//    compile time that the policy's tiles fit shared memory and the register budget.
#include <algorithm>
#include <climits>
#include <cstdio>
#include <random>
#include <vector>

#include "fa3jax/bwd_launch.h"  // BwdTraitsFor (the generated policy.h)
#include "fa3jax/bwd_layout.h"
#include "fa3jax/kernel_traits.h"
#include "fa3jax/seq_info.h"
#include "fa3jax/mask.h"
#include "fa3jax/utils.h"

using namespace cute;
using namespace fa3jax;

template <class KT>
int check(const char* name) {
  typename KT::TiledMmaQK mma_qk;
  typename KT::TiledMmaPV mma_pv;
  int errors = 0;
  for (int t = 0; t < KT::kNumMmaThreads; ++t) {
    auto thr_qk = mma_qk.get_thread_slice(t);
    auto thr_pv = mma_pv.get_thread_slice(t);
    Tensor cS = make_identity_tensor(Shape<typename KT::BlkM, typename KT::BlkN>{});
    Tensor tScS = thr_qk.partition_C(cS);
    Tensor rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    for (int r = 0; r < size<0>(rc); ++r)
      for (int c = 0; c < size<1>(rc); ++c) {
        if (get<0>(rc(r, c)) != get<0>(rc(r, 0))) ++errors;
        if (c % 2 == 1 && get<1>(rc(r, c)) != get<1>(rc(r, c - 1)) + 1) ++errors;
      }
    // A operand view of the S accumulator vs. what the PV MMA expects for A (M x K = BlkM x BlkN).
    Tensor tPcS = make_tensor(tScS.data(), acc_to_a_regs(tScS.layout()));
    Tensor cA = make_identity_tensor(Shape<typename KT::BlkM, typename KT::BlkN>{});
    Tensor tAcA = thr_pv.partition_A(cA);

    if (size(tPcS) != size(tAcA)) {
      std::printf("%s: size mismatch %d vs %d\n", name, int(size(tPcS)), int(size(tAcA)));
      return 1;
    }

    for (int i = 0; i < size(tAcA); ++i) {
      if (tPcS(i) != tAcA(i)) {
        if (errors < 5)
          std::printf("%s: thread %d value %d: S-acc coord (%d,%d) != A coord (%d,%d)\n", name, t, i,
                      int(get<0>(tPcS(i))), int(get<1>(tPcS(i))), int(get<0>(tAcA(i))), int(get<1>(tAcA(i))));
        ++errors;
      }
    }
    // Epilogue view of O.
    Tensor cO = make_identity_tensor(Shape<typename KT::BlkM, typename KT::HDim>{});
    Tensor tOcO = thr_pv.partition_C(cO);
    Tensor rcO = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
    for (int r = 0; r < size<0>(rcO); ++r)
      for (int c = 0; c < size<1>(rcO); ++c) {
        if (get<0>(rcO(r, c)) != get<0>(rcO(r, 0))) ++errors;
        if (c % 2 == 1 && get<1>(rcO(r, c)) != get<1>(rcO(r, c - 1)) + 1) ++errors;
      }
    // The mainloop builds the Q (A operand) descriptors from the warpgroup's first thread: every thread of a
    // warpgroup must see the same A tile.
    {
      Tensor cQ = make_identity_tensor(Shape<typename KT::BlkM, typename KT::HDim>{});
      Tensor a_t = thr_qk.partition_A(cQ);
      Tensor a_w = mma_qk.get_thread_slice(t / 128 * 128).partition_A(cQ);
      for (int i = 0; i < size(a_t); ++i) errors += a_t(i) != a_w(i);
    }
    // The mainloop rebuilds the K and V descriptors from the operands' first element (gmma_desc_at): every
    // thread's B tile must start there.
    {
      Tensor cK = make_identity_tensor(Shape<typename KT::BlkN, typename KT::HDim>{});
      Tensor cV = make_identity_tensor(Shape<typename KT::HDim, typename KT::BlkN>{});
      Tensor b_qk = thr_qk.partition_B(cK);
      Tensor b_pv = thr_pv.partition_B(cV);
      errors += get<0>(b_qk(0)) != 0 || get<1>(b_qk(0)) != 0;
      errors += get<0>(b_pv(0)) != 0 || get<1>(b_pv(0)) != 0;
    }
    // The 4 lanes of a quad share rows (quad reductions).
    if (t % 4 != 0) {
      auto thr0 = mma_qk.get_thread_slice(t - t % 4);
      Tensor c0 = thr0.partition_C(cS);
      Tensor rc0 = make_tensor(c0.data(), acc_rowcol(c0.layout()));
      for (int r = 0; r < size<0>(rc); ++r)
        if (get<0>(rc(r, 0)) != get<0>(rc0(r, 0))) ++errors;
    }
  }
  std::printf("%s: %s (%d errors)\n", name, errors ? "FAIL" : "ok", errors);
  return errors ? 1 : 0;
}

// KV cache, pages spanning key blocks (mainloop.h copy_boxes, gather_rows, store_colmask; mask.h kv_colmask_col).
template <class KT>
int check_kv_paged(const char* name) {
  using E = typename KT::Element;
  int errors = 0;
  // The layouts' swizzles act on shared addresses (smem_ptr_flag): read the addresses the kernel's tensors give, off
  // a 1024-byte aligned base as SharedStorage's (never dereferenced here).
  E* const base = reinterpret_cast<E*>(uintptr_t(1) << 20);
  Tensor sK = make_tensor(make_smem_ptr(base), typename KT::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(base), typename KT::SmemLayoutVt{});
  auto at = [&](E const* p) { return uint32_t(reinterpret_cast<char const*>(p) - reinterpret_cast<char const*>(base)); };
  for (int s = 0; s < KT::kStages; ++s)
    for (int row = 0; row < KT::kBlockN; ++row)
      for (int col = 0; col < KT::kHeadDim; col += 8) {
        uint32_t const want = KT::kv_chunk_offset(row, col);
        // The gather's 16-byte chunk: 8 contiguous elements at the stage's offset, in K and in V^T alike.
        for (int i = 0; i < 8; ++i) {
          errors += at(&sK(row, col + i, s)) != s * KT::kStageBytesK + want + i * sizeof(E);
          errors += at(&sVt(col + i, row, s)) != s * KT::kStageBytesV + want + i * sizeof(E);
        }
        // A 128-byte-swizzled TMA box of 64 columns starting at row r0 (a multiple of 8) lands its row r, chunk j at
        // box base + r * 128 + (j ^ (r % 8)) * 16 when the base is 1024-byte aligned (the swizzle reads address bits
        // 7-9): the stage offsets are 1024-byte aligned and the box base is the offset of (r0, slice start).
        int const r0 = row / 8 * 8, c0 = col / 64 * 64;
        uint32_t const box = s * KT::kStageBytesK + KT::kv_chunk_offset(r0, c0);
        errors += box % 1024 != 0 || KT::kStageBytesK % 1024 != 0;
        errors += s * KT::kStageBytesK + want != box + (row - r0) * 128 + (((col - c0) / 8) ^ (row % 8)) * 16;
      }
  // Each thread's accumulator column c is kv_colmask_col(lane % 4, c).
  typename KT::TiledMmaQK mma_qk;
  for (int t = 0; t < KT::kNumMmaThreads; ++t) {
    Tensor cS = make_identity_tensor(Shape<typename KT::BlkM, typename KT::BlkN>{});
    Tensor tScS = mma_qk.get_thread_slice(t).partition_C(cS);
    Tensor rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
    errors += size<1>(rc) > 32;
    for (int r = 0; r < size<0>(rc); ++r)
      for (int c = 0; c < size<1>(rc); ++c) errors += int(get<1>(rc(r, c))) != kv_colmask_col(t % 4, c);
  }
  std::printf("%s paged KV layouts: %s (%d errors)\n", name, errors ? "FAIL" : "ok", errors);
  return errors ? 1 : 0;
}

// The backward main kernel's register layouts (bwd_kernel_traits.h, bwd_mainloop.h): value v of a thread's dQ
// accumulator goes to w * kDqSlice + (v / 4) * 512 + 4 * t + v % 4 (warpgroup w, thread t of it), which must be
// where the postprocess reads its (row, col) (dq_tile_index), once per element; dK's and dV's accumulators cover
// their tiles once; with P^T / dS^T in registers (warpgroups along keys), the S^T accumulator viewed as an A
// operand holds the (key, query) coordinates the dV and dK GEMMs expect; with kLateDv, columns c and c + 1 (c
// even) of a thread's S^T are queries q and q + 1 with q even, in every row (the mainloop's 8-byte stat reads).
template <class KT>
int check_bwd(const char* name) {
  int errors = 0;
  typename KT::TiledMmadQ mma_dq;
  typename KT::TiledMmaSdP mma_sdp;
  std::vector<int> dq_hits(KT::kBlockM * KT::kHeadDim, 0), dk_hits(KT::kBlockN * KT::kHeadDim, 0),
      dv_hits(KT::kBlockN * KT::kHeadDimV, 0);
  // Every (row, col) of a rows x cols accumulator tile once over all threads of `mma`.
  auto cover = [&](auto mma, int t, auto shape, std::vector<int>& hits) {
    Tensor c = mma.get_thread_slice(t).partition_C(make_identity_tensor(shape));
    for (int v = 0; v < size(c); ++v) ++hits[get<0>(c(v)) * size<1>(shape) + get<1>(c(v))];
  };
  for (int t = 0; t < KT::kNumMmaThreads; ++t) {
    Tensor c = mma_dq.get_thread_slice(t).partition_C(make_identity_tensor(typename KT::DqTile{}));
    for (int v = 0; v < size(c); ++v) {
      int row = get<0>(c(v)), col = get<1>(c(v));  // (query, column of d), or (column, query) if swapped
      if constexpr (KT::kDqSwapAB) std::swap(row, col);
      int const written = t / 128 * KT::kDqSlice + (v / 4) * 512 + 4 * (t % 128) + v % 4;
      int const read = dq_tile_index(row, col, KT::kHeadDim, KT::kBlockM);
      if (written != read && errors++ < 5)
        std::printf("%s: dQ thread %d value %d (%d, %d) written at %d, read at %d\n", name, t, v, row, col, written,
                    read);
      if (written >= 0 && written < int(dq_hits.size())) ++dq_hits[written];
    }
    cover(typename KT::TiledMmadK{}, t, Shape<typename KT::BlkN, typename KT::HDim>{}, dk_hits);
    cover(typename KT::TiledMmadV{}, t, Shape<typename KT::BlkN, typename KT::HDimV>{}, dv_hits);
    if constexpr (!KT::kPInSmem) {
      Tensor cS = make_identity_tensor(Shape<typename KT::BlkN, typename KT::BlkM>{});
      Tensor tScS = mma_sdp.get_thread_slice(t).partition_C(cS);
      Tensor tPcS = make_tensor(tScS.data(), acc_to_a_regs(tScS.layout()));
      Tensor a_dv = typename KT::TiledMmadV{}.get_thread_slice(t).partition_A(cS);
      Tensor a_dk = typename KT::TiledMmadK{}.get_thread_slice(t).partition_A(cS);
      if (size(tPcS) != size(a_dv) || size(tPcS) != size(a_dk)) return std::printf("%s: A size mismatch\n", name), 1;
      for (int i = 0; i < size(tPcS); ++i) errors += (tPcS(i) != a_dv(i)) + (tPcS(i) != a_dk(i));
    }
    {  // the stat reads in column pairs (bwd_mainloop.h stat_pair)
      Tensor cS = make_identity_tensor(Shape<typename KT::BlkN, typename KT::BlkM>{});
      Tensor tScS = mma_sdp.get_thread_slice(t).partition_C(cS);
      Tensor rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
      for (int c = 0; c + 1 < size<1>(rc); c += 2)
        for (int r = 0; r < size<0>(rc); ++r) {
          int const q = get<1>(rc(0, c));
          if ((q % 2 != 0 || get<1>(rc(r, c)) != q || get<1>(rc(r, c + 1)) != q + 1) && errors++ < 5)
            std::printf("%s: S^T thread %d (%d, %d): query %d, pair base %d\n", name, t, r, c,
                        int(get<1>(rc(r, c))), q);
        }
    }
  }
  for (auto const* hits : {&dq_hits, &dk_hits, &dv_hits})
    for (int h : *hits) errors += h != 1;
  std::printf("bwd %s: %s (%d errors)\n", name, errors ? "FAIL" : "ok", errors);
  return errors ? 1 : 0;
}

// The scheduler's unit -> (query block, head, batch) map: a bijection onto all tiles for every order, and query
// blocks non-increasing within each (head, batch) section under reverse_m (heaviest first).
// splits: split-KV parts per (head, batch), each a unit of its own.
int check_scheduler(int num_m_blocks, int num_heads, int batch, int group, bool reverse_m, int splits = 1) {
  SchedulerParams p{};
  p.num_m_units = num_m_blocks;
  p.num_heads = num_heads;
  p.num_splits = splits;
  p.num_hb = num_heads * batch * splits;
  p.num_units = p.num_m_units * p.num_hb;
  p.group = group;
  p.reverse_m = reverse_m;
  std::vector<int> seen(size_t(num_m_blocks) * num_heads * batch * splits, 0);
  int errors = 0, prev_m = -1, prev_section = -1;
  for (int u = 0; u < p.num_units; ++u) {
    FwdTile const t = PersistentTileScheduler::tile(p, u);
    bool const in_range = t.m_block >= 0 && t.m_block < num_m_blocks && t.head >= 0 && t.head < num_heads &&
                          t.batch >= 0 && t.batch < batch && t.split >= 0 && t.split < splits;
    if (!in_range) { ++errors; continue; }
    ++seen[((size_t(t.batch) * num_heads + t.head) * splits + t.split) * num_m_blocks + t.m_block];
    if (reverse_m) {
      int const section = ((t.batch * num_heads + t.head) * splits + t.split) / group;
      if (section == prev_section && t.m_block > prev_m) ++errors;
      if (section < prev_section) ++errors;
      prev_section = section;
      prev_m = t.m_block;
    }
  }
  for (int c : seen) errors += c != 1;
  if (errors)
    std::printf("scheduler m=%d h=%d b=%d group=%d reverse=%d splits=%d: %d errors\n", num_m_blocks, num_heads, batch,
                group, int(reverse_m), splits, errors);
  return errors != 0;
}

// The backward's heaviest-first CTA order (bwd_kernel.h bwd_lpt_tile): a bijection onto all (key block, kv head,
// batch) tiles, key blocks non-decreasing within each section of `group` (kv head, batch) pairs, sections in order,
// and the first CTAs on key block 0 (the longest under a right window bound).
int check_bwd_lpt(int num_n, int hk, int batch, int group) {
  int const units = num_n * hk * batch;
  std::vector<int> seen(size_t(units), 0);
  int errors = 0, prev_n = -1, prev_section = -1;
  for (int u = 0; u < units; ++u) {
    FwdTile const t = bwd_lpt_tile(num_n, hk, batch, group, u);
    if (t.m_block < 0 || t.m_block >= num_n || t.head < 0 || t.head >= hk || t.batch < 0 || t.batch >= batch) {
      ++errors;
      continue;
    }
    ++seen[(size_t(t.batch) * hk + t.head) * num_n + t.m_block];
    int const section = (t.batch * hk + t.head) / group;
    if (section == prev_section && t.m_block < prev_n) ++errors;
    if (section < prev_section) ++errors;
    if (u < std::min(group, hk * batch) && t.m_block != 0) ++errors;
    prev_section = section;
    prev_n = t.m_block;
  }
  for (int c : seen) errors += c != 1;
  if (errors) std::printf("bwd lpt n=%d hk=%d b=%d group=%d: %d errors\n", num_n, hk, batch, group, errors);
  return errors != 0;
}

// Whether the (query block m, key block n) tile holds an allowed / a disallowed pair (rows and keys past the
// lengths count as disallowed), by the element rule.
struct TileTruth {
  bool any_allowed = false, any_disallowed = false;
};
template <int kBlockM, int kBlockN>
TileTruth tile_truth(int m, int n, int sq, int sk, int left, int right, bool clip_rows) {
  TileTruth t;
  for (int i = m * kBlockM; i < (m + 1) * kBlockM; ++i) {
    if (clip_rows && i >= sq) break;  // QBlockMask::needs_mask looks at valid rows only (the forward)
    for (int j = n * kBlockN; j < (n + 1) * kBlockN; ++j) {
      bool const a = mask_allows(i, j, sq, sk, left, right);
      t.any_allowed |= a;
      t.any_disallowed |= !a;
    }
  }
  return t;
}

// Both block masks against the element rule, and both unmasked_range against needs_mask, over sequence
// lengths and windows that put block edges on, before and after the diagonal and the tails.
template <int kBlockM, int kBlockN>
int check_masks() {
  int errors = 0, cases = 0;
  int const lens[] = {1, 63, 64, 127, 128, 129, 200, 256, 257, 500};
  int const wins[] = {-1, 0, 1, 63, 64, 128, 129, 300};
  for (int sq : lens)
    for (int sk : lens)
      for (int left : wins)
        for (int right : wins) {
          int const mb = (sq + kBlockM - 1) / kBlockM, nb = (sk + kBlockN - 1) / kBlockN;
          std::vector<TileTruth> fwd(size_t(mb) * nb), bwd(size_t(mb) * nb);
          for (int m = 0; m < mb; ++m)
            for (int n = 0; n < nb; ++n) {
              fwd[size_t(m) * nb + n] = tile_truth<kBlockM, kBlockN>(m, n, sq, sk, left, right, true);
              bwd[size_t(m) * nb + n] = tile_truth<kBlockM, kBlockN>(m, n, sq, sk, left, right, false);
            }
          for (int m = 0; m < mb; ++m) {
            QBlockMask<kBlockM, kBlockN> const bi(m, sq, sk, left, right);
            int lo, hi;
            bi.unmasked_range(lo, hi);
            ++cases;
            if (bi.num_blocks() > 0 && (lo < bi.n_min || hi > bi.n_max || lo > hi)) ++errors;
            for (int n = 0; n < nb; ++n) {
              TileTruth const t = fwd[size_t(m) * nb + n];
              bool const in = n >= bi.n_min && n < bi.n_max;
              if (in != t.any_allowed) ++errors;
              if (!in) continue;
              if (bi.needs_mask(n) != t.any_disallowed) ++errors;
              int const it = bi.n_max - 1 - n;  // the mainloop's test, in its visiting order
              bool const outside = uint32_t(it - (bi.n_max - hi)) >= uint32_t(hi - lo);
              if (outside != bi.needs_mask(n)) ++errors;
            }
          }
          for (int n = 0; n < nb; ++n) {
            KBlockMask<kBlockM, kBlockN> const kb(n, sq, sk, left, right);
            int lo, hi;
            kb.unmasked_range(lo, hi);
            ++cases;
            if (kb.num_blocks() > 0 && (lo < kb.m_min || hi > kb.m_max || lo > hi)) ++errors;
            for (int m = 0; m < mb; ++m) {
              TileTruth const t = bwd[size_t(m) * nb + n];
              bool const in = m >= kb.m_min && m < kb.m_max;
              if (in != t.any_allowed) ++errors;
              if (in && kb.needs_mask(m) != t.any_disallowed) ++errors;
              // The backward's test (bwd_mainloop.h), on every block of the walk.
              if (in && (uint32_t(m - lo) >= uint32_t(hi - lo)) != kb.needs_mask(m)) ++errors;
            }
          }
        }
  std::printf("masks<%d, %d>: %s (%d cases, %d errors)\n", kBlockM, kBlockN, errors ? "FAIL" : "ok", cases, errors);
  return errors != 0;
}

// mask_key_queries against the element rule: key j's [lo, hi) of a tile of `rows` queries from q0 holds exactly
// the allowed queries, 0 <= lo <= hi <= rows, for keys and tiles in, at and past the lengths; and near INT_MAX,
// where 32-bit sums overflow (there against the rule in 64-bit arithmetic: mask_allows' own int sums wrap).
int check_key_queries() {
  int errors = 0, cases = 0;
  auto allows64 = [](int64_t i, int64_t j, int64_t sq, int64_t sk, int64_t left, int64_t right) {
    int64_t const diag = i + sk - sq;
    return i >= 0 && i < sq && j >= 0 && j < sk && (left < 0 || j >= diag - left) && (right < 0 || j <= diag + right);
  };
  auto one = [&](int j, int q0, int rows, int sq, int sk, int left, int right) {
    int lo, hi;
    mask_key_queries(j, q0, rows, sq, sk, left, right, lo, hi);
    ++cases;
    bool bad = lo < 0 || lo > hi || hi > rows;
    for (int ql = 0; ql < rows && !bad; ++ql)
      bad = (ql >= lo && ql < hi) != allows64(int64_t(q0) + ql, j, sq, sk, left, right) ||
            (sq < 100000 && sk < 100000 && (ql >= lo && ql < hi) != mask_allows(q0 + ql, j, sq, sk, left, right));
    if (bad && errors++ < 5)
      std::printf("mask_key_queries(j=%d, q0=%d, rows=%d, sq=%d, sk=%d, left=%d, right=%d) = [%d, %d)\n", j, q0, rows,
                  sq, sk, left, right, lo, hi);
  };
  int const lens[] = {1, 63, 128, 129, 300};
  int const wins[] = {-1, 0, 1, 64, 127, 200};
  for (int rows : {64, 128})
    for (int sq : lens)
      for (int sk : lens)
        for (int left : wins)
          for (int right : wins)
            for (int q0 = 0; q0 < sq + rows; q0 += rows)
              for (int j = -1; j <= sk + 1; ++j) one(j, q0, rows, sq, sk, left, right);
  int const big = 2147483647;
  for (int left : {-1, 0, 5, big - 3, big})
    for (int right : {-1, 0, 5, big - 3, big})
      for (int j : {0, 100, big - 200, big - 2})
        for (int q0 : {0, 128, big - 300, big - 128}) {
          one(j, q0, 128, big - 1, big - 1, left, right);
          one(j, q0, 128, big - 1, 1000, left, right);
          one(j, q0, 128, 1000, big - 1, left, right);
        }
  std::printf("mask_key_queries: %s (%d cases, %d errors)\n", errors ? "FAIL" : "ok", cases, errors);
  return errors != 0;
}

// KVBlockMask against brute force: the keys of a batch row are its cache positions [leftpad, cache_len) and its
// appended keys at cache_len + t (t < seqlen_new), at mask position (position - leftpad) with key length
// cache_len + seqlen_new - leftpad. Virtual block n < nc holds cache positions [n N, n N + N) (valid below
// cache_len), block nc + t the appended keys [t N, t N + N) (valid below seqlen_new).
template <int kBlockM, int kBlockN>
int check_kv_masks() {
  std::mt19937 rng(11);
  int errors = 0;
  int const wins[] = {-1, 0, 1, 5, 64, 130};
  for (int trial = 0; trial < 4000; ++trial) {
    int const cl = int(rng() % 700), lp = cl ? int(rng() % (cl + 1)) : 0;
    int const sn = trial % 3 == 0 ? 0 : int(rng() % 300), lq = 1 + int(rng() % 260);
    int const left = wins[rng() % 6], right = wins[rng() % 6];
    int const skm = cl + sn - lp;
    int const nc = (cl + kBlockN - 1) / kBlockN, nb = nc + (sn + kBlockN - 1) / kBlockN;
    // GQA packing: tile rows are the lq * pack (query, head-in-group) pairs, query = packed row / pack.
    int const pack = (trial / 3) % 4 == 0 ? 1 << int(rng() % 4) : 1;
    for (int m = 0; m * kBlockM < lq * pack; ++m) {
      KVBlockMask<kBlockM, kBlockN> const bi(m, lq, cl, lp, sn, left, right, pack);
      int const r_hi = std::min((m + 1) * kBlockM, lq * pack);
      int const q_lo = m * kBlockM / pack, q_hi = (r_hi - 1) / pack + 1;
      // Split-KV: keep_split's parts tile [n_min, n_max) in order, contiguous and disjoint, for any count.
      for (int splits : {2, 3, 7, 64}) {
        int next = bi.n_min;
        for (int sp = 0; sp < splits; ++sp) {
          KVBlockMask<kBlockM, kBlockN> part = bi;
          part.keep_split(sp, splits);
          if (part.n_min > part.n_max) ++errors;
          if (part.n_max > part.n_min) {
            if (part.n_min != next) ++errors;
            next = part.n_max;
          }
        }
        if (next != bi.n_max) ++errors;
      }
      for (int n = 0; n < nb; ++n) {
        bool any_allowed = false, any_disallowed = false;
        int n0, kmin, kend;
        bi.block_cols(n, true, n0, kmin, kend);
        for (int c = 0; c < kBlockN; ++c) {
          bool valid;
          int pos;  // cache position of the column
          if (n < nc) {
            pos = n * kBlockN + c;
            valid = pos >= lp && pos < cl;
          } else {
            int const t = (n - nc) * kBlockN + c;
            pos = cl + t;
            valid = t < sn;
          }
          if (n0 + c != pos - lp) ++errors;  // block_cols' column positions
          bool const in_range = n0 + c >= kmin && n0 + c < kend;
          if (valid != in_range) ++errors;
          for (int i = q_lo; i < q_hi; ++i) {
            bool const a = valid && mask_allows(i, pos - lp, lq, skm, left, right);
            any_allowed |= a;
            any_disallowed |= !a;
          }
        }
        bool const in = n >= bi.n_min && n < bi.n_max;
        if (in != any_allowed) ++errors;
        if (in && !bi.needs_mask(n0, kmin, kend) && any_disallowed) ++errors;
        if (errors && errors < 4 && (in != any_allowed))
          std::printf("kv masks: cl=%d lp=%d sn=%d lq=%d pack=%d win=(%d,%d) m=%d n=%d: in=%d allowed=%d [%d, %d)\n",
                      cl, lp, sn, lq, pack, left, right, m, n, in, any_allowed, bi.n_min, bi.n_max);
      }
    }
  }
  std::printf("kv masks<%d, %d>: %s (%d errors)\n", kBlockM, kBlockN, errors ? "FAIL" : "ok", errors);
  return errors != 0;
}

static int check_varlen_stat_rows() {
  std::mt19937 rng(7);
  int errors = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    int const batch = 1 + int(rng() % 9);
    bool const hostile = trial % 2 == 1;
    std::vector<int> cu(batch + 1, 0), cu_k(batch + 1, 0);
    for (int b = 1; b <= batch; ++b) cu[b] = cu[b - 1] + int(rng() % 200);  // empty sequences included
    int const total = cu[batch] + int(rng() % 100);  // rows after the last sequence
    if (hostile)  // any order, out of range both ways
      for (int& x : cu) x = int(rng() % (total + 300)) - 150;
    int64_t const rows = fa3jax::bwd_varlen_stat_rows(total, batch);
    int64_t prev_end = 0;
    for (int b = 0; b < batch; ++b) {
      fa3jax::SeqInfo const s = fa3jax::SeqInfo::varlen(b, cu.data(), cu_k.data(), nullptr, total, 0);
      int64_t const start = fa3jax::bwd_varlen_pad_start(int(s.offset_q), b);
      int64_t const end = start + (s.seqlen_q + fa3jax::kBwdBlockM - 1) / fa3jax::kBwdBlockM * fa3jax::kBwdBlockM;
      bool const bad = start < 0 || end > rows || start % fa3jax::kBwdBlockM != 0 || (!hostile && start < prev_end);
      if (bad && errors++ < 5)
        std::printf("varlen stat rows: trial %d seq %d q0=%lld len=%d -> [%lld, %lld) of %lld (prev end %lld)\n",
                    trial, b, (long long)s.offset_q, s.seqlen_q, (long long)start, (long long)end, (long long)rows,
                    (long long)prev_end);
      prev_end = end;
    }
  }
  std::printf("varlen stat rows: %s (%d errors)\n", errors ? "FAIL" : "ok", errors);
  return errors != 0;
}

// dq_tile_coords inverts dq_tile_index on every tile the postprocess reads (each tile height with the widths it
// serves, MLA's 192 included): every stored index maps back to its (row, col), and the map is a bijection.
int check_dq_tile_coords() {
  int fails = 0;
  struct Shape { int tile_m, kd; };
  for (Shape sh : {Shape{64, 64}, Shape{64, 128}, Shape{64, 192}, Shape{64, 256}, Shape{80, 128}, Shape{128, 64}}) {
    std::vector<int> seen(size_t(sh.tile_m) * sh.kd, 0);
    for (int row = 0; row < sh.tile_m; ++row)
      for (int col = 0; col < sh.kd; ++col) {
        int const i = fa3jax::dq_tile_index(row, col, sh.kd, sh.tile_m);
        int r = -1, c = -1;
        if (i >= 0 && i < int(seen.size())) {
          ++seen[size_t(i)];
          fa3jax::dq_tile_coords(i, sh.kd, sh.tile_m, r, c);
        }
        if (r != row || c != col) {
          if (fails++ < 5)
            std::printf("FAIL dq_tile_coords tile_m=%d kd=%d: (%d, %d) -> %d -> (%d, %d)\n", sh.tile_m, sh.kd, row,
                        col, i, r, c);
        }
      }
    for (int n : seen) fails += n != 1;
  }
  std::printf("dq_tile_coords: %s (%d errors)\n", fails ? "FAIL" : "ok", fails);
  return fails;
}

// dq_rotated_turn against its definition: key block n reaches query block m at step (m - n) mod num_m; m's adds go
// by ascending step, ties by descending n. Every m's turns must be exactly that order's places (a permutation).
int check_dq_rotated_turn() {
  int fails = 0;
  for (int num_n = 1; num_n <= 70; ++num_n)
    for (int num_m = 1; num_m <= 70; ++num_m)
      for (int m = 0; m < num_m; ++m) {
        std::vector<int> order(size_t(num_n), 0);
        for (int n = 0; n < num_n; ++n) order[size_t(n)] = n;
        auto step = [&](int n) { return ((m - n) % num_m + num_m) % num_m; };
        std::sort(order.begin(), order.end(), [&](int a, int b) {
          return step(a) != step(b) ? step(a) < step(b) : a > b;
        });
        for (int r = 0; r < num_n; ++r) {
          int const n = order[size_t(r)];
          int const turn = fa3jax::dq_rotated_turn(n, m, num_n, num_m);
          if (turn != r && fails++ < 5)
            std::printf("FAIL dq_rotated_turn n=%d m=%d num_n=%d num_m=%d: %d, want %d\n", n, m, num_n, num_m, turn, r);
        }
      }
  // The walk's first block is one n reaches at step 0.
  for (int num_n = 1; num_n <= 70; ++num_n)
    for (int num_m = 1; num_m <= 70; ++num_m)
      for (int n = 0; n < num_n; ++n) {
        int const f = fa3jax::dq_rotated_first(n, num_m);
        if ((f < 0 || f >= num_m || ((f - n) % num_m + num_m) % num_m != 0) && fails++ < 5)
          std::printf("FAIL dq_rotated_first n=%d num_m=%d: %d\n", n, num_m, f);
      }
  std::printf("dq_rotated_turn: %s (%d errors)\n", fails ? "FAIL" : "ok", fails);
  return fails;
}

// dq_full_query_blocks (the rotated dQ order's condition) against every key block's own range: nonzero exactly
// where each key block of the sequence sees the query blocks [0, min(blocks, cap)), and then that count.
template <int kBlockM, int kBlockN>
int check_dq_full_query_blocks() {
  std::mt19937 rng(11);
  int fails = 0, full = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    int const sq = int(rng() % 700), sk = 1 + int(rng() % 900);
    int const left = rng() % 3 == 0 ? -1 : int(rng() % 1200), right = rng() % 3 == 0 ? -1 : int(rng() % 1200);
    int const cap = rng() % 4 == 0 ? 1 + int(rng() % 12) : INT_MAX;
    int const num_m = std::min((sq + kBlockM - 1) / kBlockM, cap), num_n = (sk + kBlockN - 1) / kBlockN;
    bool all = num_m > 0;
    for (int n = 0; n < num_n; ++n) {
      fa3jax::KBlockMask<kBlockM, kBlockN> const km(n, sq, sk, left, right);
      all = all && km.m_min == 0 && std::min(km.m_max, cap) == num_m;  // the kernel's varlen cap, as applied
    }
    int const got = fa3jax::dq_full_query_blocks<kBlockM, kBlockN>(sq, sk, left, right, cap);
    full += got > 0;
    if (got != (all ? num_m : 0) && fails++ < 5)
      std::printf("FAIL dq_full_query_blocks<%d, %d> sq=%d sk=%d win=(%d,%d) cap=%d: %d, want %d\n", kBlockM,
                  kBlockN, sq, sk, left, right, cap, got, all ? num_m : 0);
  }
  std::printf("dq_full_query_blocks<%d, %d>: %s (%d errors, %d full)\n", kBlockM, kBlockN, fails ? "FAIL" : "ok",
              fails, full);
  return fails;
}

int main() {
  int fails = 0;
  fails += check_varlen_stat_rows();
  fails += check_dq_tile_coords();
  fails += check_dq_rotated_turn();
  fails += check_dq_full_query_blocks<64, 128>();
  fails += check_dq_full_query_blocks<64, 64>();
  fails += check_masks<128, 128>();
  fails += check_masks<128, 176>();
  fails += check_masks<128, 80>();
  fails += check_masks<192, 128>();
  fails += check_masks<64, 128>();
  fails += check_masks<64, 64>();  // the d=256 backward's blocks
  fails += check_key_queries();
  fails += check_kv_masks<128, 128>();
  fails += check_kv_masks<128, 80>();
  fails += check_kv_masks<192, 128>();
  for (bool rev : {false, true}) {
    fails += check_scheduler(16, 16, 8, 32, rev);
    fails += check_scheduler(7, 3, 5, 4, rev);  // last section narrower than the group
    fails += check_scheduler(128, 16, 1, 4, rev);
    fails += check_scheduler(1, 1, 1, 1, rev);
    fails += check_scheduler(16, 6, 3, 5, rev);
    fails += check_scheduler(1, 8, 3, 4, rev, 7);   // split-KV decode: parts of one (head, batch) adjacent
    fails += check_scheduler(3, 2, 2, 3, rev, 16);
  }
  fails += check_bwd_lpt(32, 16, 4, 8);  // 4 x 4k causal, d = 128
  fails += check_bwd_lpt(128, 16, 1, 2);  // 1 x 16k
  fails += check_bwd_lpt(5, 3, 5, 4);     // last section narrower than the group
  fails += check_bwd_lpt(1, 1, 1, 1);
  fails += check_bwd_lpt(7, 8, 2, 64);    // one section holds every pair
  std::printf("scheduler: %s\n", fails ? "FAIL" : "ok");
  fails += check<FwdKernelTraits<cutlass::bfloat16_t, 128, 128, 128, 2, 24, 240>>("bf16 d128 128x128");
  fails += check<FwdKernelTraits<cutlass::half_t, 64, 192, 128, 2, 32, 160>>("fp16 d64 192x128");
  fails += check<FwdKernelTraits<cutlass::bfloat16_t, 256, 128, 80, 2, 24, 240>>("bf16 d256 128x80");
  // The KV-cache kernels' tiles (generate_instantiations.py FwdPolicy: d64 192x128, d128 128x128, d256 128x80).
  fails += check_kv_paged<FwdKernelTraits<cutlass::half_t, 64, 192, 128, 2, 32, 160, false, false, 64, true>>("d64");
  fails += check_kv_paged<FwdKernelTraits<cutlass::bfloat16_t, 128, 128, 128, 2, 32, 232, true, false, 128, true>>(
      "d128");
  fails += check_kv_paged<FwdKernelTraits<cutlass::bfloat16_t, 256, 128, 80, 2, 24, 240, false, false, 256, true>>(
      "d256");
  fails += check_bwd<BwdTraitsFor<DType::kBF16, 64, 64>>("d64");
  fails += check_bwd<BwdTraitsFor<DType::kBF16, 128, 128>>("d128");
  fails += check_bwd<BwdTraitsFor<DType::kBF16, 256, 256>>("d256");
  fails += check_bwd<BwdTraitsFor<DType::kBF16, 192, 128>>("d192x128 (MLA)");
  fails += check_bwd<BwdTraitsFor<DType::kFP16, 128, 64>>("d128x64 (MLA)");
  // The 80-row tile (policy block_m=80: dQ^T = K^T dS^T), whatever this build's policy.
  fails += check_bwd<BwdTraitsFor<DType::kBF16, 128, 128, false, kBwdBlockMWide>>("d128 80-row");
  fails += check_bwd<BwdTraitsFor<DType::kFP16, 128, 64, false, kBwdBlockMWide>>("d128x64 (MLA) 80-row");
  // The 128-row tile (policy bwd64.block_m=128: dQ's warpgroups along queries), whatever this build's policy.
  fails += check_bwd<BwdTraitsFor<DType::kBF16, 64, 64, false, kBwdBlockMTall>>("d64 128-row");
  return fails;
}

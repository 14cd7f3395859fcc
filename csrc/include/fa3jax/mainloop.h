// Forward mainloop: TMA producer (one thread) and the consumer warpgroups' GEMM + online-softmax loop.
//
// Consumer schedule per key block n (blocks visited from the last to the first):
//   [turn]  issue S = Q K_n; rescale O for block n+1's max (under the QK GEMM); issue O += P_{n+1} V_{n+1}
//           [pass turn to next warpgroup]
//   wait for S only; release K_n; softcap + mask + online softmax on S (fp32) while P_{n+1} V_{n+1} still
//   runs on the tensor cores; then wait for it, release V_{n+1}, convert S -> P_n (bf16/fp16).
// Two overlaps (FA3 paper, section 3): across warpgroups, the "turn" is a ring of named barriers (ping-pong
// for 2), so one warpgroup's softmax runs under the other's GEMMs; within a warpgroup, the softmax of block n
// runs under the PV GEMM of block n+1 (P_{n+1} lives in its own registers, S is only read after its GEMM).
#pragma once

#include <cutlass/arch/barrier.h>

#include "kernel_traits.h"
#include "mask.h"
#include "seq_info.h"
#include "softmax.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace fa3jax {

template <class KT>
struct FwdMainloop {
  using Element = typename KT::Element;
  using Params = typename KT::Params;
  using SharedStorage = typename KT::SharedStorage;
  using Pipeline = typename KT::Pipeline;
  using PipelineState = typename KT::PipelineState;
  using BI = QBlockMask<KT::kBlockM, KT::kBlockN>;
  static constexpr int kNumMmaWG = KT::kNumMmaWG;
  static constexpr int kFirstSchedBarrier = 1;  // ids 1 .. kNumMmaWG

  // One tile's loads: Q (once the consumers have released the previous one; q_iter counts the tiles with
  // loads so far), then K/V blocks n_max-1 .. n_min into the pipelines' stages (state `st` runs across tiles;
  // both pipelines hold block j in the same stage).
  // Called by the whole producer warp with warp-uniform arguments, so the TMA coordinates stay in uniform
  // registers; lane 0 issues the copies and the barrier arrivals (the pipelines' is_leader is thread 0).
  CUTE_DEVICE static void load(Params const& params, SharedStorage& ss, Pipeline& pipe_k, Pipeline& pipe_v,
                               PipelineState& st, int q_iter, FwdTile const& tile, SeqInfo const& seq,
                               BI const& bi) {
    int const batch = params.batch;
    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename KT::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename KT::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.smem_v.data()), typename KT::SmemLayoutVt{});
    int const head_k = tile.head / params.group_size;

    if constexpr (!KT::kVarlen) {
      // The tile's (M, D) Q block, (N, D, n) K blocks and (D_v, N, n) V^T blocks.
      Tensor mQ =
          params.tma_q.get_tma_tensor(make_shape(params.seqlen_q, int(KT::kHeadDim), params.num_heads_q, batch));
      Tensor mK =
          params.tma_k.get_tma_tensor(make_shape(params.seqlen_k, int(KT::kHeadDim), params.num_heads_k, batch));
      Tensor mVt =
          params.tma_v.get_tma_tensor(make_shape(int(KT::kHeadDimV), params.seqlen_k, params.num_heads_k, batch));
      Tensor gQ = local_tile(mQ(_, _, tile.head, tile.batch), Shape<typename KT::BlkM, typename KT::HDim>{},
                             make_coord(tile.m_block, _0{}));
      Tensor gK = local_tile(mK(_, _, head_k, tile.batch), Shape<typename KT::BlkN, typename KT::HDim>{},
                             make_coord(_, _0{}));
      Tensor gVt = local_tile(mVt(_, _, head_k, tile.batch), Shape<typename KT::HDimV, typename KT::BlkN>{},
                              make_coord(_0{}, _));
      auto [tQgQ, tQsQ] =
          tma_partition(params.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tKgK, tKsK] = tma_partition(params.tma_k, 0, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVgV, tVsV] =
          tma_partition(params.tma_v, 0, Layout<_1>{}, group_modes<0, 2>(sVt), group_modes<0, 2>(gVt));
      load_blocks(
          ss, pipe_k, pipe_v, st, q_iter, bi, [&] { copy(params.tma_q.with(ss.barrier_q), tQgQ, tQsQ); },
          [&](int n, PipelineState s) {
            copy(params.tma_k.with(*pipe_k.producer_get_barrier(s)), tKgK(_, n), tKsK(_, s.index()));
          },
          [&](int n, PipelineState s) {
            copy(params.tma_v.with(*pipe_v.producer_get_barrier(s)), tVgV(_, n), tVsV(_, s.index()));
          });
    } else {
      // Packed rows through rows views (rows_view.h; launch.h encode_rows_view): the sequence's `len` rows end at
      // row end = offset + len and its row i is view row kViewRows - len + i, so rows past its end are zero-filled
      // (keys past seqused_k included: their scores are masked and their zero values add nothing). One box per
      // 64-column slice (a 128-byte swizzle row) of the Q tile, a K stage or a V^T stage.
      int const end_q = int(seq.offset_q) + seq.seqlen_q, end_k = int(seq.offset_k) + seq.seqlen_k;
      int const row_q = KT::kViewRows - seq.seqlen_q + tile.m_block * KT::kBlockM;
      int const row_k = KT::kViewRows - seq.seqlen_k;
      load_blocks(
          ss, pipe_k, pipe_v, st, q_iter, bi,
          [&] {
            copy_rows_tile<KT::kHeadDim, 64>(
                params.tma_q, &ss.barrier_q, [&](int c) { return &sQ(0, c); }, row_q, tile.head, end_q);
          },
          [&](int n, PipelineState s) {
            copy_rows_tile<KT::kHeadDim, 64>(
                params.tma_k, pipe_k.producer_get_barrier(s), [&](int c) { return &sK(0, c, s.index()); },
                row_k + n * KT::kBlockN, head_k, end_k);
          },
          [&](int n, PipelineState s) {
            copy_rows_tile<KT::kHeadDimV, 64>(
                params.tma_v, pipe_v.producer_get_barrier(s), [&](int c) { return &sVt(c, 0, s.index()); },
                row_k + n * KT::kBlockN, head_k, end_k);
          });
    }
  }

  // The loads' order for one tile (load): Q once the consumers have released the previous one, then K/V blocks
  // n_max-1 .. n_min. load_q() and load_k/v(n, stage) issue one block's copies (lane 0 only).
  template <class LoadQ, class LoadK, class LoadV>
  CUTE_DEVICE static void load_blocks(SharedStorage& ss, Pipeline& pipe_k, Pipeline& pipe_v, PipelineState& st,
                                      int q_iter, BI const& bi, LoadQ const& load_q, LoadK const& load_k,
                                      LoadV const& load_v) {
    bool const lane0 = threadIdx.x % 32 == 0;
    if (q_iter > 0) cute::wait_barrier(ss.barrier_q_empty, (q_iter - 1) & 1);
    if (lane0) {
      cute::set_barrier_transaction_bytes(ss.barrier_q, KT::kBytesQ);
      load_q();
    }

    // K runs one block ahead of V (K_{n-1} is requested before V_n). A consumer needs K_{n-1} first (QK^T opens
    // each iteration) while V_n's stage frees only when the slower warpgroup's P V GEMM of block n+kStages
    // retires; in block order, K_{n-1} would queue behind that release and the QK^T GEMMs would wait for K
    // (Nsight Compute: ~10 failed K waits per key block, 13% of stall samples on long scoreboard).
    int n = bi.n_max - 1;
    pipe_k.producer_acquire(st);
    if (lane0) load_k(n, st);
    for (; n > bi.n_min; --n) {
      PipelineState next = st;
      ++next;
      pipe_k.producer_acquire(next);
      if (lane0) load_k(n - 1, next);
      pipe_v.producer_acquire(st);
      if (lane0) load_v(n, st);
      st = next;
    }
    pipe_v.producer_acquire(st);
    if (lane0) load_v(n, st);
    ++st;
  }

  // KV cache: where virtual key block n (mask.h KVBlockMask) comes from, in a packed-rows view (launch.h
  // encode_rows_view): the source's valid rows are `len` rows ending at view row `end`, and the block starts at their
  // row `row0`; it reads view rows kViewRows - len + row0 + i, so rows past len are zero-filled.
  struct KVSource {
    bool is_new;  // the appended keys (tma_new_*), else the cache
    int end, len, row0;
  };
  template <class KVBI>
  CUTE_DEVICE static KVSource kv_source(Params const& params, KVCacheSeq const& kv, KVBI const& bi, int batch,
                                        int n) {
    if (n >= bi.nc) {
      int const sn = params.seqlen_new;
      return {true, batch * sn + sn, sn, (n - bi.nc) * KT::kBlockN};
    }
    int const rows = params.slot_rows;
    int const row = n * KT::kBlockN;
    if (params.page_table == nullptr) return {false, kv.slot * rows + kv.cache_len, kv.cache_len, row};
    // Paged, kv_load kBlocks: page_size is a multiple of kBlockN, so the block lies in one page. A page index out of
    // range is never dereferenced: an empty view (every row zero-filled), and the consumers mask the block.
    int const ps = min(row / rows, params.pages_per_seq - 1);
    int const page = params.page_table[int64_t(batch) * params.pages_per_seq + ps];
    bool const ok = page >= 0 && page < params.cache_slots;
    int const valid = ok ? max(0, min(rows, kv.cache_len - ps * rows)) : 0;
    return {false, ok ? page * rows + valid : 0, valid, row - ps * rows};
  }

  // GQA packing (KV cache): the Q tile's row r is packed row R = m_block M + r = query i * pack + head-in-group j,
  // i.e. q[batch, i, tile.head * pack + j, :]; such rows are no TMA box (two strides), so the producer warp gathers
  // them with 16-byte cp.async copies (columns past the call's head dim zero-filled) and each lane's copies arrive on
  // barrier_q as they land (the non-noinc arrive holds the phase open for them; lane 0's plain arrive is the one the
  // barrier expects), so the K/V loads below are issued without waiting for Q. Rows past seqlen_q * pack are not
  // written: their scores and outputs stay in their own rows, which no epilogue stores.
  CUTE_DEVICE static void load_q_packed(Params const& params, SharedStorage& ss, FwdTile const& tile) {
    int const lane = int(threadIdx.x % 32);
    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename KT::SmemLayoutQ{});
    constexpr int kChunks = KT::kHeadDim / 8;  // 16-byte pieces of a row
    int const g = params.pack;
    int const r0 = tile.m_block * KT::kBlockM;
    int const rows = min(KT::kBlockM, params.seqlen_q * g - r0);
    int const chunks = params.dim_v / 8;  // the call's head dim (d_v == d in the KV-cache kernel)
    Element const* q = static_cast<Element const*>(params.q_ptr) + int64_t(tile.batch) * params.q_stride_batch;
    for (int i = lane; i < rows * kChunks; i += 32) {
      int const r = i / kChunks, c = i % kChunks;
      int const R = r0 + r, qi = R / g, head = tile.head * g + (R - qi * g);
      Element const* src = q + int64_t(qi) * params.q_stride_row + int64_t(head) * params.q_stride_head + c * 8;
      uint32_t const dst = cute::cast_smem_ptr_to_uint(&sQ(r, c * 8));
      uint32_t const bytes = c < chunks ? 16u : 0u;  // 0: zero fill, nothing read
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(bytes ? src : q), "r"(bytes)
                   : "memory");
    }
    cutlass::arch::cpasync_barrier_arrive(reinterpret_cast<uint64_t const*>(&ss.barrier_q));
    __syncwarp();
    if (lane == 0) cute::arrive_barrier(ss.barrier_q);
  }

  // Paged caches whose key blocks span pages (Params::kv_load kBoxes / kGather). Each is called by the whole producer
  // warp with warp-uniform arguments.
  //
  // The columns of cache block n whose page index is out of range (below the row's cache length: later columns are
  // masked anyway), as the consumers' quad-lane words (mask.h kv_colmask_col) in SharedStorage::kv_colmask slot
  // `slot`; lane 0 stores them, so its arrive on the block's K barrier releases them to the consumers.
  CUTE_DEVICE static void store_colmask(Params const& params, SharedStorage& ss, KVCacheSeq const& kv, int batch, int n,
                                        int slot) {
    int const lane = int(threadIdx.x % 32);
    CUTE_UNROLL
    for (int q = 0; q < 4; ++q) {
      int const col = kv_colmask_col(q, lane);
      int const pos = n * KT::kBlockN + col;
      bool bad = false;
      if (lane < KT::kBlockN / 4 && pos < kv.cache_len) {  // pos < capacity: its page slot is inside the table row
        int const page = params.page_table[int64_t(batch) * params.pages_per_seq + pos / params.slot_rows];
        bad = page < 0 || page >= params.cache_slots;
      }
      uint32_t const bits = __ballot_sync(0xffffffffu, bad);
      if (lane == 0) ss.kv_colmask[slot][q] = bits;
    }
  }

  // kBoxes: cache block n as kBlockN / box_rows boxes (box_rows >= 8 divides kBlockN and page_size: a box lies in one
  // page and starts on a swizzle atom), one TMA copy per box and 64-column slice; lane i issues box i's. Each box
  // reads its page as kv_source reads a whole-page block: a packed-rows view ending at the page's valid length, so
  // rows past it (and every row of a page index out of range, never dereferenced) are zero-filled. dst(row, col): the
  // stage's smem address of (row, col). The boxes' bytes add up to the block's (kBytesK = kBytesV here).
  template <class Dst>
  CUTE_DEVICE static void copy_boxes(Params const& params, cute::TmaDescriptor const& desc, uint64_t* bar,
                                     KVCacheSeq const& kv, int batch, int head_k, int n, Dst const& dst) {
    int const lane = int(threadIdx.x % 32);
    int const g = params.box_rows, ps = params.slot_rows;
    if (lane * g >= KT::kBlockN) return;
    int const pos = n * KT::kBlockN + lane * g;  // the box's first cache position
    int const pi = pos / ps;
    int const page =
        pi < params.pages_per_seq ? params.page_table[int64_t(batch) * params.pages_per_seq + pi] : -1;
    bool const ok = page >= 0 && page < params.cache_slots;
    int const valid = ok ? max(0, min(ps, kv.cache_len - pi * ps)) : 0;
    int const row = KT::kViewRows - valid + (pos - pi * ps), end = ok ? page * ps + valid : 0;
    CUTE_UNROLL
    for (int c = 0; c < KT::kHeadDim; c += 64) copy_rows_box(desc, bar, dst(lane * g, c), c, row, head_k, end);
  }

  // kGather: cache block n's rows copied with 16-byte cp.async into the stage at shared address `stage` (K or V^T,
  // whose layouts agree: KT::kv_chunk_offset, where a TMA box would put them). Each lane owns one 16-byte chunk of a
  // row (a row's bytes are contiguous in memory: coalesced reads) and rows step by 32 / chunks per row; the page is
  // tracked incrementally (one division per block) and its table entry read once per page. A row past the cache
  // length or on a page out of range, and the columns past the call's head dim, are zero-filled without a read.
  // base: the cache at the tile's kv head. The copies complete in load_spanning's flush.
  CUTE_DEVICE static void gather_rows(Params const& params, Element const* base, int64_t stride_row,
                                      KVCacheSeq const& kv, int batch, int n, uint32_t stage) {
    constexpr int kChunks = KT::kHeadDim / 8;
    static_assert(kChunks <= 32 && 32 % kChunks == 0 && KT::kBlockN % (32 / kChunks) == 0);
    constexpr int kRowStep = 32 / kChunks;
    int const lane = int(threadIdx.x % 32);
    int const c = lane % kChunks;
    int const ps = params.slot_rows;
    bool const lane_live = c < params.dim_v / 8;  // the call's head dim (d_v == d here)
    int const* table = params.page_table + int64_t(batch) * params.pages_per_seq;
    Element const* const src0 = base + c * 8;
    int r = lane / kChunks;
    int pos = n * KT::kBlockN + r;
    int pi = pos / ps, off = pos - pi * ps;
    int last = -1, page = -1;
#pragma unroll 1  // the producer's 24-32 registers
    for (; r < KT::kBlockN; r += kRowStep, pos += kRowStep, off += kRowStep) {
      while (off >= ps) {
        off -= ps;
        ++pi;
      }
      if (pi != last) {
        last = pi;
        page = pi < params.pages_per_seq ? table[pi] : -1;
      }
      bool const live = lane_live && pos < kv.cache_len && page >= 0 && page < params.cache_slots;
      Element const* src = live ? src0 + int64_t(page * ps + off) * stride_row : base;
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(stage + KT::kv_chunk_offset(r, c * 8)),
                   "l"(src), "r"(live ? 16u : 0u)
                   : "memory");
    }
  }

  // KV-cache counterpart of load(): Q as the dense kernel's, then virtual key blocks n_max-1 .. n_min, each one TMA
  // load from the cache or the appended keys (kv_source), in load()'s order (K one block ahead of V).
  // kSpansPages (kv_load kBoxes / kGather, fwd_kernel instantiates the producer loop once per value, so that the
  // kBlocks loop keeps its registers): cache blocks read per box or row instead (above).
  template <bool kSpansPages, class KVBI>
  CUTE_DEVICE static void load_kvcache(Params const& params, SharedStorage& ss, Pipeline& pipe_k, Pipeline& pipe_v,
                                       PipelineState& st, int q_iter, FwdTile const& tile, KVCacheSeq const& kv,
                                       KVBI const& bi) {
    bool const lane0 = threadIdx.x % 32 == 0;
    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename KT::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename KT::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.smem_v.data()), typename KT::SmemLayoutVt{});
    // GQA packing: the tile's heads are those of kv head tile.head (KT::Params::pack).
    int const head_k = params.pack > 1 ? tile.head : tile.head / params.group_size;

    if (q_iter > 0) cute::wait_barrier(ss.barrier_q_empty, (q_iter - 1) & 1);
    if (params.pack > 1) {
      load_q_packed(params, ss, tile);
    } else {
      Tensor mQ = params.tma_q.get_tma_tensor(
          make_shape(params.seqlen_q, int(KT::kHeadDim), params.num_heads_q, params.batch));
      Tensor gQ = local_tile(mQ(_, _, tile.head, tile.batch), Shape<typename KT::BlkM, typename KT::HDim>{},
                             make_coord(tile.m_block, _0{}));
      auto [tQgQ, tQsQ] =
          tma_partition(params.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      if (lane0) {
        cute::set_barrier_transaction_bytes(ss.barrier_q, KT::kBytesQ);
        copy(params.tma_q.with(ss.barrier_q), tQgQ, tQsQ);
      }
    }

    // One TMA per 64-column slice of the block (K: rows of the K stage; V^T: the stage's slice of d_v columns); one
    // branch per descriptor (not a pointer chosen at run time), so that each TMA names a kernel parameter.
    auto issue_k_from = [&](KVSource const& x, PipelineState s) {
      if (!lane0) return;
      uint64_t* const bar = pipe_k.producer_get_barrier(s);
      int const row = KT::kViewRows - x.len + x.row0;
      CUTE_UNROLL
      for (int c = 0; c < KT::kHeadDim; c += 64) {
        if (x.is_new) copy_rows_box(params.tma_new_k, bar, &sK(0, c, s.index()), c, row, head_k, x.end);
        else copy_rows_box(params.tma_cache_k, bar, &sK(0, c, s.index()), c, row, head_k, x.end);
      }
    };
    auto issue_v_from = [&](KVSource const& x, PipelineState s) {
      if (!lane0) return;
      uint64_t* const bar = pipe_v.producer_get_barrier(s);
      int const row = KT::kViewRows - x.len + x.row0;
      CUTE_UNROLL
      for (int c = 0; c < KT::kHeadDimV; c += 64) {
        if (x.is_new) copy_rows_box(params.tma_new_v, bar, &sVt(c, 0, s.index()), c, row, head_k, x.end);
        else copy_rows_box(params.tma_cache_v, bar, &sVt(c, 0, s.index()), c, row, head_k, x.end);
      }
    };

    auto issue_k = [&](int n, PipelineState s) { issue_k_from(kv_source(params, kv, bi, tile.batch, n), s); };
    auto issue_v = [&](int n, PipelineState s) { issue_v_from(kv_source(params, kv, bi, tile.batch, n), s); };

    if constexpr (!kSpansPages) {
      // Each block's source (paged: its page-table entry, a dependent global load) is read before the wait for
      // its K stage, so that load's latency overlaps the wait, and kept for its V stage.
      int n = bi.n_max - 1;
      KVSource src = kv_source(params, kv, bi, tile.batch, n);
      pipe_k.producer_acquire(st);
      issue_k_from(src, st);
      for (; n > bi.n_min; --n) {
        PipelineState next = st;
        ++next;
        KVSource const src_next = kv_source(params, kv, bi, tile.batch, n - 1);
        pipe_k.producer_acquire(next);
        issue_k_from(src_next, next);
        pipe_v.producer_acquire(st);
        issue_v_from(src, st);
        st = next;
        src = src_next;
      }
      pipe_v.producer_acquire(st);
      issue_v_from(src, st);
      ++st;
    } else {
      load_spanning(params, ss, pipe_k, pipe_v, st, tile, kv, bi, head_k, issue_k, issue_v);
    }
  }

  // The key blocks of load_kvcache<true>: cache blocks spanning pages. The K stage's barrier also releases the
  // block's column mask (store_colmask before lane 0's arrive).
  template <class KVBI, class IssueK, class IssueV>
  CUTE_DEVICE static void load_spanning(Params const& params, SharedStorage& ss, Pipeline& pipe_k, Pipeline& pipe_v,
                                        PipelineState& st, FwdTile const& tile, KVCacheSeq const& kv, KVBI const& bi,
                                        int head_k, IssueK const& issue_k, IssueV const& issue_v) {
    bool const lane0 = threadIdx.x % 32 == 0;
    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename KT::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.smem_v.data()), typename KT::SmemLayoutVt{});
    // kGather fills a stage with plain cp.async, which no barrier counts: each lane waits for its own copies and
    // fences them for the consumers' wgmma (async proxy) before lane 0 arrives on the stage's barrier (its one
    // expected arrival, no transaction bytes), in flush. flush runs after the first K block and then once per K/V
    // pair, so at most one K and one V stage are pending: a pending K block is never what the V stage acquired in
    // between waits for (the consumers free that stage with the P V GEMM of the block kStages back, which needs
    // only earlier K blocks).
    int pend_k = -1, pend_v = -1;  // kGather: stages filled since the last flush
    auto load_k = [&](int n, PipelineState s) {
      if (!bi.is_cache(n)) {
        pipe_k.producer_acquire(s);
        issue_k(n, s);
        return;
      }
      ss.pipeline_k.empty_barrier_[s.index()].wait(s.phase());
      store_colmask(params, ss, kv, tile.batch, n, int(s.index() + KT::kStages * (s.phase() ^ 1)));
      if (params.kv_load == KVLoad::kBoxes) {
        if (lane0) ss.pipeline_k.full_barrier_[s.index()].arrive_and_expect_tx(KT::kBytesK);
        __syncwarp();  // the expected bytes before any lane's box lands
        auto const dst = [&](int row, int col) { return &sK(row, col, s.index()); };
        copy_boxes(params, params.tma_cache_k, pipe_k.producer_get_barrier(s), kv, tile.batch, head_k, n, dst);
      } else {
        gather_rows(params, static_cast<Element const*>(params.k_cache) + int64_t(head_k) * params.k_stride_head,
                    params.k_stride_row, kv, tile.batch, n,
                    cute::cast_smem_ptr_to_uint(ss.smem_k.data()) + s.index() * KT::kStageBytesK);
        pend_k = int(s.index());
      }
    };
    auto load_v = [&](int n, PipelineState s) {
      if (!bi.is_cache(n)) {
        pipe_v.producer_acquire(s);
        issue_v(n, s);
        return;
      }
      if (params.kv_load == KVLoad::kBoxes) {
        pipe_v.producer_acquire(s);
        __syncwarp();
        auto const dst = [&](int row, int col) { return &sVt(col, row, s.index()); };
        copy_boxes(params, params.tma_cache_v, pipe_v.producer_get_barrier(s), kv, tile.batch, head_k, n, dst);
      } else {
        ss.pipeline_v.empty_barrier_[s.index()].wait(s.phase());
        gather_rows(params, static_cast<Element const*>(params.v_cache) + int64_t(head_k) * params.v_stride_head,
                    params.v_stride_row, kv, tile.batch, n,
                    cute::cast_smem_ptr_to_uint(ss.smem_v.data()) + s.index() * KT::kStageBytesV);
        pend_v = int(s.index());
      }
    };
    auto flush = [&]() {
      if (pend_k < 0 && pend_v < 0) return;
      asm volatile("cp.async.wait_all;\n" ::: "memory");
      cutlass::arch::fence_view_async_shared();
      __syncwarp();
      if (lane0) {
        if (pend_k >= 0) ss.pipeline_k.full_barrier_[pend_k].arrive();
        if (pend_v >= 0) ss.pipeline_v.full_barrier_[pend_v].arrive();
      }
      pend_k = pend_v = -1;
    };
    int n = bi.n_max - 1;
    load_k(n, st);
    // Without this flush the next load_k overwrote pend_k: the first block's K stage never got its arrival and the
    // consumers waited for it forever (every gathered tile of >= 2 blocks that starts with a cache block).
    flush();
    for (; n > bi.n_min; --n) {
      PipelineState next = st;
      ++next;
      load_k(n - 1, next);
      load_v(n, st);
      flush();
      st = next;
    }
    load_v(n, st);
    flush();
    ++st;
  }

  // Scheduling ring: warpgroup w waits for its turn on barrier (first + w) and hands the turn to w + 1. The
  // ring runs across the tiles of a persistent CTA: warpgroup 0 skips only its very first wait, and consumes the
  // last warpgroup's final hand-over after its last tile (sched_drain), so every barrier phase gets exactly 128
  // waiting + 128 arriving threads. Each warpgroup alternates wait and pass, so no barrier ever holds two
  // pending hand-overs.
  CUTE_DEVICE static void sched_wait(int wg, bool skip) {
    if constexpr (kNumMmaWG > 1) {
      if (!(wg == 0 && skip)) named_barrier_sync(kFirstSchedBarrier + wg, 256);
    }
  }
  CUTE_DEVICE static void sched_pass(int wg) {
    if constexpr (kNumMmaWG > 1) named_barrier_arrive(kFirstSchedBarrier + (wg + 1) % kNumMmaWG, 256);
  }
  CUTE_DEVICE static void sched_drain(int wg, bool ran) {
    if constexpr (kNumMmaWG > 1) {
      if (wg == 0 && ran) named_barrier_sync(kFirstSchedBarrier, 256);
    }
  }

  // Frees stage st of a pipeline for the producer: every consumer thread arrives on its own CTA's empty
  // barrier with a local mbarrier.arrive. PipelineTmaAsync::consumer_release always takes the cluster form (mapa
  // + arrive on the mapped address), which costs an add and a PRMT more per release in the SASS.
  CUTE_DEVICE static void release(typename Pipeline::SharedStorage& storage, PipelineState st) {
    storage.empty_barrier_[st.index()].arrive();
  }

  // Consumer loop. Returns with tOrO holding the unnormalized output and `softmax` the row statistics.
  // q_iter: tiles with loads this CTA ran before (Q barrier phases; 0 = the ring's very first turn).
  // kSoftcap: params.softcap > 0, as a template parameter so that the loop without softcap carries no test of
  // it (a per-block FSETP + branch in the SASS when it was read at run time); kSoftcapRuntime: one loop for both,
  // testing params.softcap per block (KT::kSoftcapVariants false).
  // BInfo: QBlockMask, or KVBlockMask for the KV-cache kernel (batch: the tile's batch row, for its page table).
  template <bool kSoftcap, bool kSoftcapRuntime = false, class BInfo, class TOrO, class Softmax>
  CUTE_DEVICE static void mma(Params const& params, SharedStorage& ss, Pipeline& pipe_k, Pipeline& pipe_v,
                              PipelineState& st_k, PipelineState& st_v, int q_iter, BInfo const& bi, int m_block,
                              int mma_tid, int mma_wg, TOrO& tOrO, Softmax& softmax, int batch = 0) {
    typename KT::TiledMmaQK mma_qk;
    typename KT::TiledMmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(mma_tid);
    auto thr_pv = mma_pv.get_thread_slice(mma_tid);

    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename KT::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename KT::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.smem_v.data()), typename KT::SmemLayoutVt{});

    // The Q descriptors depend only on the warpgroup (every thread of a warpgroup passes the same descriptor to
    // wgmma), so they are built from the warpgroup's first thread index: mma_wg is warp-uniform (shuffled
    // from lane 0 in canonical_warp_group_idx), so ptxas keeps them in uniform registers. Built from
    // mma_tid they sat in 16 vector registers and cost two R2UR per QK^T wgmma (SASS, 8 per key block).
    auto thr_qk_a = mma_qk.get_thread_slice(mma_wg * 128);
    Tensor tSrQ = thr_qk_a.partition_fragment_A(sQ);  // (MMA, MMA_M, MMA_K) descriptors
    // K/V descriptors from one base: ss sits at a 1024-byte aligned shared address (required anyway by the
    // 128-byte swizzle with base offset 0 that CuTe's descriptors assume), so each operand's address >> 4 is
    // (ss >> 4) + its constant offset / 16. Every thread's B tile starts at the operand's first element
    // (tests/test_layouts.cu). (MMA, MMA_N, MMA_K, stage)
    // Unmasked to the descriptor's 14 bits: a CTA's shared window starts at 0 (a cluster peer's would carry
    // bits above the field); the wide kernel spills 12 B with the mask (ptxas -v).
    uint32_t const ss16 = cute::cast_smem_ptr_to_uint(&ss) >> 4;
    auto offset16 = [&](auto const& member) {
      return uint32_t(reinterpret_cast<char const*>(&member) - reinterpret_cast<char const*>(&ss)) >> 4;
    };
    Tensor tSrK = gmma_desc_at(thr_qk.partition_fragment_B(sK), ss16 + offset16(ss.smem_k));
    Tensor tOrV = gmma_desc_at(thr_pv.partition_fragment_B(sVt), ss16 + offset16(ss.smem_v));

    Tensor tSrS = partition_fragment_C(mma_qk, Shape<typename KT::BlkM, typename KT::BlkN>{});
    Tensor rP = make_fragment_like<Element>(tSrS);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_regs(rP.layout()));
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));

    Tensor cS = make_identity_tensor(Shape<typename KT::BlkM, typename KT::BlkN>{});
    Tensor tScS = thr_qk.partition_C(cS);
    Tensor rcS = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

    constexpr int kRows = decltype(size<0>(S))::value;
    int const q_lo_tile = m_block * KT::kBlockM;
    // KV cache: each thread row's query index for the mask, once per tile (GQA packing: packed row / pack).
    int qrow[kRows];
    if constexpr (KT::kKVCache) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        int const row = q_lo_tile + int(get<0>(rcS(r, 0)));
        qrow[r] = params.pack > 1 ? row / params.pack : row;
      }
    }

    clear(tOrO);
    softmax.init();
    cute::wait_barrier(ss.barrier_q, q_iter & 1);
    // A packed Q tile was written by cp.async (generic proxy) and is read by wgmma (async proxy).
    if constexpr (KT::kKVCache) {
      if (params.pack > 1) cutlass::arch::fence_view_async_shared();
    }

    int unmasked_lo = 0, unmasked_hi = 0;
    if constexpr (!KT::kKVCache) bi.unmasked_range(unmasked_lo, unmasked_hi);
    // The loop visits blocks n = n_max - 1 - it for it = 0, 1, ...: the unmasked ones are
    // it in [n_max - unmasked_hi, n_max - unmasked_lo), tested in the loop's own counter (one add, one compare).
    int const it_unmasked = bi.n_max - unmasked_hi;
    uint32_t const num_unmasked = uint32_t(unmasked_hi - unmasked_lo);

    // Softcap + mask + online softmax of the it-th block visited on S (fp32, in place); o_scale rescales the
    // running O.
    auto softmax_block = [&](int it, float (&o_scale)[kRows]) {
      if constexpr (KT::kKVCache) {
        // Virtual blocks mix sources and partial ends, so masked blocks need not form one range: test each.
        // The page-table entry is an L1-resident broadcast load (the producer read it for the same block).
        int const n = bi.n_max - 1 - it;
        bool page_ok = true;
        if (params.page_table != nullptr && params.kv_load == KVLoad::kBlocks && bi.is_cache(n)) {
          int const ps = min(n * KT::kBlockN / params.slot_rows, params.pages_per_seq - 1);
          int const page = params.page_table[int64_t(batch) * params.pages_per_seq + ps];
          page_ok = page >= 0 && page < params.cache_slots;
        }
        int n0, kmin, kend;
        bi.block_cols(n, page_ok, n0, kmin, kend);
        bool const cap = kSoftcap || (kSoftcapRuntime && params.softcap > 0.f);
        if (cap) {
          CUTE_UNROLL
          for (int i = 0; i < size(S); ++i) S(i) = params.softcap * tanh_approx(S(i) * params.softcap_pre);
        }
        // Blocks spanning pages: the producer's column mask (store_colmask), this lane's quad word in the ring slot
        // of block n's K state, the one before st_k (released and advanced above).
        uint32_t kill = 0;
        if (params.kv_load != KVLoad::kBlocks && bi.is_cache(n)) {
          bool const wrapped = st_k.index() == 0;
          int const stage = wrapped ? KT::kStages - 1 : int(st_k.index()) - 1;
          kill = ss.kv_colmask[stage + KT::kStages * int(st_k.phase() ^ (wrapped ? 1u : 0u))][threadIdx.x % 4];
        }
        if (kill != 0 || bi.needs_mask(n0, kmin, kend))
          apply_mask_range(S, rcS, qrow, n0, bi.shift, kmin, kend, bi.left, bi.right, kill);
        softmax.step(S, params.scale_log2, o_scale);
        return;
      }
      int const n0 = (bi.n_max - 1 - it) * KT::kBlockN;
      bool const need_mask = uint32_t(it - it_unmasked) >= num_unmasked;  // == bi.needs_mask(n_max - 1 - it)
      if (kSoftcap || (kSoftcapRuntime && params.softcap > 0.f)) {
        if (need_mask) transform_scores<true, true>(S, rcS, q_lo_tile, n0, bi.shift, bi.seqlen_k, bi.left, bi.right, params.softcap_pre, params.softcap);
        else transform_scores<false, true>(S, rcS, q_lo_tile, n0, bi.shift, bi.seqlen_k, bi.left, bi.right, params.softcap_pre, params.softcap);
      } else if (need_mask) {
        transform_scores<true, false>(S, rcS, q_lo_tile, n0, bi.shift, bi.seqlen_k, bi.left, bi.right, 0.f, 0.f);
      }
      softmax.step(S, params.scale_log2, o_scale);
    };

    // O *= o_scale (per row): brings the running output to the latest row max before the next P V is added.
    float o_scale[kRows];
    auto rescale_o = [&]() {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(O); ++c) O(r, c) *= o_scale[r];
      }
    };

    int const n_iters = bi.num_blocks();  // >= 1 (the kernel skips the mainloop otherwise)
    // First block, peeled: S only, no PV GEMM yet. Keeping the steady-state loop free of branches around the
    // wgmma issue/wait lets ptxas keep the two GEMMs asynchronous (with them it serializes every wgmma).
    {
      pipe_k.consumer_wait(st_k);
      sched_wait(mma_wg, q_iter == 0);
      wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, st_k.index()), tSrS);
      sched_pass(mma_wg);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      release(ss.pipeline_k, st_k);
      ++st_k;
      softmax_block(0, o_scale);
      convert_fragment(rP, tSrS);
    }
    for (int it = 1; it < n_iters; ++it) {
      pipe_k.consumer_wait(st_k);
      sched_wait(mma_wg, false);
      wgmma_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, st_k.index()), tSrS);
      rescale_o();  // ALU work under the QK GEMM (FA3's ordering); O is idle until the PV GEMM below
      pipe_v.consumer_wait(st_v);  // V arrives after the next K (see load): wait for it only now
      wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, st_v.index()), tOrO);
      sched_pass(mma_wg);
      warpgroup_wait<1>();  // groups retire in issue order: S is ready, P V may still run
      warpgroup_fence_operand(tSrS);
      release(ss.pipeline_k, st_k);
      ++st_k;
      softmax_block(it, o_scale);
      warpgroup_wait<0>();
      // O and P are operands of the GEMM that just retired: keep every access to them below the wait.
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      release(ss.pipeline_v, st_v);
      ++st_v;
      convert_fragment(rP, tSrS);
    }
    // Every QK^T GEMM of this tile has retired: the producer may load the next tile's Q.
    cute::arrive_barrier(ss.barrier_q_empty);
    // Last P V.
    pipe_v.consumer_wait(st_v);
    sched_wait(mma_wg, false);
    rescale_o();
    wgmma_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, st_v.index()), tOrO);
    sched_pass(mma_wg);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    release(ss.pipeline_v, st_v);
    ++st_v;
  }
};

}  // namespace fa3jax

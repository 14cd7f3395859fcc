// Backward mainloop: the TMA producer and the consumer warpgroups' five GEMMs per query block (bwd_kernel_traits.h
// says which and why transposed).
//
// Consumer step for query block m (stage s of the Q/dO ring), warpgroups along keys (register P^T / dS^T):
//   issue S^T = K Q^T and dP^T = V dO^T; wait for S^T; P^T = exp2(S^T * scale_log2 - lse_log2) (mask where the
//   block needs it); wait for dP^T; dS^T = P^T (dP^T - delta), which ptxas interleaves with the exps; both
//   converted to bf16/fp16, dS^T put in shared memory, then dV += P^T dO issued; once every warpgroup's dS^T is
//   there (named barrier), issue this warpgroup's columns of dQ = dS K, then dK += dS^T Q; add the dQ partial into
//   global memory with a bulk reduce-add (cp.reduce.async.bulk, fp32 add in L2) while dK runs, so no CTA waits
//   for another; release stage s.
// Warpgroups along queries (kPInSmem, d = 256 and MLA 192x128): P^T and dS^T both go to shared memory before the
// barrier, then dV, dQ and dK are issued as SS GEMMs on this warpgroup's columns.
// With softcap the scores' tanh is also needed for dS, so that path waits for both S^T and dP^T first.
// 80-row tiles (kDqSwapAB) issue dQ^T = K^T dS^T instead of dQ = dS K, otherwise the same step; the staged slice
// then holds the transposed accumulator, which the postprocess reads as such (bwd_layout.h dq_tile_index).
// 128-row tiles (d = 64; kLateDv: S^T and dP^T take 128 registers) start S^T's accumulator at -lse_log2 /
// scale_log2 (-inf where masked) and dP^T's at -delta, so the exponent and dS^T read no stat; they form dS^T and only
// then convert P^T and issue dV, and their dQ = dS K has the warpgroups along queries (kDqRowsSplit).
#pragma once

#include <climits>

#include <cute/arch/copy_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "bwd_kernel_traits.h"
#include "bwd_layout.h"
#include "mask.h"
#include "seq_info.h"
#include "utils.h"

namespace fa3jax {

// One CTA's work: key block n_block of kv head head_k in batch `batch`, over the query heads of head_k's group;
// where its sequence lives (dense or packed rows) and where its padded stat rows start (bwd_layout.h).
struct BwdTile {
  int n_block, head_k, batch;
  SeqInfo seq;
  int64_t stat_base, stat_head_stride;  // stat row of (query head h, query block m): base + h * stride + tile_m m
  int tile_m;                           // the kernel's kBlockM (a constant where the tile is built)

  CUTE_DEVICE int64_t stat_row(int h, int m) const { return stat_base + h * stat_head_stride + int64_t(m) * tile_m; }
};

// dst (global fp32) += src (shared fp32), `bytes` a multiple of 16, as one asynchronous bulk operation of the
// issuing thread's bulk group (completed with cute::tma_store_wait, committed with cute::tma_store_arrive).
// kEvictLast: the L2 lines of dst are kept over others (every key block's CTA adds into them again).
template <bool kEvictLast = false>
CUTE_DEVICE void bulk_reduce_add_f32(float* dst, float const* src, int bytes) {
  if constexpr (kEvictLast) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.L2::cache_hint.add.f32 [%0], [%1], %2, %3;\n"
                 :
                 : "l"(dst), "r"(cute::cast_smem_ptr_to_uint(src)), "r"(bytes),
                   "l"(uint64_t(TMA::CacheHintSm90::EVICT_LAST))
                 : "memory");
  } else {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 :
                 : "l"(dst), "r"(cute::cast_smem_ptr_to_uint(src)), "r"(bytes)
                 : "memory");
  }
}

// dst[0..3] += (a, b, c, d) in fp32 at L2 (one vector reduction; dst 16-byte aligned).
CUTE_DEVICE void red_add_v4_f32(float* dst, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}

// Deterministic dQ (FA3's scheme, our code): the partials of one (query block, warpgroup slice) are added in a
// fixed key-block order. A CTA waits until the slice's semaphore counts the key blocks before it in that order,
// adds, and counts itself once its add has completed (dq_turn says the order, DqOrder which one applies):
// * descending: key block n's turn at query block m is QBlockMask(m).n_max - 1 - n (the CTAs that touch m are
//   exactly that key-block range). Under a causal mask the last key blocks reach a query block first (ascending
//   order made every CTA wait for key block 0); the kernel dispatches CTAs from the last key block down, so the
//   ones before it in line are resident or done (no deadlock).
// * rotated (bwd_layout.h dq_rotated_turn), where every key block of the sequence sees all of its query blocks:
//   key block n walks them from n mod M on, and the order is the walk's arrival order. In descending order every
//   such CTA reaches block 0 at its first step and waits for all later key blocks: a wavefront of N - 1 steps
//   (4 x 4k: 95 steps instead of 64). A CTA may wait here for a lower key block, dispatched after it, so the host
//   allows it (p.dq_rotate) only where a (kv head, batch)'s key blocks can all be resident at once. Then no
//   cycle: every wait is for an add of a strictly earlier (step, -n), and a wait never spans groups.
// Either order is fixed by the sequence's lengths and mask alone, so the sums are bitwise reproducible.
CUTE_DEVICE void dq_turn_wait(int const* sem, int turn) {
  int v;
  do {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(sem) : "memory");
  } while (v != turn);
  asm volatile("fence.proxy.async.global;\n" ::: "memory");  // the bulk add below is ordered after the acquire
}
// Counts this thread's turn once all but its kPending latest bulk adds have completed (not only read the source).
template <int kPending = 0>
CUTE_DEVICE void dq_turn_done(int* sem) {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(sem) : "memory");
}

// Query blocks of a sequence where every one of its key blocks sees all of them (min(that count, m_cap): varlen's
// max_seqlen_q), else 0: the rotated dQ order's condition. A key's visible queries are an interval whose ends both
// grow with the key, so key block 0's upper end and the last block's lower end bound every block's.
template <int kBlockM, int kBlockN>
CUTE_HOST_DEVICE int dq_full_query_blocks(int seqlen_q, int seqlen_k, int left, int right, int m_cap) {
  int const num_m = min((seqlen_q + kBlockM - 1) / kBlockM, m_cap);
  int const num_n = (seqlen_k + kBlockN - 1) / kBlockN;
  if (num_m <= 0 || num_n <= 0) return 0;
  KBlockMask<kBlockM, kBlockN> const first(0, seqlen_q, seqlen_k, left, right);
  KBlockMask<kBlockM, kBlockN> const last(num_n - 1, seqlen_q, seqlen_k, left, right);
  bool const full = first.m_min == 0 && last.m_min == 0 && min(first.m_max, m_cap) == num_m &&
                    min(last.m_max, m_cap) == num_m;
  return full ? num_m : 0;
}

// The CTA's walk and deterministic dQ order: its query blocks from `first` on, wrapping within [m_min, m_max)
// (next_coords); num_n > 0: the rotated order over the sequence's num_n key and num_m query blocks, else (and in
// default mode) first = m_min and the descending order.
struct DqOrder {
  int first;
  int num_n, num_m;
};

// kDet: the kernel serves deterministic mode (p.dq_sem set: the turn orders, the rotated walk); false: default mode
// only, with the plain walk from m_min and none of the orders' per-step bookkeeping (policy kDetKernel).
template <class KT, bool kDet>
struct BwdMainloop {
  using Element = typename KT::Element;
  using Params = typename KT::Params;
  using SharedStorage = typename KT::SharedStorage;
  using Pipeline = typename KT::Pipeline;
  using PipelineState = typename KT::PipelineState;
  using KM = KBlockMask<KT::kBlockM, KT::kBlockN>;
  using BlkM = typename KT::BlkM;
  using BlkN = typename KT::BlkN;
  using HDim = typename KT::HDim;
  using HDimV = typename KT::HDimV;
  static constexpr int kBlockM = KT::kBlockM;
  static constexpr int kHeadDim = KT::kHeadDim;
  static constexpr int kHeadDimV = KT::kHeadDimV;
  // Named barriers (0 is __syncthreads): dS of all warpgroups in shared memory; then one per warpgroup for its
  // dQ staging slice.
  static constexpr int kDsBarrier = 1;
  static constexpr int kDqBarrier = 2;
  static_assert(kDqBarrier + KT::kNumMmaWG <= 16, "out of named barriers");
  CUTE_DEVICE static bool deterministic(Params const& p) { return kDet && p.dq_sem != nullptr; }
  static_assert((kBlockM == kBwdBlockM || ((kBlockM == kBwdBlockMWide || kBlockM == kBwdBlockMTall) && !KT::kVarlen)) &&
                    KT::kNumMmaWG == kBwdNumMmaWG,
                "dq_accum layout (bwd_layout.h)");

  // Producer, called by the whole warp 0 (lane 0 issues): K and V once, then Q, dO, lse_log2 and delta of every
  // (query head of the group, query block) in the consumers' order, into the pipeline's stages.
  CUTE_DEVICE static void load(Params const& p, SharedStorage& ss, Pipeline& pipe, PipelineState& st,
                               BwdTile const& tile, KM const& km, DqOrder const& ord) {
    bool const lane0 = threadIdx.x % 32 == 0;
    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename KT::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename KT::SmemLayoutV{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename KT::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do.data()), typename KT::SmemLayoutdO{});

    // kL2Hint: Q and dO are read again by every key block's CTA of this head, K and V once.
    constexpr auto hint = KT::kL2Hint ? TMA::CacheHintSm90::EVICT_LAST : TMA::CacheHintSm90::EVICT_NORMAL;
    if constexpr (KT::kVarlen) {
      // Packed rows through rows views (rows_view.h; launch.h encode_rows_view): the sequence's len rows end at row
      // end = offset + len and its row i is view row kViewRows - len + i, so rows past its end are zero-filled.
      // One box per swizzle row's columns of each tile (kBoxCols*).
      int const end_k = int(tile.seq.offset_k) + tile.seq.seqlen_k;
      int const end_q = int(tile.seq.offset_q) + tile.seq.seqlen_q;
      int const row_k = kViewRows - tile.seq.seqlen_k + tile.n_block * KT::kBlockN;
      int const row_q = kViewRows - tile.seq.seqlen_q;
      if (lane0) {
        cute::set_barrier_transaction_bytes(ss.barrier_kv, KT::kBytesKV);
        copy_rows_tile<kHeadDim, KT::kBoxColsK>(
            p.tma_k, &ss.barrier_kv, [&](int c) { return &sK(0, c); }, row_k, tile.head_k, end_k);
        copy_rows_tile<kHeadDimV, KT::kBoxColsV>(
            p.tma_v, &ss.barrier_kv, [&](int c) { return &sV(0, c); }, row_k, tile.head_k, end_k);
      }
      load_steps(p, ss, pipe, st, tile, km, ord, [&](int h) {
        return [&, h](int m, uint64_t* bar, int s) {
          copy_rows_tile<kHeadDim, KT::kBoxColsQ>(
              p.tma_q, bar, [&](int c) { return &sQ(0, c, s); }, row_q + m * kBlockM, h, end_q, uint64_t(hint));
          copy_rows_tile<kHeadDimV, KT::kBoxColsdO>(
              p.tma_do, bar, [&](int c) { return &sdO(0, c, s); }, row_q + m * kBlockM, h, end_q, uint64_t(hint));
        };
      });
    } else {
      // (row, d, head, batch).
      Tensor mK = p.tma_k.get_tma_tensor(make_shape(p.seqlen_k, int(kHeadDim), p.num_heads_k, p.batch));
      Tensor mV = p.tma_v.get_tma_tensor(make_shape(p.seqlen_k, int(kHeadDimV), p.num_heads_k, p.batch));
      Tensor gK = local_tile(mK(_, _, tile.head_k, tile.batch), Shape<BlkN, HDim>{}, make_coord(tile.n_block, _0{}));
      Tensor gV = local_tile(mV(_, _, tile.head_k, tile.batch), Shape<BlkN, HDimV>{}, make_coord(tile.n_block, _0{}));
      auto [tKgK, tKsK] = tma_partition(p.tma_k, _0{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVgV, tVsV] = tma_partition(p.tma_v, _0{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      if (lane0) {
        cute::set_barrier_transaction_bytes(ss.barrier_kv, KT::kBytesKV);
        copy(p.tma_k.with(ss.barrier_kv), tKgK, tKsK);
        copy(p.tma_v.with(ss.barrier_kv), tVgV, tVsV);
      }
      Tensor mQ = p.tma_q.get_tma_tensor(make_shape(p.seqlen_q, int(kHeadDim), p.num_heads_q, p.batch));
      Tensor mdO = p.tma_do.get_tma_tensor(make_shape(p.seqlen_q, int(kHeadDimV), p.num_heads_q, p.batch));
      load_steps(p, ss, pipe, st, tile, km, ord, [&](int h) {
        Tensor gQ = local_tile(mQ(_, _, h, tile.batch), Shape<BlkM, HDim>{}, make_coord(_, _0{}));  // (M, D, m)
        Tensor gdO = local_tile(mdO(_, _, h, tile.batch), Shape<BlkM, HDimV>{}, make_coord(_, _0{}));
        auto [tQgQ, tQsQ] = tma_partition(p.tma_q, _0{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
        auto [tdOgdO, tdOsdO] =
            tma_partition(p.tma_do, _0{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
        return [&p, hint, tQgQ = tQgQ, tQsQ = tQsQ, tdOgdO = tdOgdO, tdOsdO = tdOsdO](int m, uint64_t* bar, int s) {
          copy(p.tma_q.with(*bar, 0, hint), tQgQ(_, m), tQsQ(_, s));
          copy(p.tma_do.with(*bar, 0, hint), tdOgdO(_, m), tdOsdO(_, s));
        };
      });
    }
  }

  // The producer's steps after K and V (load): each (query head of the group, query block) in the consumers' order
  // into a stage: Q and dO by head_loads(h)(m, barrier, stage) (lane 0), then the block's lse_log2 and delta rows.
  template <class HeadLoads>
  CUTE_DEVICE static void load_steps(Params const& p, SharedStorage& ss, Pipeline& pipe, PipelineState& st,
                                     BwdTile const& tile, KM const& km, DqOrder const& ord,
                                     HeadLoads const& head_loads) {
    bool const lane0 = threadIdx.x % 32 == 0;
    for (int g = 0; g < p.group_size; ++g) {
      int const h = tile.head_k * p.group_size + g;
      auto const load_qdo = head_loads(h);
      for (int i = km.m_min; i < km.m_max; ++i) {
        int const m = walk_block(km, ord, i);
        pipe.producer_acquire(st);
        if (lane0) {
          uint64_t* bar = pipe.producer_get_barrier(st);
          int const s = st.index();
          load_qdo(m, bar, s);
          int64_t const r = tile.stat_row(h, m);
          SM90_BULK_COPY_G2S::copy(p.lse_log2 + r, bar, ss.smem_lse[s], KT::kBytesRow);
          SM90_BULK_COPY_G2S::copy(p.delta + r, bar, ss.smem_delta[s], KT::kBytesRow);
        }
        ++st;
      }
    }
  }

  // The CTA's DqOrder: rotated where the host allows it and the sequence's key blocks all see all its query blocks
  // (km: this CTA's range, varlen's cap applied), which every CTA of the sequence finds alike.
  CUTE_DEVICE static DqOrder dq_order(Params const& p, BwdTile const& tile, KM const& km) {
    if (deterministic(p) && p.dq_rotate != 0) {
      int const cap = KT::kVarlen ? (p.max_seqlen_q + kBlockM - 1) / kBlockM : INT_MAX;
      int const num_m = dq_full_query_blocks<kBlockM, KT::kBlockN>(tile.seq.seqlen_q, tile.seq.seqlen_k,
                                                                   p.window_left, p.window_right, cap);
      if (num_m > 0)
        return {dq_rotated_first(tile.n_block, num_m), (tile.seq.seqlen_k + KT::kBlockN - 1) / KT::kBlockN, num_m};
    }
    return {km.m_min, 0, 0};
  }

  // Place of key block n in query block m's deterministic dQ order (dq_turn_wait).
  CUTE_DEVICE static int dq_turn(Params const& p, BwdTile const& tile, DqOrder const& ord, int m) {
    if (ord.num_n > 0) return dq_rotated_turn(tile.n_block, m, ord.num_n, ord.num_m);
    return QBlockMask<kBlockM, KT::kBlockN>(m, tile.seq.seqlen_q, tile.seq.seqlen_k, p.window_left,
                                            p.window_right).n_max - 1 - tile.n_block;
  }

  // The dQ writer (kWriterWarp; warp 1 of the producer warpgroup, lane 0 issues; FA3's split, our code). Step by
  // step, as each consumer warpgroup's partial lands in its staging slice (buffer step % kDqBufs), one bulk
  // reduce-add of the slice into dq_accum (deterministic mode: in its key-block turn, dq_turn_wait); a buffer is
  // handed back once the add that read it has finished reading, kDqBufs - 1 steps later (0: right after its add).
  // The consumers thus never wait for an add's read nor sync among themselves for it.
  CUTE_DEVICE static void write_dq(Params const& p, SharedStorage& ss, BwdTile const& tile, KM const& km,
                                   DqOrder const& ord) {
    constexpr int kWG = KT::kNumMmaWG, kBufs = KT::kDqBufs;
    constexpr int kSlice = KT::kDqSlice;  // floats per warpgroup slice
    bool const lane0 = threadIdx.x % 32 == 0;
    int const n_steps = p.group_size * km.num_blocks();
    int h = tile.head_k * p.group_size, m = ord.first;  // step's (query head, query block): next_coords
    for (int step = 0; step < n_steps; ++step, next_coords(km, ord, h, m)) {
      int64_t const stat = tile.stat_row(h, m);
      float* const dq_tile = p.dq_accum + stat * kHeadDim;
      int* const sem = deterministic(p) ? p.dq_sem + stat / kBlockM * kWG : nullptr;
      int const b = kBufs > 1 ? step % kBufs : 0;
      float const* const sdq = ss.smem_dq.data() + b * kBlockM * kHeadDim;
      CUTE_UNROLL
      for (int w = 0; w < kWG; ++w) {
        wait_barrier_suspend(ss.barrier_dq_full[w][b], (step / kBufs) & 1);
        if (lane0) {
          if (sem != nullptr) dq_turn_wait(sem + w, dq_turn(p, tile, ord, m));
          bulk_reduce_add_f32<KT::kL2Hint>(dq_tile + w * kSlice, sdq + w * kSlice, kSlice * int(sizeof(float)));
          tma_store_arrive();
        }
      }
      // Deterministic mode: each slice's turn is counted as soon as its add has completed, not at the next step's
      // add, so the key block after it in line waits for one add's latency instead of a whole step.
      if (lane0 && sem != nullptr)
        for_each(make_int_sequence<kWG>{}, [&](auto w) { dq_turn_done<kWG - 1 - decltype(w)::value>(sem + w); });
      // Hand back the buffers of step step - (kBufs - 1): its adds are followed by (kBufs - 1) x kWG newer ones,
      // and warpgroup w's by kWG - 1 - w of its own step.
      int const done = step - (kBufs - 1);
      if (lane0 && done >= 0) {
        int const bd = kBufs > 1 ? done % kBufs : 0;
        for_each(make_int_sequence<kWG>{}, [&](auto w) {
          tma_store_wait<(kBufs - 1) * kWG + kWG - 1 - decltype(w)::value>();
          cute::arrive_barrier(ss.barrier_dq_empty[decltype(w)::value][bd]);
        });
      }
      __syncwarp();
    }
    if (lane0) tma_store_wait<0>();  // every add has read its slice before the CTA's shared memory goes away
  }

  // Frees stage st for the producer (a local mbarrier arrive per consumer thread, as in FwdMainloop::release).
  CUTE_DEVICE static void release(typename Pipeline::SharedStorage& storage, PipelineState st) {
    storage.empty_barrier_[st.index()].arrive();
  }

  // (query head, query block) of the step after (h, m): the group's heads in order, each over the query blocks
  // [m_min, m_max) that see the key block from ord.first on, wrapping; producer, dQ writer and consumers walk the
  // same sequence. Carried from step to step: deriving it from the step index took an integer division ahead of
  // every step's first GEMM.
  CUTE_DEVICE static void next_coords(KM const& km, DqOrder const& ord, int& h, int& m) {
    if constexpr (kDet) {
      if (++m == km.m_max) m = km.m_min;
      if (m == ord.first) ++h;
    } else {
      if (++m == km.m_max) m = km.m_min, ++h;  // ord.first == m_min
    }
  }
  // The i-th query block (m_min <= i < m_max) of a head's walk (next_coords), for the producer's loop.
  CUTE_DEVICE static int walk_block(KM const& km, DqOrder const& ord, int i) {
    if constexpr (kDet) {
      int const m = i + (ord.first - km.m_min);
      return m < km.m_max ? m : m - km.num_blocks();
    } else {
      return i;
    }
  }

  // Consumer loop over the steps (next_coords). Accumulates dK (without the softmax scale) and dV in tdKrdK /
  // tdVrdV; adds each dQ partial into p.dq_accum. kSoftcap: p.softcap > 0 (a template parameter so the plain
  // loop carries no test of it). Issuing the next step's S^T and dP^T GEMMs before this step's dQ was staged
  // made ptxas spill 388 B at 240 registers (their accumulators live next to dQ's and dK/dV's).
  template <bool kSoftcap, class TdK, class TdV>
  CUTE_DEVICE static void mma(Params const& p, SharedStorage& ss, Pipeline& pipe, PipelineState& st,
                              BwdTile const& tile, KM const& km, DqOrder const& ord, int mma_tid, int mma_wg,
                              TdK& tdKrdK, TdV& tdVrdV) {
    typename KT::TiledMmaSdP mma_sdp;
    typename KT::TiledMmadK mma_dk;
    typename KT::TiledMmadV mma_dv;
    typename KT::TiledMmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(mma_tid);

    Tensor sK = make_tensor(make_smem_ptr(ss.smem_k.data()), typename KT::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.smem_v.data()), typename KT::SmemLayoutV{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.smem_k.data()), typename KT::SmemLayoutKt{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.smem_q.data()), typename KT::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.smem_q.data()), typename KT::SmemLayoutQt{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.smem_do.data()), typename KT::SmemLayoutdO{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.smem_do.data()), typename KT::SmemLayoutdOt{});
    Tensor sdS = make_tensor(make_smem_ptr(ss.smem_ds.data()), typename KT::SmemLayoutdS{});
    Tensor sdSt = make_tensor(make_smem_ptr(ss.smem_ds.data()), typename KT::SmemLayoutdSt{});
    Element* const p_smem = [&] {
      if constexpr (KT::kPInSmem) return ss.smem_p.data();
      else return ss.smem_ds.data();  // unused stand-in
    }();
    Tensor sPt = make_tensor(make_smem_ptr(p_smem), typename KT::SmemLayoutdSt{});

    // GMMA descriptors (MMA, MMA_M|N, MMA_K[, stage or buffer]).
    // Shared-memory operand descriptors are one per warpgroup, so they are partitioned from the warpgroup's first
    // thread (mma_wg is warp-uniform): ptxas then keeps them in uniform registers instead of building each in
    // vector registers and moving it over with R2UR before every wgmma (as the forward does, mainloop.h).
    auto wg_sdp = mma_sdp.get_thread_slice(mma_wg * 128);
    auto wg_dk = mma_dk.get_thread_slice(mma_wg * 128);
    auto wg_dv = mma_dv.get_thread_slice(mma_wg * 128);
    auto wg_dq = mma_dq.get_thread_slice(mma_wg * 128);
    Tensor tSrK = wg_sdp.partition_fragment_A(sK);
    Tensor tSrQ = wg_sdp.partition_fragment_B(sQ);
    Tensor tdPrV = wg_sdp.partition_fragment_A(sV);
    Tensor tdPrdO = wg_sdp.partition_fragment_B(sdO);
    Tensor tdVrdO = wg_dv.partition_fragment_B(sdOt);
    Tensor tdKrQ = wg_dk.partition_fragment_B(sQt);
    // dQ = dS K (A = dS, B = K^T's view), or with kDqSwapAB dQ^T = K^T dS^T (A = K^T, B = dS).
    auto tdQrdS = [&] {
      if constexpr (KT::kDqSwapAB) return wg_dq.partition_fragment_B(sdS);
      else return wg_dq.partition_fragment_A(sdS);
    }();
    auto tdQrK = [&] {
      if constexpr (KT::kDqSwapAB) return wg_dq.partition_fragment_A(sKt);
      else return wg_dq.partition_fragment_B(sKt);
    }();
    auto issue_dq = [&](auto const& ds_buf, auto& acc) {
      if constexpr (KT::kDqSwapAB) wgmma_issue<true, false>(mma_dq, tdQrK, ds_buf, acc);
      else wgmma_issue<true, false>(mma_dq, ds_buf, tdQrK, acc);
    };

    // Accumulators and their register-A views.
    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<BlkN, BlkM>{});
    Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<BlkN, BlkM>{});
    Tensor tdQrdQ = partition_fragment_C(mma_dq, typename KT::DqTile{});
    Tensor rP = make_fragment_like<Element>(tSrS);
    Tensor rdS = make_fragment_like<Element>(tdPrdP);
    // dV / dK A operands: registers (the accumulators converted in place) or P^T / dS^T in shared memory.
    auto dkv_a = [&](auto const& thr, auto& r, auto& smem) {
      if constexpr (KT::kPInSmem) return thr.partition_fragment_A(smem);
      else return make_tensor(r.data(), acc_to_a_regs(r.layout()));
    };
    auto tdVrP = dkv_a(wg_dv, rP, sPt);
    auto tdKrdS = dkv_a(wg_dk, rdS, sdSt);
    Tensor S = make_tensor(tSrS.data(), acc_rowcol(tSrS.layout()));
    Tensor dP = make_tensor(tdPrdP.data(), acc_rowcol(tdPrdP.layout()));
    // (key, query) tile coordinates of each S^T element.
    Tensor cS = make_identity_tensor(Shape<BlkN, BlkM>{});
    Tensor tScS = thr_sdp.partition_C(cS);
    Tensor rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));

    // dS^T registers -> shared memory with stmatrix (keys as rows, queries contiguous: sdSt).
    auto ds_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_sdp);
    auto thr_ds_copy = ds_copy.get_thread_slice(mma_tid);
    Tensor tdSrdS = thr_ds_copy.retile_S(rdS);
    Tensor tdSsdS = thr_ds_copy.partition_D(sdSt);  // (CPY, CPY_M, CPY_N, buffer)
    Tensor tdSrP = thr_ds_copy.retile_S(rP);
    Tensor tPsP = thr_ds_copy.partition_D(sPt);

    float* const sdq0 = ss.smem_dq.data() + mma_wg * KT::kDqSlice;
    int const wg_tid = mma_tid % 128;
    bool const dq_issuer = wg_tid == 0;
    constexpr int kDqBytes = KT::kDqSlice * int(sizeof(float));
    int const n0 = tile.n_block * KT::kBlockN;
    int const n_steps = p.group_size * km.num_blocks();
    int* sem_pending = nullptr;  // deterministic mode, issuing thread: the slice whose add is still in flight
    // Staged bulk adds, deterministic mode: the previous step's turn is counted mid-step, once this step's dK GEMM
    // is issued (that add, a step's GEMMs old, has completed by then), not at this step's add: in the rotated
    // order the next key block in line arrives one step later, and counting at the add made each link late by
    // the release's latency, a lag that grew down the line.
    auto count_previous = [&] {
      if constexpr (kDet && !KT::kDqRed && !KT::kWriterWarp) {
        if (dq_issuer && sem_pending != nullptr) {
          dq_turn_done(sem_pending);
          sem_pending = nullptr;
        }
      }
    };

    auto issue_sdp = [&](int s) {
      wgmma_issue<true, false>(mma_sdp, tSrK, tSrQ(_, _, _, s), tSrS);
      wgmma_issue<true, false>(mma_sdp, tdPrV, tdPrdO(_, _, _, s), tdPrdP);
    };
    // kLateDv: masked scores' start with softcap (see below).
    constexpr float kMaskedScore = -3.0e38f;

    // Query blocks without the element mask, tested per step with one unsigned compare (as the forward does):
    // needs_mask(m) per step took ~15 uniform-datapath instructions of the step loop.
    int unmasked_lo, unmasked_hi;
    km.unmasked_range(unmasked_lo, unmasked_hi);
    cute::wait_barrier(ss.barrier_kv, 0);
    int h = tile.head_k * p.group_size, m = ord.first;  // step's (query head, query block): next_coords
    for (int step = 0; step < n_steps; ++step, next_coords(km, ord, h, m)) {
      if constexpr (KT::kLateDv) {
        // The GEMMs' fences (and WGMMA's accumulator operands) read S^T, dP^T and dQ before each step's GEMMs
        // overwrite them, so these registers stay live from one step into the next. kLateDv ends their values here
        // (forget_values), which the 128- and 80-row tiles need to fit (without: C7512 and spills).
        forget_values(tSrS);
        forget_values(tdPrdP);
        forget_values(tdQrdQ);
      }
      int const buf = step & 1;
      pipe.consumer_wait(st);
      int const s = st.index();
      float const* lse = ss.smem_lse[s];
      float const* delta = ss.smem_delta[s];
      // A stat row's values of columns c, c + 1 (c even: adjacent queries) in one 8-byte shared load (ld.shared: a
      // plain pointer load went through the generic path, with 64-bit addresses); test_layouts checks the pairing.
      auto stat_pair = [&](float const* row, int c) {
        float2 v;
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n"
                     : "=f"(v.x), "=f"(v.y)
                     : "r"(cute::cast_smem_ptr_to_uint(row) + uint32_t(get<1>(rc(0, c))) * 4u));
        return v;
      };
      constexpr int kRows = decltype(size<0>(S))::value;  // key rows per thread
      constexpr int kPairs = decltype(size<1>(S))::value / 2;  // query column pairs per thread
      // 64-row tiles: lse_log2's pairs are read while S^T runs (here, after its issue), delta's during the exp.
      float2 lse2[kPairs], delta2[kPairs];
      if constexpr (!KT::kLateDv) {
        issue_sdp(s);
        if constexpr (!kSoftcap) {
          CUTE_UNROLL
          for (int i = 0; i < kPairs; ++i) lse2[i] = stat_pair(lse, 2 * i);
        }
      }
      bool const need_mask = uint32_t(m - unmasked_lo) >= uint32_t(unmasked_hi - unmasked_lo);  // needs_mask(m)
      int const q0 = m * kBlockM;
      // Masked blocks: key row r sees the tile's queries q0 + [lo, hi) (mask_key_queries), two compares per element.
      auto row_range = [&](int r, int& lo, int& hi) {
        mask_key_queries(n0 + int(get<0>(rc(r, 0))), q0, kBlockM, tile.seq.seqlen_q, tile.seq.seqlen_k,
                         p.window_left, p.window_right, lo, hi);
      };
      auto outside = [&](int c, int lo, int hi) {
        int const ql = int(get<1>(rc(0, c)));
        return ql < lo || ql >= hi;
      };
      if constexpr (KT::kLateDv) {
        // The GEMMs start from the stats and the mask instead of reading them next to S^T, dP^T and dK/dV (ptxas
        // batched the loads and the mask's predicates there, and the step spilled). dP^T's accumulator starts at
        // -delta, so the GEMM leaves dP^T - delta. Without softcap, S^T's starts at -lse_log2 / scale_log2, or
        // -inf where the mask hides the element (each key row's allowed queries, mask_key_queries), so
        // S^T * scale_log2 is the exponent, masked included (the fp32 sum rounds at |lse| / scale instead of |S|:
        // far below bf16's P). With softcap (tanh of the raw score first) it starts at 0, or at kMaskedScore where
        // masked, which the score loop tests (a finite sentinel: no reliance on inf compares under fast math).
        // The stats are read where used rather than held (each thread sees 32 queries at 128 rows).
        static_assert(!KT::kVarlen);
        float const inv_scale = 1.f / p.scale_log2;
        // Two copies: blocks that need no mask (most of an unmasked call's) skip the key rows' query ranges (64-bit
        // arithmetic that ptxas computed unconditionally under a runtime test) and the per-element test.
        auto start_scores = [&](auto masked) {
          int lo[kRows], hi[kRows];
          if constexpr (decltype(masked)::value) {
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r)
              mask_key_queries(n0 + int(get<0>(rc(r, 0))), q0, kBlockM, p.seqlen_q, p.seqlen_k,  // dense: the call's
                               p.window_left, p.window_right, lo[r], hi[r]);
          }
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); c += 2) {
            float2 const l = kSoftcap ? float2{0.f, 0.f} : stat_pair(lse, c);
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) {
              CUTE_UNROLL
              for (int j = 0; j < 2; ++j) {
                float const start = -(j ? l.y : l.x) * inv_scale;
                if constexpr (decltype(masked)::value) {
                  int const ql = get<1>(rc(r, c + j));
                  S(r, c + j) = ql >= lo[r] && ql < hi[r] ? start : (kSoftcap ? kMaskedScore : -INFINITY);
                } else {
                  S(r, c + j) = start;
                }
              }
            }
          }
        };
        if (need_mask) start_scores(cute::true_type{});
        else start_scores(cute::false_type{});
        wgmma_issue<false, false>(mma_sdp, tSrK, tSrQ(_, _, _, s), tSrS);
        CUTE_UNROLL
        for (int c = 0; c < size<1>(dP); c += 2) {
          float2 const dl = stat_pair(delta, c);
          CUTE_UNROLL
          for (int r = 0; r < size<0>(dP); ++r) dP(r, c) = -dl.x, dP(r, c + 1) = -dl.y;
        }
        wgmma_issue<false, false>(mma_sdp, tdPrV, tdPrdO(_, _, _, s), tdPrdP);
      }
      if constexpr (!kSoftcap) {
        warpgroup_wait<1>();  // S^T is ready; dP^T may still run
        warpgroup_fence_operand(tSrS);
        // masked: a runtime bool (the element test under a per-block predicate), or with kMaskSplit a compile-time
        // one: two copies of the loop, the unmasked one free of mask arithmetic. kLateDv: S^T holds
        // S^T - lse_log2 / scale_log2, or -inf, already.
        auto exp_scores = [&](auto masked) {
          if constexpr (KT::kLateDv) {
            CUTE_UNROLL
            for (int i = 0; i < size(tSrS); ++i) tSrS(i) = exp2f(tSrS(i) * p.scale_log2);
          } else {
            int lo[kRows] = {}, hi[kRows] = {};
            if (masked) {
              CUTE_UNROLL
              for (int r = 0; r < kRows; ++r) row_range(r, lo[r], hi[r]);
            }
            CUTE_UNROLL
            for (int i = 0; i < kPairs; ++i) {
              delta2[i] = stat_pair(delta, 2 * i);
              CUTE_UNROLL
              for (int r = 0; r < kRows; ++r) {
                CUTE_UNROLL
                for (int j = 0; j < 2; ++j) {
                  int const c = 2 * i + j;
                  float x = fmaf(S(r, c), p.scale_log2, -(j ? lse2[i].y : lse2[i].x));
                  if (masked && outside(c, lo[r], hi[r])) x = -INFINITY;
                  S(r, c) = exp2f(x);
                }
              }
            }
          }
        };
        // 64-row tiles: then dP^T, and dS^T in the same basic block as the exps (each mask copy its own), so that
        // ptxas can interleave the two; dV is issued after dS^T (below), as a GEMM issue would split them.
        auto exp_ds = [&](auto masked) {
          exp_scores(masked);
          warpgroup_wait<0>();  // dP^T is ready
          warpgroup_fence_operand(tdPrdP);
          CUTE_UNROLL
          for (int i = 0; i < kPairs; ++i) {
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) {
              dP(r, 2 * i) = S(r, 2 * i) * (dP(r, 2 * i) - delta2[i].x);
              dP(r, 2 * i + 1) = S(r, 2 * i + 1) * (dP(r, 2 * i + 1) - delta2[i].y);
            }
          }
        };
        if constexpr (KT::kLateDv) {
          exp_scores(cute::false_type{});
          warpgroup_wait<0>();  // dP^T is ready
          warpgroup_fence_operand(tdPrdP);
          CUTE_UNROLL
          for (int i = 0; i < size(tdPrdP); ++i) tdPrdP(i) *= tSrS(i);  // dP^T holds dP^T - delta already
          convert_fragment(rP, tSrS);
          wgmma_issue<false, true>(mma_dv, tdVrP, tdVrdO(_, _, _, s), tdVrdV);
        } else if constexpr (KT::kMaskSplit) {
          if (need_mask) exp_ds(cute::true_type{});
          else exp_ds(cute::false_type{});
        } else {
          exp_ds(need_mask);
        }
      } else {
        warpgroup_wait<0>();
        warpgroup_fence_operand(tSrS);
        warpgroup_fence_operand(tdPrdP);
        constexpr float kLog2e = 1.4426950408889634f;
        if constexpr (KT::kLateDv) {  // dP^T holds dP^T - delta already; S^T the mask (kMaskedScore)
          CUTE_UNROLL
          for (int c = 0; c < size<1>(S); c += 2) {
            float2 const l = stat_pair(lse, c);
            CUTE_UNROLL
            for (int r = 0; r < size<0>(S); ++r) {
              CUTE_UNROLL
              for (int j = 0; j < 2; ++j) {
                float const t = tanh_approx(S(r, c + j) * p.softcap_pre);
                float x = fmaf(p.softcap * t, kLog2e, -(j ? l.y : l.x));
                if (!(S(r, c + j) > 0.5f * kMaskedScore)) x = -INFINITY;
                float const pr = exp2f(x);
                S(r, c + j) = pr;
                dP(r, c + j) = pr * dP(r, c + j) * (1.f - t * t);  // as below
              }
            }
          }
        } else {
          int lo[kRows] = {}, hi[kRows] = {};
          if (need_mask) {
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) row_range(r, lo[r], hi[r]);
          }
          CUTE_UNROLL
          for (int i = 0; i < kPairs; ++i) {
            float2 const l = stat_pair(lse, 2 * i), dl = stat_pair(delta, 2 * i);
            CUTE_UNROLL
            for (int r = 0; r < kRows; ++r) {
              CUTE_UNROLL
              for (int j = 0; j < 2; ++j) {
                int const c = 2 * i + j;
                float const t = tanh_approx(S(r, c) * p.softcap_pre);
                float x = fmaf(p.softcap * t, kLog2e, -(j ? l.y : l.x));
                if (need_mask && outside(c, lo[r], hi[r])) x = -INFINITY;
                float const pr = exp2f(x);
                S(r, c) = pr;
                // d(softcap * tanh(s * pre)) / ds = scale * (1 - t^2); the scale is applied to dQ and dK at the end.
                dP(r, c) = pr * (dP(r, c) - (j ? dl.y : dl.x)) * (1.f - t * t);
              }
            }
          }
        }
        if constexpr (KT::kLateDv) {
          convert_fragment(rP, tSrS);
          wgmma_issue<false, true>(mma_dv, tdVrP, tdVrdO(_, _, _, s), tdVrdV);
        }
      }
      if constexpr (!KT::kLateDv) convert_fragment(rP, tSrS);
      convert_fragment(rdS, tdPrdP);
      // Every warpgroup's dS^T (and P^T) rows in shared memory (fenced for the async proxy that WGMMA reads
      // through) before any warpgroup's GEMM on them. Two buffers: a warpgroup writes buffer b again only two
      // steps later, after passing this barrier once more, i.e. after every warpgroup's GEMMs on b have retired.
      // Register P^T's dV goes out between the stores and the barrier (it reads no shared dS^T).
      copy(ds_copy, tdSrdS, tdSsdS(_, _, _, buf));
      if constexpr (KT::kPInSmem) copy(ds_copy, tdSrP, tPsP(_, _, _, buf));
      else if constexpr (!KT::kLateDv) wgmma_issue<false, true>(mma_dv, tdVrP, tdVrdO(_, _, _, s), tdVrdV);
      cutlass::arch::fence_view_async_shared();
      named_barrier_sync(kDsBarrier, KT::kNumMmaThreads);
      // dQ before dK (FA3's order): dQ retires while dK still runs, so the dQ partial is staged and added under
      // the dK GEMM instead of after every GEMM of the step.
      auto tdQrdS_buf = tdQrdS(_, _, _, buf);
      if constexpr (KT::kPInSmem) {
        auto tdVsP = tdVrP(_, _, _, buf);
        auto tdKsdS = tdKrdS(_, _, _, buf);
        wgmma_issue<false, false>(mma_dv, tdVsP, tdVrdO(_, _, _, s), tdVrdV);
        issue_dq(tdQrdS_buf, tdQrdQ);
        wgmma_issue<false, false>(mma_dk, tdKsdS, tdKrQ(_, _, _, s), tdKrdK);
        count_previous();
        warpgroup_wait<1>();  // dV and dQ have retired; dK may still run
        warpgroup_fence_operand(tdVrdV);
      } else {
        issue_dq(tdQrdS_buf, tdQrdQ);
        warpgroup_wait<1>();  // dV has retired (P's registers are free); dQ may still run
        warpgroup_fence_operand(tdVrdV);
        wgmma_issue<false, true>(mma_dk, tdKrdS, tdKrQ(_, _, _, s), tdKrdK);
        count_previous();
        warpgroup_wait<1>();  // dQ has retired; dK may still run
      }
      warpgroup_fence_operand(tdQrdQ);
      // dQ partial into dq_accum (bwd_layout.h order). kDqRed: fp32 vector reductions (red.global.add.v4.f32)
      // straight from the registers. Else through this warpgroup's staging slice and one bulk reduce-add of it; the
      // slice (one of kDqBufs, in turn) is rewritten only after the add that last read it has (issued kDqBufs
      // steps earlier, so the wait rarely waits).
      int64_t const stat = tile.stat_row(h, m);
      float* const dq_slice = p.dq_accum + stat * kHeadDim + mma_wg * KT::kDqSlice;
      static_assert(decltype(size(tdQrdQ))::value % 4 == 0);
      if constexpr (KT::kDqRed) {
        // Deterministic: every thread's reductions of this slice, in key-block turn, fenced before the issuer
        // counts the turn (no overlap with the next step, unlike the bulk path).
        int* const sem = deterministic(p) ? p.dq_sem + stat / kBlockM * KT::kNumMmaWG + mma_wg : nullptr;
        if (sem != nullptr) {
          if (dq_issuer) dq_turn_wait(sem, dq_turn(p, tile, ord, m));
          named_barrier_sync(kDqBarrier + mma_wg, 128);
        }
        CUTE_UNROLL
        for (int v = 0; v < size(tdQrdQ); v += 4)
          red_add_v4_f32(dq_slice + (v / 4) * 512 + 4 * wg_tid, tdQrdQ(v), tdQrdQ(v + 1), tdQrdQ(v + 2), tdQrdQ(v + 3));
        if (sem != nullptr) {
          __threadfence();
          named_barrier_sync(kDqBarrier + mma_wg, 128);
          if (dq_issuer) asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(sem) : "memory");
        }
      } else if constexpr (KT::kWriterWarp) {
        // Staged for the writer warp (write_dq) in buffer step % kDqBufs, once the add that read that buffer
        // kDqBufs steps ago has handed it back.
        int const b = KT::kDqBufs > 1 ? step % KT::kDqBufs : 0;
        if (step >= KT::kDqBufs) cute::wait_barrier(ss.barrier_dq_empty[mma_wg][b], (step / KT::kDqBufs - 1) & 1);
        float* const sdq = sdq0 + b * kBlockM * kHeadDim;
        CUTE_UNROLL
        for (int v = 0; v < size(tdQrdQ); v += 4)
          *reinterpret_cast<float4*>(sdq + (v / 4) * 512 + 4 * wg_tid) =
              make_float4(tdQrdQ(v), tdQrdQ(v + 1), tdQrdQ(v + 2), tdQrdQ(v + 3));
        cutlass::arch::fence_view_async_shared();
        cute::arrive_barrier(ss.barrier_dq_full[mma_wg][b]);
      } else {
        if (dq_issuer) {
          if (deterministic(p)) {
            if (sem_pending != nullptr) dq_turn_done(sem_pending);
            sem_pending = p.dq_sem + stat / kBlockM * KT::kNumMmaWG + mma_wg;
            dq_turn_wait(sem_pending, dq_turn(p, tile, ord, m));
          } else {
            tma_store_wait<(KT::kDqBufs > 1 ? KT::kDqBufs - 1 : 0)>();  // the add that last read this buffer
          }
        }
        named_barrier_sync(kDqBarrier + mma_wg, 128);
        float* const sdq = sdq0 + (KT::kDqBufs > 1 ? step % KT::kDqBufs : 0) * kBlockM * kHeadDim;
        CUTE_UNROLL
        for (int v = 0; v < size(tdQrdQ); v += 4)
          *reinterpret_cast<float4*>(sdq + (v / 4) * 512 + 4 * wg_tid) =
              make_float4(tdQrdQ(v), tdQrdQ(v + 1), tdQrdQ(v + 2), tdQrdQ(v + 3));
        cutlass::arch::fence_view_async_shared();
        named_barrier_sync(kDqBarrier + mma_wg, 128);
        if (dq_issuer) {
          bulk_reduce_add_f32<KT::kL2Hint>(dq_slice, sdq, kDqBytes);
          tma_store_arrive();
        }
      }
      warpgroup_wait<0>();  // dK has retired (dS's registers are free)
      warpgroup_fence_operand(tdKrdK);
      release(ss.pipeline_q, st);
      ++st;
    }
    if (dq_issuer && sem_pending != nullptr) dq_turn_done(sem_pending);
  }


  // Before the CTA exits: the last bulk reduce-add must have read its shared-memory source.
  CUTE_DEVICE static void finish(int mma_tid) {
    if (mma_tid % 128 == 0) tma_store_wait<0>();
  }
};

}  // namespace fa3jax

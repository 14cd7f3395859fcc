// The backward main kernel: warpgroup 0 = TMA producer, warpgroups 1.. = MMA consumers (64 keys each), register
// reallocation with setmaxnreg, one CTA per (key block, kv head, batch). dK and dV are accumulated in registers
// over the group's query heads (GQA/MQA: no per-query-head copies and no fp32 dK/dV buffers) and written once.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "bwd_kernel_traits.h"
#include "bwd_mainloop.h"
#include "mask.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace fa3jax {

// 4x4 transpose of 32-bit words across the 4 lanes of a quad (lanes 4i .. 4i + 3, q = lane % 4): on entry lane q
// holds row q (w[s] = M[q][s]), on exit column q (w[s] = M[s][q]). Two butterfly exchanges (partners q ^ 2, then
// q ^ 1), each swapping the two words whose slot differs from q in that bit.
CUTE_DEVICE void quad_transpose(uint32_t (&w)[4], int q) {
  bool const hi = (q & 2) != 0, lo = (q & 1) != 0;
  CUTE_UNROLL
  for (int k = 0; k < 2; ++k) {
    uint32_t const recv = __shfl_xor_sync(0xffffffffu, hi ? w[k] : w[2 | k], 2);
    if (hi) w[k] = recv;
    else w[2 | k] = recv;
  }
  CUTE_UNROLL
  for (int k = 0; k < 2; ++k) {
    uint32_t const recv = __shfl_xor_sync(0xffffffffu, lo ? w[2 * k] : w[2 * k + 1], 1);
    if (lo) w[2 * k] = recv;
    else w[2 * k + 1] = recv;
  }
}

// dK (scaled by the softmax scale) and dV of one key block to global memory (rows of hk x d and hk x d_v: dense
// (b, sk, hk, d), varlen packed (total_k, hk, d)), keys < the sequence's seqlen_k, columns < the call's d (dK) and
// d_v (dV) (p.head_dim, p.head_dim_v: multiples of 8, so an 8-column group is wholly inside or outside).
// In an accumulator row a thread (quad lane q) holds column pairs 8 j + 2 q (+1); the quad's four lanes together hold
// 8 whole columns per j. A quad transpose over four consecutive j gives lane q the 8 columns of j = 4 g + q, stored
// with one 16-byte store: a quad writes 64 contiguous bytes of a row, where one store per pair (4 bytes, a sector
// half used) cost the CTA's exit ~1024 store instructions.
template <class KT, class TdK, class TdV>
CUTE_DEVICE void bwd_store_dkdv(typename KT::Params const& p, BwdTile const& tile, int mma_tid, TdK const& tdKrdK,
                                TdV const& tdVrdV) {
  using Element = typename KT::Element;
  int const n0 = tile.n_block * KT::kBlockN;
  int const q = mma_tid % 4;
  // One gradient: accumulator `acc` of tiled MMA `mma` (keys x kDim) times `scale`, into `out`: rows `width` wide
  // (the call's head dim, <= kDim), columns past it not written.
  auto store = [&](auto mma, auto const& acc, auto dim, int width, Element* out, float scale) {
    constexpr int kDim = decltype(dim)::value;
    auto thr = mma.get_thread_slice(mma_tid);
    Tensor c = make_identity_tensor(Shape<typename KT::BlkN, Int<kDim>>{});
    Tensor tc = thr.partition_C(c);
    Tensor rc = make_tensor(tc.data(), acc_rowcol(tc.layout()));
    Tensor g = make_tensor(acc.data(), acc_rowcol(acc.layout()));
    constexpr int kCols = decltype(size<1>(g))::value;  // 2 per j
    static_assert(kCols % 8 == 0, "a thread's columns come in groups of four 8-column blocks");
    CUTE_UNROLL
    for (int r = 0; r < size<0>(g); ++r) {
      int const key = n0 + int(get<0>(rc(r, 0)));
      bool const row_ok = key < tile.seq.seqlen_k;
      int64_t const row = ((tile.seq.offset_k + key) * p.num_heads_k + tile.head_k) * width;
      CUTE_UNROLL
      for (int g4 = 0; g4 < kCols / 8; ++g4) {
        uint32_t w[4];
        CUTE_UNROLL
        for (int i = 0; i < 4; ++i) {
          cutlass::Array<Element, 2> x2;
          x2[0] = Element(g(r, 8 * g4 + 2 * i) * scale);
          x2[1] = Element(g(r, 8 * g4 + 2 * i + 1) * scale);
          w[i] = reinterpret_cast<uint32_t const&>(x2);
        }
        quad_transpose(w, q);  // every lane: the shuffles need the whole warp
        int const col = int(get<1>(rc(r, 8 * g4))) + 6 * q;  // own pair at 8 (4 g4) + 2 q; chunk at 8 (4 g4 + q)
        if (row_ok && col < width) *reinterpret_cast<uint4*>(out + row + col) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  };
  store(typename KT::TiledMmadK{}, tdKrdK, Int<KT::kHeadDim>{}, p.head_dim, static_cast<Element*>(p.dk), p.dk_scale);
  store(typename KT::TiledMmadV{}, tdVrdV, Int<KT::kHeadDimV>{}, p.head_dim_v, static_cast<Element*>(p.dv), 1.f);
}

// kLpt: CTA `unit` (blockIdx linearized, x fastest) of a (num_n key blocks, hk, batch) grid -> (key block in
// m_block, kv head, batch), heaviest first under a right window bound (key block 0 sees the most query blocks):
// over sections of `group` (kv head, batch) pairs whose Q, dO and dq_accum fit in L2 together, key block 0 of
// every pair, then key block 1, ... (the forward's heavy-first unit order, tile_scheduler.h, read backwards).
CUTE_HOST_DEVICE FwdTile bwd_lpt_tile(int num_n, int hk, int batch, int group, int unit) {
  int const hb = hk * batch;
  SchedulerParams const sp{num_n, hk, hb, num_n * hb, group, true, nullptr};
  FwdTile t = PersistentTileScheduler::tile(sp, unit);
  t.m_block = num_n - 1 - t.m_block;
  return t;
}

// The CTA's tile: its sequence (dense, or packed by cu_seqlens with lengths clamped as SeqInfo::varlen does) and
// its stat rows (bwd_layout.h).
template <class KT>
CUTE_DEVICE BwdTile make_bwd_tile(typename KT::Params const& p, int n_block, int head_k, int batch) {
  if constexpr (KT::kVarlen) {
    SeqInfo const seq = SeqInfo::varlen(batch, p.cu_seqlens_q, p.cu_seqlens_k, p.seqused_k, p.seqlen_q, p.seqlen_k);
    return {n_block, head_k, batch, seq, bwd_varlen_pad_start(int(seq.offset_q), batch), p.stat_rows, KT::kBlockM};
  } else {
    int64_t const rows_pad = int64_t(p.num_m_blocks) * KT::kBlockM;
    return {n_block, head_k, batch, SeqInfo::dense(batch, p.seqlen_q, p.seqlen_k),
            int64_t(batch) * p.num_heads_q * rows_pad, rows_pad, KT::kBlockM};
  }
}

// kSoftcap: p.softcap > 0. Two kernels rather than one branch: in one kernel the softcap loop's register pressure
// (S^T, dP^T and dK/dV live together) made ptxas spill in both loops (88 B; 0 B in the plain kernel alone).
// kDet: serves deterministic mode (p.dq_sem), else default mode only (BwdMainloop; the launcher picks).
template <class KT, bool kSoftcap, bool kDet>
__global__ void __launch_bounds__(KT::kNumThreads, 1) bwd_kernel(__grid_constant__ typename KT::Params const p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Mainloop = BwdMainloop<KT, kDet>;
  using Pipeline = typename KT::Pipeline;
  using PipelineState = typename KT::PipelineState;
  using SharedStorage = typename KT::SharedStorage;

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  // Offset from smem_raw itself (not an integer address) so that the compiler keeps the shared state space: the
  // stat loads and dQ staging stores become LDS/STS instead of generic LD/ST with 64-bit address math.
  uint8_t* const base = smem_raw + ((1024 - (reinterpret_cast<uintptr_t>(smem_raw) & 1023)) & 1023);
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(base);

  int const warp_idx = cutlass::canonical_warp_idx_sync();
  int const wg_idx = cutlass::canonical_warp_group_idx();
  bool const is_leader = threadIdx.x == 0;
  if (is_leader) {
    cute::prefetch_tma_descriptor(tma_desc_of(p.tma_q));
    cute::prefetch_tma_descriptor(tma_desc_of(p.tma_do));
    cute::prefetch_tma_descriptor(tma_desc_of(p.tma_k));
    cute::prefetch_tma_descriptor(tma_desc_of(p.tma_v));
    cute::initialize_barrier(ss.barrier_kv, 1);
    if constexpr (KT::kWriterWarp) {
      for (int w = 0; w < KT::kNumMmaWG; ++w)
        for (int b = 0; b < KT::kDqBufs; ++b) {
          cute::initialize_barrier(ss.barrier_dq_full[w][b], 128);  // one warpgroup's threads
          cute::initialize_barrier(ss.barrier_dq_empty[w][b], 1);   // the writer's lane 0
        }
    }
  }
  typename Pipeline::Params pp;
  pp.role = wg_idx == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = is_leader;
  pp.num_consumers = KT::kNumMmaThreads;
  pp.transaction_bytes = KT::kBytesStage;
  Pipeline pipe(ss.pipeline_q, pp, typename KT::ClusterShape{});
  __syncthreads();

  // Deterministic mode adds dQ partials in descending key-block order, or rotated (bwd_mainloop.h DqOrder), so CTAs
  // are dispatched from the last key block down: in descending order the one whose turn comes first is launched
  // first (the rotated one relies on the whole group being resident instead).
  int n_block = Mainloop::deterministic(p) ? int(gridDim.x) - 1 - int(blockIdx.x) : int(blockIdx.x);
  int head_k = int(blockIdx.y), batch = int(blockIdx.z);
  if constexpr (KT::kLpt) {
    if (p.lpt_group > 0) {
      int const unit = int(blockIdx.x) + int(gridDim.x) * (int(blockIdx.y) + int(gridDim.y) * int(blockIdx.z));
      FwdTile const t = bwd_lpt_tile(int(gridDim.x), int(gridDim.y), int(gridDim.z), p.lpt_group, unit);
      n_block = t.m_block, head_k = t.head, batch = t.batch;
    }
  }
  BwdTile const tile = make_bwd_tile<KT>(p, n_block, head_k, batch);
  typename Mainloop::KM km(tile.n_block, tile.seq.seqlen_q, tile.seq.seqlen_k, p.window_left, p.window_right);
  if constexpr (KT::kVarlen)  // query blocks past max_seqlen_q: not computed (the forward's grid), not preprocessed
    km.m_max = max(km.m_min, min(km.m_max, (p.max_seqlen_q + KT::kBlockM - 1) / KT::kBlockM));
  // Else dK = dV = 0 and nothing is loaded (varlen: key blocks past this sequence's keys have no rows at all).
  bool const any = tile.n_block * KT::kBlockN < tile.seq.seqlen_k && km.num_blocks() > 0;
  DqOrder const ord = Mainloop::dq_order(p, tile, km);

  if (wg_idx == 0) {
    cutlass::arch::warpgroup_reg_dealloc<KT::kProducerRegs>();
    if (warp_idx == 0 && any) {
      PipelineState st = cutlass::make_producer_start_state<Pipeline>();
      Mainloop::load(p, ss, pipe, st, tile, km, ord);
      pipe.producer_tail(st);  // do not exit while a stage may still be released
    } else if (KT::kWriterWarp && warp_idx == 1 && any) {
      Mainloop::write_dq(p, ss, tile, km, ord);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<KT::kConsumerRegs>();
    int const mma_tid = int(threadIdx.x) - 128;
    int const mma_wg = wg_idx - 1;
    Tensor tdKrdK = partition_fragment_C(typename KT::TiledMmadK{}, Shape<typename KT::BlkN, typename KT::HDim>{});
    Tensor tdVrdV = partition_fragment_C(typename KT::TiledMmadV{}, Shape<typename KT::BlkN, typename KT::HDimV>{});
    clear(tdKrdK);
    clear(tdVrdV);
    if (any) {
      PipelineState st;
      Mainloop::template mma<kSoftcap>(p, ss, pipe, st, tile, km, ord, mma_tid, mma_wg, tdKrdK, tdVrdV);
    }
    bwd_store_dkdv<KT>(p, tile, mma_tid, tdKrdK, tdVrdV);
    Mainloop::finish(mma_tid);
  }
#endif
}

}  // namespace fa3jax

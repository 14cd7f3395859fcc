// The forward kernel: warp-specialized (warpgroup 0 = TMA producer, warpgroups 1.. = MMA consumers),
// register reallocation with setmaxnreg, K/V pipelines on mbarriers, persistent tile scheduler.
#pragma once

#include <type_traits>

#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/arch/barrier.h>

#include "epilogue.h"
#include "kernel_traits.h"
#include "mainloop.h"
#include "mask.h"
#include "seq_info.h"
#include "softmax.h"
#include "tile_scheduler.h"

namespace fa3jax {

template <class KT>
__global__ void __launch_bounds__(KT::kNumThreads, 1) fwd_kernel(__grid_constant__ typename KT::Params const params) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Mainloop = FwdMainloop<KT>;
  using Epilogue = FwdEpilogue<KT>;
  using Pipeline = typename KT::Pipeline;
  using SharedStorage = typename KT::SharedStorage;
  using PipelineState = typename KT::PipelineState;

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uintptr_t const base = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(base);

  int const warp_idx = cutlass::canonical_warp_idx_sync();
  int const wg_idx = cutlass::canonical_warp_group_idx();
  bool const is_leader = threadIdx.x == 0;

  if (is_leader) {
    cute::prefetch_tma_descriptor(tma_desc_of(params.tma_q));
    if constexpr (KT::kKVCache) {  // the caches' views (launch.h encode_rows_view); tma_k/tma_v are unused there
      cute::prefetch_tma_descriptor(&params.tma_cache_k);
      cute::prefetch_tma_descriptor(&params.tma_cache_v);
    } else {
      cute::prefetch_tma_descriptor(tma_desc_of(params.tma_k));
      cute::prefetch_tma_descriptor(tma_desc_of(params.tma_v));
    }
    if constexpr (KT::kTmaEpilogue) cute::prefetch_tma_descriptor(params.tma_o.get_tma_descriptor());
    cute::initialize_barrier(ss.barrier_q, 1);
    cute::initialize_barrier(ss.barrier_q_empty, KT::kNumMmaThreads);
    cute::initialize_barrier(ss.barrier_unit_full, 1);
    cute::initialize_barrier(ss.barrier_unit_empty, KT::kNumMmaThreads);
  }

  typename Pipeline::Params pp;
  pp.role = wg_idx == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = is_leader;
  pp.num_consumers = KT::kNumMmaThreads;
  pp.transaction_bytes = KT::kBytesK;
  // Both constructors initialize their barriers from warp 0 and fence the initialization.
  Pipeline pipe_k(ss.pipeline_k, pp, typename KT::ClusterShape{});
  pp.transaction_bytes = KT::kBytesV;  // V tiles are d_v wide (MLA)
  Pipeline pipe_v(ss.pipeline_v, pp, typename KT::ClusterShape{});
  __syncthreads();

  using Scheduler = PersistentTileScheduler;
  using BI = std::conditional_t<KT::kKVCache, KVBlockMask<KT::kBlockM, KT::kBlockN>,
                                QBlockMask<KT::kBlockM, KT::kBlockN>>;
  // Where a tile's sequence lives. Varlen: read from cu_seqlens by every lane of a warp (one broadcast load) and
  // shuffled from lane 0, so that the compiler knows the values are warp-uniform (see the unit hand-off below).
  auto seq_info = [&](FwdTile const& t) {
    if constexpr (KT::kVarlen) {
      SeqInfo s = SeqInfo::varlen(t.batch, params.cu_seqlens_q, params.cu_seqlens_k, params.seqused_k,
                                  params.seqlen_q, params.seqlen_k);
      s.offset_q = __shfl_sync(0xffffffffu, int(s.offset_q), 0);  // offsets are <= the int32 totals
      s.offset_k = __shfl_sync(0xffffffffu, int(s.offset_k), 0);
      s.seqlen_q = __shfl_sync(0xffffffffu, s.seqlen_q, 0);
      s.seqlen_k = __shfl_sync(0xffffffffu, s.seqlen_k, 0);
      return s;
    } else {
      return SeqInfo::dense(t.batch, params.seqlen_q, params.seqlen_k);
    }
  };
  // KV cache: the batch row's clamped lengths and cache slot (seq_info.h KVCacheSeq), warp-uniform as above.
  auto kv_info = [&](FwdTile const& t) {
    if constexpr (KT::kKVCache) {
      KVCacheSeq s = KVCacheSeq::make(t.batch, params.cache_seqlens, params.leftpad, params.batch_idx,
                                      params.seqlen_k, params.seqlen_new, params.cache_slots);
      s.cache_len = __shfl_sync(0xffffffffu, s.cache_len, 0);
      s.leftpad = __shfl_sync(0xffffffffu, s.leftpad, 0);
      s.slot = __shfl_sync(0xffffffffu, s.slot, 0);
      return s;
    } else {
      return KVCacheSeq{0, 0, 0};
    }
  };
  auto block_info = [&](FwdTile const& t, SeqInfo const& seq, KVCacheSeq const& kv) {
    if constexpr (KT::kKVCache) {
      BI bi(t.m_block, seq.seqlen_q, kv.cache_len, kv.leftpad, params.seqlen_new, params.window_left,
            params.window_right, params.pack);
      bi.keep_split(t.split, params.num_splits);
      return bi;
    } else {
      return BI(t.m_block, seq.seqlen_q, seq.seqlen_k, params.window_left, params.window_right);
    }
  };

  // Dynamic assignment: work units travel from the producer warp (lane 0) to the consumers through ss.unit (one
  // slot, full/empty barriers); a unit >= num_units ends both loops. Static: both sides compute them. Varlen
  // always hands units over: the producer skips those past their sequence's end, which the consumers never see.
  volatile int* const unit_slot = &ss.unit;
  int const num_units = params.sched.num_units;
  bool const dynamic = params.sched.counter != nullptr;
  bool const handoff = dynamic || KT::kVarlen;

  if (wg_idx == 0) {
    cutlass::arch::warpgroup_reg_dealloc<KT::kProducerRegs>();
    // The producer warp's loop over its tiles. kSpansPages (KV cache): its paged cache blocks span pages
    // (Params::kv_load kBoxes / kGather); a copy of the loop of its own, so that the kBlocks one keeps its registers
    // (the producer has 24-32, and the page gathers' state spilled the shared loop's).
    auto produce = [&](auto spans_pages) {
      bool const lane0 = threadIdx.x % 32 == 0;  // lane 0: the shuffles below broadcast from it
      PipelineState st = cutlass::make_producer_start_state<Pipeline>();
      int q_iter = 0;
      int u = Scheduler::first_unit();
      // The unit after u (k: this loop's round).
      auto next_unit = [&](int u, int k) {
        if (dynamic) {
          // Broadcast so that the next tile's coordinates stay warp-uniform.
          int drawn = 0;
          if (lane0) drawn = Scheduler::dynamic_unit(params.sched);
          return __shfl_sync(0xffffffffu, drawn, 0);
        }
        if constexpr (KT::kVarlen) return u + Scheduler::num_ctas();  // rounds skipped below do not count k
        else return Scheduler::static_unit(k + 1);
      };
      for (int k = 0;; ++k) {
        if constexpr (KT::kVarlen) {
          // Query blocks are counted from max_seqlen_q: skip those past their sequence's end (no loads, no stores).
          while (u < num_units) {
            FwdTile const t = Scheduler::tile(params.sched, u);
            if (t.m_block * KT::kBlockM < seq_info(t).seqlen_q) break;
            u = next_unit(u, k);
          }
        }
        if (handoff) {
          if (k > 0) cute::wait_barrier(ss.barrier_unit_empty, (k - 1) & 1);
          if (lane0) {
            *unit_slot = u;
            cute::arrive_barrier(ss.barrier_unit_full);
          }
        }
        if (u >= num_units) break;
        FwdTile const tile = Scheduler::tile(params.sched, u);
        SeqInfo const seq = seq_info(tile);
        KVCacheSeq const kv = kv_info(tile);
        BI const bi = block_info(tile, seq, kv);
        if (bi.num_blocks() > 0) {  // else the consumers write 0 / -inf without loads
          if constexpr (KT::kKVCache) {
            Mainloop::template load_kvcache<decltype(spans_pages)::value>(params, ss, pipe_k, pipe_v, st, q_iter,
                                                                          tile, kv, bi);
          } else {
            Mainloop::load(params, ss, pipe_k, pipe_v, st, q_iter, tile, seq, bi);
          }
          ++q_iter;
        }
        // Drawn (dynamic) once this tile's loads are issued, about kStages key blocks before the consumers need it.
        u = next_unit(u, k);
      }
      // Do not exit while a stage may still be released by the consumers.
      pipe_k.producer_tail(st);
      pipe_v.producer_tail(st);
    };
    if (warp_idx == 0) {  // the whole warp, so that units and coordinates are warp-uniform (see load)
      if constexpr (KT::kKVCache) {
        if (params.kv_load != KVLoad::kBlocks) produce(cute::true_type{});
        else produce(cute::false_type{});
      } else {
        produce(cute::false_type{});
      }
    } else if constexpr (KT::kVarlen) {
      // The producer warpgroup's idle warps write the q rows outside every sequence, so no output needs a pre-fill.
      Epilogue::fill_uncovered(params, int(threadIdx.x) - 32, 96);
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<KT::kConsumerRegs>();
    int const mma_tid = int(threadIdx.x) - 128;
    int const mma_wg = wg_idx - 1;
    PipelineState st_k, st_v;
    int q_iter = 0;
    for (int k = 0;; ++k) {
      int u;
      if (handoff) {
        cute::wait_barrier(ss.barrier_unit_full, k & 1);
        // Broadcast from lane 0 so the compiler knows the unit (and every trip count derived from it) is warp-
        // uniform: read as a plain per-thread load, the tile loops count as divergent and the WGMMA
        // descriptors move from uniform to vector registers (measured 15-20% slower).
        u = __shfl_sync(0xffffffffu, *unit_slot, 0);
        cute::arrive_barrier(ss.barrier_unit_empty);
      } else {
        u = Scheduler::static_unit(k);
      }
      if (u >= num_units) break;
      FwdTile const tile = Scheduler::tile(params.sched, u);
      SeqInfo const seq = seq_info(tile);
      BI const bi = block_info(tile, seq, kv_info(tile));
      typename KT::TiledMmaPV mma_pv;
      Tensor tOrO = partition_fragment_C(mma_pv, Shape<typename KT::BlkM, typename KT::HDimV>{});
      constexpr int kRows = decltype(size<0>(acc_rowcol(tOrO.layout())))::value;
      OnlineSoftmax<kRows> softmax;
      if (bi.num_blocks() > 0) {
        if constexpr (!KT::kSoftcapVariants) {
          Mainloop::template mma<false, true>(params, ss, pipe_k, pipe_v, st_k, st_v, q_iter, bi, tile.m_block,
                                              mma_tid, mma_wg, tOrO, softmax, tile.batch);
        } else if (params.softcap > 0.f) {
          Mainloop::template mma<true>(params, ss, pipe_k, pipe_v, st_k, st_v, q_iter, bi, tile.m_block, mma_tid,
                                       mma_wg, tOrO, softmax, tile.batch);
        } else {
          Mainloop::template mma<false>(params, ss, pipe_k, pipe_v, st_k, st_v, q_iter, bi, tile.m_block, mma_tid,
                                        mma_wg, tOrO, softmax, tile.batch);
        }
        ++q_iter;
      } else {
        clear(tOrO);
        softmax.init();
      }
      float inv[kRows], lse[kRows];
      // The sink joins the row sums here only, once per tile: the key loop above is the sink-free one. Split-KV
      // partials stay sink-free (the combine pass adds it once).
      bool const splits = KT::kKVCache && params.num_splits > 1;
      if (params.sinks != nullptr && !splits) {
        if constexpr (KT::kKVCache) {
          if (params.pack > 1) {
            float sinks[kRows];
            Epilogue::packed_row_sinks(params, tile, mma_tid, sinks);
            softmax.finalize_with_sinks(params.scale_log2, sinks, inv, lse);
          } else {
            softmax.finalize_with_sink(params.scale_log2, params.sinks[tile.head], inv, lse);
          }
        } else {
          softmax.finalize_with_sink(params.scale_log2, params.sinks[tile.head], inv, lse);
        }
      } else {
        softmax.finalize(params.lse_scale, inv, lse);
      }
      if constexpr (KT::kKVCache) {
        if (splits || params.pack > 1) Epilogue::store_rows(params, tile, mma_tid, tOrO, inv, lse);
        else Epilogue::store(params, ss, tile, seq, mma_tid, tOrO, inv, lse);
      } else {
        Epilogue::store(params, ss, tile, seq, mma_tid, tOrO, inv, lse);
      }
    }
    Mainloop::sched_drain(mma_wg, q_iter > 0);
    Epilogue::finish(mma_tid);
  }
#endif
}

}  // namespace fa3jax

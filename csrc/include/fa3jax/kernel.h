// The forward kernel: warp-specialized (warpgroup 0 = TMA producer, warpgroups 1.. = MMA consumers),
// register reallocation with setmaxnreg, K/V pipelines on mbarriers, static tile scheduler.
#pragma once

#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/arch/barrier.h>

#include "block_info.h"
#include "epilogue.h"
#include "kernel_traits.h"
#include "mainloop.h"
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

  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uintptr_t const base = (reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023);
  SharedStorage& ss = *reinterpret_cast<SharedStorage*>(base);

  int const warp_idx = cutlass::canonical_warp_idx_sync();
  int const wg_idx = cutlass::canonical_warp_group_idx();
  bool const is_leader = threadIdx.x == 0;

  if (is_leader) {
    cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
    cute::initialize_barrier(ss.barrier_q, 1);
  }

  typename Pipeline::Params pp;
  pp.role = wg_idx == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = is_leader;
  pp.num_consumers = KT::kNumMmaThreads;
  pp.transaction_bytes = KT::kBytesKV;
  // Both constructors initialize their barriers from warp 0 and fence the initialization.
  Pipeline pipe_k(ss.pipeline_k, pp, Shape<_1, _1, _1>{});
  Pipeline pipe_v(ss.pipeline_v, pp, Shape<_1, _1, _1>{});
  (void)warp_idx;
  __syncthreads();

  FwdTile const tile = StaticTileScheduler::get();
  int const batch = int(gridDim.z);
  BlockInfo<KT::kBlockM, KT::kBlockN> const bi(tile.m_block, params.seqlen_q, params.seqlen_k, params.window_left,
                                               params.window_right);

  if (wg_idx == 0) {
    cutlass::arch::warpgroup_reg_dealloc<KT::kProducerRegs>();
    if (is_leader && bi.num_blocks() > 0) Mainloop::load(params, ss, pipe_k, pipe_v, tile, bi, batch);
  } else {
    cutlass::arch::warpgroup_reg_alloc<KT::kConsumerRegs>();
    int const mma_tid = int(threadIdx.x) - 128;
    int const mma_wg = wg_idx - 1;
    typename KT::TiledMmaPV mma_pv;
    Tensor tOrO = partition_fragment_C(mma_pv, Shape<typename KT::BlkM, typename KT::HDim>{});
    constexpr int kRows = decltype(size<0>(acc_rowcol(tOrO.layout())))::value;
    OnlineSoftmax<kRows> softmax;
    if (bi.num_blocks() > 0) {
      Mainloop::mma(params, ss, pipe_k, pipe_v, bi, tile.m_block, mma_tid, mma_wg, tOrO, softmax);
    } else {
      clear(tOrO);
      softmax.init();
    }
    float inv[kRows], lse[kRows];
    softmax.finalize(params.lse_scale, inv, lse);
    Epilogue::store(params, tile, mma_tid, tOrO, inv, lse);
  }
#endif
}

}  // namespace fa3jax

// Forward epilogue: normalize O and write it (bf16/fp16) with the natural-log LSE (one lane per row, rows <
// seqlen_q only).
//   kTmaEpilogue: each consumer warpgroup converts its 64 rows into its own slice of smem_o (stmatrix), fences
//   them for the async proxy and one of its threads issues a TMA store of the 64 x D box (rows past seqlen_q are
//   clipped by the TMA unit); the warpgroup goes on with its next tile while the store drains. The slice is
//   reused only after that store has read it (bulk wait_group.read at the next epilogue).
//   Otherwise: 32-bit stores of column pairs straight from the accumulator registers.
#pragma once

#include <cute/arch/copy_sm90.hpp>
#include <cutlass/arch/barrier.h>

#include "kernel_traits.h"
#include "seq_info.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace fa3jax {

template <class KT>
struct FwdEpilogue {
  using Element = typename KT::Element;
  using Params = typename KT::Params;
  using SharedStorage = typename KT::SharedStorage;
  // Named barriers: ids 1 .. kNumMmaWG are the mainloop's scheduling ring; one per warpgroup after them.
  static constexpr int kFirstBarrier = KT::kNumMmaWG + 1;
  static_assert(kFirstBarrier + KT::kNumMmaWG <= 16, "out of named barriers");

  // tOrO: consumer accumulator (unnormalized); inv/lse per thread row (acc_rowcol order).
  template <class TOrO, int kRows>
  CUTE_DEVICE static void store(Params const& params, SharedStorage& ss, FwdTile const& tile, int mma_tid,
                                TOrO& tOrO, float const (&inv)[kRows], float const (&lse)[kRows]) {
    typename KT::TiledMmaPV mma_pv;
    auto thr_pv = mma_pv.get_thread_slice(mma_tid);
    Tensor cO = make_identity_tensor(Shape<typename KT::BlkM, typename KT::HDim>{});
    Tensor tOcO = thr_pv.partition_C(cO);
    Tensor rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    static_assert(decltype(size<0>(O))::value == kRows);
    static_assert(decltype(size<1>(O))::value % 2 == 0);

    int const hq = params.num_heads_q, sq = params.seqlen_q;
    int const q_lo = tile.m_block * KT::kBlockM;

    if constexpr (KT::kTmaEpilogue) {
      int const wg = mma_tid / 128;
      bool const issuer = mma_tid % 128 == 0;
      // This warpgroup's previous TMA store must have finished reading its slice.
      if (issuer) tma_store_wait<0>();
      named_barrier_sync(kFirstBarrier + wg, 128);

      Tensor rO = make_tensor_like<Element>(tOrO);
      Tensor rOv = make_tensor(rO.data(), acc_rowcol(rO.layout()));
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(O); ++c) rOv(r, c) = Element(O(r, c) * inv[r]);
      }
      auto smem_copy = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_pv);
      auto thr_copy = smem_copy.get_thread_slice(mma_tid);
      Tensor sO = make_tensor(make_smem_ptr(ss.smem_o.data()), typename KT::SmemLayoutO{});
      copy(smem_copy, thr_copy.retile_S(rO), thr_copy.partition_D(sO));
      cutlass::arch::fence_view_async_shared();  // generic-proxy smem writes -> visible to the TMA unit
      named_barrier_sync(kFirstBarrier + wg, 128);
      if (issuer) {
        Tensor mO = params.tma_o.get_tma_tensor(
            make_shape(params.seqlen_q, int(KT::kHeadDim), params.num_heads_q, params.batch));
        Tensor gO = local_tile(mO(_, _, tile.head, tile.batch), Shape<_64, typename KT::HDim>{},
                               make_coord(tile.m_block * KT::kNumMmaWG + wg, _0{}));
        Tensor sO_wg = make_tensor(make_smem_ptr(ss.smem_o.data() + wg * 64 * KT::kHeadDim),
                                   typename KT::SmemLayoutOWG{});
        auto [tOgO, tOsO] = tma_partition(params.tma_o, _0{}, Layout<_1>{}, group_modes<0, 2>(sO_wg),
                                          group_modes<0, 2>(gO));
        copy(params.tma_o, tOsO, tOgO);
        tma_store_arrive();
      }
    } else {
      Element* out = static_cast<Element*>(params.out);
      SeqInfo const seq = SeqInfo::dense(tile.batch, sq, params.seqlen_k);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        int const row = q_lo + int(get<0>(rc(r, 0)));
        if (row < sq) {
          Element* orow = out + ((seq.offset_q + row) * hq + tile.head) * KT::kHeadDim;
          CUTE_UNROLL
          for (int c = 0; c < size<1>(O); c += 2) {
            int const col = int(get<1>(rc(r, c)));
            cutlass::Array<Element, 2> pair;
            pair[0] = Element(O(r, c) * inv[r]);
            pair[1] = Element(O(r, c + 1) * inv[r]);
            *reinterpret_cast<cutlass::Array<Element, 2>*>(orow + col) = pair;
          }
        }
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int const row = q_lo + int(get<0>(rc(r, 0)));
      if (row < sq && mma_tid % 4 == 0) params.lse[(int64_t(tile.batch) * hq + tile.head) * sq + row] = lse[r];
    }
  }

  // Before the CTA exits: its TMA stores must have read their shared-memory source.
  CUTE_DEVICE static void finish(int mma_tid) {
    if constexpr (KT::kTmaEpilogue) {
      if (mma_tid % 128 == 0) tma_store_wait<0>();
    }
  }
};

}  // namespace fa3jax

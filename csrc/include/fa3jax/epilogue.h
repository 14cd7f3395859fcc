// Forward epilogue: normalize O, write it (bf16/fp16, 32-bit stores of column pairs, rows < seqlen_q only)
// and the natural-log LSE (one lane per row).
#pragma once

#include "kernel_traits.h"
#include "tile_scheduler.h"
#include "utils.h"

namespace fa3jax {

template <class KT>
struct FwdEpilogue {
  using Element = typename KT::Element;
  using Params = typename KT::Params;

  // tOrO: consumer accumulator (unnormalized); inv/lse per thread row (acc_rowcol order).
  template <class TOrO, int kRows>
  CUTE_DEVICE static void store(Params const& params, FwdTile const& tile, int mma_tid, TOrO& tOrO,
                                float const (&inv)[kRows], float const (&lse)[kRows]) {
    typename KT::TiledMmaPV mma_pv;
    auto thr_pv = mma_pv.get_thread_slice(mma_tid);
    Tensor cO = make_identity_tensor(Shape<typename KT::BlkM, typename KT::HDim>{});
    Tensor tOcO = thr_pv.partition_C(cO);
    Tensor rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    static_assert(decltype(size<0>(O))::value == kRows);
    static_assert(decltype(size<1>(O))::value % 2 == 0);

    int const hq = params.num_heads_q, sq = params.seqlen_q;
    Element* out = static_cast<Element*>(params.out);
    int const q_lo = tile.m_block * KT::kBlockM;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int const row = q_lo + int(get<0>(rc(r, 0)));
      if (row < sq) {
        Element* orow = out + ((int64_t(tile.batch) * sq + row) * hq + tile.head) * KT::kHeadDim;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(O); c += 2) {
          int const col = int(get<1>(rc(r, c)));
          cutlass::Array<Element, 2> pair;
          pair[0] = Element(O(r, c) * inv[r]);
          pair[1] = Element(O(r, c + 1) * inv[r]);
          *reinterpret_cast<cutlass::Array<Element, 2>*>(orow + col) = pair;
        }
        if (mma_tid % 4 == 0) {
          params.lse[(int64_t(tile.batch) * hq + tile.head) * sq + row] = lse[r];
        }
      }
    }
  }
};

}  // namespace fa3jax

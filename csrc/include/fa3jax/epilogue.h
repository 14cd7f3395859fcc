// Forward epilogue: normalize O and write it (bf16/fp16) with the natural-log LSE (one lane per row, rows <
// seqlen_q only).
//   kTmaEpilogue: each consumer warpgroup converts its 64 rows into its own slice of smem_o (stmatrix), fences
//   them for the async proxy and one of its threads issues a TMA store of the 64 x D_v box (rows past seqlen_q and
//   columns past the call's d_v are clipped by the TMA unit); the warpgroup goes on with its next tile while the
//   store drains. The slice is reused only after that store has read it (bulk wait_group.read at the next epilogue).
//   Otherwise: 32-bit stores of column pairs straight from the accumulator registers, columns < d_v only.
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

  // The (tile row, column) coordinates of the thread's P V accumulator, in the acc_rowcol view the softmax uses.
  CUTE_DEVICE static auto o_coords(int mma_tid) {
    typename KT::TiledMmaPV mma_pv;
    Tensor tOcO = mma_pv.get_thread_slice(mma_tid).partition_C(
        make_identity_tensor(Shape<typename KT::BlkM, typename KT::HDimV>{}));
    return make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  }

  // Row r of the thread's O view (rc: its coordinates) times inv into orow's columns below dim_v, as pairs of T (the
  // pairs start at even columns and dim_v is a multiple of 8, so a pair is wholly inside or outside).
  template <class T, class TO, class TRC>
  CUTE_DEVICE static void store_pairs(T* orow, TO const& O, TRC const& rc, int r, float inv, int dim_v) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(O); c += 2) {
      int const col = int(get<1>(rc(r, c)));
      if (col >= dim_v) continue;
      cutlass::Array<T, 2> pair;
      pair[0] = T(O(r, c) * inv);
      pair[1] = T(O(r, c + 1) * inv);
      *reinterpret_cast<cutlass::Array<T, 2>*>(orow + col) = pair;
    }
  }

  // tOrO: consumer accumulator (unnormalized); inv/lse per thread row (acc_rowcol order).
  template <class TOrO, int kRows>
  CUTE_DEVICE static void store(Params const& params, SharedStorage& ss, FwdTile const& tile, SeqInfo const& seq,
                                int mma_tid, TOrO& tOrO, float const (&inv)[kRows], float const (&lse)[kRows]) {
    typename KT::TiledMmaPV mma_pv;
    Tensor rc = o_coords(mma_tid);
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    static_assert(decltype(size<0>(O))::value == kRows);
    static_assert(decltype(size<1>(O))::value % 2 == 0);

    int const hq = params.num_heads_q, sq = KT::kVarlen ? seq.seqlen_q : params.seqlen_q;
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
        auto const gO = [&]() {
          if constexpr (!KT::kVarlen) {
            Tensor mO = params.tma_o.get_tma_tensor(
                make_shape(params.seqlen_q, int(KT::kHeadDimV), params.num_heads_q, params.batch));
            return local_tile(mO(_, _, tile.head, tile.batch), Shape<_64, typename KT::HDimV>{},
                              make_coord(tile.m_block * KT::kNumMmaWG + wg, _0{}));
          } else {
            // Bounded per sequence as the loads are (mainloop.h): rows past its end fall outside the tensor, so
            // the store never writes the next sequence's rows.
            int const tq = params.seqlen_q;
            Tensor mO = params.tma_o.get_tma_tensor(make_shape(tq, int(KT::kHeadDimV), params.num_heads_q, tq + 1));
            return local_tile(domain_offset(make_coord(tq - sq, _0{}), mO(_, _, tile.head, int(seq.offset_q) + sq)),
                              Shape<_64, typename KT::HDimV>{}, make_coord(tile.m_block * KT::kNumMmaWG + wg, _0{}));
          }
        }();
        Tensor sO_wg = make_tensor(make_smem_ptr(ss.smem_o.data() + wg * 64 * KT::kHeadDimV),
                                   typename KT::SmemLayoutOWG{});
        auto [tOgO, tOsO] = tma_partition(params.tma_o, _0{}, Layout<_1>{}, group_modes<0, 2>(sO_wg),
                                          group_modes<0, 2>(gO));
        copy(params.tma_o, tOsO, tOgO);
        tma_store_arrive();
      }
    } else {
      // Columns past the call's d_v (a narrower head dim served by this kernel) are not written: the pairs start at
      // even columns and dim_v is a multiple of 8, so a pair is wholly inside or outside.
      int const dim_v = params.dim_v;
      Element* out = static_cast<Element*>(params.out);
      int64_t const offset_q = KT::kVarlen ? seq.offset_q : SeqInfo::dense(tile.batch, sq, params.seqlen_k).offset_q;
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        int const row = q_lo + int(get<0>(rc(r, 0)));
        if (row < sq) {
          store_pairs(out + ((offset_q + row) * hq + tile.head) * dim_v, O, rc, r, inv[r], dim_v);
        }
      }
    }
    // LSE: dense (b, hq, sq), varlen (hq, total_q).
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int const row = q_lo + int(get<0>(rc(r, 0)));
      if (row < sq && mma_tid % 4 == 0) {
        if constexpr (KT::kVarlen) params.lse[int64_t(tile.head) * params.seqlen_q + seq.offset_q + row] = lse[r];
        else params.lse[(int64_t(tile.batch) * hq + tile.head) * sq + row] = lse[r];
      }
    }
  }

  // GQA packing: the sink of each thread row's query head (rows past the valid ones get a head of the group too).
  template <int kRows>
  CUTE_DEVICE static void packed_row_sinks(Params const& params, FwdTile const& tile, int mma_tid,
                                           float (&sinks)[kRows]) {
    Tensor rc = o_coords(mma_tid);
    int const g = params.pack;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int const row = tile.m_block * KT::kBlockM + int(get<0>(rc(r, 0)));
      sinks[r] = params.sinks[tile.head * g + row % g];
    }
  }

  // KV cache, tiles the TMA store above cannot write: GQA-packed tiles (a tile row is a (query, head) pair,
  // KT::Params::pack) and split-KV tiles (normalized fp32 output and the sink-free LSE to the split's part of
  // out_accum / lse_accum, for the combine pass). Register stores of column pairs (columns < d_v), one lane per
  // row for the LSE, rows past seqlen_q (packed: seqlen_q * pack) not written.
  template <class TOrO, int kRows>
  CUTE_DEVICE static void store_rows(Params const& params, FwdTile const& tile, int mma_tid, TOrO& tOrO,
                                     float const (&inv)[kRows], float const (&lse)[kRows]) {
    Tensor rc = o_coords(mma_tid);
    Tensor O = make_tensor(tOrO.data(), acc_rowcol(tOrO.layout()));
    int const hq = params.num_heads_q, sq = params.seqlen_q, g = params.pack, dim_v = params.dim_v;
    bool const split = params.num_splits > 1;
    // Split s's part of the accumulators: (b, hq, sq) rows of d_v.
    int64_t const part = int64_t(tile.split) * params.batch * hq * sq;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      int const row = tile.m_block * KT::kBlockM + int(get<0>(rc(r, 0)));
      if (row >= sq * g) continue;
      int const qi = g > 1 ? row / g : row;
      int const head = g > 1 ? tile.head * g + (row - qi * g) : tile.head;
      int64_t const lrow = (int64_t(tile.batch) * hq + head) * sq + qi;  // (b, hq, sq)
      if (split) {
        store_pairs(params.out_accum + (part + lrow) * dim_v, O, rc, r, inv[r], dim_v);
        if (mma_tid % 4 == 0) params.lse_accum[part + lrow] = lse[r];
      } else {
        Element* const out = static_cast<Element*>(params.out);
        store_pairs(out + ((int64_t(tile.batch) * sq + qi) * hq + head) * dim_v, O, rc, r, inv[r], dim_v);
        if (mma_tid % 4 == 0) params.lse[lrow] = lse[r];
      }
    }
  }

  // Varlen: the q rows outside every sequence ([0, cu_seqlens_q[0]) and [cu_seqlens_q[batch], total_q)) get out 0
  // and lse -inf, or the head's sink (as a row that sees no key). Rows over the CTAs; each row (contiguous, hq x d_v)
  // by threads tid of nthreads in 16-byte pieces, with no runtime division (the producer warps run this with
  // their 24-32 registers). Nothing to do (two loads) when the sequences cover q.
  CUTE_DEVICE static void fill_uncovered(Params const& params, int tid, int nthreads) {
    int first, last;
    SeqInfo::uncovered(params.batch, params.cu_seqlens_q, params.seqlen_q, first, last);
    int const rows = first + (params.seqlen_q - last);
    int const hq = params.num_heads_q;
    int const pieces = hq * (params.dim_v * int(sizeof(Element)) / 16);  // dim_v: a multiple of 8
    for (int r = int(blockIdx.x); r < rows; r += int(gridDim.x)) {
      int64_t const row = r < first ? r : r - first + last;
      uint4* const out = reinterpret_cast<uint4*>(static_cast<Element*>(params.out) + row * hq * params.dim_v);
      for (int j = tid; j < pieces; j += nthreads) out[j] = make_uint4(0u, 0u, 0u, 0u);
      for (int h = tid; h < hq; h += nthreads)
        params.lse[int64_t(h) * params.seqlen_q + row] = params.sinks ? params.sinks[h] : -INFINITY;
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

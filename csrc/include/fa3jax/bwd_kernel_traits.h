// Compile-time description of one backward main kernel: tiles, the five MMAs, shared-memory layouts, TMA types.
//
// One CTA owns one key block of kBlockN keys (FA3 paper, section 3.3 / appendix B): dK and dV stay in registers
// for the whole loop over the query blocks that see it. Per query block of kBlockM rows the consumer warpgroups
// compute
//   S^T = K Q^T, dP^T = V dO^T                      (keys x queries; SS GEMMs)
//   P^T = exp2(S^T * scale_log2 - lse_log2),  dS^T = P^T * (dP^T - delta)   (elementwise, fp32)
//   dV += P^T dO, dK += dS^T Q
// and, after every warpgroup has put dS in shared memory, its columns of dQ = dS K (queries x d, warpgroups
// along d), added into the fp32 dq accumulator in global memory.
// Computing S and dP transposed puts the key index on the accumulator rows, so P^T and dS^T are the A operands
// of the dV/dK GEMMs and dS^T's rows (keys) are the K dimension of dQ = dS K. Two ways to split the work:
// * kBlockN = 64 x warpgroups (d <= 128, MLA 128x64): each warpgroup owns 64 keys in every GEMM; P^T and dS^T
//   are register A operands of dV/dK (RS), and only dS^T goes through shared memory (for dQ).
// * kBlockN = 64 with two warpgroups (d = 256, where 64 keys x d of dK + dV already take 128 registers per
//   thread of each warpgroup; MLA 192x128, where 64 keys x (d + d_v) would take 160): the warpgroups split
//   S^T/dP^T along queries and dK/dV along d, so P^T and dS^T both go through shared memory and dV/dK are SS
//   GEMMs.
// MLA (kHeadDimV < kHeadDim): S^T, dK and dQ run over q/k's d; dP^T (its reduction), dV, V and dO over d_v.
// kBlockM = 80 (FA3's non-causal d=128 tile; bwd_tile_m picks it): 80 queries are a legal WGMMA N but no M, so
// S^T / dP^T / dV / dK keep queries on N or K as above, and dQ is computed transposed, dQ^T = K^T dS^T (d x
// queries, warpgroups along d: M = 64 columns each, N = 80 queries, K = the keys; kDqSwapAB), with the 128-row
// tile's register plan (kLateDv, below).
// kBlockM = 128 (FA3's d=64 tile, policy bwd64.block_m=128): S^T / dP^T are 64 keys x 128 queries per warpgroup
// (128 accumulator registers), so dQ = dS K splits the queries instead of d (kDqRowsSplit: 64 queries x d per
// warpgroup, 32 registers at d = 64), and the step is arranged to fit 240 registers (kLateDv, bwd_mainloop.h):
// accumulator values ended every step, the stats and the mask folded into the GEMMs' starting values, dV issued once
// dS^T is formed (S^T, dP^T, P^T and dK/dV never live together).
#pragma once

#include <type_traits>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "bwd_layout.h"
#include "rows_view.h"

namespace fa3jax {

using namespace cute;

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNumMmaWG_, int kStages_,
          int kProducerRegs_, int kConsumerRegs_, bool kDqRed_, int kDqBufs_, bool kVarlen_ = false,
          int kHeadDimV_ = kHeadDim_, bool kWriterWarp_ = false, bool kLpt_ = false, bool kL2Hint_ = false,
          bool kMaskSplit_ = false>
struct BwdKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;    // q/k: S^T's reduction, dK, dQ
  static constexpr int kHeadDimV = kHeadDimV_;  // v/dO (MLA: smaller): dP^T's reduction, dV
  static constexpr int kBlockM = kBlockM_;  // queries per step of the loop
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kStages = kStages_;  // Q / dO / LSE / delta stages in flight
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  static constexpr bool kDqRed = kDqRed_;  // dQ partials by vector reductions from registers, not a bulk reduce
  static constexpr int kDqBufs = kDqRed ? 0 : kDqBufs_;  // dQ staging buffers (bulk adds in flight per warpgroup)
  static constexpr bool kVarlen = kVarlen_;  // packed sequences (cu_seqlens): per-CTA SeqInfo, bounded TMA views
  // A/B switches (generate_instantiations.py BWD_AB): a dQ writer warp issues the staged bulk adds (bulk path
  // only); heaviest-first key-block order for causal-like masks; L2 evict-last hints on Q, dO and the dQ adds.
  static constexpr bool kWriterWarp = kWriterWarp_ && !kDqRed;
  static constexpr bool kLpt = kLpt_;
  static constexpr bool kL2Hint = kL2Hint_;
  static constexpr bool kMaskSplit = kMaskSplit_;  // exp2 loop without the element mask for unmasked blocks
  using ClusterShape = Shape<_1, _1, _1>;

  static constexpr int kNumMmaWG = kNumMmaWG_;
  static constexpr int kWgKeys = kBlockN / 64;          // warpgroups along keys in S^T / dP^T
  static constexpr int kWgQ = kNumMmaWG / kWgKeys;      // ... and along queries
  static constexpr bool kPInSmem = kWgQ > 1;            // P^T / dS^T through shared memory, dV / dK as SS GEMMs
  static_assert(kWgKeys * kWgQ == kNumMmaWG && (!kPInSmem || kWgKeys == 1), "unsupported warpgroup split");
  static constexpr int kNumMmaThreads = kNumMmaWG * 128;
  static constexpr int kNumThreads = kNumMmaThreads + 128;  // + one producer warpgroup
  static constexpr int kLaunchRegs = (65536 / kNumThreads) / 8 * 8;
  static_assert(kProducerRegs * 128 + kConsumerRegs * kNumMmaThreads <= kLaunchRegs * kNumThreads,
                "register reallocation exceeds the CTA's launch allocation (the kernel would hang)");
  // dQ^T = K^T dS^T (bwd_layout.h): query tiles that are no multiple of WGMMA's M.
  static constexpr bool kDqSwapAB = bwd_dq_swapped(kBlockM);
  static_assert(kBlockN % 64 == 0 && kBlockM % 16 == 0 && (kBlockM % 64 == 0 || kDqSwapAB) &&
                kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kHeadDimV <= kHeadDim);
  // dQ with the warpgroups along queries (bwd_layout.h): only with register P^T / dS^T and 64 queries each.
  static constexpr bool kDqRowsSplit = bwd_dq_rows_split(kBlockM);
  static_assert(!kDqRowsSplit || (kNumMmaWG * 64 == kBlockM && kNumMmaWG == kWgKeys));
  static constexpr int kDqCols = kDqRowsSplit ? kHeadDim : kHeadDim / kNumMmaWG;  // dQ columns per warpgroup
  static constexpr int kDqSlice = kBlockM * kHeadDim / kNumMmaWG;  // dQ floats per warpgroup (bwd_layout.h)
  static_assert(kDqCols % 16 == 0);
  // The wide steps' register plan (bwd_mainloop.h): S^T + dP^T take 128 registers at 128 queries, and at 80 queries
  // they sit beside dK/dV and dQ^T (without it the 80-row kernel spilled 108 B and its wgmmas were serialized).
  static constexpr bool kLateDv = kDqRowsSplit || kDqSwapAB;
  static_assert(!kDqSwapAB || (!kPInSmem && kDqCols == 64),
                "a swapped dQ needs one WGMMA M (64 columns of d) per warpgroup and P^T / dS^T in registers");
  static constexpr int kDkCols = kPInSmem ? kHeadDim / kNumMmaWG : kHeadDim;    // dK columns per warpgroup
  static constexpr int kDvCols = kPInSmem ? kHeadDimV / kNumMmaWG : kHeadDimV;  // dV columns per warpgroup

  using BlkM = Int<kBlockM>;
  using BlkN = Int<kBlockN>;
  using HDim = Int<kHeadDim>;
  using HDimV = Int<kHeadDimV>;
  using AtomAlongM = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using AtomAlongN = Layout<Shape<_1, Int<kNumMmaWG>, _1>>;

  // S^T = K Q^T and dP^T = V dO^T: (keys, queries, d), A and B K-major in smem.
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM / kWgQ>, HDim>>(),
      Layout<Shape<Int<kWgKeys>, Int<kWgQ>, _1>>{}));
  // (The selector's K only picks the atom: the same tiled MMA serves dP^T's d_v-long reduction.)
  // dV += P^T dO and dK += dS^T Q: (keys, d_v or d, queries), B = dO / Q viewed as (d_v / d, queries); A in
  // registers (warpgroups along keys) or, kPInSmem, P^T / dS^T from shared memory (warpgroups along d_v / d).
  template <int kDim, int kCols>
  using TiledMmaGrad = std::conditional_t<
      kPInSmem,
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kCols>, BlkM>,
                                                   GMMA::Major::K, GMMA::Major::MN>(),
                              AtomAlongN{})),
      decltype(make_tiled_mma(GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kDim>, BlkM>,
                                                   GMMA::Major::K, GMMA::Major::MN>(),
                              AtomAlongM{}))>;
  using TiledMmadK = TiledMmaGrad<kHeadDim, kDkCols>;
  using TiledMmadV = TiledMmaGrad<kHeadDimV, kDvCols>;
  // dQ = dS K: (queries, d, keys), warpgroups along d; A = dS (queries, keys) and B = K viewed as (d, keys),
  // both MN-major.
  // kDqSwapAB: dQ^T = K^T dS^T: (d, queries, keys), warpgroups along d; A = K^T (d, keys) and B = dS (queries,
  // keys), both MN-major as well. kDqRowsSplit: dQ = dS K with the warpgroups along queries (64 each).
  using TiledMmadQ = std::conditional_t<
      kDqSwapAB,
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, BlkM, BlkN>,
                                                   GMMA::Major::MN, GMMA::Major::MN>(),
                              AtomAlongM{})),
      std::conditional_t<
          kDqRowsSplit,
          decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, HDim, BlkN>,
                                                       GMMA::Major::MN, GMMA::Major::MN>(),
                                  AtomAlongM{})),
          decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDqCols>, BlkN>,
                                                       GMMA::Major::MN, GMMA::Major::MN>(),
                                  AtomAlongN{}))>>;
  // dQ's accumulator tile: (queries, d), or (d, queries) with kDqSwapAB.
  using DqTile = std::conditional_t<kDqSwapAB, Shape<HDim, BlkM>, Shape<BlkM, HDim>>;

  // K-major swizzle atom of a tensor whose transpose is an MN-major B operand sliced kCols wide per warpgroup.
  // An MN-major descriptor walks whole atoms from its start address, so a slice must either stay inside one atom
  // (d = 64's 32-column dQ slices) or consist of whole ones: 128-byte swizzle (64 elements of 16 bits) where it
  // can, else 64-byte (32 elements; MLA d = 192: dQ's and dK's 96-column slices of K^T and Q^T).
  static_assert(sizeof(Element) == 2);
  template <int kCols>
  static constexpr bool kSw128 = kCols % 64 == 0 || 64 % kCols == 0;
  template <int kCols>
  using SwizzleAtom = std::conditional_t<kSw128<kCols>, GMMA::Layout_K_SW128_Atom<Element>,
                                         GMMA::Layout_K_SW64_Atom<Element>>;
  static_assert((kSw128<kDqCols> || kDqCols % 32 == 0) && (kSw128<kDkCols> || kDkCols % 32 == 0) &&
                    (kSw128<kDvCols> || kDvCols % 32 == 0),
                "no swizzle atom fits the warpgroups' column slices");
  using SmemLayoutK = decltype(tile_to_shape(SwizzleAtom<kDqCols>{}, Shape<BlkN, HDim>{}));
  using SmemLayoutV = decltype(tile_to_shape(SwizzleAtom<kHeadDimV>{}, Shape<BlkN, HDimV>{}));  // A of dP^T only
  using SmemLayoutQ = decltype(tile_to_shape(SwizzleAtom<kDkCols>{}, Shape<BlkM, HDim, Int<kStages>>{}));
  using SmemLayoutdO = decltype(tile_to_shape(SwizzleAtom<kDvCols>{}, Shape<BlkM, HDimV, Int<kStages>>{}));
  // Transposed views of the same bytes, as the MN-major B operands (d, rows): K-major swizzled rows of an atom's
  // width are also the MN-major canonical layout of the transpose.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<HDim, BlkM, Int<kStages>>{}, Stride<BlkM, _1, Int<kBlockM * kHeadDim>>{})));
  using SmemLayoutdOt = decltype(composition(
      SmemLayoutdO{},
      make_layout(Shape<HDimV, BlkM, Int<kStages>>{}, Stride<BlkM, _1, Int<kBlockM * kHeadDimV>>{})));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutK{}, make_layout(Shape<HDim, BlkN>{}, Stride<BlkN, _1>{})));
  // dS^T as (keys, queries, buffer) with queries contiguous, written from the dS^T accumulators by stmatrix like
  // the forward's O; its transpose (queries, keys) is the MN-major A operand of dQ = dS K (or B of dQ^T). The
  // widest swizzle whose atom divides the queries: 128 bytes at 64 rows, 32 bytes (16 queries) at 80.
  using SwizzleAtomdS = std::conditional_t<
      kBlockM % 64 == 0, GMMA::Layout_K_SW128_Atom<Element>,
      std::conditional_t<kBlockM % 32 == 0, GMMA::Layout_K_SW64_Atom<Element>, GMMA::Layout_K_SW32_Atom<Element>>>;
  using SmemLayoutdSt = decltype(tile_to_shape(SwizzleAtomdS{}, Shape<BlkN, BlkM, _2>{}));
  using SmemLayoutdS = decltype(composition(
      SmemLayoutdSt{}, make_layout(Shape<BlkM, BlkN, _2>{}, Stride<BlkN, _1, Int<kBlockM * kBlockN>>{})));

  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStride{}));
  template <class G>
  static auto make_tma_q(G const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutQ{}(_, _, _0{}), Shape<BlkM, HDim>{}, _1{});
  }
  template <class G>
  static auto make_tma_do(G const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutdO{}(_, _, _0{}), Shape<BlkM, HDimV>{}, _1{});
  }
  template <class G>
  static auto make_tma_k(G const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutK{}, Shape<BlkN, HDim>{}, _1{});
  }
  template <class G>
  static auto make_tma_v(G const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutV{}, Shape<BlkN, HDimV>{}, _1{});
  }
  using TmaQ = decltype(make_tma_q(std::declval<GTensor>()));
  using TmadO = decltype(make_tma_do(std::declval<GTensor>()));
  using TmaK = decltype(make_tma_k(std::declval<GTensor>()));
  using TmaV = decltype(make_tma_v(std::declval<GTensor>()));
  // Varlen: q, dO, k and v are loaded through packed-rows views (rows_view.h, launch.h encode_rows_view) whose
  // descriptor base is the tensor itself, as boxes of one swizzle row of each tile's atom (128 or 64 bytes).
  template <class Tma>
  using TmaField = std::conditional_t<kVarlen, cute::TmaDescriptor, Tma>;
  template <int kCols>
  static constexpr int kBoxCols = kSw128<kCols> ? 64 : 32;
  static constexpr int kBoxColsQ = kBoxCols<kDkCols>, kBoxColsdO = kBoxCols<kDvCols>;
  static constexpr int kBoxColsK = kBoxCols<kDqCols>, kBoxColsV = kBoxCols<kHeadDimV>;

  static constexpr uint32_t kBytesRow = kBlockM * sizeof(float);
  // Q, dO, lse_log2, delta
  static constexpr uint32_t kBytesStage = kBlockM * (kHeadDim + kHeadDimV) * sizeof(Element) + 2 * kBytesRow;
  static constexpr uint32_t kBytesKV = kBlockN * (kHeadDim + kHeadDimV) * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  struct Empty {};
  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>, 1024> smem_v;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutdO>, 1024> smem_do;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutdSt>, 1024> smem_ds;
    // P^T, laid out like dS^T (kPInSmem only: no bytes otherwise, d=128 fills 227 KiB without it).
    std::conditional_t<kPInSmem, cute::array_aligned<Element, cute::cosize_v<SmemLayoutdSt>, 1024>, Empty> smem_p;
    // dQ partials, kDqBufs x one kDqSlice fp32 slice per warpgroup in accumulator-register order (bwd_layout.h);
    // unused with kDqRed.
    alignas(128) cute::array_aligned<float, kDqRed ? 32 : kDqBufs * kBlockM * kHeadDim, 128> smem_dq;
    alignas(16) float smem_lse[kStages][kBlockM];
    alignas(16) float smem_delta[kStages][kBlockM];
    typename Pipeline::SharedStorage pipeline_q;
    alignas(8) uint64_t barrier_kv;
    // kWriterWarp: per (warpgroup, staging buffer), "partial staged" (128 consumer arrivals) and "add has read
    // it" (1 writer arrival).
    alignas(8) uint64_t barrier_dq_full[kWriterWarp ? kNumMmaWG : 1][kWriterWarp ? kDqBufs : 1];
    alignas(8) uint64_t barrier_dq_empty[kWriterWarp ? kNumMmaWG : 1][kWriterWarp ? kDqBufs : 1];
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "tiles x stages exceed sm90's 227 KiB of shared memory per block");

  struct Params {
    TmaField<TmaQ> tma_q;
    TmaField<TmadO> tma_do;
    TmaField<TmaK> tma_k;
    TmaField<TmaV> tma_v;
    void* dk;  // like k: rows of hk x d (the call's d)
    void* dv;  // like v: rows of hk x d_v (the call's d_v)
    float* dq_accum;        // kBlockM x kHeadDim tiles per padded row block (bwd_layout.h, bwd_stat_row0)
    float const* lse_log2;  // one float per padded row
    float const* delta;
    int* dq_sem;            // deterministic: warpgroups turn counters per padded row block, zeroed; else nullptr
    // Dense: the call's lengths. Varlen: the totals (rows of the packed tensors), with the sequences in
    // cu_seqlens_q/k (+ seqused_k, query lengths capped at max_seqlen_q) and their padded stat rows at
    // bwd_stat_row0 (attn_params.h).
    int batch, seqlen_q, seqlen_k, num_heads_q, num_heads_k, group_size, num_m_blocks;
    int window_left, window_right;
    float scale_log2;   // multiplier of the (capped) raw score inside exp2
    float softcap_pre;  // softmax_scale / softcap (softcap path only)
    float softcap;      // 0: off
    float dk_scale;     // softmax_scale: dK = scale * dS^T Q
    int const* cu_seqlens_q;  // varlen only (else nullptr)
    int const* cu_seqlens_k;
    int const* seqused_k;
    int max_seqlen_q;
    int64_t stat_rows;  // varlen: padded stat rows per query head
    // The call's head dims (multiples of 8): dK's (<= kHeadDim) and dV's (<= kHeadDimV) row widths, columns written.
    // d_v == d, or (MLA) exactly the kernel's pair.
    int head_dim;
    int head_dim_v;
    int lpt_group;  // kLpt: (kv head, batch) pairs per L2 section of the heaviest-first order; 0: blockIdx order
    int dq_rotate;  // deterministic: 1 where a (kv head, batch)'s key blocks fit on the GPU at once (DqOrder)
  };
};

}  // namespace fa3jax

// Compile-time description of one backward main kernel: tiles, the five MMAs, shared-memory layouts, TMA types.
//
// One CTA owns one key block of kBlockN keys (FA3 paper, section 3.3 / appendix B): dK and dV stay in registers
// for the whole loop over the query blocks that see it. Each consumer warpgroup owns 64 of the block's keys and
// computes, per query block of kBlockM rows,
//   S^T = K Q^T, dP^T = V dO^T                      (keys x queries; SS GEMMs)
//   P^T = exp2(S^T * scale_log2 - lse_log2),  dS^T = P^T * (dP^T - delta)   (elementwise, fp32)
//   dV += P^T dO, dK += dS^T Q                      (A from registers: the accumulators converted in place)
// and, after both warpgroups have put dS in shared memory, its half of dQ = dS K (queries x d, warpgroups along
// d), which is added into the fp32 dq accumulator in global memory with one bulk reduce-add per warpgroup.
// Computing S and dP transposed puts the key index on the accumulator rows, so P^T and dS^T are register A
// operands of the dV/dK GEMMs with no shuffle, and dS^T's rows (keys) are the K dimension of dQ = dS K.
#pragma once

#include <type_traits>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace fa3jax {

using namespace cute;

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, int kProducerRegs_,
          int kConsumerRegs_, bool kDqRed_>
struct BwdKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // queries per step of the loop
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kStages = kStages_;  // Q / dO / LSE / delta stages in flight
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  static constexpr bool kDqRed = kDqRed_;  // dQ partials by vector reductions from registers, not a bulk reduce
  using ClusterShape = Shape<_1, _1, _1>;

  static constexpr int kNumMmaWG = kBlockN / 64;  // one warpgroup per 64 keys
  static constexpr int kNumMmaThreads = kNumMmaWG * 128;
  static constexpr int kNumThreads = kNumMmaThreads + 128;  // + one producer warpgroup
  static constexpr int kLaunchRegs = (65536 / kNumThreads) / 8 * 8;
  static_assert(kProducerRegs * 128 + kConsumerRegs * kNumMmaThreads <= kLaunchRegs * kNumThreads,
                "register reallocation exceeds the CTA's launch allocation (the kernel would hang)");
  static_assert(kBlockN % 64 == 0 && kBlockM % 64 == 0 && kHeadDim % 64 == 0);
  static constexpr int kDqCols = kHeadDim / kNumMmaWG;  // dQ columns per warpgroup
  static_assert(kDqCols % 16 == 0);

  using BlkM = Int<kBlockM>;
  using BlkN = Int<kBlockN>;
  using HDim = Int<kHeadDim>;
  using AtomAlongM = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using AtomAlongN = Layout<Shape<_1, Int<kNumMmaWG>, _1>>;

  // S^T = K Q^T and dP^T = V dO^T: (keys, queries, d), A and B K-major in smem.
  using TiledMmaSdP =
      decltype(make_tiled_mma(GMMA::ss_op_selector<Element, Element, float, Shape<_64, BlkM, HDim>>(), AtomAlongM{}));
  // dV += P^T dO and dK += dS^T Q: (keys, d, queries), A in registers, B = dO / Q viewed as (d, queries).
  using TiledMmadKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, HDim, BlkM>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomAlongM{}));
  // dQ = dS K: (queries, d, keys), warpgroups along d; A = dS (queries, keys) and B = K viewed as (d, keys),
  // both MN-major.
  using TiledMmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDqCols>, BlkN>, GMMA::Major::MN,
                           GMMA::Major::MN>(),
      AtomAlongN{}));

  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkN, HDim>{}));
  using SmemLayoutQ =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkM, HDim, Int<kStages>>{}));
  // Transposed views of the same bytes, as the MN-major B operands (d, rows): K-major 128-byte-swizzled rows of
  // 64 elements are also the MN-major canonical layout of the transpose.
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<HDim, BlkM, Int<kStages>>{}, Stride<BlkM, _1, Int<kBlockM * kHeadDim>>{})));
  using SmemLayoutKt =
      decltype(composition(SmemLayoutK{}, make_layout(Shape<HDim, BlkN>{}, Stride<BlkN, _1>{})));
  // dS^T as (keys, queries, buffer) with queries contiguous, written from the dS^T accumulators by stmatrix like
  // the forward's O; its transpose (queries, keys) is the MN-major A operand of dQ = dS K.
  using SmemLayoutdSt = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkN, BlkM, _2>{}));
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
  static auto make_tma_k(G const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutK{}, Shape<BlkN, HDim>{}, _1{});
  }
  using TmaQ = decltype(make_tma_q(std::declval<GTensor>()));
  using TmaK = decltype(make_tma_k(std::declval<GTensor>()));

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesRow = kBlockM * sizeof(float);
  static constexpr uint32_t kBytesStage = 2 * kBytesQ + 2 * kBytesRow;  // Q, dO, lse_log2, delta
  static constexpr uint32_t kBytesKV = 2 * kBlockN * kHeadDim * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> smem_v;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> smem_do;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutdSt>, 1024> smem_ds;
    // dQ partials, one kBlockM x kDqCols fp32 slice per warpgroup in accumulator-register order (bwd_layout.h).
    alignas(128) cute::array_aligned<float, kBlockM * kHeadDim, 128> smem_dq;
    alignas(16) float smem_lse[kStages][kBlockM];
    alignas(16) float smem_delta[kStages][kBlockM];
    typename Pipeline::SharedStorage pipeline_q;
    alignas(8) uint64_t barrier_kv;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "tiles x stages exceed sm90's 227 KiB of shared memory per block");

  struct Params {
    TmaQ tma_q;
    TmaQ tma_do;
    TmaK tma_k;
    TmaK tma_v;
    void* dk;
    void* dv;
    float* dq_accum;        // (b, hq, m blocks, kBlockM * d) tiles, bwd_layout.h
    float const* lse_log2;  // (b, hq, rows padded to kBlockM)
    float const* delta;
    int* dq_sem;            // deterministic: (b, hq, m blocks, warpgroups) turn counters, zeroed; else nullptr
    int batch, seqlen_q, seqlen_k, num_heads_q, num_heads_k, group_size, num_m_blocks;
    int window_left, window_right;
    float scale_log2;   // multiplier of the (capped) raw score inside exp2
    float softcap_pre;  // softmax_scale / softcap (softcap path only)
    float softcap;      // 0: off
    float dk_scale;     // softmax_scale: dK = scale * dS^T Q
  };
};

}  // namespace fa3jax

// Compile-time description of one forward kernel: tiles, MMAs, shared-memory layouts, TMA types, params.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

namespace fa3jax {

using namespace cute;

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, int kProducerRegs_,
          int kConsumerRegs_>
struct FwdKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  static_assert(kBlockM % 64 == 0 && kHeadDim % 64 == 0 && kBlockN % 16 == 0);

  static constexpr int kNumMmaWG = kBlockM / 64;
  static constexpr int kNumMmaThreads = kNumMmaWG * 128;
  static constexpr int kNumThreads = kNumMmaThreads + 128;  // + one producer warpgroup
  static_assert(kProducerRegs * 128 + kConsumerRegs * kNumMmaThreads <= 65536);

  using BlkM = Int<kBlockM>;
  using BlkN = Int<kBlockN>;
  using HDim = Int<kHeadDim>;

  // S = Q K^T: both operands K-major in smem. O += P V: P from registers, V^T MN-major in smem.
  using AtomLayout = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, BlkN, HDim>>(), AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, HDim, BlkN>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayout{}));
  // WGMMA N sizes that are not multiples of 32 (d=256's 80-wide key tile) need the extended atoms; without
  // them the selector silently falls back to narrow atoms. Generated TUs define the macro where needed.
  static_assert(decltype(tile_size<1>(TiledMmaQK{}))::value == kBlockN,
                "QK^T atom narrower than kBlockN: define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED before any CuTe include");

  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkM, HDim>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkN, HDim, Int<kStages>>{}));
  // V stored transposed-view: (d, n) with d contiguous (= V's natural row-major layout), MN-major for the MMA.
  using SmemLayoutVt =
      decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{}, Shape<HDim, BlkN, Int<kStages>>{}));

  // Global tensors: Q/K as (seq, d, head, batch); V as (d, seq, head, batch).
  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStrideQK = Stride<int64_t, _1, int64_t, int64_t>;
  using GStrideVt = Stride<_1, int64_t, int64_t, int64_t>;

  using TmaQ = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStrideQK{}),
      SmemLayoutQ{}, Shape<BlkM, HDim>{}, _1{}));
  using TmaK = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStrideQK{}),
      SmemLayoutK{}(_, _, _0{}), Shape<BlkN, HDim>{}, _1{}));
  using TmaV = decltype(make_tma_copy(
      SM90_TMA_LOAD{}, make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStrideVt{}),
      SmemLayoutVt{}(_, _, _0{}), Shape<HDim, BlkN>{}, _1{}));

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesKV = kBlockN * kHeadDim * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutVt>, 1024> smem_v;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    alignas(8) uint64_t barrier_q;
  };
  // + 1024 so the kernel can align the dynamic smem base itself.
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "tiles x stages exceed sm90's 227 KiB of shared memory per block");

  // Everything the kernel needs; passed as a __grid_constant__ parameter (TMA descriptors inside).
  struct Params {
    TmaQ tma_q;
    TmaK tma_k;
    TmaV tma_v;
    void* out;
    float* lse;
    int seqlen_q, seqlen_k, num_heads_q, num_heads_k, group_size;
    int window_left, window_right;
    float scale_log2;    // multiplier of the (capped) raw score inside exp2
    float softcap_pre;   // softmax_scale / softcap (softcap path only)
    float softcap;       // 0: off
    float lse_scale;     // converts a max in raw-score units to natural-log units
  };
};

}  // namespace fa3jax

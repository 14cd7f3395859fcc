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
// * kBlockN = 64 x warpgroups (d <= 128): each warpgroup owns 64 keys in every GEMM; P^T and dS^T are register
//   A operands of dV/dK (RS), and only dS^T goes through shared memory (for dQ).
// * kBlockN = 64 with two warpgroups (d = 256, where 64 keys x d of dK + dV already take 128 registers per
//   thread of each warpgroup): the warpgroups split S^T/dP^T along queries and dK/dV along d, so P^T and dS^T
//   both go through shared memory and dV/dK are SS GEMMs.
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

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNumMmaWG_, int kStages_,
          int kProducerRegs_, int kConsumerRegs_, bool kDqRed_, int kDqBufs_, bool kVarlen_ = false>
struct BwdKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // queries per step of the loop
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kStages = kStages_;  // Q / dO / LSE / delta stages in flight
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  static constexpr bool kDqRed = kDqRed_;  // dQ partials by vector reductions from registers, not a bulk reduce
  static constexpr int kDqBufs = kDqRed ? 0 : kDqBufs_;  // dQ staging buffers (bulk adds in flight per warpgroup)
  static constexpr bool kVarlen = kVarlen_;  // packed sequences (cu_seqlens): per-CTA SeqInfo, bounded TMA views
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
  static_assert(kBlockN % 64 == 0 && kBlockM % 64 == 0 && kHeadDim % 64 == 0);
  static constexpr int kDqCols = kHeadDim / kNumMmaWG;  // dQ columns per warpgroup
  static_assert(kDqCols % 16 == 0);
  static constexpr int kDkvCols = kPInSmem ? kHeadDim / kNumMmaWG : kHeadDim;  // dK / dV columns per warpgroup

  using BlkM = Int<kBlockM>;
  using BlkN = Int<kBlockN>;
  using HDim = Int<kHeadDim>;
  using AtomAlongM = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using AtomAlongN = Layout<Shape<_1, Int<kNumMmaWG>, _1>>;

  // S^T = K Q^T and dP^T = V dO^T: (keys, queries, d), A and B K-major in smem.
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM / kWgQ>, HDim>>(),
      Layout<Shape<Int<kWgKeys>, Int<kWgQ>, _1>>{}));
  // dV += P^T dO and dK += dS^T Q: (keys, d, queries), B = dO / Q viewed as (d, queries); A in registers
  // (warpgroups along keys) or, kPInSmem, P^T / dS^T from shared memory (warpgroups along d).
  using TiledMmadKVRS = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, HDim, BlkM>, GMMA::Major::K, GMMA::Major::MN>(),
      AtomAlongM{}));
  using TiledMmadKVSS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kDkvCols>, BlkM>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomAlongN{}));
  using TiledMmadKV = std::conditional_t<kPInSmem, TiledMmadKVSS, TiledMmadKVRS>;
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

  struct Empty {};
  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> smem_v;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> smem_do;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutdSt>, 1024> smem_ds;
    // P^T, laid out like dS^T (kPInSmem only: no bytes otherwise, d=128 fills 227 KiB without it).
    std::conditional_t<kPInSmem, cute::array_aligned<Element, cute::cosize_v<SmemLayoutdSt>, 1024>, Empty> smem_p;
    // dQ partials, kDqBufs x one kBlockM x kDqCols fp32 slice per warpgroup in accumulator-register order
    // (bwd_layout.h); unused with kDqRed.
    alignas(128) cute::array_aligned<float, kDqRed ? 32 : kDqBufs * kBlockM * kHeadDim, 128> smem_dq;
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
    float* dq_accum;        // kBlockM x d tiles per padded row block (bwd_layout.h, bwd_stat_row0)
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
  };
};

}  // namespace fa3jax

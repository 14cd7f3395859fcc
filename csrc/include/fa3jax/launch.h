// Host-side launcher of one forward instantiation: builds the TMA descriptors for this call (plain structs,
// passed by value in the kernel's __grid_constant__ params), sets the smem attribute and launches.
// Included only by the generated per-instantiation translation units.
#pragma once

#include <cmath>
#include <cutlass/numeric_types.h>

#include "fwd_api.h"
#include "kernel.h"
#include "policy.h"

namespace fa3jax {

template <DType kDType> struct ElementOf;
template <> struct ElementOf<DType::kBF16> { using type = cutlass::bfloat16_t; };
template <> struct ElementOf<DType::kFP16> { using type = cutlass::half_t; };

template <DType kDType, int kHeadDim>
using FwdTraitsFor = FwdKernelTraits<typename ElementOf<kDType>::type, kHeadDim, FwdPolicy<kHeadDim>::kBlockM,
                                     FwdPolicy<kHeadDim>::kBlockN, FwdPolicy<kHeadDim>::kStages,
                                     FwdPolicy<kHeadDim>::kProducerRegs, FwdPolicy<kHeadDim>::kConsumerRegs>;

template <DType kDType, int kHeadDim>
FwdStatus launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using KT = FwdTraitsFor<kDType, kHeadDim>;
  using Element = typename KT::Element;
  constexpr int D = kHeadDim;
  int const b = p.batch, sq = p.seqlen_q, sk = p.seqlen_k, hq = p.num_heads_q, hk = p.num_heads_k;

  auto q = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.q)), make_shape(sq, D, hq, b),
                       make_stride(int64_t(hq) * D, _1{}, int64_t(D), int64_t(sq) * hq * D));
  auto k = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k)), make_shape(sk, D, hk, b),
                       make_stride(int64_t(hk) * D, _1{}, int64_t(D), int64_t(sk) * hk * D));
  auto vt = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.v)), make_shape(D, sk, hk, b),
                        make_stride(_1{}, int64_t(hk) * D, int64_t(D), int64_t(sk) * hk * D));

  typename KT::Params kp{
      make_tma_copy(SM90_TMA_LOAD{}, q, typename KT::SmemLayoutQ{}, Shape<typename KT::BlkM, typename KT::HDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, k, typename KT::SmemLayoutK{}(_, _, _0{}), Shape<typename KT::BlkN, typename KT::HDim>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, vt, typename KT::SmemLayoutVt{}(_, _, _0{}), Shape<typename KT::HDim, typename KT::BlkN>{}, _1{}),
      p.out,
      p.lse,
      sq, sk, hq, hk, hq / hk,
      p.window_left < 0 ? -1 : p.window_left,
      p.window_right < 0 ? -1 : p.window_right,
      0.f, 0.f, 0.f, 0.f};
  constexpr float kLog2e = 1.4426950408889634f;
  if (p.softcap > 0.f) {
    kp.softcap = p.softcap;
    kp.softcap_pre = p.softmax_scale / p.softcap;
    kp.scale_log2 = kLog2e;
    kp.lse_scale = 1.f;
  } else {
    kp.scale_log2 = p.softmax_scale * kLog2e;
    kp.lse_scale = p.softmax_scale;
  }

  auto kernel = &fwd_kernel<KT>;
  constexpr int smem = KT::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return {err, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)"};
  int const num_m_blocks = (sq + KT::kBlockM - 1) / KT::kBlockM;
  dim3 grid = StaticTileScheduler::grid(num_m_blocks, hq, b);
  kernel<<<grid, KT::kNumThreads, smem, stream>>>(kp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "kernel launch"};
  return {};
}

}  // namespace fa3jax

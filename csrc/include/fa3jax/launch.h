// Host-side launcher of one forward instantiation: builds the TMA descriptors for this call (plain structs,
// passed by value in the kernel's __grid_constant__ params), sets the smem attribute and launches.
// Included only by the generated per-instantiation translation units.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <cutlass/numeric_types.h>

#include "attn_params.h"
#include "kernel.h"
#include "policy.h"  // generated (generate_instantiations.py)

namespace fa3jax {

template <DType kDType> struct ElementOf;
template <> struct ElementOf<DType::kBF16> { using type = cutlass::bfloat16_t; };
template <> struct ElementOf<DType::kFP16> { using type = cutlass::half_t; };

template <class P, DType kDType, int kHeadDim>
using FwdTraitsOf = FwdKernelTraits<typename ElementOf<kDType>::type, kHeadDim, P::kBlockM, P::kBlockN, P::kStages,
                                    P::kProducerRegs, P::kConsumerRegs, P::kTmaEpilogue>;
template <DType kDType, int kHeadDim, bool kWide>
using FwdTraitsFor =
    FwdTraitsOf<std::conditional_t<kWide, FwdPolicyWide<kHeadDim>, FwdPolicy<kHeadDim>>, kDType, kHeadDim>;

template <DType kDType, int kHeadDim, bool kWide>
FwdStatus launch_fwd(const FwdParams& fp, cudaStream_t stream) {
  using KT = FwdTraitsFor<kDType, kHeadDim, kWide>;
  using Element = typename KT::Element;
  constexpr int D = kHeadDim;
  AttnCore const& p = fp.core;
  int const b = p.batch, sq = p.seqlen_q, sk = p.seqlen_k, hq = p.num_heads_q, hk = p.num_heads_k;

  // q/k/v through TMA at the caller's strides; out is dense (the register epilogue addresses it so).
  auto q = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.q)), make_shape(sq, D, hq, b),
                       make_stride(p.q_stride.row, _1{}, p.q_stride.head, p.q_stride.batch));
  auto k = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.k)), make_shape(sk, D, hk, b),
                       make_stride(p.k_stride.row, _1{}, p.k_stride.head, p.k_stride.batch));
  auto o = make_tensor(make_gmem_ptr(static_cast<Element*>(fp.out)), make_shape(sq, D, hq, b),
                       make_stride(int64_t(hq) * D, _1{}, int64_t(D), int64_t(sq) * hq * D));
  auto vt = make_tensor(make_gmem_ptr(static_cast<Element const*>(p.v)), make_shape(D, sk, hk, b),
                        make_stride(_1{}, p.v_stride.row, p.v_stride.head, p.v_stride.batch));

  typename KT::Params kp{
      KT::make_tma_q(q),
      KT::make_tma_k(k),
      KT::make_tma_v(vt),
      KT::make_tma_o(o),
      fp.out,
      fp.lse,
      SchedulerParams{},
      b, sq, sk, hq, hk, hq / hk,
      p.window_left < 0 ? -1 : p.window_left,
      p.window_right < 0 ? -1 : p.window_right,
      0.f, 0.f, 0.f, 0.f,
      fp.sinks};
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
  SchedulerParams& sp = kp.sched;
  sp.num_m_units = (sq + KT::kBlockM - 1) / KT::kBlockM;
  sp.num_heads = hq;
  sp.num_hb = hq * b;
  if (int64_t(sp.num_m_units) * sp.num_hb > INT32_MAX) return {cudaErrorInvalidValue, "too many tiles"};
  sp.num_units = sp.num_m_units * sp.num_hb;
  sp.reverse_m = p.window_right >= 0;  // a right bound gives the last query blocks the most keys
  // (head, batch) pairs per section of the heavy-first order: as many as keep their K/V within ~32 MiB of the
  // 50 MiB L2 (H100).
  int64_t const kv_bytes = int64_t(sk) * D * 2 * int64_t(sizeof(Element));
  int64_t const group = (int64_t(32) << 20) / (kv_bytes > 0 ? kv_bytes : 1);
  sp.group = int(group < 1 ? 1 : (group > sp.num_hb ? sp.num_hb : group));
  // Dynamic assignment only where tiles differ in length (causal-like masks): it costs a shared-memory hand-off
  // per tile, and with equal tiles round robin is already balanced.
  sp.counter = nullptr;
  if (fp.workspace != nullptr && (p.window_left >= 0 || p.window_right >= 0)) {
    sp.counter = static_cast<int*>(fp.workspace);
    err = cudaMemsetAsync(sp.counter, 0, sizeof(int), stream);
    if (err != cudaSuccess) return {err, "cudaMemsetAsync(tile counter)"};
  }
  int device = 0, num_sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return {err, "cudaDeviceGetAttribute(MultiProcessorCount)"};
  // One CTA per SM (shared memory holds one CTA's tiles).
  dim3 const grid(PersistentTileScheduler::num_ctas(sp, num_sms));
  kernel<<<grid, KT::kNumThreads, smem, stream>>>(kp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "kernel launch"};
  return {};
}

}  // namespace fa3jax

// Host-side launcher of one backward main-kernel instantiation: TMA descriptors for q, dO, k, v, the kernel's
// params, one CTA per (key block, kv head, batch). Included only by the generated per-instantiation units; the
// passes around it (preprocess, postprocess) and the checks are in src/bwd_dispatch.cc.
#pragma once

#include <cmath>
#include <cstdint>

#include "attn_params.h"
#include "bwd_kernel.h"
#include "launch.h"  // ElementOf
#include "policy.h"  // generated (generate_instantiations.py)

namespace fa3jax {

// kBlockM: kBwdBlockM for every call, or the policy's block_m (80, 128) for those bwd_tile_m gives it. These
// kernels keep one dQ staging buffer: d=128 at 80 rows takes K 32 + V 32 + 2 x (Q 20 + dO 20) + dS 40 + dQ 40 =
// 224 KiB, d=64 at 128 rows K 16 + V 16 + 2 x (Q 16 + dO 16) + dS 64 + dQ 32 = 192 KiB: no room for a second.
template <DType kDType, int kHeadDim, int kHeadDimV, bool kVarlen = false, int kBlockM = kBwdBlockM,
          class P = BwdPolicy<kHeadDim, kHeadDimV>>
using BwdTraitsFor = BwdKernelTraits<typename ElementOf<kDType>::type, kHeadDim, kBlockM, P::kBlockN, P::kNumMmaWG,
                                     P::kStages, P::kProducerRegs, P::kConsumerRegs, P::kDqRed != 0,
                                     kBlockM == kBwdBlockM ? P::kDqBufs : 1, kVarlen, kHeadDimV,
                                     P::kWriterWarp != 0, P::kLpt != 0, P::kL2Hint != 0, P::kMaskSplit != 0>;

// One kernel: varlen or dense, kBlockM query rows per step (launch_bwd_main picks).
template <DType kDType, int kHeadDim, int kHeadDimV, bool kVarlen, int kBlockM>
FwdStatus launch_bwd_kernel(const BwdParams& bp, BwdWorkspace const& ws, cudaStream_t stream) {
  using KT = BwdTraitsFor<kDType, kHeadDim, kHeadDimV, kVarlen, kBlockM>;
  // The stat rows were padded for this tile (bwd_tile_m, the one place that picks it).
  if (ws.tile_m != KT::kBlockM) return {cudaErrorInvalidValue, "bwd: workspace tile height differs from the kernel's"};
  using Element = typename KT::Element;
  AttnCore const& c = bp.core;
  int const b = c.batch, sq = c.seqlen_q, sk = c.seqlen_k, hq = c.num_heads_q, hk = c.num_heads_k;
  // The call's head dims (multiples of 8; d <= kHeadDim, d_v <= kHeadDimV; MLA: exactly the kernel's pair): the
  // tensors' extents, so that the kernel-wide TMA boxes zero-fill the columns past them (their dQ/dK/dV columns come
  // out 0: dq_accum keeps them, dK/dV stores skip them).
  int const d = c.head_dim, dv = c.value_dim();
  // Dense: (row, dim, head, batch). Varlen: packed-rows views (launch.h encode_rows_view; bwd_mainloop.h load says
  // how a sequence addresses them), set below.
  auto tensor = [&](void const* ptr, int rows, int dim, int heads, Strides const& s) {
    return make_tensor(make_gmem_ptr(static_cast<Element const*>(ptr)), make_shape(rows, dim, heads, b),
                       make_stride(s.row, _1{}, s.head, s.batch));
  };
  Strides const dense_do{int64_t(hq) * dv, int64_t(dv), int64_t(sq) * hq * dv};  // dO is dense like out
  int const num_m_blocks = (sq + KT::kBlockM - 1) / KT::kBlockM;
  // Varlen: key blocks of the longest sequence in the grid (CTAs past a sequence's keys exit at once).
  int const rows_k = kVarlen ? (c.varlen.max_seqlen_k > 0 ? std::min(c.varlen.max_seqlen_k, sk) : sk) : sk;
  constexpr float kLog2e = 1.4426950408889634f;
  bool const capped = c.softcap > 0.f;
  typename KT::Params kp{
      {},
      {},
      {},
      {},
      bp.dk,
      bp.dv,
      ws.dq_accum,
      ws.lse_log2,
      ws.delta,
      ws.dq_sem,
      b, sq, sk, hq, hk, hq / hk, num_m_blocks,
      c.window_left < 0 ? -1 : c.window_left,
      c.window_right < 0 ? -1 : c.window_right,
      capped ? kLog2e : c.softmax_scale * kLog2e,
      capped ? c.softmax_scale / c.softcap : 0.f,
      capped ? c.softcap : 0.f,
      c.softmax_scale,
      c.varlen.cu_seqlens_q,
      c.varlen.cu_seqlens_k,
      c.varlen.seqused_k,
      c.varlen.max_seqlen_q,
      kVarlen ? bwd_varlen_stat_rows(sq, b) : 0,
      d,
      dv,
      0,
      0};
  if constexpr (kVarlen) {
    // Boxes of one swizzle row of each tile's atom (KT::kBoxCols*) by its rows.
    if (!encode_rows_view<Element>(&kp.tma_q, c.q, c.q_stride.row, c.q_stride.head, d, sq, hq, KT::kBoxColsQ,
                                   KT::kBlockM) ||
        !encode_rows_view<Element>(&kp.tma_do, bp.dout, dense_do.row, dense_do.head, dv, sq, hq, KT::kBoxColsdO,
                                   KT::kBlockM) ||
        !encode_rows_view<Element>(&kp.tma_k, c.k, c.k_stride.row, c.k_stride.head, d, sk, hk, KT::kBoxColsK,
                                   KT::kBlockN) ||
        !encode_rows_view<Element>(&kp.tma_v, c.v, c.v_stride.row, c.v_stride.head, dv, sk, hk, KT::kBoxColsV,
                                   KT::kBlockN))
      return {cudaErrorInvalidValue, "cuTensorMapEncodeTiled (varlen q/dO/k/v views), bwd"};
  } else {
    kp.tma_q = KT::make_tma_q(tensor(c.q, sq, d, hq, c.q_stride));
    kp.tma_do = KT::make_tma_do(tensor(bp.dout, sq, dv, hq, dense_do));
    kp.tma_k = KT::make_tma_k(tensor(c.k, sk, d, hk, c.k_stride));
    kp.tma_v = KT::make_tma_v(tensor(c.v, sk, dv, hk, c.v_stride));
  }
  // kLpt: heaviest key blocks first where a right window bound makes key block 0 the longest (dense, default
  // mode: deterministic mode keeps its descending dispatch, which its turn order relies on). Sections of (kv head,
  // batch) pairs whose Q, dO (group_size query heads) and fp32 dq_accum take ~32 MiB of L2 together.
  if constexpr (KT::kLpt && !kVarlen) {
    if (c.window_right >= 0 && ws.dq_sem == nullptr) {
      int64_t const per_hb = int64_t(hq / hk) * sq * ((d + dv) * int64_t(sizeof(Element)) + d * int64_t(sizeof(float)));
      int64_t const group = (int64_t(32) << 20) / (per_hb > 0 ? per_hb : 1);
      kp.lpt_group = int(std::max<int64_t>(1, std::min<int64_t>(group, int64_t(hk) * b)));
    }
  }

  // bwd_tile_m gives softcap and deterministic calls the 64-row kernel, or one that serves every dense call (kAll).
  // Deterministic mode: kernels of its own where the policy says (kDetKernel: the default ones then carry none of
  // its turn-order bookkeeping), else the same ones for both modes (kDet = true), testing p.dq_sem at run time.
  constexpr bool kAll = kBlockM == kBwdBlockM || bwd_tile_serves_all_dense(kBlockM);
  constexpr bool kDetShared = kAll && BwdPolicy<kHeadDim, kHeadDimV>::kDetKernel == 0;
  auto kernel = &bwd_kernel<KT, false, kDetShared>;
  if constexpr (kAll) {
    bool const det = ws.dq_sem != nullptr;
    if (capped) kernel = det ? &bwd_kernel<KT, true, true> : &bwd_kernel<KT, true, kDetShared>;
    else if (det) kernel = &bwd_kernel<KT, false, true>;
  }
  constexpr int smem = KT::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return {err, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize), bwd"};
  dim3 const grid(unsigned(std::max(1, (rows_k + KT::kBlockN - 1) / KT::kBlockN)), unsigned(hk), unsigned(b));
  // Deterministic mode's rotated dQ order (bwd_mainloop.h DqOrder) lets a key block's CTA wait for lower ones,
  // dispatched after it: allowed only where one (kv head, batch)'s grid.x CTAs can all be resident at once (CTAs
  // are dispatched in blockIdx order, so each earlier group finishes and makes room for the next). A GPU with
  // fewer SMs may take the descending order for the same call: bitwise reproducible per device, not across them.
  if (ws.dq_sem != nullptr) {
    int dev = 0, sms = 0, per_sm = 0;
    if ((err = cudaGetDevice(&dev)) != cudaSuccess) return {err, "cudaGetDevice, bwd"};
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess)
      return {err, "cudaDeviceGetAttribute(MultiProcessorCount), bwd"};
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, KT::kNumThreads, smem)) != cudaSuccess)
      return {err, "cudaOccupancyMaxActiveBlocksPerMultiprocessor, bwd"};
    kp.dq_rotate = int64_t(grid.x) <= int64_t(sms) * per_sm ? 1 : 0;
  }
  kernel<<<grid, KT::kNumThreads, smem, stream>>>(kp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "bwd kernel launch"};
  return {};
}

// The kernel for a call (kHeadDimV: v's, out's and dO's head dim; MLA: below kHeadDim), all in the one translation
// unit: varlen (64 rows), or dense with the tile bwd_tile_m gave the workspace. A policy tile that serves every
// dense call leaves no 64-row dense kernel to build.
template <DType kDType, int kHeadDim, int kHeadDimV>
FwdStatus launch_bwd_main(const BwdParams& bp, BwdWorkspace const& ws, cudaStream_t stream) {
  if (bp.core.varlen.enabled()) return launch_bwd_kernel<kDType, kHeadDim, kHeadDimV, true, kBwdBlockM>(bp, ws, stream);
  constexpr int kPolicyM = BwdPolicy<kHeadDim, kHeadDimV>::kBlockM;
  if constexpr (bwd_tile_serves_all_dense(kPolicyM)) {
    return launch_bwd_kernel<kDType, kHeadDim, kHeadDimV, false, kPolicyM>(bp, ws, stream);
  } else {
    if constexpr (kPolicyM != kBwdBlockM) {
      if (ws.tile_m == kPolicyM) return launch_bwd_kernel<kDType, kHeadDim, kHeadDimV, false, kPolicyM>(bp, ws, stream);
    }
    return launch_bwd_kernel<kDType, kHeadDim, kHeadDimV, false, kBwdBlockM>(bp, ws, stream);
  }
}

}  // namespace fa3jax

// Host-side launcher of one forward instantiation: builds the TMA descriptors for this call (plain structs,
// passed by value in the kernel's __grid_constant__ params), sets the smem attribute and launches.
// Included only by the generated per-instantiation translation units.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <cutlass/cuda_host_adapter.hpp>
#include <cutlass/numeric_types.h>

#include "attn_params.h"
#include "kernel.h"
#include "policy.h"  // generated (generate_instantiations.py)

namespace fa3jax {

template <DType kDType> struct ElementOf;
template <> struct ElementOf<DType::kBF16> { using type = cutlass::bfloat16_t; };
template <> struct ElementOf<DType::kFP16> { using type = cutlass::half_t; };

template <class P, DType kDType, int kHeadDim, int kHeadDimV, bool kVarlen = false, bool kKVCache = false>
using FwdTraitsOf = FwdKernelTraits<typename ElementOf<kDType>::type, kHeadDim, P::kBlockM, P::kBlockN, P::kStages,
                                    P::kProducerRegs, P::kConsumerRegs, P::kTmaEpilogue, kVarlen, kHeadDimV,
                                    kKVCache>;
// Wide key tiles exist for d_v == d only (policy.h has no FwdPolicyWide<d, d_v>).
template <DType kDType, int kHeadDim, int kHeadDimV, bool kWide, bool kVarlen = false>
using FwdTraitsFor = FwdTraitsOf<std::conditional_t<kWide, FwdPolicyWide<kHeadDim>, FwdPolicy<kHeadDim, kHeadDimV>>,
                                 kDType, kHeadDim, kHeadDimV, kVarlen>;

// `p` moved back by `rows` rows of `row_stride` elements, as an address (it may point before the allocation: only
// the TMA unit adds the coordinates back, see launch_fwd).
template <class T>
T* rows_before(T* p, int64_t rows, int64_t row_stride) {
  return reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(p) - uintptr_t(rows * row_stride * int64_t(sizeof(T))));
}

// Scale fields of the kernel's params from the call's softmax_scale / softcap.
template <class KP>
void set_score_scales(KP& kp, AttnCore const& p) {
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
}

// Dynamic unit assignment (SchedulerParams::counter, zeroed here on `stream`) where `wanted` and some CTA takes a
// second unit: with at most one unit per CTA (grids of min(units, SMs), or all SMs) round robin assigns exactly what
// the counter would, so such calls (decode, short rows) skip the counter's memset launch.
inline FwdStatus set_tile_counter(SchedulerParams& sp, void* workspace, bool wanted, cudaStream_t stream) {
  sp.counter = nullptr;
  if (!wanted || workspace == nullptr) return {};
  int device = 0, num_sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return {err, "cudaDeviceGetAttribute(MultiProcessorCount)"};
  if (sp.num_units <= num_sms) return {};
  sp.counter = static_cast<int*>(workspace);
  err = cudaMemsetAsync(sp.counter, 0, sizeof(int), stream);
  if (err != cudaSuccess) return {err, "cudaMemsetAsync(tile counter)"};
  return {};
}

// Sets the smem attribute and launches the persistent kernel: one CTA per SM (shared memory holds one CTA's tiles),
// at most one per unit unless all_sms.
template <class KT>
FwdStatus launch_persistent(typename KT::Params const& kp, bool all_sms, cudaStream_t stream) {
  auto kernel = &fwd_kernel<KT>;
  constexpr int smem = KT::kSmemBytes;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return {err, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)"};
  int device = 0, num_sms = 0;
  err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return {err, "cudaDeviceGetAttribute(MultiProcessorCount)"};
  dim3 const grid(all_sms ? (num_sms > 0 ? num_sms : 1) : PersistentTileScheduler::num_ctas(kp.sched, num_sms));
  kernel<<<grid, KT::kNumThreads, smem, stream>>>(kp);
  err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "kernel launch"};
  return {};
}

// The TMA view of `total` packed rows for loads (rows_view.h): rank 5, (d, row, head, end, wrap) with extents
// (d, kViewRows, heads, total + 1, kViewRows + 1) and the descriptor's base at the tensor itself. A run of len rows
// ending at row `end` (a varlen sequence, a KV-cache slot) reads view row kViewRows - len + i: rows past len fall
// outside the row extent (zero-filled), and the wrap mode at coordinate kViewRows with stride 2^34 - row bytes adds
// -kViewRows rows modulo 2^64 (kViewRows x 2^34 = 2^64), so the address is base + (end - len + i) rows.
// Why not a base moved back by total rows (rows_before): TMA loads fault when the descriptor's base lies in
// unmapped memory (a tensor at the start of a mapping; the flaky JAX-level ILLEGAL_ADDRESS, RESULTS.md).
// Boxes of box_cols columns (one swizzle row: 128 or 64 bytes, the swizzle of the smem tile's atom) by box_rows
// rows: one box fills rows of one column slice of a tile whose layout keeps each slice as swizzled rows (the
// forward's Q, K and V^T stages; the backward's Q, dO, K, V). Extents of the extra modes are exact (a loose bound
// let TMA read past a tensor in quack's ragged views). fwd_check / bwd_check bound len (<= kViewRows) and the row
// bytes (< 2^34).
template <class Element>
bool encode_rows_view(cute::TmaDescriptor* desc, void const* base, int64_t row_stride, int64_t head_stride, int d,
                      int total, int heads, int box_cols, int box_rows) {
  constexpr uint64_t kBytes = sizeof(Element);
  static_assert(kBytes == 2, "bf16 / fp16 views");
  uint64_t const row = uint64_t(row_stride) * kBytes;  // < 2^34 (fwd_check, bwd_check)
  cuuint64_t dims[5] = {cuuint64_t(d), cuuint64_t(kViewRows), cuuint64_t(heads), cuuint64_t(total) + 1,
                        cuuint64_t(kViewRows) + 1};
  cuuint64_t strides[4] = {row, uint64_t(head_stride) * kBytes, row, (uint64_t(1) << 34) - row};
  cuuint32_t box[5] = {cuuint32_t(box_cols), cuuint32_t(box_rows), 1, 1, 1};
  cuuint32_t unit[5] = {1, 1, 1, 1, 1};
  uint64_t const swizzle_bytes = uint64_t(box_cols) * kBytes;
  CUtensorMapSwizzle const swizzle = swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                           : CU_TENSOR_MAP_SWIZZLE_32B;
  CUresult const r = cutlass::call_cuTensorMapEncodeTiled(
      desc,
      std::is_same_v<Element, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
      5, const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

template <DType kDType, int kHeadDim, int kHeadDimV, bool kWide, bool kVarlen = false>
FwdStatus launch_fwd(const FwdParams& fp, cudaStream_t stream) {
  static_assert(!kWide || kHeadDimV == kHeadDim, "wide key tiles are compiled for d_v == d only");
  if constexpr (!kWide && !kVarlen) {
    // The varlen kernel has the FwdPolicy tiles and is compiled in this translation unit.
    if (fp.core.varlen.enabled()) return launch_fwd<kDType, kHeadDim, kHeadDimV, false, true>(fp, stream);
  } else if constexpr (kWide) {
    if (fp.core.varlen.enabled()) return {cudaErrorInvalidValue, "varlen has no wide-key-tile kernel"};
  }
  using KT = FwdTraitsFor<kDType, kHeadDim, kHeadDimV, kWide, kVarlen>;
  using Element = typename KT::Element;
  constexpr int D = kHeadDim, Dv = kHeadDimV;  // the kernel's q/k and v/out head dims (MLA: Dv < D)
  AttnCore const& p = fp.core;
  int const b = p.batch, sq = p.seqlen_q, sk = p.seqlen_k, hq = p.num_heads_q, hk = p.num_heads_k;
  // The call's head dims (<= the kernel's, multiples of 8): the tensors' extents below. TMA boxes stay D (Dv) wide,
  // so loads zero-fill the columns past d (zero scores and output columns) and stores clip them.
  int const d = p.head_dim, dv = p.value_dim();

  // q/k/v through TMA at the caller's strides; out is dense (the register epilogue addresses it so).
  // Dense: (seq, d, head, batch). Varlen: q/k/v through packed-rows views (encode_rows_view: one descriptor for all
  // sequences, rows past a sequence's end zero-filled; mainloop.h), and out (the TMA epilogue's stores) as
  // (r, d, head, end), where the last mode, with the row stride too, is a sequence's end row (offset + length) and
  // the base moves back by total rows: row i of that sequence is r = total - length + i, rows past its end have
  // r >= total and lie outside the tensor, so TMA drops their stores (epilogue.h).
  // Stores keep the moved-back base: the fault it is suspected of is the loads' (a load descriptor's base in unmapped
  // memory), and a rows-view store would put a raw 5-D TMA store into the consumers' epilogue.
  Element* o_ptr = static_cast<Element*>(fp.out);
  int64_t const o_row = int64_t(hq) * dv;
  int64_t o_last = sq * o_row;
  int q_ext = b;
  if constexpr (kVarlen) {
    o_ptr = rows_before(o_ptr, sq, o_row);
    o_last = o_row;
    q_ext = sq + 1;
  }
  auto o = make_tensor(make_gmem_ptr(o_ptr), make_shape(sq, dv, hq, q_ext),
                       make_stride(o_row, _1{}, int64_t(dv), o_last));

  typename KT::Params kp{
      {},
      {},
      {},
      KT::make_tma_o(o),
      fp.out,
      fp.lse,
      SchedulerParams{},
      b, sq, sk, hq, hk, hq / hk,
      p.window_left < 0 ? -1 : p.window_left,
      p.window_right < 0 ? -1 : p.window_right,
      0.f, 0.f, 0.f, 0.f,
      fp.sinks,
      p.varlen.cu_seqlens_q,
      p.varlen.cu_seqlens_k,
      p.varlen.seqused_k,
      dv,
      nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0};  // no KV cache (launch_fwd_kvcache)
  if constexpr (kVarlen) {
    // Boxes of one 128-byte swizzle row (64 columns) by the Q tile's or a key block's rows (SmemLayoutQ/K/Vt).
    if (!encode_rows_view<Element>(&kp.tma_q, p.q, p.q_stride.row, p.q_stride.head, d, sq, hq, 64, KT::kBlockM) ||
        !encode_rows_view<Element>(&kp.tma_k, p.k, p.k_stride.row, p.k_stride.head, d, sk, hk, 64, KT::kBlockN) ||
        !encode_rows_view<Element>(&kp.tma_v, p.v, p.v_stride.row, p.v_stride.head, dv, sk, hk, 64, KT::kBlockN))
      return {cudaErrorInvalidValue, "cuTensorMapEncodeTiled (varlen q/k/v views)"};
  } else {
    Element const* q_ptr = static_cast<Element const*>(p.q);
    Element const* k_ptr = static_cast<Element const*>(p.k);
    Element const* v_ptr = static_cast<Element const*>(p.v);
    kp.tma_q = KT::make_tma_q(make_tensor(make_gmem_ptr(q_ptr), make_shape(sq, d, hq, b),
                                          make_stride(p.q_stride.row, _1{}, p.q_stride.head, p.q_stride.batch)));
    kp.tma_k = KT::make_tma_k(make_tensor(make_gmem_ptr(k_ptr), make_shape(sk, d, hk, b),
                                          make_stride(p.k_stride.row, _1{}, p.k_stride.head, p.k_stride.batch)));
    kp.tma_v = KT::make_tma_v(make_tensor(make_gmem_ptr(v_ptr), make_shape(dv, sk, hk, b),
                                          make_stride(_1{}, p.v_stride.row, p.v_stride.head, p.v_stride.batch)));
  }
  set_score_scales(kp, p);

  SchedulerParams& sp = kp.sched;
  // Varlen: query blocks of the longest sequence for every one (the kernel skips those past a sequence's end);
  // no sequence is longer than the total.
  int const rows_q = kVarlen ? std::min(p.varlen.max_seqlen_q, sq) : sq;
  sp.num_m_units = (rows_q + KT::kBlockM - 1) / KT::kBlockM;
  sp.num_heads = hq;
  sp.num_hb = hq * b;
  if (int64_t(sp.num_m_units) * sp.num_hb > INT32_MAX) return {cudaErrorInvalidValue, "too many tiles"};
  sp.num_units = sp.num_m_units * sp.num_hb;
  sp.reverse_m = p.window_right >= 0;  // a right bound gives the last query blocks the most keys
  // (head, batch) pairs per section of the heavy-first order: as many as keep their K/V within ~32 MiB of the
  // 50 MiB L2 (H100).
  int const rows_k = kVarlen && p.varlen.max_seqlen_k > 0 ? p.varlen.max_seqlen_k : sk;
  int64_t const kv_bytes = int64_t(rows_k) * (D + Dv) * int64_t(sizeof(Element));
  int64_t const group = (int64_t(32) << 20) / (kv_bytes > 0 ? kv_bytes : 1);
  sp.group = int(group < 1 ? 1 : (group > sp.num_hb ? sp.num_hb : group));
  // Dynamic assignment only where tiles differ in length (causal-like masks): it costs a shared-memory hand-off
  // per tile, and with equal tiles round robin is already balanced.
  // Varlen too: sequences of unequal lengths give tiles of unequal length.
  FwdStatus st = set_tile_counter(sp, fp.workspace, p.window_left >= 0 || p.window_right >= 0 || kVarlen, stream);
  if (!st.ok()) return st;
  // Varlen: on every SM, whatever the unit count, since units past a sequence's end are skipped and every CTA
  // writes a share of the rows outside the sequences.
  return launch_persistent<KT>(kp, kVarlen, stream);
}

// The KV-cache forward (attn_params.h KVCacheSeqs, FwdPolicy's tiles). q/out/lse are the dense kernel's. The caches
// are read as packed rows (encode_rows_view): all cache_slots * slot_rows rows of k (and v) in one view, so a slot
// (a batch row of the contiguous cache, or a page) of valid length len ending at row end reads its rows with those
// at or past len zero-filled. The appended k/v (batch, seqlen_new, hk, d) are viewed the same way with one slot per
// batch row. fwd_check has checked shapes, strides and that every coordinate fits int32.
template <DType kDType, int kHeadDim>
FwdStatus launch_fwd_kvcache(const FwdParams& fp, cudaStream_t stream) {
  using KT = FwdTraitsOf<FwdPolicy<kHeadDim, kHeadDim>, kDType, kHeadDim, kHeadDim, false, true>;
  using Element = typename KT::Element;
  AttnCore const& p = fp.core;
  // The call's head dim (<= kHeadDim, a multiple of 8; fwd_kernel_dim chose this kernel): the tensors' extent, as in
  // launch_fwd, so the kHeadDim-wide boxes zero-fill the columns past it and the output store clips them.
  int const d = p.head_dim;
  int const b = p.batch, sq = p.seqlen_q, hq = p.num_heads_q, hk = p.num_heads_k;
  bool const paged = p.paged.enabled();
  int const slot_rows = paged ? p.paged.page_size : p.seqlen_k;
  int const slots = p.kvcache.cache_slots;
  int const total = slots * slot_rows;
  int const sn = p.append.enabled() ? p.append.seqlen_new : 0;

  Element const* q_ptr = static_cast<Element const*>(p.q);
  Element* o_ptr = static_cast<Element*>(fp.out);
  int64_t const o_row = int64_t(hq) * d;
  auto q = make_tensor(make_gmem_ptr(q_ptr), make_shape(sq, d, hq, b),
                       make_stride(p.q_stride.row, _1{}, p.q_stride.head, p.q_stride.batch));
  auto o = make_tensor(make_gmem_ptr(o_ptr), make_shape(sq, d, hq, b),
                       make_stride(o_row, _1{}, int64_t(d), sq * o_row));
  typename KT::Params kp{};
  kp.tma_q = KT::make_tma_q(q);
  kp.tma_o = KT::make_tma_o(o);
  // The caches and the appended keys through encode_rows_view (tma_k/tma_v stay unused). Without appended keys the
  // kernel never reads tma_new_* (no virtual block past the cache's): the cache's descriptors stand in.
  kp.kv_load = fwd_kvcache_load(fp);
  kp.box_rows = kp.kv_load == KVLoad::kBoxes ? fwd_kvcache_box_rows(slot_rows, KT::kBlockN) : KT::kBlockN;
  if (!encode_rows_view<Element>(&kp.tma_cache_k, p.k, p.k_stride.row, p.k_stride.head, d, total, hk, 64,
                                 kp.box_rows) ||
      !encode_rows_view<Element>(&kp.tma_cache_v, p.v, p.v_stride.row, p.v_stride.head, d, total, hk, 64, kp.box_rows))
    return {cudaErrorInvalidValue, "cuTensorMapEncodeTiled (K/V cache views)"};
  kp.tma_new_k = kp.tma_cache_k;
  kp.tma_new_v = kp.tma_cache_v;
  if (sn > 0) {
    int64_t const new_row = int64_t(hk) * d;
    if (!encode_rows_view<Element>(&kp.tma_new_k, p.append.k_new, new_row, d, d, b * sn, hk, 64, KT::kBlockN) ||
        !encode_rows_view<Element>(&kp.tma_new_v, p.append.v_new, new_row, d, d, b * sn, hk, 64, KT::kBlockN))
      return {cudaErrorInvalidValue, "cuTensorMapEncodeTiled (appended K/V views)"};
  }
  kp.out = fp.out;
  kp.lse = fp.lse;
  kp.batch = b;
  kp.seqlen_q = sq;
  kp.seqlen_k = p.seqlen_k;  // the capacity
  kp.num_heads_q = hq;
  kp.num_heads_k = hk;
  kp.group_size = hq / hk;
  kp.window_left = p.window_left < 0 ? -1 : p.window_left;
  kp.window_right = p.window_right < 0 ? -1 : p.window_right;
  set_score_scales(kp, p);
  kp.sinks = fp.sinks;
  kp.dim_v = d;  // out's row width and the register epilogue's column bound (d_v == d here)
  kp.cache_seqlens = p.kvcache.cache_seqlens;
  kp.leftpad = p.kvcache.leftpad;
  kp.batch_idx = paged ? nullptr : p.kvcache.batch_idx;
  kp.page_table = paged ? p.paged.block_table : nullptr;
  kp.cache_slots = slots;
  kp.slot_rows = slot_rows;
  kp.pages_per_seq = paged ? p.paged.max_pages_per_seq : 1;
  kp.seqlen_new = sn;
  // Key blocks spanning pages (fwd_kvcache_load decides): TMA boxes inside pages (box_rows above), or the producer's
  // gather.
  if (kp.kv_load == KVLoad::kGather) {
    kp.k_cache = p.k;
    kp.v_cache = p.v;
    kp.k_stride_row = p.k_stride.row;
    kp.k_stride_head = p.k_stride.head;
    kp.v_stride_row = p.v_stride.row;
    kp.v_stride_head = p.v_stride.head;
  }
  // Split-KV: the tiles write fp32 parts for run_fwd_combine (fwd_check has checked the buffers).
  int const splits = fp.splits.num_splits > 1 ? fp.splits.num_splits : 1;
  kp.num_splits = splits;
  kp.out_accum = splits > 1 ? fp.splits.out_accum : nullptr;
  kp.lse_accum = splits > 1 ? fp.splits.lse_accum : nullptr;
  // GQA packing: tiles over the (query, head-in-group) rows of each kv head, Q gathered at its strides.
  bool const pack = fwd_kvcache_pack_gqa(fp);
  kp.pack = pack ? hq / hk : 1;
  kp.q_ptr = p.q;
  kp.q_stride_row = p.q_stride.row;
  kp.q_stride_head = p.q_stride.head;
  kp.q_stride_batch = p.q_stride.batch;

  SchedulerParams& sp = kp.sched;
  int64_t const rows_q = int64_t(sq) * kp.pack;
  int const heads = pack ? hk : hq;
  if ((rows_q + KT::kBlockM - 1) / KT::kBlockM * heads * int64_t(b) * splits > INT32_MAX)
    return {cudaErrorInvalidValue, "too many tiles"};
  sp.num_m_units = int((rows_q + KT::kBlockM - 1) / KT::kBlockM);
  sp.num_heads = heads;
  sp.num_splits = splits;
  sp.num_hb = heads * b * splits;
  sp.num_units = sp.num_m_units * sp.num_hb;
  sp.reverse_m = p.window_right >= 0;
  int64_t const kv_bytes = (int64_t(p.seqlen_k) + sn) * 2 * kHeadDim * int64_t(sizeof(Element));
  int64_t const group = (int64_t(32) << 20) / (kv_bytes > 0 ? kv_bytes : 1);
  sp.group = int(group < 1 ? 1 : (group > sp.num_hb ? sp.num_hb : group));
  // Rows of different batch entries have different lengths: dynamic assignment balances them.
  FwdStatus st = set_tile_counter(sp, fp.workspace, true, stream);
  if (!st.ok()) return st;
  return launch_persistent<KT>(kp, false, stream);
}

}  // namespace fa3jax

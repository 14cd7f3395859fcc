// Compile-time description of one forward kernel: tiles, MMAs, shared-memory layouts, TMA types, params.
#pragma once

#include <type_traits>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "attn_params.h"
#include "rows_view.h"
#include "tile_scheduler.h"

namespace fa3jax {

using namespace cute;

template <class Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kStages_, int kProducerRegs_,
          int kConsumerRegs_, bool kTmaEpilogue_ = false, bool kVarlen_ = false, int kHeadDimV_ = kHeadDim_,
          bool kKVCache_ = false>
struct FwdKernelTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // q/k: Q and K tiles, the QK^T GEMM's reduction
  // v/out (MLA: smaller than kHeadDim): V and O tiles, the P V GEMM's N, the epilogue.
  static constexpr int kHeadDimV = kHeadDimV_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  // Epilogue through shared memory and one TMA store per consumer warpgroup (64 rows): the warpgroup moves on
  // to its next tile as soon as its rows sit in shared memory, instead of issuing ~D/2 scattered 4-byte
  // global stores per row (costly on short tiles: causal, s <= 2k). Needs a BlockM x D buffer of its own.
  static constexpr bool kTmaEpilogue = kTmaEpilogue_;
  // Packed variable-length sequences (attn_params.h VarlenSeqs): per-tile offsets and lengths from cu_seqlens
  // (SeqInfo::varlen), TMA tensors bounded per sequence (launch.h), units past a sequence's end skipped.
  static constexpr bool kVarlen = kVarlen_;
  // KV cache (attn_params.h KVCacheSeqs): dense q/out; keys from the cache (contiguous or paged) and then from the
  // appended k/v, per batch row bounded by its lengths (mask.h KVBlockMask, FwdMainloop::load_kvcache).
  static constexpr bool kKVCache = kKVCache_;
  static_assert(!(kVarlen && kKVCache), "varlen and KV cache are separate kernels");
  // One CTA per cluster (a 2-CTA K/V-multicast variant measured within +-2%, benchmarks/RESULTS.md).
  using ClusterShape = Shape<_1, _1, _1>;
  static_assert(kBlockM % 64 == 0 && kHeadDim % 64 == 0 && kHeadDimV % 64 == 0 && kBlockN % 16 == 0);

  // Two copies of the consumer loop, with and without softcap (FwdMainloop::mma<kSoftcap>), so that the loop
  // without softcap has no per-block test of it. Not at d=256: there (240 consumer registers) the second copy made
  // ptxas spill (ptxas -v: 4 B stores / 12 B loads, nvcc 13.0); that kernel tests softcap per block. The O
  // accumulator (kHeadDimV wide) is what fills the registers, so MLA 192/128 gets the two copies as d=128 does.
  static constexpr bool kSoftcapVariants = kHeadDimV <= 128;

  static constexpr int kNumMmaWG = kBlockM / 64;
  static constexpr int kNumMmaThreads = kNumMmaWG * 128;
  static constexpr int kNumThreads = kNumMmaThreads + 128;  // + one producer warpgroup
  // setmaxnreg moves registers only within the CTA's launch allocation (65536 / threads, rounded down to 8 per
  // thread): consumers asking for more than the producer gives back wait in setmaxnreg.inc forever.
  static constexpr int kLaunchRegs = (65536 / kNumThreads) / 8 * 8;
  static_assert(kProducerRegs * 128 + kConsumerRegs * kNumMmaThreads <= kLaunchRegs * kNumThreads,
                "register reallocation exceeds the CTA's launch allocation (the kernel would hang)");

  using BlkM = Int<kBlockM>;
  using BlkN = Int<kBlockN>;
  using HDim = Int<kHeadDim>;
  using HDimV = Int<kHeadDimV>;

  // S = Q K^T: both operands K-major in smem. O += P V: P from registers, V^T MN-major in smem.
  using AtomLayout = Layout<Shape<Int<kNumMmaWG>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, BlkN, HDim>>(), AtomLayout{}));
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, HDimV, BlkN>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomLayout{}));
  // WGMMA N sizes that are not multiples of 32 (d=256's 80-wide key tile) need the extended atoms; without
  // them the selector silently falls back to narrow atoms. Generated TUs define the macro where needed.
  static_assert(decltype(tile_size<1>(TiledMmaQK{}))::value == kBlockN,
                "QK^T atom narrower than kBlockN: define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED before any CuTe include");

  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkM, HDim>{}));
  using SmemLayoutK =
      decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<BlkN, HDim, Int<kStages>>{}));
  // V stored transposed-view: (d, n) with d contiguous (= V's natural row-major layout), MN-major for the MMA.
  // Atoms ordered n first (Step<_2, _1, _3>): each 64-wide d slice of a stage is then one contiguous run of
  // BlkN rows, which TMA fills with one box. With d first, the two d slices interleaved every 8 rows and CuTe
  // split the V load into one box per 8-row atom (d=128: 70 -> 34 UTMALDG; measured in benchmarks/RESULTS.md).
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<HDimV, BlkN, Int<kStages>>{}, Step<_2, _1, _3>{}));

  // Byte offset of row `row`'s 8 columns from `col` (a multiple of 8) within one stage of SmemLayoutK (row = key, col =
  // d) or of SmemLayoutVt (col = d_v, row = key): both keep each 64-column slice of a stage as kBlockN rows of 128
  // bytes whose 16-byte chunks are swizzled by row % 8 (test_layouts checks it against the layouts). The KV-cache
  // producer's page gather writes there what a TMA box would (mainloop.h gather_rows).
  static constexpr uint32_t kStageBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kStageBytesV = kBlockN * kHeadDimV * sizeof(Element);
  CUTE_HOST_DEVICE static constexpr uint32_t kv_chunk_offset(int row, int col) {
    return uint32_t(col / 64) * (kBlockN * 128) + uint32_t(row) * 128 + uint32_t(((col / 8) % 8) ^ (row % 8)) * 16;
  }

  // The packed-rows views' row extent (rows_view.h): the KV cache's and varlen's loads.
  static constexpr int kViewRows = fa3jax::kViewRows;

  // Global tensors: Q/K as (seq, d, head, batch); V as (d_v, seq, head, batch).
  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStrideQK = Stride<int64_t, _1, int64_t, int64_t>;
  using GStrideVt = Stride<_1, int64_t, int64_t, int64_t>;

  // TMA descriptors: built on the host per call by these functions, whose return types are the Params fields.
  template <class GTensor>
  static auto make_tma_q(GTensor const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutQ{}, Shape<BlkM, HDim>{}, _1{});
  }
  template <class GTensor>
  static auto make_tma_k(GTensor const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutK{}(_, _, _0{}), Shape<BlkN, HDim>{}, _1{});
  }
  template <class GTensor>
  static auto make_tma_v(GTensor const& g) {
    return make_tma_copy(SM90_TMA_LOAD{}, g, SmemLayoutVt{}(_, _, _0{}), Shape<HDimV, BlkN>{}, _1{});
  }
  using GTensorQK = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStrideQK{}));
  using GTensorVt = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStrideVt{}));
  // O: one warpgroup's 64 rows per TMA store (each warpgroup stores its own rows on its own schedule).
  using SmemLayoutOWG = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<_64, HDimV>{}));
  // Whole tile = the warpgroups' 64-row slices one after another (the epilogue's register -> smem copy
  // addresses it by tile row; each TMA store reads one contiguous slice).
  using SmemLayoutO = decltype(tile_to_shape(SmemLayoutOWG{}, Shape<BlkM, HDimV>{}));
  template <class GTensor>
  static auto make_tma_o(GTensor const& g) {
    return make_tma_copy(SM90_TMA_STORE{}, g, SmemLayoutOWG{}, Shape<_64, HDimV>{}, _1{});
  }
  using GTensorO = decltype(make_tensor(make_gmem_ptr(static_cast<Element*>(nullptr)), GShape{}, GStrideQK{}));
  using TmaO = decltype(make_tma_o(std::declval<GTensorO>()));
  using TmaQ = decltype(make_tma_q(std::declval<GTensorQK>()));
  using TmaK = decltype(make_tma_k(std::declval<GTensorQK>()));
  using TmaV = decltype(make_tma_v(std::declval<GTensorVt>()));

  static constexpr uint32_t kBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesK = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kBytesV = kBlockN * kHeadDimV * sizeof(Element);  // the V pipeline's transaction bytes

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> smem_q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> smem_k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutVt>, 1024> smem_v;
    alignas(1024) cute::array_aligned<Element, kTmaEpilogue ? cute::cosize_v<SmemLayoutO> : 8, 1024> smem_o;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
    alignas(8) uint64_t barrier_q;        // Q tile landed (TMA transaction bytes)
    alignas(8) uint64_t barrier_q_empty;  // consumers done with the Q tile (its last QK^T GEMM retired)
    alignas(8) uint64_t barrier_unit_full;   // producer wrote the next work unit
    alignas(8) uint64_t barrier_unit_empty;  // consumers read it
    int unit;
    // KV cache, kv_load kBoxes / kGather: per key block, which of its columns lie on a page whose index is out of
    // range, as one 32-bit word per quad lane (mask.h kv_colmask_col), written by the producer before the block's K
    // stage fills and read by the consumers after they release it, so a ring of 2 x kStages slots (slot = stage +
    // kStages x consumer phase): a slot is rewritten only once the consumers released the K stage kStages blocks
    // later, after their softmax of the block that used it.
    uint32_t kv_colmask[kKVCache ? 2 * kStages : 1][4];
  };
  // + 1024 so the kernel can align the dynamic smem base itself.
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "tiles x stages exceed sm90's 227 KiB of shared memory per block");

  // Everything the kernel needs; passed as a __grid_constant__ parameter (TMA descriptors inside).
  // Varlen: q/k/v are loaded through packed-rows views (rows_view.h, launch.h encode_rows_view) whose descriptor
  // base is the tensor itself, so those fields are plain descriptors; dense and KV-cache kernels keep CuTe's copies.
  using TmaQField = std::conditional_t<kVarlen, cute::TmaDescriptor, TmaQ>;
  using TmaKField = std::conditional_t<kVarlen, cute::TmaDescriptor, TmaK>;
  using TmaVField = std::conditional_t<kVarlen, cute::TmaDescriptor, TmaV>;

  struct Params {
    TmaQField tma_q;
    TmaKField tma_k;
    TmaVField tma_v;
    TmaO tma_o;  // used when kTmaEpilogue
    void* out;
    float* lse;
    SchedulerParams sched;
    // Varlen: seqlen_q/seqlen_k are the packed totals (the TMA tensors' row extents), batch the sequence count.
    int batch, seqlen_q, seqlen_k, num_heads_q, num_heads_k, group_size;
    int window_left, window_right;
    float scale_log2;    // multiplier of the (capped) raw score inside exp2
    float softcap_pre;   // softmax_scale / softcap (softcap path only)
    float softcap;       // 0: off
    float lse_scale;     // converts a max in raw-score units to natural-log units
    float const* sinks;  // (num_heads_q,) natural-log attention sinks, or nullptr (off)
    int const* cu_seqlens_q;  // kVarlen only: (batch + 1,) each
    int const* cu_seqlens_k;
    int const* seqused_k;     // or nullptr
    int dim_v;  // the call's v/out head dim (<= kHeadDimV, a multiple of 8): out's row width, columns written
    int const* cache_seqlens;  // (batch,)
    int const* leftpad;        // or nullptr
    int const* batch_idx;      // or nullptr (contiguous only)
    int const* page_table;     // (batch, pages_per_seq) or nullptr (contiguous)
    int cache_slots, slot_rows, pages_per_seq, seqlen_new;  // slot_rows: capacity (contiguous) or page_size
    // kKVCache only. Split-KV (attn_params.h Splits): with num_splits > 1 a tile covers part tile.split of its
    // row's key blocks (KVBlockMask::keep_split) and writes its normalized fp32 output and sink-free LSE to
    // out_accum (num_splits, b, hq, sq, d_v) / lse_accum (num_splits, b, hq, sq) for the combine pass.
    float* out_accum = nullptr;
    float* lse_accum = nullptr;
    int num_splits = 1;
    // GQA packing: pack = group_size when the tiles hold the (query, head-in-group) rows of one kv head (tile.head
    // is then the kv head; Q is gathered row by row, out stored row by row), else 1.
    int pack = 1;
    void const* q_ptr = nullptr;  // kKVCache with pack > 1: q and its element strides (the packed gather)
    int64_t q_stride_row = 0, q_stride_head = 0, q_stride_batch = 0;
    // kKVCache only (launch.h encode_rows_view): tma_cache_k/v read the caches, tma_new_k/v the appended keys, as
    // packed rows (d, row, head, end, wrap) whose descriptor base is the tensor itself; a slot (cache row or page) of
    // valid length len ending at row `end` reads view rows kViewRows - len + i, so rows past len are zero-filled.
    // Boxes of (64, box_rows) for the cache (kBlockN rows but with kv_load kBoxes), (64, kBlockN) for the new keys.
    // How cache blocks are read (attn_params.h KVLoad, fwd_kvcache_load); kGather: the caches' base pointers and
    // element strides (row, head).
    KVLoad kv_load = KVLoad::kBlocks;
    int box_rows = 0;
    cute::TmaDescriptor tma_cache_k{}, tma_cache_v{}, tma_new_k{}, tma_new_v{};
    void const* k_cache = nullptr;
    void const* v_cache = nullptr;
    int64_t k_stride_row = 0, k_stride_head = 0, v_stride_row = 0, v_stride_head = 0;
  };
};

}  // namespace fa3jax

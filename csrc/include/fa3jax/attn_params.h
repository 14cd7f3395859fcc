// Plain C++ interface of the attention kernels. No CUTLASS / CuTe / Python in here: the FFI layer, the nanobind
// module and the standalone tests include only this header.
//
// One parameter set per kernel family member: AttnCore (what every pass reads: pointers, strides, shapes,
// scale, softcap, window) plus optional parts that later features fill (varlen offsets, paged K/V, appended
// keys), and per pass its outputs and workspace (FwdParams; a backward adds its own).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "bwd_layout.h"

namespace fa3jax {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

// Element strides of a (batch, seq, head, d) tensor; d is contiguous (TMA needs a unit inner stride).
struct Strides {
  int64_t row = 0, head = 0, batch = 0;
};

// Variable-length batches (packed rows, FA's cu_seqlens convention). Off while cu_seqlens_q is null. With it on,
// AttnCore's q/k/v (and out) are packed (total, heads, d): seqlen_q/seqlen_k are the totals, batch the number of
// sequences, and the strides' batch field is unused. The kernel clamps every offset into [0, total] and every
// length to >= 0, so hostile values cannot address rows outside the tensors (fa3jax/validation.py sanitizes them
// first, so that results follow its documented rule).
struct VarlenSeqs {
  const int* cu_seqlens_q = nullptr;  // (batch + 1) row offsets into the packed q / out
  const int* cu_seqlens_k = nullptr;  // (batch + 1) row offsets into the packed k / v
  const int* seqused_k = nullptr;     // optional: keys used per sequence (<= its cu_seqlens_k length)
  int max_seqlen_q = 0;  // query blocks per (sequence, head) in the grid: rows past it are not computed
  int max_seqlen_k = 0;  // a hint for the tile order's L2 sections (0: the total)
  bool enabled() const { return cu_seqlens_q != nullptr; }
};

// KV cache (decode / chunked prefill, fa3jax/backends/base.py KVCacheArgs). Off while cache_seqlens is null. With
// it on, AttnCore's q is dense (batch, seqlen_q, hq, d), k/v are the caches: contiguous (cache_slots, capacity,
// hk, d), or paged (num_pages = cache_slots, page_size, hk, d) with `paged` on; seqlen_k is the capacity (paged:
// max_pages_per_seq * page_size) and the strides' batch field steps one cache slot (row or page). Batch row b
// attends to its cache keys [leftpad, cache_len) and then to its `append` keys, at positions cache_len + t.
// The kernel clamps every index so that no value addresses memory outside the caches (fa3jax/validation.py
// sanitizes them first, so that results follow its documented rule): cache_len into [0, capacity - seqlen_new],
// leftpad into [0, cache_len], batch_idx into [0, cache_slots); a page index outside [0, cache_slots) is never
// dereferenced and masks that page's keys.
struct KVCacheSeqs {
  const int* cache_seqlens = nullptr;  // (batch,) keys already in the cache (the appended keys start there)
  const int* leftpad = nullptr;        // (batch,) first visible cache position, or nullptr (0)
  const int* batch_idx = nullptr;      // (batch,) cache slot of each batch row (contiguous only), or nullptr (b)
  int cache_slots = 0;                 // contiguous: the caches' leading dim; paged: num_pages
  bool enabled() const { return cache_seqlens != nullptr; }
};

// Paged K/V cache (with KVCacheSeqs): k/v are (num_pages, page_size, heads_k, d). Off while block_table is null.
// Any page_size >= 1: fwd_kvcache_load says how the kernel reads a key block that spans pages.
struct PagedKV {
  const int* block_table = nullptr;  // (batch, max_pages_per_seq) page indices
  int page_size = 0, max_pages_per_seq = 0;
  bool enabled() const { return block_table != nullptr; }
};

// Keys/values appended after the cache's keys (with KVCacheSeqs): dense (batch, seqlen_new, heads_k, d) each, read
// where they are (the caller writes them into the cache separately). Off while k_new is null.
struct AppendKV {
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int seqlen_new = 0;
  bool enabled() const { return k_new != nullptr; }
};

// What every pass of one attention call reads: q (b, sq, hq, d), k (b, sk, hk, d) and v (b, sk, hk, d_v) at their
// strides. d is the call's own head dim (any multiple of 8 up to 256): the smallest compiled kernel that holds it
// serves it (fwd_kernel_dim / bwd_kernel_dim), its TMA loads zero-filling the columns past d and its stores
// writing none of them, so no padded copies are made.
struct AttnCore {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_stride, k_stride, v_stride;
  int batch = 0, seqlen_q = 0, seqlen_k = 0, num_heads_q = 0, num_heads_k = 0, head_dim = 0;
  // v's (and out's) head dim; 0 means head_dim. Smaller than head_dim for MLA (d_v < d_qk).
  int head_dim_v = 0;
  DType dtype = DType::kBF16;
  float softmax_scale = 1.f;
  float softcap = 0.f;    // <= 0: off
  int window_left = -1;   // -1: unbounded (bottom-right aligned window, see fa3jax/masking.py)
  int window_right = -1;  // causal == (window_left, 0)
  VarlenSeqs varlen;
  KVCacheSeqs kvcache;
  PagedKV paged;
  AppendKV append;

  int value_dim() const { return head_dim_v != 0 ? head_dim_v : head_dim; }

  // Contiguous q/k/v of the shapes above.
  void set_dense_strides() {
    int64_t const dv = value_dim();
    q_stride = {int64_t(num_heads_q) * head_dim, int64_t(head_dim), int64_t(seqlen_q) * num_heads_q * head_dim};
    k_stride = {int64_t(num_heads_k) * head_dim, int64_t(head_dim), int64_t(seqlen_k) * num_heads_k * head_dim};
    v_stride = {int64_t(num_heads_k) * dv, dv, int64_t(seqlen_k) * num_heads_k * dv};
  }
};

// Split-KV forward of the KV cache (off while num_splits <= 1): each row's key blocks (cache, then appended) are
// cut into num_splits contiguous parts (mask.h KVBlockMask::keep_split), each written as a normalized fp32 output
// and a sink-free LSE (-inf and 0 for a part with no visible key), then a combine pass (run_fwd_combine) merges
// the parts by their LSE into out/lse and adds the sink once. fwd_kvcache_num_splits chooses num_splits (0 =
// automatic) and fwd_splits_workspace lays the buffers out.
inline constexpr int kMaxSplits = 128;
struct Splits {
  int num_splits = 1;
  float* out_accum = nullptr;  // (num_splits, b, hq, sq, d_v)
  float* lse_accum = nullptr;  // (num_splits, b, hq, sq)
};

// Forward: core + outputs + workspace. out is dense (b, sq, hq, d_v); lse float32 (b, hq, sq). Varlen: out
// (total_q, hq, d_v), lse (hq, total_q); q rows outside every sequence get out 0 and lse -inf (the sink with sinks).
struct FwdParams {
  AttnCore core;
  void* out = nullptr;
  float* lse = nullptr;
  // Attention sinks (gpt-oss): float32 (num_heads_q,), one natural-log logit per query head that joins every row's
  // softmax denominator and carries no value (rows that see no key: out 0, lse = sink). nullptr: off.
  const float* sinks = nullptr;
  Splits splits;
  // Device memory of at least kFwdWorkspaceBytes (the caller's; reset by run_fwd on `stream`): the persistent
  // kernel then assigns tiles dynamically under windowed/causal masks (tiles of unequal length). nullptr:
  // static round-robin assignment always.
  void* workspace = nullptr;
  // Wide key tiles (FwdPolicyWide, where compiled): -1 = where the policy says (unmasked, long keys), 0 = never,
  // 1 = always (tests, benchmarks).
  int wide_tiles = -1;
  // KV cache, GQA packing (the query heads of one kv head in one tile, fwd_kvcache_pack_gqa): -1 = where the
  // policy says, 0 = never, 1 = whenever num_heads_q > num_heads_k (tests).
  int pack_gqa = -1;
  // KV cache, paged: true reads every page size that splits key blocks with the producer's gather, multiples of 8
  // rows too (fwd_kvcache_load; tests: the same shapes through both paths).
  bool gather_pages = false;
};

inline constexpr size_t kFwdWorkspaceBytes = 16;

// Status of a launch: `error` is cudaSuccess on success; otherwise `what` names the failing step (static string).
struct FwdStatus {
  cudaError_t error = cudaSuccess;
  const char* what = "";
  bool ok() const { return error == cudaSuccess && what[0] == '\0'; }
};

// Checks the parameters (shapes, strides, pointers, alignment, compiled-in instantiations) without launching.
// Returns nullptr when fine, else a static message.
const char* fwd_check(const FwdParams& p);

// Checks, then launches on `stream`. Never throws.
FwdStatus run_fwd(const FwdParams& p, cudaStream_t stream);

// Whether (dtype, head_dim, head_dim_v) was compiled into this build (head_dim_v 0: head_dim), and whether with a
// wide-key-tile kernel (d_v == d only).
bool fwd_compiled(DType dtype, int head_dim, int head_dim_v = 0);
bool fwd_compiled_wide(DType dtype, int head_dim);

// The head dim D of the compiled forward kernel that serves a call's (dtype, head_dim, head_dim_v), or 0 if none:
// the smallest compiled D >= head_dim where head_dim_v == head_dim (0: head_dim); MLA pairs (head_dim_v < head_dim)
// only by an exact compiled pair. The one place that chooses the instance (run_fwd, fwd_check and the tests ask it).
int fwd_kernel_dim(DType dtype, int head_dim, int head_dim_v = 0);

// Compiled instantiations as "bf16:128;fp16:64;bf16:192x128;..." (static string; "DxDV" where d_v != d, MLA), and
// the target arch.
const char* fwd_compiled_list();
const char* fwd_arch();

// Backward: core + the forward's out/LSE + the cotangents + gradients, and the fp32 workspace the passes share.
// Rows of the per-row buffers are padded to the main kernel's query tile (bwd_tile_m, bwd_layout.h) so that its
// query tiles never need a bound.
struct BwdParams {
  AttnCore core;
  const void* out = nullptr;   // (b, sq, hq, d_v), dense
  const void* dout = nullptr;  // (b, sq, hq, d_v), dense
  const float* lse = nullptr;  // (b, hq, sq), natural log, -inf for rows that saw no key
  const float* dlse = nullptr; // (b, hq, sq) cotangent of the LSE, or nullptr (zero)
  void* dq = nullptr;          // (b, sq, hq, d), dense
  void* dk = nullptr;          // (b, sk, hk, d), dense
  void* dv = nullptr;          // (b, sk, hk, d_v), dense
  // Workspace (bwd_workspace_bytes, 16-byte aligned): dq_accum fp32 (b, hq, sq_pad, D) in the tile order of
  // bwd_layout.h (D = bwd_kernel_dim(dtype, d, d_v) >= d: the kernel's width; columns past d stay 0); delta and
  // lse_log2 fp32 (b, hq, sq_pad); deterministic: int32 turn counters.
  void* workspace = nullptr;
  // Bitwise-reproducible gradients: dQ partials added in a fixed key-block order (bwd_mainloop.h).
  bool deterministic = false;
  // The policy's query tile (bwd_tile_m): -1 from its min_seqlen_q queries on; 1 at any length (tests cover it on
  // small inputs); 0 never (kBwdBlockM).
  int policy_rows = -1;
};

// The backward's workspace, carved from BwdParams::workspace (all fp32, 256-byte aligned parts).
struct BwdWorkspace {
  float* dq_accum = nullptr;
  float* delta = nullptr;     // rowsum(dO * O) - dlse: the softmax gradient's row term (FA2 paper, Alg. 2)
  float* lse_log2 = nullptr;  // lse * log2(e); +inf where lse is -inf so that exp2(s - lse_log2) is 0
  int* dq_sem = nullptr;      // deterministic only: (b, hq, sq_pad / tile_m, kBwdNumMmaWG) turn counters
  int tile_m = kBwdBlockM;    // bwd_tile_m: the main kernel's query rows per step, the stat rows' padding
};
// The query tile of a call's main kernel (bwd_layout.h), the one place that picks it, for dense calls with at least
// the policy's min_seqlen_q queries (policy_rows): kBwdBlockMTall for every such call where the serving instance's
// policy has block_m = 128; kBwdBlockMWide where it has block_m = 80 and the call is unmasked (no causal or window
// bound), without softcap and not deterministic; else kBwdBlockM. Workspace sizes, the passes and the launch all
// read it.
int bwd_tile_m(const BwdParams& p);
size_t bwd_workspace_bytes(const BwdParams& p);
BwdWorkspace bwd_workspace(const BwdParams& p);

// Checks the parameters without launching; nullptr when fine, else a static message.
const char* bwd_check(const BwdParams& p);

// The passes around the main kernel, each on `stream`, never throwing:
//   preprocess:  delta, lse_log2 (padded rows: 0 and +inf), dq_accum (and the turn counters) zeroed;
//   postprocess: dq = dq_accum * softmax_scale in the input dtype.
// Varlen: zeroes the dq, dk, dv rows that no later pass writes (outside every sequence, past seqused_k or past the
// covered lengths); a no-op for dense calls.
FwdStatus run_bwd_zero_uncovered(const BwdParams& p, cudaStream_t stream);
FwdStatus run_bwd_preprocess(const BwdParams& p, cudaStream_t stream);
FwdStatus run_bwd_postprocess(const BwdParams& p, cudaStream_t stream);

// The whole backward (checks, preprocess, main kernel, postprocess) on `stream`. Never throws.
FwdStatus run_bwd(const BwdParams& p, cudaStream_t stream);

// Whether (dtype, head_dim, head_dim_v) has a compiled backward (head_dim_v 0: head_dim), and the list as
// "bf16:128;bf16:192x128;..." (static string; "DxDV" where d_v != d, MLA).
bool bwd_compiled(DType dtype, int head_dim, int head_dim_v = 0);
const char* bwd_compiled_list();
// The head dim D of the compiled backward that serves (dtype, head_dim, head_dim_v), or 0 if none: the smallest
// compiled D >= head_dim where head_dim_v == head_dim (0: head_dim); MLA pairs only by an exact compiled pair (as
// fwd_kernel_dim). dq_accum tiles are D wide (bwd_layout.h), so the workspace is sized by it.
int bwd_kernel_dim(DType dtype, int head_dim, int head_dim_v = 0);

// Per-instantiation main kernels (generated translation units).
template <DType kDType, int kHeadDim, int kHeadDimV>
FwdStatus run_bwd_instance(const BwdParams& p, BwdWorkspace const& ws, cudaStream_t stream);

// Per-instantiation entry points (defined in generated translation units). kWide: FwdPolicyWide's tiles instead
// of FwdPolicy's.
template <DType kDType, int kHeadDim, int kHeadDimV, bool kWide>
FwdStatus run_fwd_instance(const FwdParams& p, cudaStream_t stream);
// The KV-cache forward (core.kvcache on), FwdPolicy's tiles; a translation unit of its own per (dtype, head_dim).
template <DType kDType, int kHeadDim>
FwdStatus run_fwd_kvcache_instance(const FwdParams& p, cudaStream_t stream);
// Whether a KV-cache call of (dtype, head_dim) has a compiled KV-cache forward, and that kernel's key block (paged
// caches of a multiple of it take the TMA fast path, fwd_kvcache_load; 0 when none). The kernel is fwd_kernel_dim's: the narrowest
// d_v == d instance that holds head_dim (each has a KV-cache kernel beside it); head_dim must be a multiple of 8.
bool fwd_kvcache_compiled(DType dtype, int head_dim);
int fwd_kvcache_block_n(DType dtype, int head_dim);
int fwd_kvcache_block_m(DType dtype, int head_dim);  // that kernel's query tile (0 when none)

// How the KV-cache forward reads its cache's key blocks (kernel_traits.h Params::kv_load), chosen per call by
// fwd_kvcache_load, the one place that decides it:
//   kBlocks  contiguous caches, or pages of a multiple of the key block: one TMA box per key block (the fast path)
//   kBoxes   pages of a multiple of 8 rows (the 128-byte swizzle atom): TMA boxes of fwd_kvcache_box_rows rows,
//            each inside one page, all on the stage's barrier with the block's transaction bytes
//   kGather  any other page size (or any with FwdParams::gather_pages): the producer warp copies the block's rows
//            with 16-byte cp.async
// In the last two a key block spans pages, so a page index out of range masks that page's columns only (the
// producer leaves a per-block column mask in shared memory for the consumers).
enum class KVLoad : int { kBlocks = 0, kBoxes = 1, kGather = 2 };
KVLoad fwd_kvcache_load(const FwdParams& p);
// Which page sizes that split key blocks the KV-cache kernel of (dtype, head_dim) reads: 0 none (pages of whole key
// blocks only), 1 multiples of 8 rows (kBoxes), 2 any (kGather too); fwd_check refuses the others, and
// fwd_kvcache_page_served says it for one call's page_size.
int fwd_kvcache_page_reads(DType dtype, int head_dim);
bool fwd_kvcache_page_served(DType dtype, int head_dim, int page_size, bool gather_pages = false);
// kBoxes' rows per TMA box: gcd(page_size, block_n), a multiple of 8 that divides both, so a box never crosses a
// page and lands on a 1024-byte (swizzle-atom) boundary of the stage.
int fwd_kvcache_box_rows(int page_size, int block_n);

// Whether a KV-cache call's tiles pack the query heads of one kv head (p.pack_gqa; policy: num_heads_q >
// num_heads_k and seqlen_q * group <= the query tile, i.e. decode, where one unpacked query would fill one row of
// a tile). The one place that decides it (the launch, the split rule below and the tests ask it).
bool fwd_kvcache_pack_gqa(const FwdParams& p);
// The splits a KV-cache call runs with: `requested` >= 1 capped at kMaxSplits and at the key blocks of the longest
// possible row (capacity + seqlen_new); 0 = automatic: 1 while the tiles (batch x heads x query tiles) fill 80% of
// the `num_sms` SMs (one persistent CTA each), else the fewest splits whose last wave is about as full (>= 85%) as
// the fullest choice's, skipping counts that leave parts empty. The one place that chooses them.
int fwd_kvcache_num_splits(const FwdParams& p, int requested, int num_sms);
// Bytes of the split-KV buffers for p.splits.num_splits (0 when <= 1), and their layout in `base` (256-byte
// aligned, at least that many bytes) into p.splits.
size_t fwd_splits_workspace_bytes(const FwdParams& p);
void fwd_splits_workspace(FwdParams& p, void* base);
// The combine pass of a split-KV call (after its kernel, on the same stream): out (b, sq, hq, d_v) in the call's
// dtype and lse (b, hq, sq) from the parts in p.splits, with p.sinks (if any) in every row's denominator. run_fwd
// runs it; exposed for tests.
FwdStatus run_fwd_combine(const FwdParams& p, cudaStream_t stream);

}  // namespace fa3jax

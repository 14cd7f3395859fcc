// Parameter checks and (dtype, head_dim, head_dim_v) dispatch over the instantiations compiled into this build
// (listed in the generated fwd_instances.inc).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "fa3jax/attn_params.h"
#include "checks.h"
#include "policy.h"  // generated

namespace fa3jax {

bool fwd_compiled(DType dtype, int head_dim, int head_dim_v) {
  if (head_dim_v == 0) head_dim_v = head_dim;
#define FA3JAX_FWD_INSTANCE(e, n, d, dv, label) \
  if (dtype == DType::e && head_dim == d && head_dim_v == dv) return true;
#include "fwd_instances.inc"
#undef FA3JAX_FWD_INSTANCE
  return false;
}

bool fwd_compiled_wide(DType dtype, int head_dim) {
#define FA3JAX_FWD_INSTANCE(e, n, d, dv, label)
#define FA3JAX_FWD_WIDE_INSTANCE(e, n, d) \
  if (dtype == DType::e && head_dim == d) return true;
#include "fwd_instances.inc"
#undef FA3JAX_FWD_WIDE_INSTANCE
#undef FA3JAX_FWD_INSTANCE
  return false;
}

int fwd_kernel_dim(DType dtype, int head_dim, int head_dim_v) {
  if (head_dim_v == 0) head_dim_v = head_dim;
  int best = 0;
  // MLA: exact pairs only (its policy is per pair); else the narrowest kernel that holds head_dim (the instances
  // are listed in no particular order).
#define FA3JAX_FWD_INSTANCE(e, n, d, dv, label)                                                       \
  if (dtype == DType::e && (head_dim_v != head_dim ? (head_dim == d && head_dim_v == dv)               \
                                                  : (d == dv && head_dim <= d && (best == 0 || d < best)))) \
    best = d;
#include "fwd_instances.inc"
#undef FA3JAX_FWD_INSTANCE
  return head_dim >= 1 ? best : 0;
}

bool fwd_kvcache_compiled(DType dtype, int head_dim) { return fwd_kvcache_block_n(dtype, head_dim) > 0; }

// The query and key tiles of the KV-cache kernel that serves head_dim (fwd_kernel_dim: every d_v == d forward
// instance has a KV-cache one beside it); {0, 0} when none.
static std::pair<int, int> kvcache_tiles(DType dtype, int head_dim) {
  int const kd = fwd_kernel_dim(dtype, head_dim);
#define FA3JAX_FWD_INSTANCE(e, n, d, dv, label)
#define FA3JAX_FWD_KVCACHE_INSTANCE(e, n, d) \
  if (dtype == DType::e && kd == d) return {FwdPolicy<d, d>::kBlockM, FwdPolicy<d, d>::kBlockN};
#include "fwd_instances.inc"
#undef FA3JAX_FWD_KVCACHE_INSTANCE
#undef FA3JAX_FWD_INSTANCE
  return {0, 0};
}

int fwd_kvcache_block_n(DType dtype, int head_dim) { return kvcache_tiles(dtype, head_dim).second; }
int fwd_kvcache_block_m(DType dtype, int head_dim) { return kvcache_tiles(dtype, head_dim).first; }

int fwd_kvcache_box_rows(int page_size, int block_n) {
  int a = page_size, b = block_n;
  while (b != 0) {
    int const t = a % b;
    a = b;
    b = t;
  }
  return a;
}

int fwd_kvcache_page_reads(DType dtype, int head_dim) {
  int const kd = fwd_kernel_dim(dtype, head_dim);
  if (kd <= 0) return 0;
#if FA3JAX_KVCACHE_SPANS_ALL
  return 2;  // test builds (CMake FA3JAX_KVCACHE_SPANS_ALL): every path, so that a GPU run can check them
#else
  // None until a JAX-level GPU run passes page boxes and the gather (the paged fault in RESULTS.md).
  return 0;
#endif
}

bool fwd_kvcache_page_served(DType dtype, int head_dim, int page_size, bool gather_pages) {
  int const bn = fwd_kvcache_block_n(dtype, head_dim);
  if (bn <= 0 || page_size < 1) return false;
  if (page_size % bn == 0) return true;
  int const reads = fwd_kvcache_page_reads(dtype, head_dim);
  return page_size % 8 == 0 && !gather_pages ? reads >= 1 : reads >= 2;
}

KVLoad fwd_kvcache_load(const FwdParams& p) {
  AttnCore const& c = p.core;
  int const bn = fwd_kvcache_block_n(c.dtype, c.head_dim);
  int const ps = c.paged.page_size;
  if (!c.paged.enabled() || bn <= 0 || ps < 1 || ps % bn == 0) return KVLoad::kBlocks;
  // A box must start on a swizzle atom (8 rows of 128 bytes) and stay inside one page.
  return ps % 8 == 0 && !p.gather_pages ? KVLoad::kBoxes : KVLoad::kGather;
}

bool fwd_kvcache_pack_gqa(const FwdParams& p) {
  AttnCore const& c = p.core;
  if (p.pack_gqa == 0 || c.num_heads_k < 1 || c.num_heads_q <= c.num_heads_k) return false;
  if (p.pack_gqa == 1) return true;
  // Decode-like calls only: with more rows than a tile the unpacked tiles are full already, and their Q is one TMA
  // box (the packed gather is row by row).
  int const bm = fwd_kvcache_block_m(c.dtype, c.head_dim);
  return int64_t(c.seqlen_q) * (c.num_heads_q / c.num_heads_k) <= bm;
}

int fwd_kvcache_num_splits(const FwdParams& p, int requested, int num_sms) {
  AttnCore const& c = p.core;
  int const bn = fwd_kvcache_block_n(c.dtype, c.head_dim), bm = fwd_kvcache_block_m(c.dtype, c.head_dim);
  if (bn <= 0 || bm <= 0 || requested == 1 || c.batch < 1 || c.num_heads_k < 1) return 1;
  // No row has more key blocks than its capacity and appended keys give (cache blocks, then appended blocks).
  int64_t const sn = c.append.enabled() ? c.append.seqlen_new : 0;
  int64_t const blocks = (int64_t(c.seqlen_k) + bn - 1) / bn + (sn + bn - 1) / bn;
  int const most = int(std::max<int64_t>(1, std::min<int64_t>(kMaxSplits, blocks)));
  if (requested > 1) return std::min(requested, most);
  // Automatic: one persistent CTA per SM, so the tiles fill the GPU once there are about as many as SMs.
  bool const pack = fwd_kvcache_pack_gqa(p);
  int64_t const rows = int64_t(c.seqlen_q) * (pack ? c.num_heads_q / c.num_heads_k : 1);
  int64_t const tiles = (rows + bm - 1) / bm * (pack ? c.num_heads_k : c.num_heads_q) * c.batch;
  int const sms = std::max(num_sms, 1);
  if (tiles >= int64_t(sms) * 8 / 10) return 1;
  // Wave efficiency of s splits: tiles * s CTAs over waves of `sms`, the last one's fill counting.
  auto efficiency = [&](int s) {
    double const waves = double(tiles) * s / sms;
    return waves / std::ceil(waves);
  };
  // s is eligible if its parts are shorter than s - 1's (otherwise s - 1 does the same work with fewer CTAs and
  // the extra part is empty).
  auto eligible = [&](int s) { return s == 1 || (blocks + s - 1) / s < (blocks + s - 2) / (s - 1); };
  double best = 0;
  for (int s = 1; s <= most; ++s)
    if (eligible(s)) best = std::max(best, efficiency(s));
  for (int s = 1; s <= most; ++s)
    if (eligible(s) && efficiency(s) >= 0.85 * best) return s;
  return 1;
}

namespace {
size_t align256(size_t n) { return (n + 255) / 256 * 256; }
size_t splits_rows(const FwdParams& p) {
  return size_t(p.splits.num_splits) * size_t(p.core.batch) * size_t(p.core.num_heads_q) * size_t(p.core.seqlen_q);
}
}  // namespace

size_t fwd_splits_workspace_bytes(const FwdParams& p) {
  if (p.splits.num_splits <= 1) return 0;
  size_t const rows = splits_rows(p);
  return align256(rows * size_t(p.core.value_dim()) * sizeof(float)) + align256(rows * sizeof(float));
}

void fwd_splits_workspace(FwdParams& p, void* base) {
  if (p.splits.num_splits <= 1 || base == nullptr) return;
  size_t const rows = splits_rows(p);
  p.splits.out_accum = static_cast<float*>(base);
  p.splits.lse_accum = reinterpret_cast<float*>(static_cast<char*>(base) +
                                                align256(rows * size_t(p.core.value_dim()) * sizeof(float)));
}

const char* fwd_compiled_list() {
#define FA3JAX_FWD_INSTANCE(e, n, d, dv, label) #n ":" label ";"
  static const char kList[] = ""
#include "fwd_instances.inc"
      ;
#undef FA3JAX_FWD_INSTANCE
  return kList;
}

const char* fwd_arch() { return "sm_90a"; }

// fwd_check of a KV-cache call (attn_params.h KVCacheSeqs; launch.h launch_fwd_kvcache says what the kernel needs).
static const char* kvcache_check(const FwdParams& fp) {
  AttnCore const& p = fp.core;
  if (p.varlen.enabled()) return "KV cache: varlen cu_seqlens cannot be combined with a KV cache";
  if (p.value_dim() != p.head_dim) return "KV cache: head_dim_v must equal head_dim (no MLA cache)";
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return "dtype must be bfloat16 or float16";
  if (p.head_dim < 1 || p.head_dim > 256) return "head_dim must be in [1, 256]";
  // TMA's 16-byte rows, as fwd_check (the Python backend refuses other head dims here: padding would copy the caches).
  if (p.head_dim % 8 != 0) return "KV cache: head_dim must be a multiple of 8 (TMA's 16-byte rows)";
  int const bn = fwd_kvcache_block_n(p.dtype, p.head_dim);  // of the narrowest kernel that holds head_dim
  if (bn <= 0) return "KV cache: no compiled KV-cache forward of this dtype with a head_dim >= the call's";
  if (p.num_heads_k < 1 || p.num_heads_q % p.num_heads_k != 0)
    return "num_heads_q must be a positive multiple of num_heads_k";
  int const splits = std::max(fp.splits.num_splits, 1);
  if (splits > kMaxSplits) return "KV cache: num_splits must be <= kMaxSplits (128)";
  // Packed or not, at most this many (query tile, head, batch, split) units (query tiles are >= 64 rows).
  if ((int64_t(p.seqlen_q) * (p.num_heads_q / p.num_heads_k) + 63) / 64 * p.num_heads_q * p.batch * splits >
      INT32_MAX)
    return "too many query tiles";
  if (splits > 1) {
    if (!fp.splits.out_accum || !fp.splits.lse_accum) return "KV cache: split K/V needs out_accum and lse_accum";
    if (!aligned16(fp.splits.out_accum) || (reinterpret_cast<uintptr_t>(fp.splits.lse_accum) & 3) != 0)
      return "KV cache: out_accum must be 16-byte and lse_accum 4-byte aligned";
  }
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads_q == 0) return nullptr;  // nothing to do
  if (p.seqlen_k < 1 || p.kvcache.cache_slots < 1) return "KV cache: capacity and cache slots must be >= 1";
  int slot_rows = p.seqlen_k;
  if (p.paged.enabled()) {
    if (p.paged.page_size < 1) return "KV cache: page_size must be >= 1";
    if (p.paged.max_pages_per_seq < 1 || int64_t(p.paged.max_pages_per_seq) * p.paged.page_size != p.seqlen_k)
      return "KV cache: the capacity (seqlen_k) must be max_pages_per_seq * page_size";
    slot_rows = p.paged.page_size;
    if (!fwd_kvcache_page_served(p.dtype, p.head_dim, p.paged.page_size, fp.gather_pages))
      return "KV cache: this head dim's kernel does not serve this page_size (fwd_kvcache_page_reads): use a multiple "
             "of its key block";
  }
  // TMA row coordinates: up to every cache row, plus a slot and a key block (launch_fwd_kvcache), in int32.
  if (int64_t(p.kvcache.cache_slots) * slot_rows + slot_rows + bn >= INT32_MAX)
    return "KV cache: too many cache rows for int32 TMA coordinates";
  if (p.append.enabled()) {
    int const sn = p.append.seqlen_new;
    if (sn < 1 || sn > p.seqlen_k) return "KV cache: seqlen_new must be in [1, capacity]";
    if (!p.append.v_new) return "KV cache: v_new is null";
    if (!aligned16(p.append.k_new) || !aligned16(p.append.v_new)) return "k_new and v_new must be 16-byte aligned";
    if (int64_t(p.batch) * sn + sn + bn >= INT32_MAX) return "KV cache: too many appended rows for int32 TMA coordinates";
    if (!tma_strides_ok(Strides{int64_t(p.num_heads_k) * p.head_dim, p.head_dim, int64_t(p.num_heads_k) * p.head_dim}))
      return "k_new/v_new rows must be multiples of 16 bytes";
  }
  if (!p.q || !p.k || !p.v || !fp.out || !fp.lse) return "null buffer";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(fp.out))
    return "q, k, v and out must be 16-byte aligned";
  if ((reinterpret_cast<uintptr_t>(fp.sinks) & 3) != 0) return "sinks must be 4-byte aligned (float32)";
  if (!(p.softmax_scale > 0.f) || p.softcap < 0.f) return "softmax_scale must be > 0 and softcap >= 0";
  // The caches are read as packed rows, slot after slot (launch_fwd_kvcache): one slot's stride is its rows.
  for (Strides s : {p.k_stride, p.v_stride}) {
    if (s.batch != int64_t(slot_rows) * s.row) return "KV cache: k/v must be packed slot after slot (batch stride = slot rows x row stride)";
    s.batch = s.row;
    if (!tma_strides_ok(s)) return "k/v strides must be positive multiples of 16 bytes below 2^40";
  }
  if (!tma_strides_ok(p.q_stride)) return "q strides must be positive multiples of 16 bytes below 2^40";
  if (int64_t(p.seqlen_q) * p.num_heads_q * p.head_dim * 2 >= (int64_t(1) << 40)) return "tensor too large for TMA";
  return nullptr;
}

const char* fwd_check(const FwdParams& fp) {
  AttnCore const& p = fp.core;
  if (p.kvcache.enabled()) {
    if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.num_heads_q < 0 || p.num_heads_k < 0)
      return "negative dimension";
    return kvcache_check(fp);
  }
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.num_heads_q < 0 || p.num_heads_k < 0)
    return "negative dimension";
  int const dv = p.value_dim();
  if (p.head_dim < 1 || p.head_dim > 256) return "head_dim must be in [1, 256]";
  if (dv < 0 || dv > p.head_dim) return "head_dim_v must be in [0, head_dim] (0: head_dim; smaller for MLA)";
  // TMA addresses rows in 16-byte units: a head dim of 2-byte elements must be a multiple of 8 (the Python backend
  // pads other head dims to the next multiple of 8 and slices the results).
  if (p.head_dim % 8 != 0 || dv % 8 != 0) return "head_dim and head_dim_v must be multiples of 8 (TMA's 16-byte rows)";
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return "dtype must be bfloat16 or float16";
  if (fwd_kernel_dim(p.dtype, p.head_dim, dv) == 0)
    return dv == p.head_dim ? "no compiled kernel of this dtype with a head_dim >= the call's"
                            : "this (dtype, head_dim, head_dim_v) was not compiled into the extension (MLA: "
                              "FA3JAX_HEAD_DIMS entries such as 192x128, 128x64)";
  if (p.num_heads_k < 1 || p.num_heads_q % p.num_heads_k != 0)
    return "num_heads_q must be a positive multiple of num_heads_k";
  if (p.paged.enabled() || p.append.enabled()) return "paged and appended K/V need the KV cache (core.kvcache)";
  if (fp.splits.num_splits > 1) return "split K/V is not implemented by this forward";
  bool const varlen = p.varlen.enabled();
  if (varlen) {
    if (!p.varlen.cu_seqlens_k) return "varlen: cu_seqlens_k is null";
    if (p.varlen.max_seqlen_q < 0 || p.varlen.max_seqlen_k < 0) return "varlen: max_seqlen_q/k must be >= 0";
    // TMA coordinates are int32: a sequence's end row (<= total) and rows up to total + a tile.
    if (p.seqlen_q > INT32_MAX - 1024 || p.seqlen_k > INT32_MAX - 1024) return "varlen: total rows too large";
  }
  // The persistent scheduler numbers (query block, head, batch) tiles with int32 (query blocks >= 64 rows).
  // Varlen: query rows per sequence in the grid (no sequence is longer than the total; launch.h caps it so).
  int64_t const rows_q = varlen ? std::min(p.varlen.max_seqlen_q, p.seqlen_q) : p.seqlen_q;
  if ((rows_q + 63) / 64 * p.num_heads_q * p.batch > INT32_MAX) return "too many query tiles";
  // Varlen with no sequence still writes its uncovered rows; otherwise no rows of q means nothing to do.
  if ((p.batch == 0 && !varlen) || p.seqlen_q == 0 || p.num_heads_q == 0) return nullptr;
  if (p.seqlen_k < 1) return "seqlen_k must be >= 1";
  if (!p.q || !p.k || !p.v || !fp.out || !fp.lse) return "null buffer";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(fp.out))
    return "q, k, v and out must be 16-byte aligned";
  if ((reinterpret_cast<uintptr_t>(fp.sinks) & 3) != 0) return "sinks must be 4-byte aligned (float32)";
  if (!(p.softmax_scale > 0.f) || p.softcap < 0.f) return "softmax_scale must be > 0 and softcap >= 0";
  // Varlen tensors have no batch stride (launch.h uses the row stride in its place).
  auto strides = [&](Strides s) {
    if (varlen) s.batch = s.row;
    return s;
  };
  if (!tma_strides_ok(strides(p.q_stride)) || !tma_strides_ok(strides(p.k_stride)) ||
      !tma_strides_ok(strides(p.v_stride)))
    return "q/k/v strides must be positive multiples of 16 bytes below 2^40 (AttnCore::set_dense_strides)";
  // out is written dense (the register epilogue addresses it so); its TMA store needs byte strides < 2^40.
  if (int64_t(p.seqlen_q) * p.num_heads_q * dv * 2 >= (int64_t(1) << 40)) return "tensor too large for TMA";
  return nullptr;
}

FwdStatus run_fwd(const FwdParams& p, cudaStream_t stream) {
  if (const char* msg = fwd_check(p)) return {cudaErrorInvalidValue, msg};
  AttnCore const& c = p.core;
  if ((c.batch == 0 && !c.varlen.enabled()) || c.seqlen_q == 0 || c.num_heads_q == 0) return {};
  if (c.kvcache.enabled()) {
    int const kd = fwd_kernel_dim(c.dtype, c.head_dim);  // the narrowest kernel that holds head_dim, as dense calls
#define FA3JAX_FWD_INSTANCE(e, n, d, dv_, label)
#define FA3JAX_FWD_KVCACHE_INSTANCE(e, n, d)                                   \
  if (c.dtype == DType::e && kd == d) {                                        \
    FwdStatus const st = run_fwd_kvcache_instance<DType::e, d>(p, stream);     \
    return !st.ok() || p.splits.num_splits <= 1 ? st : run_fwd_combine(p, stream); \
  }
#include "fwd_instances.inc"
#undef FA3JAX_FWD_KVCACHE_INSTANCE
#undef FA3JAX_FWD_INSTANCE
    return {cudaErrorInvalidValue, "unreachable: KV-cache instantiation missing"};
  }
  // Wide key tiles only pay on long unmasked rows (policy.h); tests force them with wide_tiles = 1. Varlen has
  // the FwdPolicy tiles only (launch_fwd).
  bool const unmasked = c.window_left < 0 && c.window_right < 0;
  int const dv = c.value_dim();
  // The kernel's head dims: the call's, or (d_v == d) the smallest compiled ones that hold them.
  int const kd = fwd_kernel_dim(c.dtype, c.head_dim, dv), kdv = dv == c.head_dim ? kd : dv;
#define FA3JAX_FWD_INSTANCE(e, n, d, dv_, label)
#define FA3JAX_FWD_WIDE_INSTANCE(e, n, d)                                                           \
  if (c.dtype == DType::e && kd == d && kdv == d && !c.varlen.enabled() &&                          \
      (p.wide_tiles == 1 || (p.wide_tiles < 0 && unmasked && c.seqlen_k >= FwdPolicyWide<d>::kMinSeqlenK))) \
    return run_fwd_instance<DType::e, d, d, true>(p, stream);
#include "fwd_instances.inc"
#undef FA3JAX_FWD_WIDE_INSTANCE
#undef FA3JAX_FWD_INSTANCE
#define FA3JAX_FWD_INSTANCE(e, n, d, dv_, label) \
  if (c.dtype == DType::e && kd == d && kdv == dv_) return run_fwd_instance<DType::e, d, dv_, false>(p, stream);
#include "fwd_instances.inc"
#undef FA3JAX_FWD_INSTANCE
  return {cudaErrorInvalidValue, "unreachable: instantiation missing"};
}

}  // namespace fa3jax

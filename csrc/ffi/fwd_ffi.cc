// XLA FFI handlers of the forward: dense without and with attention sinks, varlen (packed sequences, optional
// seqused_k and sinks), and the KV cache (contiguous or paged, appended k/v, leftpad, batch_idx, sinks). v (and out)
// may have a smaller head dim than q/k (MLA) where such a kernel is compiled.
// Typed checks on every input; every failure returns an ffi::Error, and nothing throws across the FFI.
// Stateless: nothing is kept between calls; the device workspace is the last result, a buffer XLA allocates
// (ffi_handlers.h gives its size), so that the handlers may be captured in CUDA graphs (ffi_common.h).
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "fa3jax/attn_params.h"
#include "fa3jax/ffi_handlers.h"
#include "ffi_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using fa3jax_ffi::dims_str;

// Bytes of a forward's workspace result for p.splits.num_splits: the persistent kernel's tile counter, then
// (split-KV) the fp32 parts at the first 256-byte boundary past it. The counter needs 4-byte and the parts 16-byte
// alignment (fwd_check), which XLA's buffers (>= 16) give; the parts' 256 is by hand (up to 255 bytes of padding)
// so that their rows start on whole cache lines whatever XLA's alignment, and the size stays address-independent.
size_t layout_bytes(const fa3jax::FwdParams& p) {
  size_t const split_bytes = fa3jax::fwd_splits_workspace_bytes(p);
  return split_bytes > 0 ? fa3jax::kFwdWorkspaceBytes + 255 + split_bytes : fa3jax::kFwdWorkspaceBytes;
}

// Launches a checked forward with its workspace (the last result, checked against layout_bytes here): the tile
// counter first, the split-KV parts (p.splits.num_splits > 1) after it.
ffi::Error Launch(const char* target, cudaStream_t stream, ffi::AnyBuffer& ws, fa3jax::FwdParams& p) {
  std::string const why = fa3jax_ffi::check_workspace(ws, layout_bytes(p), 4);
  if (!why.empty()) return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(target) + ": " + why);
  p.workspace = ws.untyped_data();
  if (p.splits.num_splits > 1) {
    uintptr_t const parts =
        (reinterpret_cast<uintptr_t>(p.workspace) + fa3jax::kFwdWorkspaceBytes + 255) & ~uintptr_t(255);
    fa3jax::fwd_splits_workspace(p, reinterpret_cast<char*>(parts));
  }
  fa3jax::FwdStatus st = fa3jax::run_fwd(p, stream);
  if (!st.ok()) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(target) + ": " + st.what + ": " +
                                                     cudaGetErrorString(st.error));
  }
  return ffi::Error::Success();
}

// The (hq,) float32 sinks operand into p.sinks; else what is wrong with it. Bound untyped so that a wrong dtype gets a
// message naming the operand (a typed binding's does not).
std::string set_sinks(ffi::AnyBuffer const& sinks, int64_t hq, fa3jax::FwdParams& p) {
  auto sd = sinks.dimensions();
  if (sinks.element_type() != ffi::DataType::F32) return "sinks must be float32";
  if (sd.size() != 1 || sd[0] != hq)
    return "sinks shape " + dims_str(sd) + " must be (heads_q,) = (" + std::to_string(hq) + ",)";
  p.sinks = static_cast<const float*>(sinks.untyped_data());
  return "";
}

// sinks: nullptr for the sink-free target, else the (hq,) float32 operand of fa3jax_cuda_fwd_sinks.
ffi::Error FwdImpl(const char* target, cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                   ffi::AnyBuffer const* sinks, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::AnyBuffer> ws, float softmax_scale,
                   int32_t window_left, int32_t window_right, float softcap, int32_t kernel_variant) {
  auto bad = [&](std::string m) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(target) + ": " + m);
  };
  fa3jax::FwdParams p;
  fa3jax::AttnCore& c = p.core;
  std::string const why = fa3jax_ffi::dense_core(q, k, v, softmax_scale, window_left, window_right, softcap, c);
  if (!why.empty()) return bad(why);
  auto od = out->dimensions(), ld = lse->dimensions();
  if (out->element_type() != q.element_type()) return bad("out must have q's dtype");
  if (od.size() != 4 || od[0] != c.batch || od[1] != c.seqlen_q || od[2] != c.num_heads_q || od[3] != c.value_dim())
    return bad("out shape " + dims_str(od) + " must be q's shape with v's head dim " +
               std::to_string(c.value_dim()));
  if (ld.size() != 3 || ld[0] != c.batch || ld[1] != c.num_heads_q || ld[2] != c.seqlen_q)
    return bad("lse shape " + dims_str(ld) + " must be (batch, heads_q, seqlen_q)");
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  if (sinks != nullptr) {
    std::string const swhy = set_sinks(*sinks, c.num_heads_q, p);
    if (!swhy.empty()) return bad(swhy);
  }
  // 0: the dispatch policy's choice; 1: FwdPolicy tiles; 3: wide key tiles where compiled (benchmarks compare
  // them in one process; see targets.py). 2 (a removed 2-CTA kernel) is refused so that a stale caller errs.
  if (kernel_variant != 0 && kernel_variant != 1 && kernel_variant != 3) return bad("kernel_variant must be 0, 1 or 3");
  p.wide_tiles = kernel_variant == 0 ? -1 : (kernel_variant == 3 ? 1 : 0);
  if (const char* msg = fa3jax::fwd_check(p)) return bad(msg);
  return Launch(target, stream, *ws, p);
}

ffi::Error Fwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
               ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::AnyBuffer> ws,
               float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
               int32_t kernel_variant) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return FwdImpl("fa3jax_cuda_fwd", stream, q, k, v, nullptr, out, lse, ws, softmax_scale, window_left,
                   window_right, softcap, kernel_variant);
  });
}

// The same forward with attention sinks: a target of its own, so that the sink-free call keeps its operands.
ffi::Error FwdSinks(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer sinks, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                    ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left, int32_t window_right,
                    float softcap, int32_t kernel_variant) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return FwdImpl("fa3jax_cuda_fwd_sinks", stream, q, k, v, &sinks, out, lse, ws, softmax_scale, window_left,
                   window_right, softcap, kernel_variant);
  });
}

// Varlen: q (total_q, hq, d), k (total_k, hk, d), v (total_k, hk, d_v), cu_seqlens_q/k int32 (batch + 1,), then,
// as the flags say, seqused_k int32 (batch,) and sinks float32 (hq,) (optional operands: one target serves the four
// combinations). Outputs out (total_q, hq, d_v), lse float32 (hq, total_q) and the workspace.
ffi::Error FwdVarlenImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer cu_seqlens_q, ffi::AnyBuffer cu_seqlens_k, ffi::RemainingArgs rest,
                         ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                         ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left,
                         int32_t window_right, float softcap, int32_t max_seqlen_q, int32_t max_seqlen_k,
                         int32_t has_seqused_k, int32_t has_sinks) {
  const char* target = "fa3jax_cuda_fwd_varlen";
  auto bad = [&](std::string m) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(target) + ": " + m);
  };
  if ((has_seqused_k != 0 && has_seqused_k != 1) || (has_sinks != 0 && has_sinks != 1))
    return bad("has_seqused_k and has_sinks must be 0 or 1");
  if (rest.size() != size_t(has_seqused_k + has_sinks))
    return bad("expected " + std::to_string(has_seqused_k + has_sinks) + " operands after cu_seqlens_k (seqused_k: " +
               std::to_string(has_seqused_k) + ", sinks: " + std::to_string(has_sinks) + "), got " +
               std::to_string(rest.size()));
  std::optional<ffi::AnyBuffer> used, sinks;
  if (has_seqused_k) {
    auto x = rest.get<ffi::AnyBuffer>(0);
    if (x.has_error()) return bad("seqused_k: not a buffer");
    used = *x;
  }
  if (has_sinks) {
    auto x = rest.get<ffi::AnyBuffer>(size_t(has_seqused_k));
    if (x.has_error()) return bad("sinks: not a buffer");
    sinks = *x;
  }
  fa3jax::FwdParams p;
  fa3jax::AttnCore& c = p.core;
  std::string const why =
      fa3jax_ffi::varlen_core(q, k, v, cu_seqlens_q, cu_seqlens_k, used ? &*used : nullptr, softmax_scale,
                              window_left, window_right, softcap, max_seqlen_q, max_seqlen_k, c);
  if (!why.empty()) return bad(why);
  auto od = out->dimensions(), ld = lse->dimensions();
  if (out->element_type() != q.element_type()) return bad("out must have q's dtype");
  if (od.size() != 3 || od[0] != c.seqlen_q || od[1] != c.num_heads_q || od[2] != c.value_dim())
    return bad("out shape " + dims_str(od) + " must be q's shape with v's head dim " +
               std::to_string(c.value_dim()));
  if (ld.size() != 2 || ld[0] != c.num_heads_q || ld[1] != c.seqlen_q)
    return bad("lse shape " + dims_str(ld) + " must be (heads_q, total_q)");
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  if (sinks) {
    std::string const swhy = set_sinks(*sinks, c.num_heads_q, p);
    if (!swhy.empty()) return bad(swhy);
  }
  if (const char* msg = fa3jax::fwd_check(p)) return bad(msg);
  return Launch(target, stream, *ws, p);
}

ffi::Error FwdVarlen(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                     ffi::AnyBuffer cu_seqlens_q, ffi::AnyBuffer cu_seqlens_k, ffi::RemainingArgs rest,
                     ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                     ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
                     int32_t max_seqlen_q, int32_t max_seqlen_k, int32_t has_seqused_k, int32_t has_sinks) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return FwdVarlenImpl(stream, q, k, v, cu_seqlens_q, cu_seqlens_k, rest, out, lse, ws, softmax_scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k,
                         has_seqused_k, has_sinks);
  });
}

// An int32 operand of shape `want` (its dims), named in the message otherwise.
std::string check_i32(ffi::AnyBuffer const& x, const char* name, std::initializer_list<int64_t> want) {
  auto xd = x.dimensions();
  bool ok = x.element_type() == ffi::DataType::S32 && xd.size() == want.size();
  size_t i = 0;
  for (int64_t w : want) ok = ok && xd[i++] == w;
  if (ok) return "";
  std::string w = "(";
  i = 0;
  for (int64_t v : want) w += (i++ ? ", " : "") + std::to_string(v);
  return std::string(name) + " must be int32 of shape " + w + ")" + "; got " + dims_str(xd);
}

// KV cache: q (b, lq, hq, d); k_cache/v_cache contiguous (slots, capacity, hk, d) or paged (num_pages, page_size,
// hk, d); cache_seqlens int32 (b,) (where the appended keys start: fa3jax KVCacheArgs.cache_seqlens); then, as the
// flags say, k_new and v_new (b, seqlen_new, hk, d), leftpad int32 (b,), batch_idx int32 (b,) (contiguous only),
// page_table int32 (b, max_pages_per_seq), sinks float32 (hq,). Outputs out (b, lq, hq, d), lse float32 (b, hq, lq).
// Index values are the kernel's to clamp (attn_params.h KVCacheSeqs). num_splits: split-KV parts (0: automatic,
// fwd_kvcache_num_splits on this device's SMs; the Python backend passes the count it resolved with
// fwd_kvcache_splits, which the rule returns unchanged), their fp32 buffers in the workspace result after the tile
// counter, combined in the same call.
ffi::Error FwdKvcacheImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kc, ffi::AnyBuffer vc,
                          ffi::AnyBuffer cache_seqlens, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out,
                          ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
                          int32_t has_new, int32_t has_leftpad, int32_t has_batch_idx, int32_t has_page_table,
                          int32_t has_sinks, int32_t num_splits) {
  const char* target = "fa3jax_cuda_fwd_kvcache";
  auto bad = [&](std::string m) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(target) + ": " + m);
  };
  for (int32_t f : {has_new, has_leftpad, has_batch_idx, has_page_table, has_sinks})
    if (f != 0 && f != 1) return bad("has_new, has_leftpad, has_batch_idx, has_page_table and has_sinks must be 0 or 1");
  if (has_page_table && (has_batch_idx || has_leftpad))
    return bad("a paged cache takes no batch_idx (fold it into the page table) and no leftpad");
  size_t const want = size_t(2 * has_new + has_leftpad + has_batch_idx + has_page_table + has_sinks);
  if (rest.size() != want)
    return bad("expected " + std::to_string(want) + " operands after cache_seqlens (k_new, v_new: " +
               std::to_string(2 * has_new) + ", leftpad: " + std::to_string(has_leftpad) + ", batch_idx: " +
               std::to_string(has_batch_idx) + ", page_table: " + std::to_string(has_page_table) + ", sinks: " +
               std::to_string(has_sinks) + "), got " + std::to_string(rest.size()));
  std::optional<ffi::AnyBuffer> k_new, v_new, leftpad, batch_idx, page_table, sinks;
  size_t next = 0;
  auto take = [&](bool on, const char* name, std::optional<ffi::AnyBuffer>& dst) -> std::string {
    if (!on) return "";
    auto x = rest.get<ffi::AnyBuffer>(next++);
    if (x.has_error()) return std::string(name) + ": not a buffer";
    dst = *x;
    return "";
  };
  for (auto [on, name, dst] : {std::tuple<bool, const char*, std::optional<ffi::AnyBuffer>*>{has_new != 0, "k_new", &k_new},
                               {has_new != 0, "v_new", &v_new}, {has_leftpad != 0, "leftpad", &leftpad},
                               {has_batch_idx != 0, "batch_idx", &batch_idx},
                               {has_page_table != 0, "page_table", &page_table}, {has_sinks != 0, "sinks", &sinks}}) {
    std::string const why = take(on, name, *dst);
    if (!why.empty()) return bad(why);
  }

  auto qd = q.dimensions(), kd = kc.dimensions(), vd = vc.dimensions();
  fa3jax::FwdParams p;
  fa3jax::AttnCore& c = p.core;
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return bad("expected q, k_cache and v_cache of rank 4");
  if (!fa3jax_ffi::kernel_dtype(q.element_type(), c.dtype)) return bad("q must be bfloat16 or float16");
  if (kc.element_type() != q.element_type() || vc.element_type() != q.element_type())
    return bad("q, k_cache and v_cache must share one dtype");
  int64_t const b = qd[0], lq = qd[1], hq = qd[2], d = qd[3], slots = kd[0], slot_rows = kd[1], hk = kd[2];
  if (kd[3] != d) return bad("k_cache shape " + dims_str(kd) + " must end in q's head dim (q shape " + dims_str(qd) + ")");
  for (size_t i = 0; i < 4; ++i)
    if (vd[i] != kd[i]) return bad("v_cache shape " + dims_str(vd) + " must equal k_cache's " + dims_str(kd));
  std::string why = check_i32(cache_seqlens, "cache_seqlens", {b});
  if (!why.empty()) return bad(why);
  int64_t capacity = slot_rows;
  if (page_table) {
    auto pd = page_table->dimensions();
    if (page_table->element_type() != ffi::DataType::S32 || pd.size() != 2 || pd[0] != b || pd[1] < 1)
      return bad("page_table must be int32 of shape (batch, max_pages_per_seq) with batch " + std::to_string(b) +
                 "; got " + dims_str(pd));
    capacity = pd[1] * slot_rows;
    if (pd[1] >= (int64_t(1) << 31) || capacity >= (int64_t(1) << 31)) return bad("page_table: capacity too large");
    c.paged.block_table = static_cast<const int*>(page_table->untyped_data());
    c.paged.page_size = int(slot_rows);
    c.paged.max_pages_per_seq = int(pd[1]);
  } else if (!batch_idx && slots != b) {
    return bad("k_cache shape " + dims_str(kd) + " must have q's batch " + std::to_string(b) +
               " unless batch_idx is given");
  }
  why = fa3jax_ffi::set_core(q, kc, vc, b, lq, capacity, hq, hk, d, d, softmax_scale, window_left, window_right,
                             softcap, c);
  if (!why.empty()) return bad(why);
  if (slots >= (int64_t(1) << 31)) return bad("k_cache: too many slots");
  // The caches step one slot (a row of the contiguous cache, or a page) per leading index.
  c.k_stride.batch = c.v_stride.batch = slot_rows * hk * d;
  c.kvcache.cache_seqlens = static_cast<const int*>(cache_seqlens.untyped_data());
  c.kvcache.cache_slots = int(slots);
  if (leftpad) {
    why = check_i32(*leftpad, "leftpad", {b});
    if (!why.empty()) return bad(why);
    c.kvcache.leftpad = static_cast<const int*>(leftpad->untyped_data());
  }
  if (batch_idx) {
    why = check_i32(*batch_idx, "batch_idx", {b});
    if (!why.empty()) return bad(why);
    c.kvcache.batch_idx = static_cast<const int*>(batch_idx->untyped_data());
  }
  if (k_new) {
    auto nd = k_new->dimensions(), nvd = v_new->dimensions();
    if (k_new->element_type() != q.element_type() || v_new->element_type() != q.element_type())
      return bad("k_new and v_new must have q's dtype");
    if (nd.size() != 4 || nd[0] != b || nd[2] != hk || nd[3] != d || nd[1] < 1)
      return bad("k_new shape " + dims_str(nd) + " must be (batch, seqlen_new >= 1, heads_k, head_dim) = (" +
                 std::to_string(b) + ", *, " + std::to_string(hk) + ", " + std::to_string(d) + ")");
    if (nvd.size() != 4 || nvd[0] != nd[0] || nvd[1] != nd[1] || nvd[2] != nd[2] || nvd[3] != nd[3])
      return bad("v_new shape " + dims_str(nvd) + " must equal k_new's " + dims_str(nd));
    if (nd[1] > capacity) return bad("k_new: seqlen_new " + std::to_string(nd[1]) + " exceeds the capacity " +
                                     std::to_string(capacity));
    c.append.k_new = k_new->untyped_data();
    c.append.v_new = v_new->untyped_data();
    c.append.seqlen_new = int(nd[1]);
  }
  auto od = out->dimensions(), ld = lse->dimensions();
  if (out->element_type() != q.element_type()) return bad("out must have q's dtype");
  if (od.size() != 4 || od[0] != b || od[1] != lq || od[2] != hq || od[3] != d)
    return bad("out shape " + dims_str(od) + " must be q's shape " + dims_str(qd));
  if (ld.size() != 3 || ld[0] != b || ld[1] != hq || ld[2] != lq)
    return bad("lse shape " + dims_str(ld) + " must be (batch, heads_q, seqlen_q)");
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  if (sinks) {
    why = set_sinks(*sinks, hq, p);
    if (!why.empty()) return bad(why);
  }
  // 0: automatic; any other count is capped at the key blocks a row can have (fwd_kvcache_num_splits).
  if (num_splits < 0) return bad("num_splits must be >= 0 (0: automatic); got " + std::to_string(num_splits));
  int sms = 0;  // read only by the automatic rule
  if (num_splits == 0)
    if (cudaError_t const err = fa3jax_ffi::current_num_sms(&sms); err != cudaSuccess)
      return ffi::Error(ffi::ErrorCode::kInternal, std::string(target) + ": cudaDeviceGetAttribute: " +
                                                       cudaGetErrorString(err));
  int const splits = fa3jax::fwd_kvcache_num_splits(p, num_splits, sms);
  if (const char* msg = fa3jax::fwd_check(p)) return bad(msg);  // unsplit: everything but the split buffers
  p.splits.num_splits = splits;  // <= kMaxSplits; Launch lays out its buffers (run_fwd checks them again)
  return Launch(target, stream, *ws, p);
}

ffi::Error FwdKvcache(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kc, ffi::AnyBuffer vc,
                      ffi::AnyBuffer cache_seqlens, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out,
                      ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::AnyBuffer> ws, float softmax_scale,
                      int32_t window_left, int32_t window_right, float softcap, int32_t has_new, int32_t has_leftpad,
                      int32_t has_batch_idx, int32_t has_page_table, int32_t has_sinks,
                      int32_t num_splits) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return FwdKvcacheImpl(stream, q, kc, vc, cache_seqlens, rest, out, lse, ws, softmax_scale,
                          window_left, window_right, softcap, has_new, has_leftpad, has_batch_idx, has_page_table,
                          has_sinks, num_splits);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwd, Fwd,
                              fa3jax_ffi::bind_mask_attrs(fa3jax_ffi::bind_dense_inputs(ffi::Ffi::Bind())
                                                              .Ret<ffi::AnyBuffer>()           // out
                                                              .Ret<ffi::Buffer<ffi::F32>>()   // lse
                                                              .Ret<ffi::AnyBuffer>())          // workspace
                                  .Attr<int32_t>("kernel_variant"),
                              FA3JAX_FFI_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwdSinks, FwdSinks,
                              fa3jax_ffi::bind_mask_attrs(fa3jax_ffi::bind_dense_inputs(ffi::Ffi::Bind())
                                                              .Arg<ffi::AnyBuffer>()           // sinks (hq,) f32
                                                              .Ret<ffi::AnyBuffer>()           // out
                                                              .Ret<ffi::Buffer<ffi::F32>>()   // lse
                                                              .Ret<ffi::AnyBuffer>())          // workspace
                                  .Attr<int32_t>("kernel_variant"),
                              FA3JAX_FFI_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwdVarlen, FwdVarlen,
                              fa3jax_ffi::bind_mask_attrs(ffi::Ffi::Bind()
                                                              .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                              .Arg<ffi::AnyBuffer>()   // q
                                                              .Arg<ffi::AnyBuffer>()   // k
                                                              .Arg<ffi::AnyBuffer>()   // v
                                                              .Arg<ffi::AnyBuffer>()   // cu_seqlens_q
                                                              .Arg<ffi::AnyBuffer>()   // cu_seqlens_k
                                                              .RemainingArgs()         // [seqused_k] [sinks]
                                                              .Ret<ffi::AnyBuffer>()   // out
                                                              .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                                              .Ret<ffi::AnyBuffer>())  // workspace
                                  .Attr<int32_t>("max_seqlen_q")
                                  .Attr<int32_t>("max_seqlen_k")
                                  .Attr<int32_t>("has_seqused_k")
                                  .Attr<int32_t>("has_sinks"),
                              FA3JAX_FFI_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwdKvcache, FwdKvcache,
                              fa3jax_ffi::bind_mask_attrs(ffi::Ffi::Bind()
                                                              .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                              .Arg<ffi::AnyBuffer>()   // q
                                                              .Arg<ffi::AnyBuffer>()   // k_cache
                                                              .Arg<ffi::AnyBuffer>()   // v_cache
                                                              .Arg<ffi::AnyBuffer>()   // cache_seqlens
                                                              .RemainingArgs()         // see FwdKvcacheImpl
                                                              .Ret<ffi::AnyBuffer>()   // out
                                                              .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                                              .Ret<ffi::AnyBuffer>())  // workspace
                                  .Attr<int32_t>("has_new")
                                  .Attr<int32_t>("has_leftpad")
                                  .Attr<int32_t>("has_batch_idx")
                                  .Attr<int32_t>("has_page_table")
                                  .Attr<int32_t>("has_sinks")
                                  .Attr<int32_t>("num_splits"),
                              FA3JAX_FFI_TRAITS);

namespace fa3jax_ffi {

cudaError_t current_num_sms(int* sms) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  return err;
}

size_t fwd_workspace_size() { return layout_bytes(fa3jax::FwdParams{}); }

KvcacheWorkspace fwd_kvcache_workspace(int dtype, int64_t batch, int64_t seqlen_q, int64_t heads_q, int64_t heads_k,
                                       int64_t head_dim, int64_t capacity, int64_t seqlen_new, int requested,
                                       int num_sms) {
  KvcacheWorkspace w{1, layout_bytes(fa3jax::FwdParams{}), cudaSuccess};
  // The fields of FwdParams that the split rule and the layout read, as FwdKvcacheImpl sets them from its buffers;
  // calls the handler refuses (its dimension and num_splits checks) need no more than the counter.
  fa3jax::FwdParams p;
  fa3jax::AttnCore& c = p.core;
  if (!set_dims(batch, seqlen_q, capacity, heads_q, heads_k, head_dim, head_dim, c) || seqlen_new < 0 ||
      seqlen_new >= (int64_t(1) << 31) || (dtype != 0 && dtype != 1) || requested < 0)
    return w;
  c.dtype = static_cast<fa3jax::DType>(dtype);
  static char const kNotRead = 0;  // AppendKV::enabled() asks for a pointer; no size rule dereferences it
  if (seqlen_new > 0) {
    c.append.k_new = c.append.v_new = &kNotRead;
    c.append.seqlen_new = int(seqlen_new);
  }
  if (requested == 0 && num_sms < 0) {
    w.error = current_num_sms(&num_sms);
    if (w.error != cudaSuccess) return w;
  }
  w.num_splits = p.splits.num_splits = fa3jax::fwd_kvcache_num_splits(p, requested, num_sms);
  w.bytes = layout_bytes(p);
  return w;
}

}  // namespace fa3jax_ffi

// XLA FFI handlers of the backward, dense and varlen: dq, dk, dv from q, k, v, the forward's out and lse, and the
// cotangents dout and dlse. v, out, dout and dv may have a smaller head dim than q/k (MLA) where such a kernel is
// compiled. Typed checks on every input; every failure returns an ffi::Error, and nothing throws across the
// FFI. Stateless: the fp32 workspace (dq accumulator, per-row terms) is the last result, a buffer that XLA allocates
// (ffi_handlers.h bwd_workspace_size gives its size), so that the handlers may be captured in CUDA graphs.
#include <cstdint>
#include <optional>
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

bool same_dims(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// a has b's dimensions but for the last (the head dim), which is `last`.
bool same_dims_but_last(ffi::Span<const int64_t> a, ffi::Span<const int64_t> b, int64_t last) {
  if (a.size() != b.size() || a.size() == 0 || a[a.size() - 1] != last) return false;
  for (size_t i = 0; i + 1 < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// The checks on the outputs and the cotangents, the workspace, and the run; shared by both handlers. q, k, v:
// the inputs whose dtypes and shapes out/dout (q's, with v's head dim) and dq/dk/dv must have (given when `p` does
// not fix them).
ffi::Error RunBwd(const char* target, cudaStream_t stream, ffi::AnyBuffer const& out, ffi::Buffer<ffi::F32> const& lse,
                  ffi::AnyBuffer const& dout, ffi::Buffer<ffi::F32> const& dlse, ffi::Result<ffi::AnyBuffer>& dq,
                  ffi::Result<ffi::AnyBuffer>& dk, ffi::Result<ffi::AnyBuffer>& dv, ffi::AnyBuffer const& ws,
                  int32_t deterministic, fa3jax::BwdParams& p, ffi::AnyBuffer const* q = nullptr,
                  ffi::AnyBuffer const* k = nullptr, ffi::AnyBuffer const* v = nullptr) {
  auto bad = [&](std::string m) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, target + (": " + m)); };
  fa3jax::AttnCore const& c = p.core;
  if (q != nullptr) {
    ffi::DataType const dt = q->element_type();
    for (auto const* buf : {&out, &dout})
      if (buf->element_type() != dt || !same_dims_but_last(buf->dimensions(), q->dimensions(), c.value_dim()))
        return bad("out and dout (shapes " + dims_str(out.dimensions()) + ", " + dims_str(dout.dimensions()) +
                   ") must have q's dtype and shape " + dims_str(q->dimensions()) + " with v's head dim " +
                   std::to_string(c.value_dim()));
    if (dq->element_type() != dt || !same_dims(dq->dimensions(), q->dimensions()))
      return bad("dq must have q's dtype and shape");
    if (dk->element_type() != dt || !same_dims(dk->dimensions(), k->dimensions()) || dv->element_type() != dt ||
        !same_dims(dv->dimensions(), v->dimensions()))
      return bad("dk and dv must have k's and v's dtype and shapes " + dims_str(k->dimensions()) + ", " +
                 dims_str(v->dimensions()));
  }
  p.out = out.untyped_data();
  p.dout = dout.untyped_data();
  p.lse = lse.typed_data();
  p.dlse = dlse.typed_data();
  p.dq = dq->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  if (deterministic != 0 && deterministic != 1) return bad("deterministic must be 0 or 1");
  p.deterministic = deterministic == 1;
  p.workspace = ws.untyped_data();
  // bwd_check first: it bounds the shapes (its "tensor too large"), so that the size below cannot overflow.
  if (const char* msg = fa3jax::bwd_check(p)) return bad(msg);
  // 16-byte alignment: the passes' bulk copies and vector reductions (its parts are 256-byte multiples past it).
  std::string const why = fa3jax_ffi::check_workspace(ws, fa3jax::bwd_workspace_bytes(p), 16);
  if (!why.empty()) return bad(why);
  fa3jax::FwdStatus st = fa3jax::run_bwd(p, stream);
  if (!st.ok()) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(target) + ": " + st.what + ": " +
                                                     cudaGetErrorString(st.error));
  }
  return ffi::Error::Success();
}

ffi::Error BwdImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                   ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> dlse,
                   ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                   ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left, int32_t window_right,
                   float softcap, int32_t deterministic) {
  auto bad = [](std::string m) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fa3jax_cuda_bwd: " + m); };
  fa3jax::BwdParams p;
  fa3jax::AttnCore& c = p.core;
  std::string const why = fa3jax_ffi::dense_core(q, k, v, softmax_scale, window_left, window_right, softcap, c);
  if (!why.empty()) return bad(why);
  for (auto const* buf : {&lse, &dlse}) {
    auto ld = buf->dimensions();
    if (ld.size() != 3 || ld[0] != c.batch || ld[1] != c.num_heads_q || ld[2] != c.seqlen_q)
      return bad("lse and dlse shapes " + dims_str(ld) + " must be (batch, heads_q, seqlen_q)");
  }
  return RunBwd("fa3jax_cuda_bwd", stream, out, lse, dout, dlse, dq, dk, dv, *ws, deterministic, p, &q, &k, &v);
}

// Varlen: packed q (total_q, hq, d), k (total_k, hk, d), v (total_k, hk, d_v), out/dout (total_q, hq, d_v),
// lse/dlse (hq, total_q), then
// cu_seqlens_q/k int32 (batch + 1,) and, with has_seqused_k, seqused_k int32 (batch,).
ffi::Error BwdVarlenImpl(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                         ffi::AnyBuffer out, ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout,
                         ffi::Buffer<ffi::F32> dlse, ffi::AnyBuffer cu_seqlens_q, ffi::AnyBuffer cu_seqlens_k,
                         ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                         ffi::Result<ffi::AnyBuffer> dv, ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left,
                         int32_t window_right, float softcap, int32_t deterministic, int32_t max_seqlen_q,
                         int32_t max_seqlen_k, int32_t has_seqused_k) {
  const char* target = "fa3jax_cuda_bwd_varlen";
  auto bad = [&](std::string m) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, target + (": " + m)); };
  if (has_seqused_k != 0 && has_seqused_k != 1) return bad("has_seqused_k must be 0 or 1");
  if (rest.size() != size_t(has_seqused_k))
    return bad("expected " + std::to_string(has_seqused_k) + " operands after cu_seqlens_k (seqused_k), got " +
               std::to_string(rest.size()));
  std::optional<ffi::AnyBuffer> used;
  if (has_seqused_k) {
    auto x = rest.get<ffi::AnyBuffer>(0);
    if (x.has_error()) return bad("seqused_k: not a buffer");
    used = *x;
  }
  fa3jax::BwdParams p;
  fa3jax::AttnCore& c = p.core;
  std::string const why =
      fa3jax_ffi::varlen_core(q, k, v, cu_seqlens_q, cu_seqlens_k, used ? &*used : nullptr, softmax_scale,
                              window_left, window_right, softcap, max_seqlen_q, max_seqlen_k, c);
  if (!why.empty()) return bad(why);
  for (auto const* buf : {&lse, &dlse}) {
    auto ld = buf->dimensions();
    if (ld.size() != 2 || ld[0] != c.num_heads_q || ld[1] != c.seqlen_q)
      return bad("lse and dlse shapes " + dims_str(ld) + " must be (heads_q, total_q)");
  }
  return RunBwd(target, stream, out, lse, dout, dlse, dq, dk, dv, *ws, deterministic, p, &q, &k, &v);
}

ffi::Error Bwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
               ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> dlse,
               ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
               ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left, int32_t window_right,
               float softcap, int32_t deterministic) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return BwdImpl(stream, q, k, v, out, lse, dout, dlse, dq, dk, dv, ws, softmax_scale, window_left, window_right,
                   softcap, deterministic);
  });
}

ffi::Error BwdVarlen(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer out,
                     ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout, ffi::Buffer<ffi::F32> dlse,
                     ffi::AnyBuffer cu_seqlens_q, ffi::AnyBuffer cu_seqlens_k, ffi::RemainingArgs rest,
                     ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                     ffi::Result<ffi::AnyBuffer> ws, float softmax_scale, int32_t window_left, int32_t window_right,
                     float softcap, int32_t deterministic, int32_t max_seqlen_q, int32_t max_seqlen_k,
                     int32_t has_seqused_k) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return BwdVarlenImpl(stream, q, k, v, out, lse, dout, dlse, cu_seqlens_q, cu_seqlens_k, rest, dq, dk, dv, ws,
                         softmax_scale, window_left, window_right, softcap, deterministic, max_seqlen_q,
                         max_seqlen_k, has_seqused_k);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaBwdVarlen, BwdVarlen,
                              fa3jax_ffi::bind_mask_attrs(fa3jax_ffi::bind_dense_inputs(ffi::Ffi::Bind())
                                                              .Arg<ffi::AnyBuffer>()          // out
                                                              .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                                              .Arg<ffi::AnyBuffer>()          // dout
                                                              .Arg<ffi::Buffer<ffi::F32>>()  // dlse
                                                              .Arg<ffi::AnyBuffer>()          // cu_seqlens_q
                                                              .Arg<ffi::AnyBuffer>()          // cu_seqlens_k
                                                              .RemainingArgs()                // [seqused_k]
                                                              .Ret<ffi::AnyBuffer>()          // dq
                                                              .Ret<ffi::AnyBuffer>()          // dk
                                                              .Ret<ffi::AnyBuffer>()          // dv
                                                              .Ret<ffi::AnyBuffer>())         // workspace
                                  .Attr<int32_t>("deterministic")
                                  .Attr<int32_t>("max_seqlen_q")
                                  .Attr<int32_t>("max_seqlen_k")
                                  .Attr<int32_t>("has_seqused_k"),
                              FA3JAX_FFI_TRAITS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaBwd, Bwd,
                              fa3jax_ffi::bind_mask_attrs(fa3jax_ffi::bind_dense_inputs(ffi::Ffi::Bind())
                                                              .Arg<ffi::AnyBuffer>()          // out
                                                              .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                                              .Arg<ffi::AnyBuffer>()          // dout
                                                              .Arg<ffi::Buffer<ffi::F32>>()  // dlse
                                                              .Ret<ffi::AnyBuffer>()          // dq
                                                              .Ret<ffi::AnyBuffer>()          // dk
                                                              .Ret<ffi::AnyBuffer>()          // dv
                                                              .Ret<ffi::AnyBuffer>())         // workspace
                                  .Attr<int32_t>("deterministic"),
                              FA3JAX_FFI_TRAITS);

size_t fa3jax_ffi::bwd_workspace_size(int dtype, int64_t batch, int64_t seqlen_q, int64_t heads_q, int64_t head_dim,
                                      int64_t head_dim_v, int32_t window_left, int32_t window_right, float softcap,
                                      bool deterministic, bool varlen) {
  // The fields of BwdParams that bwd_workspace_bytes reads, as the handlers set them from their buffers (the key
  // dims it does not read: 0 keys, heads_q kv heads); calls the handler refuses (set_core's checks) need none.
  fa3jax::BwdParams p;
  fa3jax::AttnCore& c = p.core;
  if (!fa3jax_ffi::set_dims(batch, seqlen_q, 0, heads_q, heads_q, head_dim, head_dim_v, c) ||
      (dtype != 0 && dtype != 1))
    return 0;
  c.dtype = static_cast<fa3jax::DType>(dtype);
  c.window_left = window_left;
  c.window_right = window_right;
  c.softcap = softcap;
  static int const kNotRead = 0;  // VarlenSeqs::enabled() asks for a pointer; the size rule never dereferences it
  if (varlen) c.varlen.cu_seqlens_q = &kNotRead;
  p.deterministic = deterministic;
  return fa3jax::bwd_workspace_bytes(p);
}

// XLA FFI handlers of the forward: dense without and with attention sinks, and varlen (packed sequences, optional
// seqused_k and sinks). v (and out) may have a smaller head dim than q/k (MLA) where such a kernel is compiled.
// Typed checks on every input; every failure returns an ffi::Error, and nothing throws across the FFI.
// Stateless: nothing is kept between calls. Not declared command-buffer compatible (each call runs
// cudaFuncSetAttribute and builds TMA descriptors on the host).
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

// Launches a checked forward with the persistent kernel's tile counter (stream-ordered scratch: freed when the
// handler returns, reused only by work queued after the kernel).
ffi::Error Launch(const char* target, cudaStream_t stream, ffi::ScratchAllocator& scratch, fa3jax::FwdParams& p) {
  std::optional<void*> ws = scratch.Allocate(fa3jax::kFwdWorkspaceBytes, 16);
  if (!ws.has_value())
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, std::string(target) + ": scratch allocation failed");
  p.workspace = *ws;
  fa3jax::FwdStatus st = fa3jax::run_fwd(p, stream);
  if (!st.ok()) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string(target) + ": " + st.what + ": " +
                                                     cudaGetErrorString(st.error));
  }
  return ffi::Error::Success();
}

// sinks: nullptr for the sink-free target, else the (hq,) float32 operand of fa3jax_cuda_fwd_sinks.
ffi::Error FwdImpl(const char* target, cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q,
                   ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer const* sinks,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse, float softmax_scale,
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
    // Bound untyped so that a wrong dtype gets a message naming the operand (a typed binding's does not).
    auto sd = sinks->dimensions();
    if (sinks->element_type() != ffi::DataType::F32) return bad("sinks must be float32");
    if (sd.size() != 1 || sd[0] != c.num_heads_q)
      return bad("sinks shape " + dims_str(sd) + " must be (heads_q,) = (" + std::to_string(c.num_heads_q) + ",)");
    p.sinks = static_cast<const float*>(sinks->untyped_data());
  }
  // 0: the dispatch policy's choice; 1: FwdPolicy tiles; 3: wide key tiles where compiled (benchmarks compare
  // them in one process; see targets.py). 2 (a removed 2-CTA kernel) is refused so that a stale caller errs.
  if (kernel_variant != 0 && kernel_variant != 1 && kernel_variant != 3) return bad("kernel_variant must be 0, 1 or 3");
  p.wide_tiles = kernel_variant == 0 ? -1 : (kernel_variant == 3 ? 1 : 0);
  if (const char* msg = fa3jax::fwd_check(p)) return bad(msg);
  return Launch(target, stream, scratch, p);
}

ffi::Error Fwd(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q, ffi::AnyBuffer k,
               ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
               float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
               int32_t kernel_variant) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return FwdImpl("fa3jax_cuda_fwd", stream, std::move(scratch), q, k, v, nullptr, out, lse, softmax_scale,
                   window_left, window_right, softcap, kernel_variant);
  });
}

// The same forward with attention sinks: a target of its own, so that the sink-free call keeps its operands.
ffi::Error FwdSinks(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q, ffi::AnyBuffer k,
                    ffi::AnyBuffer v, ffi::AnyBuffer sinks, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::Buffer<ffi::F32>> lse, float softmax_scale, int32_t window_left,
                    int32_t window_right, float softcap, int32_t kernel_variant) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return FwdImpl("fa3jax_cuda_fwd_sinks", stream, std::move(scratch), q, k, v, &sinks, out, lse, softmax_scale,
                   window_left, window_right, softcap, kernel_variant);
  });
}

// Varlen: q (total_q, hq, d), k (total_k, hk, d), v (total_k, hk, d_v), cu_seqlens_q/k int32 (batch + 1,), then,
// as the flags say, seqused_k int32 (batch,) and sinks float32 (hq,) (optional operands: one target serves the four
// combinations). Outputs out (total_q, hq, d_v) and lse float32 (hq, total_q).
ffi::Error FwdVarlenImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::AnyBuffer cu_seqlens_q, ffi::AnyBuffer cu_seqlens_k,
                         ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::Buffer<ffi::F32>> lse, float softmax_scale, int32_t window_left,
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
    auto sd = sinks->dimensions();
    if (sinks->element_type() != ffi::DataType::F32) return bad("sinks must be float32");
    if (sd.size() != 1 || sd[0] != c.num_heads_q)
      return bad("sinks shape " + dims_str(sd) + " must be (heads_q,) = (" + std::to_string(c.num_heads_q) + ",)");
    p.sinks = static_cast<const float*>(sinks->untyped_data());
  }
  if (const char* msg = fa3jax::fwd_check(p)) return bad(msg);
  return Launch(target, stream, scratch, p);
}

ffi::Error FwdVarlen(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q, ffi::AnyBuffer k,
                     ffi::AnyBuffer v, ffi::AnyBuffer cu_seqlens_q, ffi::AnyBuffer cu_seqlens_k,
                     ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                     float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
                     int32_t max_seqlen_q, int32_t max_seqlen_k, int32_t has_seqused_k, int32_t has_sinks) noexcept {
  return fa3jax_ffi::no_throw([&] {
    return FwdVarlenImpl(stream, std::move(scratch), q, k, v, cu_seqlens_q, cu_seqlens_k, rest, out, lse,
                         softmax_scale, window_left, window_right, softcap, max_seqlen_q, max_seqlen_k,
                         has_seqused_k, has_sinks);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwd, Fwd,
                              fa3jax_ffi::bind_mask_attrs(fa3jax_ffi::bind_dense_inputs(ffi::Ffi::Bind())
                                                              .Ret<ffi::AnyBuffer>()           // out
                                                              .Ret<ffi::Buffer<ffi::F32>>())  // lse
                                  .Attr<int32_t>("kernel_variant"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwdSinks, FwdSinks,
                              fa3jax_ffi::bind_mask_attrs(fa3jax_ffi::bind_dense_inputs(ffi::Ffi::Bind())
                                                              .Arg<ffi::AnyBuffer>()           // sinks (hq,) f32
                                                              .Ret<ffi::AnyBuffer>()           // out
                                                              .Ret<ffi::Buffer<ffi::F32>>())  // lse
                                  .Attr<int32_t>("kernel_variant"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwdVarlen, FwdVarlen,
                              fa3jax_ffi::bind_mask_attrs(ffi::Ffi::Bind()
                                                              .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                              .Ctx<ffi::ScratchAllocator>()
                                                              .Arg<ffi::AnyBuffer>()   // q
                                                              .Arg<ffi::AnyBuffer>()   // k
                                                              .Arg<ffi::AnyBuffer>()   // v
                                                              .Arg<ffi::AnyBuffer>()   // cu_seqlens_q
                                                              .Arg<ffi::AnyBuffer>()   // cu_seqlens_k
                                                              .RemainingArgs()         // [seqused_k] [sinks]
                                                              .Ret<ffi::AnyBuffer>()   // out
                                                              .Ret<ffi::Buffer<ffi::F32>>())  // lse
                                  .Attr<int32_t>("max_seqlen_q")
                                  .Attr<int32_t>("max_seqlen_k")
                                  .Attr<int32_t>("has_seqused_k")
                                  .Attr<int32_t>("has_sinks"));

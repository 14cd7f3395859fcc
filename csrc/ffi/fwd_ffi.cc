// XLA FFI handlers of the dense forward, without and with attention sinks. Typed checks on every input; every
// failure returns an ffi::Error, and nothing throws across the FFI.
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
  if (od.size() != 4 || od[0] != c.batch || od[1] != c.seqlen_q || od[2] != c.num_heads_q || od[3] != c.head_dim)
    return bad("out shape " + dims_str(od) + " must equal q's shape");
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
  // The persistent kernel's tile counter (stream-ordered scratch: freed when this handler returns, reused only
  // by work queued after the kernel).
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

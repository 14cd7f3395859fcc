// XLA FFI handler of the dense forward. Typed checks on every input; every failure returns an ffi::Error, and
// nothing throws across the FFI.
// Stateless: nothing is kept between calls. Not declared command-buffer compatible (each call runs
// cudaFuncSetAttribute and builds TMA descriptors on the host).
#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "fa3jax/attn_params.h"
#include "fa3jax/ffi_handlers.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + ")";
}

ffi::Error FwdImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q, ffi::AnyBuffer k,
                   ffi::AnyBuffer v,
                   ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse, float softmax_scale,
                   int32_t window_left, int32_t window_right, float softcap, int32_t kernel_variant) {
  auto bad = [](std::string m) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fa3jax_cuda_fwd: " + m); };
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), od = out->dimensions();
  auto ld = lse->dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || od.size() != 4 || ld.size() != 3)
    return bad("expected q/k/v/out of rank 4 and lse of rank 3");
  ffi::DataType const dt = q.element_type();
  fa3jax::DType dtype;
  if (dt == ffi::DataType::BF16) dtype = fa3jax::DType::kBF16;
  else if (dt == ffi::DataType::F16) dtype = fa3jax::DType::kFP16;
  else return bad("q must be bfloat16 or float16");
  if (k.element_type() != dt || v.element_type() != dt || out->element_type() != dt)
    return bad("q, k, v and out must share one dtype");
  int64_t const b = qd[0], sq = qd[1], hq = qd[2], d = qd[3], sk = kd[1], hk = kd[2];
  if (kd[0] != b || kd[3] != d || vd[0] != b || vd[1] != sk || vd[2] != hk || vd[3] != d)
    return bad("k/v shapes " + dims_str(kd) + ", " + dims_str(vd) + " do not match q " + dims_str(qd));
  if (od[0] != b || od[1] != sq || od[2] != hq || od[3] != d) return bad("out shape must equal q's shape");
  if (ld[0] != b || ld[1] != hq || ld[2] != sq) return bad("lse shape must be (batch, heads_q, seqlen_q)");
  int64_t const lim = int64_t(1) << 31;
  if (b >= lim || sq >= lim || sk >= lim || hq >= lim || hk >= lim) return bad("dimension too large");

  fa3jax::FwdParams p;
  fa3jax::AttnCore& c = p.core;
  c.q = q.untyped_data();
  c.k = k.untyped_data();
  c.v = v.untyped_data();
  c.batch = int(b);
  c.seqlen_q = int(sq);
  c.seqlen_k = int(sk);
  c.num_heads_q = int(hq);
  c.num_heads_k = int(hk);
  c.head_dim = int(d);
  c.dtype = dtype;
  c.softmax_scale = softmax_scale;
  c.window_left = window_left;
  c.window_right = window_right;
  c.softcap = softcap;
  c.set_dense_strides();  // XLA buffers are row-major
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  // 0: the dispatch policy's choice; 1: FwdPolicy tiles; 3: wide key tiles where compiled (benchmarks compare
  // them in one process; see targets.py). 2 (a removed 2-CTA kernel) is refused so that a stale caller errs.
  if (kernel_variant != 0 && kernel_variant != 1 && kernel_variant != 3) return bad("kernel_variant must be 0, 1 or 3");
  p.wide_tiles = kernel_variant == 0 ? -1 : (kernel_variant == 3 ? 1 : 0);
  if (const char* msg = fa3jax::fwd_check(p)) return bad(msg);
  // The persistent kernel's tile counter (stream-ordered scratch: freed when this handler returns, reused only
  // by work queued after the kernel).
  std::optional<void*> ws = scratch.Allocate(fa3jax::kFwdWorkspaceBytes, 16);
  if (!ws.has_value())
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "fa3jax_cuda_fwd: scratch allocation failed");
  p.workspace = *ws;
  fa3jax::FwdStatus st = fa3jax::run_fwd(p, stream);
  if (!st.ok()) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("fa3jax_cuda_fwd: ") + st.what + ": " +
                                                     cudaGetErrorString(st.error));
  }
  return ffi::Error::Success();
}

// No exception crosses the FFI: the messages above allocate (std::string) and could throw std::bad_alloc. The
// fallback message fits the small-string buffer, so building it does not allocate.
ffi::Error Fwd(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer q, ffi::AnyBuffer k,
               ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
               float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
               int32_t kernel_variant) noexcept {
  try {
    return FwdImpl(stream, std::move(scratch), q, k, v, out, lse, softmax_scale, window_left, window_right, softcap,
                   kernel_variant);
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "fa3jax: failed");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Fa3jaxCudaFwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // lse
                                  .Attr<float>("softmax_scale")
                                  .Attr<int32_t>("window_left")
                                  .Attr<int32_t>("window_right")
                                  .Attr<float>("softcap")
                                  .Attr<int32_t>("kernel_variant"));

// Helpers shared by the XLA FFI handlers (host only).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include <cuda_runtime_api.h>

#include "fa3jax/attn_params.h"
#include "xla/ffi/api/ffi.h"

namespace fa3jax_ffi {

namespace ffi = xla::ffi;

// Every handler declares CUDA-graph compatibility: XLA may trace it into a command buffer (its default command
// types include custom calls) and replay the graph. That is safe because a handler only enqueues work on XLA's
// stream (memsets, kernel launches; the host-side checks, cudaFuncSetAttribute and device queries are not stream
// work), its TMA descriptors are kernel parameters (captured by value, rebuilt when XLA re-traces for new buffer
// addresses), and all device memory it touches is XLA's buffers: its workspace is its last result, not the
// scratch allocator's memory, which is freed when the handler returns while a graph would keep its address.
// (tests/test_export.py checks the capture, replays and bitwise-equal results on the device; tests/
// test_ffi_sources.py that no handler declares this while taking scratch.)
#define FA3JAX_FFI_TRAITS {xla::ffi::Traits::kCmdBufferCompatible}

inline std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + ")";
}

// The kernels' dtype of an FFI element type; false for anything but bfloat16 / float16.
inline bool kernel_dtype(ffi::DataType dt, fa3jax::DType& out) {
  if (dt == ffi::DataType::BF16) out = fa3jax::DType::kBF16;
  else if (dt == ffi::DataType::F16) out = fa3jax::DType::kFP16;
  else return false;
  return true;
}

// A call's dimensions into `c`; false (nothing set) where one does not fit the kernels' int32 fields. The handlers
// and the workspace size functions (ffi_handlers.h) both set them here.
inline bool set_dims(int64_t b, int64_t sq, int64_t sk, int64_t hq, int64_t hk, int64_t d, int64_t dv,
                     fa3jax::AttnCore& c) {
  for (int64_t x : {b, sq, sk, hq, hk, d, dv})
    if (x < 0 || x >= (int64_t(1) << 31)) return false;
  c.batch = int(b);
  c.seqlen_q = int(sq);
  c.seqlen_k = int(sk);
  c.num_heads_q = int(hq);
  c.num_heads_k = int(hk);
  c.head_dim = int(d);
  c.head_dim_v = int(dv);
  return true;
}

// The part of a call's checks that dense and varlen share: the dimensions fit the kernels' int32 fields, then
// pointers, shapes, strides (row-major XLA buffers; varlen's batch stride is unused) and attributes into `c`.
inline std::string set_core(ffi::AnyBuffer const& q, ffi::AnyBuffer const& k, ffi::AnyBuffer const& v, int64_t b,
                            int64_t sq, int64_t sk, int64_t hq, int64_t hk, int64_t d, int64_t dv,
                            float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
                            fa3jax::AttnCore& c) {
  if (!set_dims(b, sq, sk, hq, hk, d, dv, c)) return "dimension too large";
  c.q = q.untyped_data();
  c.k = k.untyped_data();
  c.v = v.untyped_data();
  c.softmax_scale = softmax_scale;
  c.window_left = window_left;
  c.window_right = window_right;
  c.softcap = softcap;
  c.set_dense_strides();
  return "";
}

// v's head dim d_v: d, or smaller (MLA; the kernels' checks say which pairs were compiled).
inline std::string check_value_dim(ffi::Span<const int64_t> vd, int64_t d) {
  int64_t const dv = vd[vd.size() - 1];
  if (dv < 1 || dv > d)
    return "v's head dim " + std::to_string(dv) + " (v shape " + dims_str(vd) + ") must be in [1, " +
           std::to_string(d) + "] (q/k's head dim; smaller for MLA)";
  return "";
}

// Shapes and attributes of a dense call into `c` (q (b, sq, hq, d), k (b, sk, hk, d), v (b, sk, hk, d_v) with
// d_v <= d, row-major XLA buffers). Returns an empty string when they are consistent, else what is wrong, naming
// the operand.
inline std::string dense_core(ffi::AnyBuffer const& q, ffi::AnyBuffer const& k, ffi::AnyBuffer const& v,
                              float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
                              fa3jax::AttnCore& c) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4) return "expected q, k and v of rank 4";
  if (!kernel_dtype(q.element_type(), c.dtype)) return "q must be bfloat16 or float16";
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type())
    return "q, k and v must share one dtype";
  int64_t const b = qd[0], sq = qd[1], hq = qd[2], d = qd[3], sk = kd[1], hk = kd[2];
  if (kd[0] != b || kd[3] != d)
    return "k shape " + dims_str(kd) + " must be (batch, seqlen_k, heads_k, head_dim) with q's batch and head dim " +
           "(q shape " + dims_str(qd) + ")";
  if (vd[0] != b || vd[1] != sk || vd[2] != hk)
    return "v shape " + dims_str(vd) + " must be k's " + dims_str(kd) + " but for the head dim";
  std::string const why = check_value_dim(vd, d);
  if (!why.empty()) return why;
  return set_core(q, k, v, b, sq, sk, hq, hk, d, vd[3], softmax_scale, window_left, window_right, softcap, c);
}

// Shapes and attributes of a varlen call into `c`: packed q (total_q, hq, d), k (total_k, hk, d), v (total_k, hk,
// d_v) with d_v <= d, and the index
// operands cu_seqlens_q/k (int32 (batch + 1,)) and seqused_k (int32 (batch,), or nullptr); their values are the
// kernel's to clamp (attn_params.h VarlenSeqs). Returns an empty string when consistent, else what is wrong,
// naming the operand.
inline std::string varlen_core(ffi::AnyBuffer const& q, ffi::AnyBuffer const& k, ffi::AnyBuffer const& v,
                               ffi::AnyBuffer const& cu_q, ffi::AnyBuffer const& cu_k, ffi::AnyBuffer const* used,
                               float softmax_scale, int32_t window_left, int32_t window_right, float softcap,
                               int32_t max_seqlen_q, int32_t max_seqlen_k, fa3jax::AttnCore& c) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3)
    return "expected packed q, k and v of rank 3 (total, heads, head_dim)";
  if (!kernel_dtype(q.element_type(), c.dtype)) return "q must be bfloat16 or float16";
  if (k.element_type() != q.element_type() || v.element_type() != q.element_type())
    return "q, k and v must share one dtype";
  int64_t const tq = qd[0], hq = qd[1], d = qd[2], tk = kd[0], hk = kd[1];
  if (kd[2] != d)
    return "k shape " + dims_str(kd) + " must be (total_k, heads_k, head_dim) with q's head dim (q shape " +
           dims_str(qd) + ")";
  if (vd[0] != tk || vd[1] != hk)
    return "v shape " + dims_str(vd) + " must be k's " + dims_str(kd) + " but for the head dim";
  std::string const vwhy = check_value_dim(vd, d);
  if (!vwhy.empty()) return vwhy;
  auto cqd = cu_q.dimensions(), ckd = cu_k.dimensions();
  if (cu_q.element_type() != ffi::DataType::S32 || cqd.size() != 1 || cqd[0] < 1)
    return "cu_seqlens_q must be int32 of shape (batch + 1,); got " + dims_str(cqd);
  int64_t const b = cqd[0] - 1;
  if (cu_k.element_type() != ffi::DataType::S32 || ckd.size() != 1 || ckd[0] != b + 1)
    return "cu_seqlens_k must be int32 of shape (batch + 1,) = (" + std::to_string(b + 1) + ",); got " +
           dims_str(ckd);
  if (used != nullptr) {
    auto ud = used->dimensions();
    if (used->element_type() != ffi::DataType::S32 || ud.size() != 1 || ud[0] != b)
      return "seqused_k must be int32 of shape (batch,) = (" + std::to_string(b) + ",); got " + dims_str(ud);
  }
  if (max_seqlen_q < 0 || max_seqlen_k < 0) return "max_seqlen_q and max_seqlen_k must be >= 0";
  std::string const why =
      set_core(q, k, v, b, tq, tk, hq, hk, d, vd[2], softmax_scale, window_left, window_right, softcap, c);
  if (!why.empty()) return why;
  c.varlen.cu_seqlens_q = static_cast<const int*>(cu_q.untyped_data());
  c.varlen.cu_seqlens_k = static_cast<const int*>(cu_k.untyped_data());
  c.varlen.seqused_k = used ? static_cast<const int*>(used->untyped_data()) : nullptr;
  c.varlen.max_seqlen_q = max_seqlen_q;
  c.varlen.max_seqlen_k = max_seqlen_k;
  return "";
}

// The workspace result (every handler's last: a 1-D uint8 buffer that XLA allocates, sized by ffi_handlers.h's
// functions): at least `need` bytes, its start a multiple of `align` bytes; else what is wrong with it.
inline std::string check_workspace(ffi::AnyBuffer const& ws, size_t need, size_t align) {
  if (ws.element_type() != ffi::DataType::U8 || ws.dimensions().size() != 1)
    return "the workspace (last result) must be a 1-D uint8 buffer; got shape " + dims_str(ws.dimensions());
  if (ws.size_bytes() < need)
    return "the workspace (last result) has " + std::to_string(ws.size_bytes()) + " bytes; this call needs " +
           std::to_string(need);
  if (need > 0 && reinterpret_cast<uintptr_t>(ws.untyped_data()) % align != 0)
    return "the workspace (last result) must be " + std::to_string(align) + "-byte aligned";
  return "";
}

// Binding prefix of a dense handler: stream, then q, k, v.
template <class B>
auto bind_dense_inputs(B b) {
  return std::move(b).template Ctx<ffi::PlatformStream<cudaStream_t>>()
      .template Arg<ffi::AnyBuffer>()   // q
      .template Arg<ffi::AnyBuffer>()   // k
      .template Arg<ffi::AnyBuffer>();  // v
}

// Attributes every dense handler takes, in this order (fa3jax/backends/cuda/targets.py names them).
template <class B>
auto bind_mask_attrs(B b) {
  return std::move(b).template Attr<float>("softmax_scale")
      .template Attr<int32_t>("window_left")
      .template Attr<int32_t>("window_right")
      .template Attr<float>("softcap");
}

// Runs a handler body so that no exception crosses the FFI: the bodies' messages allocate (std::string) and could
// throw std::bad_alloc; the fallback message fits the small-string buffer, so building it does not allocate.
template <class F>
ffi::Error no_throw(F&& body) noexcept {
  try {
    return body();
  } catch (...) {
    return ffi::Error(ffi::ErrorCode::kInternal, "fa3jax: failed");
  }
}

}  // namespace fa3jax_ffi

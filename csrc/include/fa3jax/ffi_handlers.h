// C symbols of the XLA FFI handlers (defined in csrc/ffi/), and the sizes of their workspace results. Only needs the
// XLA FFI C API header and the CUDA runtime's.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* Fa3jaxCudaFwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaFwdSinks(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaFwdVarlen(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaFwdKvcache(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaBwd(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* Fa3jaxCudaBwdVarlen(XLA_FFI_CallFrame* call_frame);
}

// Every handler's last result is its device workspace: a 1-D uint8 buffer that XLA allocates (not XLA's scratch, which
// a captured CUDA graph would keep after it is freed), of at least these many bytes. The Python backend sizes it with
// these functions (csrc/python/module.cc) from the call's scalars; the handlers check it against the same layout
// functions on their parameters. dtype: 0 bfloat16, 1 float16 (fa3jax::DType).
namespace fa3jax_ffi {

// Dense and varlen forwards (targets fa3jax_cuda_fwd, _fwd_sinks, _fwd_varlen): the persistent scheduler's tile
// counter only, whatever the shapes.
size_t fwd_workspace_size();

// The KV-cache forward (fa3jax_cuda_fwd_kvcache): the split count fwd_kvcache_num_splits gives a call of these
// shapes (capacity: the caches' rows per batch row, pages_per_seq * page_size when paged; seqlen_new: 0 without
// k_new) for `requested` >= 0 splits (0: automatic, on `num_sms` SMs; < 0: the current device's, read as the
// handler reads them), and the workspace bytes with that count. The Python backend passes the count back as the
// num_splits attribute, which the rule returns unchanged, so that the handler lays out the buffer it sized. Calls
// the handler refuses get 1 split; `error` is a failed SM-count query's.
struct KvcacheWorkspace {
  int num_splits;
  size_t bytes;
  cudaError_t error;
};
KvcacheWorkspace fwd_kvcache_workspace(int dtype, int64_t batch, int64_t seqlen_q, int64_t heads_q, int64_t heads_k,
                                       int64_t head_dim, int64_t capacity, int64_t seqlen_new, int requested,
                                       int num_sms);

// The backward (fa3jax_cuda_bwd; varlen: fa3jax_cuda_bwd_varlen with batch = sequences, seqlen_q = total_q):
// fa3jax::bwd_workspace_bytes (the fp32 dQ accumulator and row terms) of a call with these scalars; head_dim /
// head_dim_v as the kernels see them (multiples of 8; the Python backend pads others).
size_t bwd_workspace_size(int dtype, int64_t batch, int64_t seqlen_q, int64_t heads_q, int64_t head_dim,
                          int64_t head_dim_v, int32_t window_left, int32_t window_right, float softcap,
                          bool deterministic, bool varlen);

// The SM count of the current CUDA device into `sms` (the KV-cache handler's automatic split rule reads it).
cudaError_t current_num_sms(int* sms);

}  // namespace fa3jax_ffi

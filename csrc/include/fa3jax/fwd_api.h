// Plain C++ interface of the forward kernels. No CUTLASS / CuTe / Python in here: the FFI layer, the nanobind
// module and the standalone test all include only this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace fa3jax {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

// Dense layout: q (b, sq, hq, d), k/v (b, sk, hk, d), out like q, all contiguous; lse float32 (b, hq, sq).
struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  int batch = 0, seqlen_q = 0, seqlen_k = 0, num_heads_q = 0, num_heads_k = 0, head_dim = 0;
  DType dtype = DType::kBF16;
  float softmax_scale = 1.f;
  int window_left = -1;   // -1: unbounded (bottom-right aligned window, see fa3jax/masking.py)
  int window_right = -1;  // causal == (window_left, 0)
  float softcap = 0.f;    // <= 0: off
  // Use the K/V-multicast cluster instantiation where one is compiled and the mask allows it (no window, an
  // even number of query blocks). Off by default: measured slower than the single-CTA persistent kernel at
  // 128x128 tiles (H100, 2026-11-25: 586 vs 651 TFLOP/s at s=16k, benchmarks/RESULTS.md). The C++ tests run both.
  bool allow_cluster = false;
  // Device memory of at least kFwdWorkspaceBytes (the caller's; reset by run_fwd on `stream`): the persistent
  // kernel then assigns tiles dynamically under windowed/causal masks (tiles of unequal length). nullptr:
  // static round-robin assignment always.
  void* workspace = nullptr;
  // Wide key tiles (FwdPolicyWide, where compiled): -1 = where the policy says (unmasked, long keys), 0 = never,
  // 1 = always (tests).
  int wide_tiles = -1;
};

inline constexpr size_t kFwdWorkspaceBytes = 16;

// Status of a launch: `error` is cudaSuccess on success; otherwise `what` names the failing step (static string).
struct FwdStatus {
  cudaError_t error = cudaSuccess;
  const char* what = "";
  bool ok() const { return error == cudaSuccess && what[0] == '\0'; }
};

// Checks the parameters (shapes, pointers, alignment, compiled-in instantiations) without launching.
// Returns nullptr when fine, else a static message.
const char* fwd_check(const FwdParams& p);

// Checks, then launches on `stream`. Never throws.
FwdStatus run_fwd(const FwdParams& p, cudaStream_t stream);

// Whether (dtype, head_dim) was compiled into this build, and whether with a wide-key-tile kernel.
bool fwd_compiled(DType dtype, int head_dim);
bool fwd_compiled_wide(DType dtype, int head_dim);

// Compiled instantiations as "bf16:128;fp16:64;..." (static string), and the target arch.
const char* fwd_compiled_list();
const char* fwd_arch();

// Per-instantiation entry points (defined in generated translation units). kClusterM: CTAs per cluster;
// kWide: FwdPolicyWide's tiles instead of FwdPolicy's.
template <DType kDType, int kHeadDim, int kClusterM, bool kWide = false>
FwdStatus run_fwd_instance(const FwdParams& p, cudaStream_t stream);

}  // namespace fa3jax

// Parameter checks and (dtype, head_dim) dispatch over the instantiations compiled into this build
// (listed in the generated fwd_instances.inc).
#include <cstdint>

#include "fa3jax/fwd_api.h"
#include "fa3jax/policy.h"

namespace fa3jax {

bool fwd_compiled(DType dtype, int head_dim) {
#define FA3JAX_FWD_INSTANCE(e, n, d) \
  if (dtype == DType::e && head_dim == d) return true;
#include "fwd_instances.inc"
#undef FA3JAX_FWD_INSTANCE
  return false;
}

bool fwd_compiled_wide(DType dtype, int head_dim) {
#define FA3JAX_FWD_INSTANCE(e, n, d)
#define FA3JAX_FWD_WIDE_INSTANCE(e, n, d) \
  if (dtype == DType::e && head_dim == d) return true;
#include "fwd_instances.inc"
#undef FA3JAX_FWD_WIDE_INSTANCE
#undef FA3JAX_FWD_INSTANCE
  return false;
}

const char* fwd_compiled_list() {
#define FA3JAX_FWD_INSTANCE(e, n, d) #n ":" #d ";"
  static const char kList[] = ""
#include "fwd_instances.inc"
      ;
#undef FA3JAX_FWD_INSTANCE
  return kList;
}

const char* fwd_arch() { return "sm_90a"; }

static bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

const char* fwd_check(const FwdParams& p) {
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.num_heads_q < 0 || p.num_heads_k < 0)
    return "negative dimension";
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return "head_dim must be 64, 128 or 256";
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return "dtype must be bfloat16 or float16";
  if (!fwd_compiled(p.dtype, p.head_dim)) return "this (dtype, head_dim) was not compiled into the extension";
  if (p.num_heads_k < 1 || p.num_heads_q % p.num_heads_k != 0)
    return "num_heads_q must be a positive multiple of num_heads_k";
  // The persistent scheduler numbers (query block, head, batch) tiles with int32 (query blocks >= 64 rows).
  if ((int64_t(p.seqlen_q) + 63) / 64 * p.num_heads_q * p.batch > INT32_MAX) return "too many query tiles";
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads_q == 0) return nullptr;  // nothing to do
  if (p.seqlen_k < 1) return "seqlen_k must be >= 1";
  if (!p.q || !p.k || !p.v || !p.out || !p.lse) return "null buffer";
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.out))
    return "q, k, v and out must be 16-byte aligned";
  if (!(p.softmax_scale > 0.f) || p.softcap < 0.f) return "softmax_scale must be > 0 and softcap >= 0";
  // TMA: byte strides < 2^40.
  int64_t const elem = 2;
  if (int64_t(p.seqlen_q) * p.num_heads_q * p.head_dim * elem >= (int64_t(1) << 40) ||
      int64_t(p.seqlen_k) * p.num_heads_k * p.head_dim * elem >= (int64_t(1) << 40))
    return "tensor too large for TMA";
  return nullptr;
}

FwdStatus run_fwd(const FwdParams& p, cudaStream_t stream) {
  if (const char* msg = fwd_check(p)) return {cudaErrorInvalidValue, msg};
  if (p.batch == 0 || p.seqlen_q == 0 || p.num_heads_q == 0) return {};
  // The cluster kernels need every CTA of a pair to visit the same key blocks (no mask that depends on the query
  // row) and pairs of query blocks.
  bool const unmasked = p.window_left < 0 && p.window_right < 0;
#define FA3JAX_FWD_INSTANCE(e, n, d)
#define FA3JAX_FWD_CLUSTER_INSTANCE(e, n, d)                                                        \
  if (p.allow_cluster && unmasked && p.dtype == DType::e && p.head_dim == d &&                      \
      ((p.seqlen_q + FwdPolicy<d>::kBlockM - 1) / FwdPolicy<d>::kBlockM) % 2 == 0)                    \
    return run_fwd_instance<DType::e, d, 2>(p, stream);
#include "fwd_instances.inc"
#undef FA3JAX_FWD_CLUSTER_INSTANCE
#undef FA3JAX_FWD_INSTANCE
  // Wide key tiles only pay on long unmasked rows (policy.h); tests force them with wide_tiles = 1.
#define FA3JAX_FWD_INSTANCE(e, n, d)
#define FA3JAX_FWD_WIDE_INSTANCE(e, n, d)                                                           \
  if (p.dtype == DType::e && p.head_dim == d &&                                                     \
      (p.wide_tiles == 1 || (p.wide_tiles < 0 && unmasked && p.seqlen_k >= FwdPolicyWide<d>::kMinSeqlenK))) \
    return run_fwd_instance<DType::e, d, 1, true>(p, stream);
#include "fwd_instances.inc"
#undef FA3JAX_FWD_WIDE_INSTANCE
#undef FA3JAX_FWD_INSTANCE
#define FA3JAX_FWD_INSTANCE(e, n, d) \
  if (p.dtype == DType::e && p.head_dim == d) return run_fwd_instance<DType::e, d, 1>(p, stream);
#include "fwd_instances.inc"
#undef FA3JAX_FWD_INSTANCE
  return {cudaErrorInvalidValue, "unreachable: instantiation missing"};
}

}  // namespace fa3jax

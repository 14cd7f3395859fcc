// Parameter checks and (dtype, head_dim, head_dim_v) dispatch over the instantiations compiled into this build
// (listed in the generated fwd_instances.inc).
#include <algorithm>
#include <cstdint>
#include <initializer_list>

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

const char* fwd_compiled_list() {
#define FA3JAX_FWD_INSTANCE(e, n, d, dv, label) #n ":" label ";"
  static const char kList[] = ""
#include "fwd_instances.inc"
      ;
#undef FA3JAX_FWD_INSTANCE
  return kList;
}

const char* fwd_arch() { return "sm_90a"; }

const char* fwd_check(const FwdParams& fp) {
  AttnCore const& p = fp.core;
  if (p.batch < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.num_heads_q < 0 || p.num_heads_k < 0)
    return "negative dimension";
  int const dv = p.value_dim();
  if (dv == p.head_dim) {
    if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return "head_dim must be 64, 128 or 256";
  } else if (dv < 0 || dv > p.head_dim) {
    return "head_dim_v must be in [0, head_dim] (0: head_dim; smaller for MLA)";
  }
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) return "dtype must be bfloat16 or float16";
  if (!fwd_compiled(p.dtype, p.head_dim, dv))
    return dv == p.head_dim ? "this (dtype, head_dim) was not compiled into the extension"
                            : "this (dtype, head_dim, head_dim_v) was not compiled into the extension (MLA: "
                              "FA3JAX_HEAD_DIMS entries such as 192x128, 128x64)";
  if (p.num_heads_k < 1 || p.num_heads_q % p.num_heads_k != 0)
    return "num_heads_q must be a positive multiple of num_heads_k";
  if (p.paged.enabled() || p.append.enabled() || fp.splits.num_splits > 1)
    return "paged K/V, appended K/V and split K/V are not implemented by this forward";
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
  // Wide key tiles only pay on long unmasked rows (policy.h); tests force them with wide_tiles = 1. Varlen has
  // the FwdPolicy tiles only (launch_fwd).
  bool const unmasked = c.window_left < 0 && c.window_right < 0;
  int const dv = c.value_dim();
#define FA3JAX_FWD_INSTANCE(e, n, d, dv_, label)
#define FA3JAX_FWD_WIDE_INSTANCE(e, n, d)                                                           \
  if (c.dtype == DType::e && c.head_dim == d && dv == d && !c.varlen.enabled() &&                    \
      (p.wide_tiles == 1 || (p.wide_tiles < 0 && unmasked && c.seqlen_k >= FwdPolicyWide<d>::kMinSeqlenK))) \
    return run_fwd_instance<DType::e, d, d, true>(p, stream);
#include "fwd_instances.inc"
#undef FA3JAX_FWD_WIDE_INSTANCE
#undef FA3JAX_FWD_INSTANCE
#define FA3JAX_FWD_INSTANCE(e, n, d, dv_, label) \
  if (c.dtype == DType::e && c.head_dim == d && dv == dv_) return run_fwd_instance<DType::e, d, dv_, false>(p, stream);
#include "fwd_instances.inc"
#undef FA3JAX_FWD_INSTANCE
  return {cudaErrorInvalidValue, "unreachable: instantiation missing"};
}

}  // namespace fa3jax

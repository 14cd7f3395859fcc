// Backward: parameter checks, (dtype, head_dim) dispatch over the compiled main kernels (generated
// bwd_instances.inc), and the three passes in order: preprocess, main kernel, postprocess.
#include <cstdint>
#include <utility>

#include "fa3jax/attn_params.h"
#include "checks.h"

namespace fa3jax {

bool bwd_compiled(DType dtype, int head_dim) {
#define FA3JAX_BWD_INSTANCE(e, n, d) \
  if (dtype == DType::e && head_dim == d) return true;
#include "bwd_instances.inc"
#undef FA3JAX_BWD_INSTANCE
  return false;
}

const char* bwd_compiled_list() {
#define FA3JAX_BWD_INSTANCE(e, n, d) #n ":" #d ";"
  static const char kList[] = ""
#include "bwd_instances.inc"
      ;
#undef FA3JAX_BWD_INSTANCE
  return kList;
}

static bool empty(AttnCore const& c) { return c.batch == 0 || c.seqlen_q == 0 || c.num_heads_q == 0; }

// Varlen: dq, dk, dv rows outside every sequence (and keys past seqused_k) get no write from the passes.
static FwdStatus zero_varlen_grads(const BwdParams& p, cudaStream_t stream) {
  AttnCore const& c = p.core;
  size_t const nq = size_t(c.seqlen_q) * c.num_heads_q * c.head_dim * 2;
  size_t const nk = size_t(c.seqlen_k) * c.num_heads_k * c.head_dim * 2;
  for (auto [ptr, n] : {std::pair<void*, size_t>{p.dq, nq}, {p.dk, nk}, {p.dv, nk}})
    if (n > 0)
      if (cudaError_t e = cudaMemsetAsync(ptr, 0, n, stream); e != cudaSuccess) return {e, "cudaMemsetAsync(grads)"};
  return {};
}

const char* bwd_check(const BwdParams& p) {
  AttnCore const& c = p.core;
  if (c.batch < 0 || c.seqlen_q < 0 || c.seqlen_k < 0 || c.num_heads_q < 0 || c.num_heads_k < 0)
    return "negative dimension";
  if (c.dtype != DType::kBF16 && c.dtype != DType::kFP16) return "dtype must be bfloat16 or float16";
  if (c.value_dim() != c.head_dim) return "head_dim_v != head_dim (MLA): no backward kernel";
  if (!bwd_compiled(c.dtype, c.head_dim)) return "this (dtype, head_dim) has no compiled backward";
  if (c.num_heads_k < 1 || c.num_heads_q % c.num_heads_k != 0)
    return "num_heads_q must be a positive multiple of num_heads_k";
  if (c.paged.enabled() || c.append.enabled()) return "backward: dense or varlen calls only";
  bool const varlen = c.varlen.enabled();
  if (varlen) {
    if (!c.varlen.cu_seqlens_k) return "varlen: cu_seqlens_k is null";
    if (c.varlen.max_seqlen_q < 0 || c.varlen.max_seqlen_k < 0) return "varlen: max_seqlen_q/k must be >= 0";
    // TMA coordinates are int32: a sequence's end row (<= total) and rows up to total + a tile.
    if (c.seqlen_q > INT32_MAX - 1024 || c.seqlen_k > INT32_MAX - 1024) return "varlen: total rows too large";
  }
  // The main kernel's grid is (key blocks, kv heads, batch): CUDA's y/z limit is 65535.
  if (c.num_heads_k > 65535 || c.batch > 65535) return "batch and num_heads_k must be <= 65535";
  int64_t const stat_rows = varlen ? c.num_heads_q * bwd_varlen_stat_rows(c.seqlen_q, c.batch)
                                   : int64_t(c.batch) * c.num_heads_q *
                                         ((int64_t(c.seqlen_q) + kBwdBlockM - 1) / kBwdBlockM) * kBwdBlockM;
  if (stat_rows * c.head_dim > (int64_t(1) << 40)) return "tensor too large";
  if (empty(c) && !(varlen && c.seqlen_q + c.seqlen_k > 0)) return nullptr;  // nothing to do
  if (varlen && (!p.dq || (c.seqlen_k > 0 && (!p.dk || !p.dv)))) return "null buffer";
  if (empty(c)) return nullptr;  // varlen without sequences: only the zeroed gradients
  if (!p.out || !p.dout || !p.lse || !p.dq || !p.workspace || !c.q) return "null buffer";
  if (c.seqlen_k > 0 && (!c.k || !c.v || !p.dk || !p.dv)) return "null buffer";
  if (reinterpret_cast<uintptr_t>(p.workspace) % 16) return "workspace must be 16-byte aligned";
  if (!aligned16(c.q) || !aligned16(c.k) || !aligned16(c.v) || !aligned16(p.dout) || !aligned16(p.dk) ||
      !aligned16(p.dv))
    return "q, k, v, dout, dk and dv must be 16-byte aligned";
  if (!(c.softmax_scale > 0.f) || c.softcap < 0.f) return "softmax_scale must be > 0 and softcap >= 0";
  auto strides = [&](Strides s) {  // varlen tensors have no batch stride (bwd_launch.h uses the row stride)
    if (varlen) s.batch = s.row;
    return s;
  };
  if (!tma_strides_ok(strides(c.q_stride)) || !tma_strides_ok(strides(c.k_stride)) ||
      !tma_strides_ok(strides(c.v_stride)))
    return "q/k/v strides must be positive multiples of 16 bytes below 2^40 (AttnCore::set_dense_strides)";
  return nullptr;
}

static FwdStatus run_main(const BwdParams& p, cudaStream_t stream) {
  AttnCore const& c = p.core;
  BwdWorkspace const ws = bwd_workspace(p);
#define FA3JAX_BWD_INSTANCE(e, n, d) \
  if (c.dtype == DType::e && c.head_dim == d) return run_bwd_instance<DType::e, d>(p, ws, stream);
#include "bwd_instances.inc"
#undef FA3JAX_BWD_INSTANCE
  return {cudaErrorInvalidValue, "unreachable: backward instantiation missing"};
}

FwdStatus run_bwd(const BwdParams& p, cudaStream_t stream) {
  if (const char* why = bwd_check(p)) return {cudaErrorInvalidValue, why};
  if (p.core.varlen.enabled()) {
    FwdStatus const z = zero_varlen_grads(p, stream);
    if (!z.ok()) return z;
  }
  if (empty(p.core)) return {};
  FwdStatus st = run_bwd_preprocess(p, stream);
  if (!st.ok()) return st;
  if (p.core.seqlen_k > 0) {  // no keys: dq = 0 from the zeroed accumulator, dk/dv are empty
    st = run_main(p, stream);
    if (!st.ok()) return st;
  }
  return run_bwd_postprocess(p, stream);
}

}  // namespace fa3jax

// Backward: parameter checks, (dtype, head_dim, head_dim_v) dispatch over the compiled main kernels (generated
// bwd_instances.inc), and the three passes in order: preprocess, main kernel, postprocess.
#include <cstdint>
#include <utility>

#include "fa3jax/attn_params.h"
#include "checks.h"
#include "policy.h"  // generated (generate_instantiations.py): BwdPolicy<d, dv>::kBlockM

namespace fa3jax {

bool bwd_compiled(DType dtype, int head_dim, int head_dim_v) {
  if (head_dim_v == 0) head_dim_v = head_dim;
#define FA3JAX_BWD_INSTANCE(e, n, d, dv, label) \
  if (dtype == DType::e && head_dim == d && head_dim_v == dv) return true;
#include "bwd_instances.inc"
#undef FA3JAX_BWD_INSTANCE
  return false;
}

int bwd_kernel_dim(DType dtype, int head_dim, int head_dim_v) {
  if (head_dim_v == 0) head_dim_v = head_dim;
  int best = 0;
  // MLA: exact pairs only (its policy is per pair); else the narrowest kernel that holds head_dim (the instances
  // are listed in no particular order).
#define FA3JAX_BWD_INSTANCE(e, n, d, dv, label)                                                       \
  if (dtype == DType::e && (head_dim_v != head_dim ? (head_dim == d && head_dim_v == dv)               \
                                                  : (d == dv && head_dim <= d && (best == 0 || d < best)))) \
    best = d;
#include "bwd_instances.inc"
#undef FA3JAX_BWD_INSTANCE
  return head_dim >= 1 ? best : 0;
}

const char* bwd_compiled_list() {
#define FA3JAX_BWD_INSTANCE(e, n, d, dv, label) #n ":" label ";"
  static const char kList[] = ""
#include "bwd_instances.inc"
      ;
#undef FA3JAX_BWD_INSTANCE
  return kList;
}

int bwd_tile_m(const BwdParams& p) {
  AttnCore const& c = p.core;
  if (c.varlen.enabled() || p.policy_rows == 0) return kBwdBlockM;
  int const kd = bwd_kernel_dim(c.dtype, c.head_dim, c.value_dim());
  int const kdv = c.value_dim() == c.head_dim ? kd : c.value_dim();
  int tile = kBwdBlockM, min_seqlen_q = 0;
#define FA3JAX_BWD_INSTANCE(e, n, d, dv, label)                  \
  if (c.dtype == DType::e && kd == d && kdv == dv) {             \
    tile = BwdPolicy<d, dv>::kBlockM;                            \
    min_seqlen_q = BwdPolicy<d, dv>::kMinSeqlenQ;                \
  }
#include "bwd_instances.inc"
#undef FA3JAX_BWD_INSTANCE
  if (p.policy_rows < 0 && c.seqlen_q < min_seqlen_q) return kBwdBlockM;
  if (bwd_tile_serves_all_dense(tile)) return tile;
  bool const plain = c.window_left < 0 && c.window_right < 0 && !(c.softcap > 0.f) && !p.deterministic;
  return plain ? tile : kBwdBlockM;
}

static bool empty(AttnCore const& c) { return c.batch == 0 || c.seqlen_q == 0 || c.num_heads_q == 0; }

const char* bwd_check(const BwdParams& p) {
  AttnCore const& c = p.core;
  if (c.batch < 0 || c.seqlen_q < 0 || c.seqlen_k < 0 || c.num_heads_q < 0 || c.num_heads_k < 0)
    return "negative dimension";
  if (c.dtype != DType::kBF16 && c.dtype != DType::kFP16) return "dtype must be bfloat16 or float16";
  int const dv = c.value_dim();
  if (c.head_dim < 1 || c.head_dim > 256) return "head_dim must be in [1, 256]";
  if (dv < 0 || dv > c.head_dim) return "head_dim_v must be in [0, head_dim] (0: head_dim; smaller for MLA)";
  // TMA addresses rows in 16-byte units (the Python backend pads other head dims to the next multiple of 8).
  if (c.head_dim % 8 != 0 || dv % 8 != 0) return "head_dim and head_dim_v must each be a multiple of 8 (TMA's rows)";
  int const kd = bwd_kernel_dim(c.dtype, c.head_dim, dv);
  if (kd == 0)
    return dv == c.head_dim ? "no compiled backward of this dtype with a head_dim >= the call's"
                            : "this (dtype, head_dim, head_dim_v) has no compiled backward (MLA: FA3JAX_HEAD_DIMS "
                              "entries such as 192x128, 128x64)";
  if (c.num_heads_k < 1 || c.num_heads_q % c.num_heads_k != 0)
    return "num_heads_q must be a positive multiple of num_heads_k";
  if (c.paged.enabled() || c.append.enabled()) return "backward: dense or varlen calls only";
  bool const varlen = c.varlen.enabled();
  if (varlen) {
    if (!c.varlen.cu_seqlens_k) return "varlen: cu_seqlens_k is null";
    if (c.varlen.max_seqlen_q < 0 || c.varlen.max_seqlen_k < 0) return "varlen: max_seqlen_q/k must be >= 0";
    // The loads' packed-rows views (launch.h encode_rows_view) hold a sequence of up to 2^30 rows (their row
    // extent; no sequence is longer than the total) and rows below 2^34 bytes (their wrap mode's stride); 2^30 keeps
    // the int32 TMA coordinates (a sequence's end row, rows up to the extent + a tile) in range too.
    if (c.seqlen_q > (1 << 30) || c.seqlen_k > (1 << 30)) return "varlen: total rows above 2^30";
    if (c.q_stride.row * 2 >= (int64_t(1) << 34) || c.k_stride.row * 2 >= (int64_t(1) << 34) ||
        c.v_stride.row * 2 >= (int64_t(1) << 34) || int64_t(c.num_heads_q) * c.value_dim() * 2 >= (int64_t(1) << 34))
      return "varlen: q/k/v/dout rows must be below 2^34 bytes";
  }
  // The main kernel's grid is (key blocks, kv heads, batch): CUDA's y/z limit is 65535.
  if (c.num_heads_k > 65535 || c.batch > 65535) return "batch and num_heads_k must be <= 65535";
  int64_t const stat_rows = varlen ? c.num_heads_q * bwd_varlen_stat_rows(c.seqlen_q, c.batch)
                                   : int64_t(c.batch) * c.num_heads_q * bwd_padded_rows(c.seqlen_q, bwd_tile_m(p));
  if (stat_rows * kd > (int64_t(1) << 40)) return "tensor too large";
  if (empty(c) && !(varlen && c.seqlen_q + c.seqlen_k > 0)) return nullptr;  // nothing to do
  if (varlen && (!p.dq || (c.seqlen_k > 0 && (!p.dk || !p.dv)))) return "null buffer";
  if (empty(c)) return nullptr;  // varlen without sequences: only the zeroed gradients
  if (!p.out || !p.dout || !p.lse || !p.dq || !p.workspace || !c.q) return "null buffer";
  if (c.seqlen_k > 0 && (!c.k || !c.v || !p.dk || !p.dv)) return "null buffer";
  if (reinterpret_cast<uintptr_t>(p.workspace) % 16) return "workspace must be 16-byte aligned";
  // out, dout: the preprocess reads them, dq: the postprocess writes it, in 16-byte groups (bwd_prepost.cu).
  if (!aligned16(c.q) || !aligned16(c.k) || !aligned16(c.v) || !aligned16(p.out) || !aligned16(p.dout) ||
      !aligned16(p.dq) || !aligned16(p.dk) || !aligned16(p.dv))
    return "q, k, v, out, dout, dq, dk and dv must be 16-byte aligned";
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
  // MLA: the exact pair; else the narrowest kernel that holds d (bwd_kernel_dim), d_v == d.
  int const kd = bwd_kernel_dim(c.dtype, c.head_dim, c.value_dim());
  int const kdv = c.value_dim() == c.head_dim ? kd : c.value_dim();
#define FA3JAX_BWD_INSTANCE(e, n, d, dv, label) \
  if (c.dtype == DType::e && kd == d && kdv == dv) return run_bwd_instance<DType::e, d, dv>(p, ws, stream);
#include "bwd_instances.inc"
#undef FA3JAX_BWD_INSTANCE
  return {cudaErrorInvalidValue, "unreachable: backward instantiation missing"};
}

FwdStatus run_bwd(const BwdParams& p, cudaStream_t stream) {
  if (const char* why = bwd_check(p)) return {cudaErrorInvalidValue, why};
  if (FwdStatus const z = run_bwd_zero_uncovered(p, stream); !z.ok()) return z;
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

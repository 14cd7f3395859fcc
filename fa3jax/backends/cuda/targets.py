"""The single place that names the CUDA extension's XLA FFI targets and their attributes.

The C++ side (``csrc/ffi/fwd_ffi.cc``) binds the same attribute names; keep the two in sync.
"""
from __future__ import annotations

import numpy as np

from ...tuning import DEFAULT, Tuning

# FFI target name -> key of the capsule in ``_fa3jax_cuda.handlers()``.
FWD_TARGET = "fa3jax_cuda_fwd"  # (q, k, v) -> (out, lse); csrc/ffi/fwd_ffi.cc
FWD_SINKS_TARGET = "fa3jax_cuda_fwd_sinks"  # (q, k, v, sinks float32 (hq,)) -> (out, lse), the forward's attributes
# (q, k, v, cu_seqlens_q, cu_seqlens_k[, seqused_k][, sinks]) -> (out, lse (hq, total_q)); the varlen attributes say
# which optional operands follow
FWD_VARLEN_TARGET = "fa3jax_cuda_fwd_varlen"
# (q, k_cache, v_cache, cache_seqlens[, k_new, v_new][, leftpad][, batch_idx][, page_table][, sinks]) -> (out, lse
# (b, hq, lq)); the KV-cache attributes say which optional operands follow
FWD_KVCACHE_TARGET = "fa3jax_cuda_fwd_kvcache"
BWD_TARGET = "fa3jax_cuda_bwd"  # (q, k, v, out, lse, dout, dlse) -> (dq, dk, dv); csrc/ffi/bwd_ffi.cc
# (q, k, v, out, lse (hq, total_q), dout, dlse, cu_seqlens_q, cu_seqlens_k[, seqused_k]) -> (dq, dk, dv)
BWD_VARLEN_TARGET = "fa3jax_cuda_bwd_varlen"
HANDLERS = {FWD_TARGET: "fwd", FWD_SINKS_TARGET: "fwd_sinks", FWD_VARLEN_TARGET: "fwd_varlen",
            FWD_KVCACHE_TARGET: "fwd_kvcache", BWD_TARGET: "bwd", BWD_VARLEN_TARGET: "bwd_varlen"}
# build_info()["features"] entries of an extension that has FWD_SINKS_TARGET / FWD_VARLEN_TARGET (older builds lack
# them), of one whose forward targets take v with a smaller head dim (MLA; build_info()["mla_instances"]), and of one
# whose backward targets do too (build_info()["bwd_mla_instances"]).
FEATURE_SINKS = "sinks"
FEATURE_VARLEN = "varlen"
FEATURE_VARLEN_BWD = "varlen_bwd"
FEATURE_MLA = "mla"
FEATURE_MLA_BWD = "mla_bwd"
# ... and of one whose kernels serve every head dim up to their largest instance (a narrower one by the smallest
# instance that holds it), not only the instances' own.
FEATURE_ANY_HEAD_DIM = "any_head_dim"
# ... and of one with FWD_KVCACHE_TARGET (build_info()["kvcache_instances"]: (dtype, head_dim, key block) of
# the kernels; with FEATURE_ANY_HEAD_DIM, build_info()["kvcache_head_dims"]: the same for every head dim served).
FEATURE_KVCACHE = "kvcache"
# ... and of one whose FWD_KVCACHE_TARGET takes ATTR_NUM_SPLITS (split-KV with its combine, GQA packing for decode).
FEATURE_KVCACHE_SPLITS = "kvcache_splits"
# ... and of one whose KV-cache kernel serves every page size (key blocks spanning pages: TMA boxes inside pages for
# multiples of 8 rows, the producer's row gather otherwise); older ones need multiples of the key block.
FEATURE_KVCACHE_ANY_PAGE = "kvcache_any_page"
# ... and of one whose targets all take their device workspace as a last result (1-D uint8, sized by the extension's
# fwd_workspace_bytes / kvcache_workspace / bwd_workspace_bytes) instead of XLA scratch, so that XLA may capture them
# in CUDA graphs; its KV-cache target gets the split count kvcache_workspace resolved as ATTR_NUM_SPLITS.
FEATURE_WORKSPACE_RESULT = "workspace_result"

# Attributes, with their FFI types: all targets take the first four, then the forward kernel_variant and the
# backward deterministic.
ATTR_SOFTMAX_SCALE = "softmax_scale"  # f32
ATTR_WINDOW_LEFT = "window_left"  # i32, -1 = unbounded
ATTR_WINDOW_RIGHT = "window_right"  # i32, -1 = unbounded; causal is 0
ATTR_SOFTCAP = "softcap"  # f32, 0 = off
ATTR_KERNEL_VARIANT = "kernel_variant"  # i32, see KERNEL_VARIANTS (forward only)
ATTR_DETERMINISTIC = "deterministic"  # i32 0/1: dQ partials added in a fixed order (backward only)
# Varlen only (has_sinks: forward only):
ATTR_MAX_SEQLEN_Q = "max_seqlen_q"  # i32: query blocks per sequence in the grid (rows past it are not computed)
ATTR_MAX_SEQLEN_K = "max_seqlen_k"  # i32: a hint for the tile order
ATTR_HAS_SEQUSED_K = "has_seqused_k"  # i32 0/1: a seqused_k operand follows cu_seqlens_k
ATTR_HAS_SINKS = "has_sinks"  # i32 0/1: a sinks operand comes last
# KV cache only (with ATTR_HAS_SINKS), each i32 0/1: which optional operands follow cache_seqlens, in this order.
ATTR_HAS_NEW = "has_new"  # k_new and v_new
ATTR_HAS_LEFTPAD = "has_leftpad"
ATTR_HAS_BATCH_IDX = "has_batch_idx"  # contiguous caches only
ATTR_HAS_PAGE_TABLE = "has_page_table"
# i32 >= 0: split-KV parts (0 = automatic; the C++ fwd_kvcache_num_splits chooses, and caps any count at the key
# blocks a row can have). Only with FEATURE_KVCACHE_SPLITS; with FEATURE_WORKSPACE_RESULT the backend replaces the
# caller's count by the one the extension's kvcache_workspace resolved (the handler keeps it).
ATTR_NUM_SPLITS = "num_splits"
_MAX_I32 = 2**31 - 1

# Which compiled kernel serves a call: "auto" is the dispatch policy (csrc/src/fwd_dispatch.cc); the others force
# one where it applies (fa3jax.tuning.Tuning.cuda_kernel), so that benchmarks can time them side by side.
# 2 belonged to a removed 2-CTA kernel; the handler refuses it.
KERNEL_VARIANTS = {"auto": 0, "plain": 1, "wide": 3}


def _mask_attributes(spec) -> dict:
    """The attributes every dense handler binds first (csrc/ffi/ffi_common.h bind_mask_attrs)."""
    return {
        ATTR_SOFTMAX_SCALE: np.float32(spec.softmax_scale),
        ATTR_WINDOW_LEFT: np.int32(spec.window.left),
        ATTR_WINDOW_RIGHT: np.int32(spec.window.right),
        ATTR_SOFTCAP: np.float32(spec.softcap if spec.softcap > 0 else 0.0),
    }


def bwd_attributes(spec) -> dict:
    """Keyword attributes of one backward call, typed as the handler binds them."""
    return {**_mask_attributes(spec), ATTR_DETERMINISTIC: np.int32(bool(spec.deterministic))}


def fwd_attributes(spec, tune: Tuning = DEFAULT) -> dict:
    """Keyword attributes of one forward call, typed as the handler binds them."""
    return {**_mask_attributes(spec), ATTR_KERNEL_VARIANT: np.int32(KERNEL_VARIANTS[tune.cuda_kernel])}


def varlen_fwd_attributes(spec) -> dict:
    """Keyword attributes of one varlen forward call. The max lengths are capped at the totals: no sequence is
    longer (validation's sanitized cu_seqlens lie in [0, total]), and a larger bound only adds idle tiles."""
    vs = spec.varlen
    return {
        **_mask_attributes(spec),
        ATTR_MAX_SEQLEN_Q: np.int32(min(vs.max_seqlen_q, spec.seqlen_q)),
        ATTR_MAX_SEQLEN_K: np.int32(min(vs.max_seqlen_k, spec.seqlen_k)),
        ATTR_HAS_SEQUSED_K: np.int32(bool(vs.has_seqused_k)),
        ATTR_HAS_SINKS: np.int32(bool(spec.has_sinks)),
    }


def varlen_bwd_attributes(spec) -> dict:
    """Keyword attributes of one varlen backward call (the sinks need no operand: the LSE holds them)."""
    vs = spec.varlen
    return {
        **bwd_attributes(spec),
        ATTR_MAX_SEQLEN_Q: np.int32(min(vs.max_seqlen_q, spec.seqlen_q)),
        ATTR_MAX_SEQLEN_K: np.int32(min(vs.max_seqlen_k, spec.seqlen_k)),
        ATTR_HAS_SEQUSED_K: np.int32(bool(vs.has_seqused_k)),
    }


def kvcache_fwd_attributes(spec, splits: bool = True) -> dict:
    """Keyword attributes of one KV-cache forward call (the operands they announce: backends/cuda kvcache_forward).
    ``splits``: the extension takes ATTR_NUM_SPLITS (FEATURE_KVCACHE_SPLITS); the count is passed as the caller
    gave it (validation: >= 0), clipped to int32 (the kernel caps it far lower)."""
    kv = spec.kvcache
    attrs = {
        **_mask_attributes(spec),
        ATTR_HAS_NEW: np.int32(kv.seqlen_new > 0),
        ATTR_HAS_LEFTPAD: np.int32(bool(kv.has_cache_leftpad)),
        ATTR_HAS_BATCH_IDX: np.int32(bool(kv.has_cache_batch_idx and not kv.paged)),
        ATTR_HAS_PAGE_TABLE: np.int32(bool(kv.paged)),
        ATTR_HAS_SINKS: np.int32(bool(spec.has_sinks)),
    }
    if splits:
        attrs[ATTR_NUM_SPLITS] = np.int32(min(int(kv.num_splits), _MAX_I32))
    return attrs

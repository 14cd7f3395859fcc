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
BWD_TARGET = "fa3jax_cuda_bwd"  # (q, k, v, out, lse, dout, dlse) -> (dq, dk, dv); csrc/ffi/bwd_ffi.cc
# (q, k, v, out, lse (hq, total_q), dout, dlse, cu_seqlens_q, cu_seqlens_k[, seqused_k]) -> (dq, dk, dv)
BWD_VARLEN_TARGET = "fa3jax_cuda_bwd_varlen"
HANDLERS = {FWD_TARGET: "fwd", FWD_SINKS_TARGET: "fwd_sinks", FWD_VARLEN_TARGET: "fwd_varlen", BWD_TARGET: "bwd",
            BWD_VARLEN_TARGET: "bwd_varlen"}
# build_info()["features"] entries of an extension that has FWD_SINKS_TARGET / FWD_VARLEN_TARGET (older builds lack
# them), and of one whose forward targets take v with a smaller head dim (MLA; build_info()["mla_instances"]).
FEATURE_SINKS = "sinks"
FEATURE_VARLEN = "varlen"
FEATURE_VARLEN_BWD = "varlen_bwd"
FEATURE_MLA = "mla"

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

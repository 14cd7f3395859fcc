"""The single place that names the CUDA extension's XLA FFI targets and their attributes.

The C++ side (``csrc/ffi/fwd_ffi.cc``) binds the same attribute names; keep the two in sync.
"""
from __future__ import annotations

import numpy as np

from ...tuning import DEFAULT, Tuning

# FFI target name -> key of the capsule in ``_fa3jax_cuda.handlers()``.
FWD_TARGET = "fa3jax_cuda_fwd"  # (q, k, v) -> (out, lse); csrc/ffi/fwd_ffi.cc
FWD_SINKS_TARGET = "fa3jax_cuda_fwd_sinks"  # (q, k, v, sinks float32 (hq,)) -> (out, lse), the forward's attributes
BWD_TARGET = "fa3jax_cuda_bwd"  # (q, k, v, out, lse, dout, dlse) -> (dq, dk, dv); csrc/ffi/bwd_ffi.cc
HANDLERS = {FWD_TARGET: "fwd", FWD_SINKS_TARGET: "fwd_sinks", BWD_TARGET: "bwd"}
# build_info()["features"] entry of an extension that has FWD_SINKS_TARGET (older builds lack both).
FEATURE_SINKS = "sinks"

# Attributes, with their FFI types: all targets take the first four, then the forward kernel_variant and the
# backward deterministic.
ATTR_SOFTMAX_SCALE = "softmax_scale"  # f32
ATTR_WINDOW_LEFT = "window_left"  # i32, -1 = unbounded
ATTR_WINDOW_RIGHT = "window_right"  # i32, -1 = unbounded; causal is 0
ATTR_SOFTCAP = "softcap"  # f32, 0 = off
ATTR_KERNEL_VARIANT = "kernel_variant"  # i32, see KERNEL_VARIANTS (forward only)
ATTR_DETERMINISTIC = "deterministic"  # i32 0/1: dQ partials added in a fixed order (backward only)

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

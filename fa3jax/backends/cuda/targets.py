"""The single place that names the CUDA extension's XLA FFI targets and their attributes.

The C++ side (``csrc/ffi/fwd_ffi.cc``) binds the same attribute names; keep the two in sync.
"""
from __future__ import annotations

import contextlib

import numpy as np

# FFI target name -> key of the capsule in ``_fa3jax_cuda.handlers()``.
FWD_TARGET = "fa3jax_cuda_fwd"
HANDLERS = {FWD_TARGET: "fwd"}

# Attributes of FWD_TARGET, with their FFI types.
ATTR_SOFTMAX_SCALE = "softmax_scale"  # f32
ATTR_WINDOW_LEFT = "window_left"  # i32, -1 = unbounded
ATTR_WINDOW_RIGHT = "window_right"  # i32, -1 = unbounded; causal is 0
ATTR_SOFTCAP = "softcap"  # f32, 0 = off
ATTR_KERNEL_VARIANT = "kernel_variant"  # i32, see KERNEL_VARIANTS

# Which compiled kernel serves a call: "auto" is the dispatch policy (csrc/src/fwd_dispatch.cc); the others force
# one, where it applies, so that benchmarks can time them side by side in one process.
KERNEL_VARIANTS = {"auto": 0, "plain": 1, "cluster": 2, "wide": 3}
_forced_variant = "auto"


@contextlib.contextmanager
def forced_kernel_variant(name: str):
    """Calls traced inside this block use kernel variant ``name`` (benchmarks only; not thread-safe)."""
    global _forced_variant
    if name not in KERNEL_VARIANTS:
        raise ValueError(f"kernel variant must be one of {sorted(KERNEL_VARIANTS)}, got {name=!r}")
    prev, _forced_variant = _forced_variant, name
    try:
        yield
    finally:
        _forced_variant = prev


def fwd_attributes(spec) -> dict:
    """Keyword attributes of one forward call, typed as the handler binds them."""
    return {
        ATTR_SOFTMAX_SCALE: np.float32(spec.softmax_scale),
        ATTR_WINDOW_LEFT: np.int32(spec.window.left),
        ATTR_WINDOW_RIGHT: np.int32(spec.window.right),
        ATTR_SOFTCAP: np.float32(spec.softcap if spec.softcap > 0 else 0.0),
        ATTR_KERNEL_VARIANT: np.int32(KERNEL_VARIANTS[_forced_variant]),
    }

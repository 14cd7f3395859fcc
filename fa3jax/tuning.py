"""The one seam that overrides the measured launch policy, for benchmarks, sweeps and tests.

Every backend plans its launches from its measured tables (``backends/triton/tables.py``, the CUDA dispatch in
``csrc/src/fwd_dispatch.cc``). A :class:`Tuning` names the choices to force instead; fields left at ``None`` (or
``"auto"``) keep the table's choice. Plans take one as an argument; a whole API call picks up the one in force
where it is traced::

    with fa3jax.tuning.override(Tuning(fwd=(128, 64, 8, 3))):
        f = jax.jit(lambda q, k, v: fa3jax.flash_mha(q, k, v, backend="triton"))
        f(q, k, v)  # traced (and cached) with the forced tile

The override applies at trace time: a function already traced outside the block keeps its launches.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Optional

CUDA_KERNELS = ("auto", "plain", "wide")


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Forced launch choices. Triton tiles are ``(block_m, block_n, num_warps, num_stages[, overlap])``."""

    fwd: Optional[tuple] = None  # triton forward tile (dense, varlen and the decode kernels' base tile)
    bwd_dkdv: Optional[tuple] = None
    bwd_dq: Optional[tuple] = None
    bwd_pre: Optional[tuple] = None
    # A triton ``tables.DecodeConfig`` that replaces the table's policy for either cache layout.
    decode: Optional[Any] = None
    decode_programs: Optional[int] = None  # programs per kv head of the stream-K decode grid
    cuda_kernel: str = "auto"  # one of CUDA_KERNELS

    def __post_init__(self):
        if self.cuda_kernel not in CUDA_KERNELS:
            raise ValueError(f"cuda_kernel must be one of {CUDA_KERNELS}; got cuda_kernel={self.cuda_kernel!r}")
        for name in ("fwd", "bwd_dkdv", "bwd_dq", "bwd_pre"):
            tile = getattr(self, name)
            if tile is not None and not (isinstance(tile, tuple) and 4 <= len(tile) <= 5):
                raise ValueError(f"{name} must be (block_m, block_n, num_warps, num_stages[, overlap]); "
                                 f"got {name}={tile!r}")

    def tile(self, name: str):
        """The forced tile ``name`` ("fwd", "bwd_dkdv", ...) or None."""
        return getattr(self, name)


DEFAULT = Tuning()
_CURRENT: contextvars.ContextVar[Tuning] = contextvars.ContextVar("fa3jax_tuning", default=DEFAULT)


def current() -> Tuning:
    """The Tuning in force (``DEFAULT`` outside :func:`override`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def override(tuning: Tuning):
    """Calls traced inside this block plan with ``tuning``."""
    if not isinstance(tuning, Tuning):
        raise TypeError(f"tuning must be a fa3jax.tuning.Tuning; got {type(tuning).__name__}")
    token = _CURRENT.set(tuning)
    try:
        yield tuning
    finally:
        _CURRENT.reset(token)

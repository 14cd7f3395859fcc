"""Shared test machinery: random inputs, the low-precision twin of the reference, and the error check.

Tolerance rule: a backend's relative error against the float64 reference may be at most ``FACTOR`` times the
error of a naive implementation computed entirely in the input dtype (plus a tiny floor for float32).
"""
from __future__ import annotations

import zlib

import jax.numpy as jnp
import numpy as np

from fa3jax import reference

FACTOR = 3.0
_FLOOR = {"float32": 1e-4, "bfloat16": 2e-3, "float16": 3e-4}


def rand(rng: np.random.Generator, shape, dtype):
    """Fresh normal inputs, rounded to ``dtype``; returned as (jax array, float64 numpy of the rounded values)."""
    x = jnp.asarray(rng.standard_normal(shape), dtype=dtype)
    return x, np.asarray(x.astype(jnp.float32), dtype=np.float64)


def naive_lowp(q, k, v, *, dtype="bfloat16", **kw):
    """The float64 reference with every intermediate rounded to ``dtype``: what a naive implementation in that
    precision would get. The yardstick for tolerances (same contract as ``fa3jax.reference.attention``)."""
    np_dt = jnp.dtype(dtype)

    def rnd(x):
        return np.asarray(np.asarray(x).astype(np_dt), np.float64)

    return reference.attention(q, k, v, rnd=rnd, **kw)


def relerr(x, ref) -> float:
    x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(x)) or np.isnan(x).any():
        return float("inf")  # NaN, or an inf where the reference is finite (or vice versa), never passes
    if not np.array_equal(x[~finite], ref[~finite]):
        return float("inf")
    # a floor for references that are legitimately ~0 (e.g. dq with a single visible key): unit-scale data
    denom = max(np.linalg.norm(ref[finite]), 1e-3 * np.sqrt(max(int(finite.sum()), 1)))
    return float(np.linalg.norm(x[finite] - ref[finite]) / denom)


def check(name, got, ref64, lowp, dtype):
    """``got`` must be within FACTOR x the naive low-precision error (``lowp`` vs ``ref64``)."""
    err = relerr(got, ref64)
    base = relerr(lowp, ref64)
    if not np.isfinite(base):  # the yardstick itself broke: fall back to the floor, never to "anything goes"
        base = 0.0
    tol = FACTOR * max(base, _FLOOR[dtype])
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.3e} (naive {dtype} error {base:.3e})"


def seeded_rng(*key):
    """A NumPy generator seeded from ``key``'s repr: the same inputs in every process (``hash`` of a string is
    randomized per process, which made a failing case unreproducible)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))

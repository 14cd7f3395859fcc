"""Merging partial attention results by their log-sum-exp (used by ring attention and split-KV).

Two partial results over disjoint key sets, ``(o1, lse1)`` and ``(o2, lse2)``, combine exactly as
``lse = logaddexp(lse1, lse2)``, ``o = o1 * exp(lse1 - lse) + o2 * exp(lse2 - lse)``. Empty partials
(lse = -inf, o = 0) drop out without NaN.
"""
from __future__ import annotations

import jax.numpy as jnp

_NEG_INF = float("-inf")


def merge(o1, lse1, o2, lse2, lse_axes_to_out):
    """Merge two partials. ``lse_axes_to_out(x)`` maps an LSE-shaped array to broadcast against ``o`` (the
    layouts differ between dense (b, h, l) and varlen (h, total)). Returns (o in fp32, lse)."""
    lse = jnp.logaddexp(lse1, lse2)
    safe = jnp.where(lse == _NEG_INF, 0.0, lse)
    w1 = jnp.where(lse1 == _NEG_INF, 0.0, jnp.exp(lse1 - safe))
    w2 = jnp.where(lse2 == _NEG_INF, 0.0, jnp.exp(lse2 - safe))
    o = o1.astype(jnp.float32) * lse_axes_to_out(w1) + o2.astype(jnp.float32) * lse_axes_to_out(w2)
    return o, lse


def merge_many(outs, lses, axis, lse_axes_to_out):
    """Merge partials stacked along ``axis`` of ``outs``/``lses`` (same axis index in both)."""
    lse = jnp.max(lses, axis=axis, keepdims=True)
    safe = jnp.where(lse == _NEG_INF, 0.0, lse)
    w = jnp.exp(lses - safe)
    total = jnp.sum(w, axis=axis, keepdims=True)
    o = jnp.sum(outs.astype(jnp.float32) * lse_axes_to_out(w), axis=axis)
    total_s = jnp.squeeze(total, axis)
    o = o / lse_axes_to_out(jnp.where(total_s == 0, 1.0, total_s))
    lse_out = jnp.where(total_s == 0, _NEG_INF, jnp.squeeze(safe, axis) + jnp.log(jnp.where(total_s == 0, 1.0, total_s)))
    return o, lse_out


def dense_lse_to_out(x):
    """(b, h, l) -> (b, l, h, 1), the dense/kvcache layout."""
    return jnp.swapaxes(x, -1, -2)[..., None]


def varlen_lse_to_out(x):
    """(h, total) -> (total, h, 1)."""
    return jnp.swapaxes(x, -1, -2)[..., None]

"""The correctness guard: relative error against a reference, and the references sharing no code with fa3jax.

Before timing, each impl's forward output is compared with a reference on the same inputs at the benchmark shape;
``max_rel_err = max|o - o_ref| / max|o_ref|``. An impl above ``WRONG_TOL`` is reported as WRONG and not timed. The
attn and decode suites compare with fa3jax's xla backend; the varlen suite with :func:`varlen_reference` and
:func:`dense_reference`, which share no code with fa3jax, so that fa3jax's own xla varlen path is checked too.
"""
from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np

def rel_err(out, ref) -> float:
    out = jnp.asarray(out, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    num = float(jnp.max(jnp.abs(out - ref)))
    den = float(jnp.max(jnp.abs(ref)))
    if not math.isfinite(num):
        return float("inf")
    return num / max(den, 1e-30)


def padded_reference(q, k, v, lengths, causal: bool):
    """Forward reference for a batch ``(n, m, h, d)`` whose first ``lengths[i]`` rows are sequence ``i``:
    ``jax.nn.dot_product_attention`` (xla) in float32 with the padding masked by the sequence lengths. It shares no
    code with fa3jax, so it also catches a wrong fa3jax:xla. One head at a time keeps the (n, m, m) scores of the
    longest sequences (m up to 1.5x the mean) within a few GiB."""
    lens = jnp.asarray(lengths, jnp.int32)
    k, v = (jnp.repeat(t, q.shape[2] // t.shape[2], axis=2) for t in (k, v))  # GQA: each query head's kv head

    def one_head(x):
        qh, kh, vh = (t[:, :, None, :] for t in x)
        return jax.nn.dot_product_attention(qh, kh, vh, is_causal=causal, query_seq_lengths=lens,
                                            key_value_seq_lengths=lens, implementation="xla")[:, :, 0, :]

    out = jax.lax.map(one_head, tuple(jnp.moveaxis(x.astype(jnp.float32), 2, 0) for x in (q, k, v)))
    return jnp.moveaxis(out, 0, 2)


def varlen_reference(q, k, v, lengths, causal: bool):
    """:func:`padded_reference` of packed ``(total, h, d)`` sequences: gathered into a padded batch, computed,
    and packed back, all in one jit at full float32 matmul precision."""
    lengths = np.asarray(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(lengths.max())
    rows = np.where(pos[None] < lengths[:, None], starts[:, None] + pos[None], 0)  # (n, m) packed row of each slot
    seq = np.repeat(np.arange(len(lengths)), lengths)  # packed row -> (sequence, position)
    off = np.arange(int(lengths.sum())) - starts[seq]

    def f(q, k, v):
        return padded_reference(q[rows], k[rows], v[rows], lengths, causal)[seq, off]

    with _highest_precision():
        return jax.jit(f)(q, k, v)


def dense_reference(q, k, v, causal: bool):
    with _highest_precision():
        return jax.jit(lambda q, k, v: padded_reference(q, k, v, [q.shape[1]] * q.shape[0], causal))(q, k, v)


def _highest_precision():
    """True float32 matmuls (no TF32) for the reference; any precision passes the guard, so a jax without the
    context manager just runs at its default."""
    ctx = getattr(jax, "default_matmul_precision", None)
    return ctx("highest") if ctx is not None else contextlib.nullcontext()

"""Ring attention: sequence parallelism over one mesh axis, inside ``shard_map`` (or a custom partition).

Every device holds one sequence chunk of q, k, v (dense layout, (b, l_local, h, d)). The forward runs ``n`` steps
(``n`` = the axis size): at step ``s`` device ``i`` attends its q chunk to the k/v chunk of device ``i - s``
and passes that k/v chunk to device ``i + 1`` with ``lax.ppermute`` (in the inputs' own dtype). Partial results
are merged by their log-sum-exp (:mod:`fa3jax.lse`). Each block is one ordinary backend call on a spec whose
masks use the global lengths (``global_seqlen_q/k``) and the runtime global offsets of the block, so causal,
sliding windows, softcap and GQA behave exactly as on the unsharded sequence. Blocks that the mask hides
entirely are skipped with ``lax.cond`` (the kernel does not run; the permute still happens).

The backward is the standard ring backward: the global ``out``/``lse`` of the local q rows (already merged) feed
every step, ``dq`` accumulates locally in fp32, and fp32 ``dk``/``dv`` accumulators travel around the ring with
their k/v chunk, arriving back on their owner after ``n`` permutes.

Layouts:
  * ``"contiguous"``: device ``i`` holds chunk ``i`` of ``n``.
  * ``"zigzag"``: the sequence is cut in ``2n`` chunks and device ``i`` holds chunks ``i`` and ``2n - 1 - i``
    (use :func:`zigzag_permute` to lay a global array out that way). Under causal masks every device then does
    the same amount of work. Each local tensor is two halves with different offsets, so every step makes up to
    4 backend calls (q half x k half; a scan over the pairs, so the kernel is traced once), each skipped when
    masked out.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import calls, masking
from . import lse as _lse
from .backends.base import DenseArgs
from .manual_axes import varying_like
from .spec import RingConfig

_NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------- layout helpers
def zigzag_permute(x, n: int, axis: int = 1):
    """Reorder a global sequence so that contiguous sharding over ``n`` devices gives device ``i`` the chunks
    ``i`` and ``2n - 1 - i`` (of ``2n``). ``x.shape[axis]`` must divide by ``2n``. numpy in, numpy out."""
    return _reorder(x, _zigzag_order(n), axis)


def zigzag_unpermute(x, n: int, axis: int = 1):
    """Inverse of :func:`zigzag_permute`."""
    order = _zigzag_order(n)
    inv = [0] * len(order)
    for pos, c in enumerate(order):
        inv[c] = pos
    return _reorder(x, inv, axis)


def _zigzag_order(n):
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1; got n={n}")
    return [c for i in range(n) for c in (i, 2 * n - 1 - i)]


def _reorder(x, order, axis):
    parts = len(order)
    length = x.shape[axis]
    if length % parts:
        raise ValueError(f"x.shape[{axis}]={length} must divide by 2n={parts} for the zigzag layout")
    if isinstance(x, np.ndarray):
        c = length // parts
        idx = np.concatenate([np.arange(o * c, (o + 1) * c) for o in order])
        return np.take(x, idx, axis=axis)
    chunks = jnp.split(x, parts, axis=axis)
    return jnp.concatenate([chunks[o] for o in order], axis=axis)


# --------------------------------------------------------------------------------------------- skipping
def block_is_live(q_lo, len_q, k_lo, len_k, seqlen_q, seqlen_k, window: masking.Window):
    """Whether any query of global rows ``[q_lo, q_lo + len_q)`` may attend to any key of global columns
    ``[k_lo, k_lo + len_k)`` (sequence lengths ``seqlen_q``/``seqlen_k``), per :func:`fa3jax.masking.allowed`.

    Exact: the keys visible from consecutive rows form one contiguous band (:func:`fa3jax.masking.key_range`),
    so the block is live iff that band, clipped to the sequence, meets the block's columns. Works on Python ints
    and on traced int32 scalars."""
    lo, hi = masking.key_range(q_lo, q_lo + len_q, seqlen_q, seqlen_k, window)
    lo = jnp.maximum(jnp.maximum(lo, k_lo), 0)
    hi = jnp.minimum(jnp.minimum(hi, k_lo + len_k), seqlen_k)
    return (lo < hi) & (len_q > 0)


# ------------------------------------------------------------------------------------------ ring plumbing
def _offsets(idx, n, total, layout):
    """(P,) int32 global offsets of the P pieces (1 contiguous, 2 zigzag) held by device ``idx``."""
    if layout == "contiguous":
        return jnp.stack([idx * (total // n)]).astype(jnp.int32)
    c = total // (2 * n)
    return jnp.stack([idx * c, (2 * n - 1 - idx) * c]).astype(jnp.int32)


def _stack(x, p, axis):
    """Cut ``axis`` of ``x`` into ``p`` equal pieces, stacked on a new leading axis."""
    shape = x.shape[:axis] + (p, x.shape[axis] // p) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unstack(x, axis):
    """Inverse of :func:`_stack`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _block_spec(spec, len_q, len_k):
    return spec.replace(seqlen_q=len_q, seqlen_k=len_k, has_offsets=True, global_seqlen_q=spec.seqlen_q,
                        global_seqlen_k=spec.seqlen_k)


def _perm(n):
    return [(j, (j + 1) % n) for j in range(n)]


def _get(x, i):
    return x[i] if isinstance(i, int) else lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _put(x, i, val):
    return x.at[i].set(val) if isinstance(i, int) else lax.dynamic_update_index_in_dim(x, val, i, 0)


def _pairs(pq, pk, fn, carry):
    """Apply ``fn(carry, a, b)`` to every (q piece a, k piece b) pair. One traced instance of ``fn`` (a scan over
    the pairs when there are several), so the kernel is compiled once whatever the layout."""
    if pq * pk == 1:
        return fn(carry, 0, 0)
    return _count(lambda c, p: fn(c, p // pk, p % pk), carry, pq * pk)


def _count(body, carry, n):
    """``body(carry, i)`` for i in range(n) in one scan; i is a carried counter, not scanned ``xs``, so the loop
    has no dynamic-slice of an index array."""
    def step(c, _):
        c, i = c
        return (body(c, i), i + 1), None

    return lax.scan(step, (carry, jnp.int32(0)), None, length=n)[0][0]


def _pieces(layout):
    return 2 if layout == "zigzag" else 1


def _ring_step(spec, cfg: RingConfig, idx, s, kv, q_offs, cq, ck, visit, carry):
    """Step ``s`` of the ring: send the held k/v chunk on (issued first so that it can overlap the compute) and
    run ``visit(carry, a, b, offsets, ks, vs)`` on every (q piece a, k piece b) pair the mask does not hide.
    Returns (the next k/v chunk, carry)."""
    n, p = cfg.axis_size, _pieces(cfg.layout)
    nxt = tuple(lax.ppermute(x, cfg.axis_name, _perm(n)) for x in kv) if n > 1 else kv
    ks, vs = _stack(kv[0], p, 1), _stack(kv[1], p, 1)
    k_offs = _offsets((idx - s) % n, n, spec.seqlen_k, cfg.layout)

    def pair(c, a, b):
        qo, ko = _get(q_offs, a), _get(k_offs, b)
        live = block_is_live(qo, cq, ko, ck, spec.seqlen_q, spec.seqlen_k, spec.window)
        return lax.cond(live, lambda c: visit(c, a, b, DenseArgs(qo, ko), ks, vs), lambda c: c, c)

    return nxt, _pairs(p, p, pair, carry)


# ---------------------------------------------------------------------------------------------- forward
def forward(backend_name: str, spec, cfg: RingConfig, q, k, v):
    """(out, lse) of the local q chunk against the whole (ring-distributed) sequence, each block run by backend
    ``backend_name``; ``spec`` describes the global sequence. Inside shard_map.

    A scan over the ``n`` ring steps (:func:`_ring_step`; the last step's permute is redundant, the price of
    tracing the step once)."""
    n, name, layout = cfg.axis_size, cfg.axis_name, cfg.layout
    p = _pieces(layout)
    idx = lax.axis_index(name).astype(jnp.int32)
    qs = _stack(q, p, 1)  # (P, b, cq, hq, d)
    q_offs = _offsets(idx, n, spec.seqlen_q, layout)
    cq, ck = qs.shape[2], k.shape[1] // p
    bspec = _block_spec(spec, cq, ck)
    acc0 = (jnp.zeros(qs.shape, jnp.float32), jnp.full((p, q.shape[0], q.shape[2], cq), _NEG_INF, jnp.float32))
    acc0 = tuple(varying_like(x, q, k, v, q_offs) for x in acc0)

    def attend(acc, a, b, offsets, ks, vs):
        o, l = calls.forward(backend_name, bspec, _get(qs, a), _get(ks, b), _get(vs, b), offsets)
        mo, ml = _lse.merge(_get(acc[0], a), _get(acc[1], a), o, l, _lse.dense_lse_to_out)
        return _put(acc[0], a, mo), _put(acc[1], a, ml)

    def step(carry, s):
        kv, acc = carry
        return _ring_step(spec, cfg, idx, s, kv, q_offs, cq, ck, attend, acc)

    _, (o, l) = _count(step, ((k, v), acc0), n)
    return _unstack(o, 1).astype(q.dtype), _unstack(l, 2)


# --------------------------------------------------------------------------------------------- backward
def backward(backend_name: str, spec, cfg: RingConfig, q, k, v, out, lse, dout, dlse):
    """(dq, dk, dv) of the local chunks. ``out``/``lse`` are the merged (global) results of the local q rows,
    so every block's softmax gradient uses the global statistics. fp32 dk/dv accumulators travel with their
    k/v chunk and are home after the n-th permute; dq accumulates locally in fp32."""
    n, name, layout = cfg.axis_size, cfg.axis_name, cfg.layout
    p = _pieces(layout)
    idx = lax.axis_index(name).astype(jnp.int32)
    qs, outs, douts = (_stack(x, p, 1) for x in (q, out, dout))
    lses, dlses = _stack(lse, p, 2), _stack(dlse, p, 2)
    q_offs = _offsets(idx, n, spec.seqlen_q, layout)
    cq, ck = qs.shape[2], k.shape[1] // p
    bspec = _block_spec(spec, cq, ck)
    dq0 = jnp.zeros(qs.shape, jnp.float32)
    dkv0 = (jnp.zeros((p, k.shape[0], ck) + k.shape[2:], jnp.float32),
            jnp.zeros((p, v.shape[0], ck) + v.shape[2:], jnp.float32))
    dq0, dkv0 = jax.tree.map(lambda x: varying_like(x, q, k, v, out, lse, dout, dlse, q_offs), (dq0, dkv0))

    def grads(c, a, b, offsets, ks, vs):
        dq, dk, dv = c
        g = calls.backward(backend_name, bspec, _get(qs, a), _get(ks, b), _get(vs, b), _get(outs, a),
                           _get(lses, a), _get(douts, a), _get(dlses, a), offsets)
        return (_put(dq, a, _get(dq, a) + g[0].astype(jnp.float32)),
                _put(dk, b, _get(dk, b) + g[1].astype(jnp.float32)),
                _put(dv, b, _get(dv, b) + g[2].astype(jnp.float32)))

    def step(carry, s):
        kv, dkv, dq = carry
        nxt, (dq, dk, dv) = _ring_step(spec, cfg, idx, s, kv, q_offs, cq, ck, grads, (dq,) + dkv)
        dkv = tuple(lax.ppermute(x, name, _perm(n)) for x in (dk, dv)) if n > 1 else (dk, dv)
        return nxt, dkv, dq

    _, (dk, dv), dq = _count(step, ((k, v), dkv0, dq0), n)
    return (_unstack(dq, 1).astype(q.dtype), _unstack(dk, 1).astype(k.dtype), _unstack(dv, 1).astype(v.dtype))

"""Pure-JAX backend: blockwise online softmax over KV chunks (FlashAttention-2, Alg. 1) and a blockwise backward
from the saved LSE (Alg. 2), so memory is O(seqlen * block), never O(seqlen^2). Runs on every platform; it is the
fallback of ``auto`` and the cross-check of the GPU backends.

All three modes reduce to one core: queries and keys carry, per batch row, a position, a segment id and (for
queries) the lengths of their sequence. The mask is ``fa3jax.masking.allowed`` plus "same segment"; padding and
invalid keys get positions outside ``[0, seqlen)`` so the same rule masks them.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import masking
from ..manual_axes import varying_like
from ..spec import AttentionSpec
from .base import Backend, DenseArgs, KVCacheArgs, VarlenArgs

_NEG_INF = float("-inf")


class _Rows(NamedTuple):
    """Per-query metadata, each (B, Lq) int32."""

    pos: jax.Array
    seg: jax.Array
    seqlen_q: jax.Array
    seqlen_k: jax.Array


class _Cols(NamedTuple):
    """Per-key metadata, each (B, Lk) int32."""

    pos: jax.Array
    seg: jax.Array


def _block_sizes(lq: int, lk: int) -> tuple[int, int]:
    # 512 keeps a (heads, 512, 512) fp32 score block at a few MiB per head group: O(l * block) memory.
    def pick(n):
        return min(512, max(8, -(-n // 8) * 8))

    return pick(lq), pick(lk)


def _pad_to(x, n, axis, value=0):
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, nblk, axis=1):
    """(B, nblk*bs, ...) -> (nblk, B, bs, ...)."""
    shape = x.shape[:axis] + (nblk, x.shape[axis] // nblk) + x.shape[axis + 1:]
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _unblocks(x, axis=1):
    """Inverse of :func:`_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _mask(rows: _Rows, cols: _Cols, window) -> jax.Array:
    """(B, bq, bk) boolean mask of one block pair, from the shared masking rule."""
    ok = masking.allowed(rows.pos[:, :, None], cols.pos[:, None, :], rows.seqlen_q[:, :, None],
                         rows.seqlen_k[:, :, None], window, jnp)
    return ok & (rows.seg[:, :, None] == cols.seg[:, None, :])


def _scores(qb, kb, spec: AttentionSpec):
    """Scaled (and soft-capped) fp32 scores (B, Hk, G, bq, bk) and the pre-cap tanh for the backward."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb, preferred_element_type=jnp.float32) * spec.softmax_scale
    if spec.softcap > 0:
        t = jnp.tanh(s / spec.softcap)
        return spec.softcap * t, t
    return s, None


def _core_forward(spec: AttentionSpec, q, k, v, rows: _Rows, cols: _Cols, sinks=None):
    """q (B, Lq, Hq, D), k (B, Lk, Hk, D), v (B, Lk, Hk, Dv) -> out (B, Lq, Hq, Dv) in q.dtype, lse (B, Hq, Lq)
    fp32. ``sinks`` (Hq,) fp32 or None: each head's sink logit joins every row's denominator (no value)."""
    B, lq, hq, d = q.shape
    lk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    bq, bk = _block_sizes(lq, lk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    qp = _blocks(_pad_to(q, nq * bq, 1).reshape(B, nq * bq, hk, g, d), nq)
    rows_b = _Rows(*(_blocks(_pad_to(r, nq * bq, 1, fill), nq)
                     for r, fill in zip(rows, (0, -1, 0, 0))))  # padded rows: seqlen_q 0 -> masked
    kp = _blocks(_pad_to(k, nk * bk, 1), nk)
    vp = _blocks(_pad_to(v, nk * bk, 1), nk)
    cols_b = _Cols(_blocks(_pad_to(cols.pos, nk * bk, 1, -1), nk), _blocks(_pad_to(cols.seg, nk * bk, 1, -2), nk))

    def one_q_block(args):
        qb, rb = args
        qb = qb.astype(jnp.float32) if q.dtype == jnp.float32 else qb
        init = (jnp.full((B, hk, g, bq), _NEG_INF, jnp.float32), jnp.zeros((B, hk, g, bq), jnp.float32),
                jnp.zeros((B, bq, hk, g, dv), jnp.float32))
        init = tuple(varying_like(x, qb, rb, k, v, cols) for x in init)

        def step(carry, kv):
            kb, vb, cb = kv
            mask = _mask(rb, cb, spec.window)

            def attend(carry):
                m, l, acc = carry
                s, _ = _scores(qb, kb, spec)
                s = jnp.where(mask[:, None, None], s, _NEG_INF)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)  # rows with nothing yet: no inf - inf
                p = jnp.exp(s - m_safe[..., None])
                corr = jnp.exp(m - m_safe)
                l = l * corr + p.sum(-1)
                pv = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
                acc = acc * jnp.moveaxis(corr, 3, 1)[..., None] + pv
                return m_new, l, acc

            return lax.cond(jnp.any(mask), attend, lambda c: c, carry), None

        (m, l, acc), _ = lax.scan(step, init, (kp, vp, cols_b))
        empty = l == 0.0
        lse = jnp.where(empty, _NEG_INF, m + jnp.log(jnp.where(empty, 1.0, l)))
        norm = jnp.where(empty, 1.0, l)
        if sinks is not None:  # the sink joins the denominator once: l -> l + exp(sink - m), in the LSE domain
            sink = sinks.reshape(1, hk, g, 1)
            lse_s = jnp.logaddexp(lse, sink)
            # out = acc / (l + exp(sink - m)) = acc / l * exp(lse - lse_s); 0 where no key (acc = 0)
            norm = norm / jnp.where(empty | (lse_s == _NEG_INF), 1.0, jnp.exp(lse - lse_s))
            lse = lse_s
        out = acc / jnp.moveaxis(norm, 3, 1)[..., None]
        return out.astype(q.dtype), lse

    out, lse = lax.map(one_q_block, (qp, rows_b))
    out = _unblocks(out)[:, :lq].reshape(B, lq, hq, dv)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, hk, g, nq * bq)[..., :lq].reshape(B, hq, lq)
    return out, lse


def _core_backward(spec: AttentionSpec, q, k, v, out, lse, dout, dlse, rows: _Rows, cols: _Cols):
    """Blockwise gradients from the saved LSE. One pass over KV blocks (outer) and query blocks (inner): dK/dV
    accumulate in the inner carry, dQ in a full-size fp32 carry. Sequential, hence bitwise deterministic.
    With sinks, ``out``/``lse`` are the sink-inclusive ones and nothing else changes (see backends.base)."""
    B, lq, hq, d = q.shape
    lk, hk, dv_dim = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    bq, bk = _block_sizes(lq, lk)
    nq, nk = -(-lq // bq), -(-lk // bk)
    # delta = rowsum(dO * O) - dlse  (the LSE cotangent enters the softmax gradient here)
    delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32)) - dlse
    lse_safe = jnp.where(lse == _NEG_INF, jnp.inf, lse)  # exp(s - inf) = 0 for rows that saw nothing

    def qlayout(x):
        return _blocks(_pad_to(x, nq * bq, 1).reshape(B, nq * bq, hk, g, x.shape[-1]), nq)

    def rowstat(x):  # (B, Hq, Lq) -> (nq, B, Hk, G, bq)
        x = _pad_to(x, nq * bq, 2).reshape(B, hk, g, nq, bq)
        return jnp.moveaxis(x, 3, 0)

    qp, dop = qlayout(q), qlayout(dout)
    lsep, deltap = rowstat(lse_safe), rowstat(delta)
    rows_b = _Rows(*(_blocks(_pad_to(r, nq * bq, 1, fill), nq) for r, fill in zip(rows, (0, -1, 0, 0))))
    kp = _blocks(_pad_to(k, nk * bk, 1), nk)
    vp = _blocks(_pad_to(v, nk * bk, 1), nk)
    cols_b = _Cols(_blocks(_pad_to(cols.pos, nk * bk, 1, -1), nk), _blocks(_pad_to(cols.seg, nk * bk, 1, -2), nk))

    def one_k_block(dq_all, kv):
        kb, vb, cb = kv

        def inner(carry, xs):
            dk, dv, dq_all = carry
            i, qb, dob, lb, db, rb = xs
            mask = _mask(rb, cb, spec.window)

            def grads(carry):
                dk, dv, dq_all = carry
                s, t = _scores(qb, kb, spec)
                p = jnp.where(mask[:, None, None], jnp.exp(s - lb[..., None]), 0.0)
                dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(dob.dtype), dob, preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqhgd,bkhd->bhgqk", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - db[..., None])
                if t is not None:  # d/ds [c tanh(s/c)] = 1 - tanh^2
                    ds = ds * (1.0 - t * t)
                ds = ds * spec.softmax_scale
                dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(qb.dtype), qb, preferred_element_type=jnp.float32)
                dqb = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(kb.dtype), kb, preferred_element_type=jnp.float32)
                dq_all = lax.dynamic_update_index_in_dim(dq_all, dq_all[i] + dqb, i, 0)
                return dk, dv, dq_all

            return lax.cond(jnp.any(mask), grads, lambda c: c, carry), None

        zeros = [varying_like(jnp.zeros((B, bk, hk, n), jnp.float32), q, k, v, dout, rows, cols) for n in (d, dv_dim)]
        (dk, dv, dq_all), _ = lax.scan(inner, (*zeros, dq_all),
                                       (jnp.arange(nq), qp, dop, lsep, deltap, rows_b))
        return dq_all, (dk, dv)

    dq0 = varying_like(jnp.zeros((nq, B, bq, hk, g, d), jnp.float32), q, k, v, dout, rows, cols)
    dq_all, (dk, dv) = lax.scan(one_k_block, dq0, (kp, vp, cols_b))
    dq = _unblocks(dq_all)[:, :lq].reshape(B, lq, hq, d)
    dk = _unblocks(dk)[:, :lk]
    dv = _unblocks(dv)[:, :lk]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


# ------------------------------------------------------------------------------------ metadata per mode
def _dense_meta(spec: AttentionSpec, args: DenseArgs):
    b, lq, lk = spec.batch, spec.seqlen_q, spec.seqlen_k
    qo = jnp.int32(0) if args is None or args.q_offset is None else args.q_offset.astype(jnp.int32)
    ko = jnp.int32(0) if args is None or args.k_offset is None else args.k_offset.astype(jnp.int32)
    qpos = jnp.broadcast_to(jnp.arange(lq, dtype=jnp.int32) + qo, (b, lq))
    kpos = jnp.broadcast_to(jnp.arange(lk, dtype=jnp.int32) + ko, (b, lk))
    zq = jnp.zeros((b, lq), jnp.int32)
    qseg, kseg = zq, jnp.zeros((b, lk), jnp.int32)
    if spec.has_segment_ids:
        qseg, kseg = args.q_segment_ids, args.k_segment_ids
    rows = _Rows(qpos, qseg, zq + spec.global_seqlen_q, zq + spec.global_seqlen_k)
    return rows, _Cols(kpos, kseg)


def _varlen_meta(spec: AttentionSpec, args: VarlenArgs):
    cu_q, cu_k = args.cu_seqlens_q, args.cu_seqlens_k
    nb = spec.batch
    len_q = cu_q[1:] - cu_q[:-1]
    len_k = cu_k[1:] - cu_k[:-1] if args.seqused_k is None else args.seqused_k

    def segments(cu, total):
        t = jnp.arange(total, dtype=jnp.int32)
        seg = jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1  # in [-1, nb]; nb = past the end
        inside = (seg >= 0) & (seg < nb)
        safe = jnp.clip(seg, 0, nb - 1)
        return t - cu[safe], jnp.where(inside, seg, -1), safe, inside

    qpos, qseg, qsafe, qin = segments(cu_q, spec.seqlen_q)
    kpos, kseg, _, _ = segments(cu_k, spec.seqlen_k)
    rows = _Rows(qpos[None], qseg[None], jnp.where(qin, len_q[qsafe], 0)[None], len_k[qsafe][None])
    return rows, _Cols(kpos[None], kseg[None])


def _kvcache_keys(spec: AttentionSpec, k_cache, v_cache, args: KVCacheArgs):
    """Gather each sequence's cache rows, append the new keys, and give every key its mask position."""
    kv = spec.kvcache
    b, cap = spec.batch, kv.capacity
    j = jnp.arange(cap, dtype=jnp.int32)[None, :]
    valid = j < args.cache_seqlens[:, None]
    if kv.paged:
        pt = args.page_table
        page_ok = (pt >= 0) & (pt < kv.cache_batch)
        safe = jnp.where(page_ok, pt, 0)
        keys = k_cache[safe].reshape(b, cap, *k_cache.shape[2:])
        vals = v_cache[safe].reshape(b, cap, *v_cache.shape[2:])
        valid = valid & jnp.repeat(page_ok, kv.page_size, axis=1)
    else:
        idx = args.batch_idx
        keys = k_cache if idx is None else k_cache[idx]
        vals = v_cache if idx is None else v_cache[idx]
    pos = j
    if kv.seqlen_new:
        t = jnp.arange(kv.seqlen_new, dtype=jnp.int32)[None, :]
        keys = jnp.concatenate([keys, args.k_new], axis=1)
        vals = jnp.concatenate([vals, args.v_new], axis=1)
        pos = jnp.concatenate([jnp.broadcast_to(j, (b, cap)), args.cache_seqlens[:, None] + t], axis=1)
        valid = jnp.concatenate([valid, jnp.ones((b, kv.seqlen_new), bool)], axis=1)
    leftpad = jnp.zeros((b,), jnp.int32) if args.leftpad is None else args.leftpad
    pos = jnp.where(valid & (pos >= leftpad[:, None]), pos - leftpad[:, None], -1)
    lq = spec.seqlen_q
    zq = jnp.zeros((b, lq), jnp.int32)
    rows = _Rows(jnp.broadcast_to(jnp.arange(lq, dtype=jnp.int32), (b, lq)), zq, zq + lq,
                 zq + (args.seqlens_k - leftpad)[:, None])
    return keys, vals, rows, _Cols(pos, jnp.zeros(pos.shape, jnp.int32))


# --------------------------------------------------------------------------------------------- backend
class XlaBackend(Backend):
    name = "xla"

    def availability(self):
        return True, ""

    def check_forward(self, spec):
        return None

    def check_backward(self, spec):
        if spec.mode == "kvcache":
            raise NotImplementedError("xla: flash_mha_with_kvcache has no backward (inference API)")

    def forward(self, spec, q, k, v, args):
        sinks = args.sinks if spec.has_sinks else None
        if spec.mode == "varlen":
            rows, cols = _varlen_meta(spec, args)
            out, lse = _core_forward(spec, q[None], k[None], v[None], rows, cols, sinks)
            return out[0], lse[0]
        rows, cols = _dense_meta(spec, args)
        return _core_forward(spec, q, k, v, rows, cols, sinks)

    def backward(self, spec, q, k, v, out, lse, dout, dlse, args):
        if spec.mode == "varlen":
            rows, cols = _varlen_meta(spec, args)
            dq, dk, dv = _core_backward(spec, q[None], k[None], v[None], out[None], lse[None], dout[None],
                                        dlse[None], rows, cols)
            return dq[0], dk[0], dv[0]
        rows, cols = _dense_meta(spec, args)
        return _core_backward(spec, q, k, v, out, lse, dout, dlse, rows, cols)

    def kvcache_forward(self, spec, q, k_cache, v_cache, args):
        keys, vals, rows, cols = _kvcache_keys(spec, k_cache, v_cache, args)
        # one pass over every key (no split-KV here), so the sink is counted once per row
        return _core_forward(spec, q, keys, vals, rows, cols, args.sinks if spec.has_sinks else None)

"""Float64 NumPy reference: full score matrices, no blocking, the textbook softmax gradient.

Deliberately a different algorithm from every backend (no online softmax, no blocks), sharing only the mask
rule of :mod:`fa3jax.masking`. O(l^2) memory: for tests at small sizes.
"""
from __future__ import annotations

import numpy as np

from . import masking


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def attention(q, k, v, *, scale, window, softcap=0.0, seqlen_q=None, seqlen_k=None, q_pos=None, k_pos=None,
              dout=None, dlse=None, rnd=None, sinks=None, q_seg=None, k_seg=None):
    """One sequence: q (lq, hq, d), k (lk, hk, d), v (lk, hk, dv). Returns (out, lse (hq, lq)) and, when ``dout``
    is given, also (dq, dk, dv), and then d sinks (hq,) when ``sinks`` is given. Positions default to 0..l-1,
    lengths to the array lengths.

    ``sinks`` (hq,): one logit per head, compared with the scaled (soft-capped) scores, that joins every row's
    denominator and carries no value: a row that sees no key gets out 0, lse = sink.

    ``q_seg`` (lq,) / ``k_seg`` (lk,): packed-sequence segment ids; a query sees only keys of equal id (the
    position mask unchanged).

    ``rnd`` (tests only) rounds every intermediate to a low precision, turning this into the error yardstick
    of a naive low-precision implementation."""
    rnd = rnd or (lambda x: x)
    q, k, v = _f64(q), _f64(k), _f64(v)
    lq, hq, d = q.shape
    dv_dim = v.shape[-1]
    sk = np.full((hq, 1, 1), -np.inf) if sinks is None else _f64(sinks).reshape(hq, 1, 1)
    lk, hk = k.shape[0], k.shape[1]
    g = hq // hk
    seqlen_q = lq if seqlen_q is None else seqlen_q
    seqlen_k = lk if seqlen_k is None else seqlen_k
    q_pos = np.arange(lq) if q_pos is None else np.asarray(q_pos)
    k_pos = np.arange(lk) if k_pos is None else np.asarray(k_pos)
    mask = masking.allowed(q_pos[:, None], k_pos[None, :], seqlen_q, seqlen_k, window, np)  # (lq, lk)
    if q_seg is not None:
        mask = mask & (np.asarray(q_seg)[:, None] == np.asarray(k_seg)[None, :])
    kh = np.repeat(k, g, axis=1)  # query head h -> kv head h // g
    vh = np.repeat(v, g, axis=1)
    raw = rnd(np.einsum("qhd,khd->hqk", q, kh) * scale)
    s = rnd(masking.softcap_scores(raw, softcap, np))
    s = np.where(mask[None], s, -np.inf)
    m = np.maximum(s.max(-1, keepdims=True, initial=-np.inf), sk)
    empty = ~np.isfinite(m)
    e = np.where(mask[None], np.exp(s - np.where(empty, 0.0, m)), 0.0)
    e_sink = np.where(empty, 0.0, np.exp(sk - np.where(empty, 0.0, m)))
    z = e.sum(-1, keepdims=True) + e_sink
    p = rnd(e / np.where(z == 0, 1.0, z))
    p_sink = e_sink / np.where(z == 0, 1.0, z)  # (hq, lq, 1)
    out = rnd(np.einsum("hqk,khd->qhd", p, vh))
    lse = np.where(z[..., 0] == 0, -np.inf, np.log(np.where(z[..., 0] == 0, 1.0, z[..., 0])) + np.where(empty[..., 0], 0.0, m[..., 0]))
    if dout is None:
        return out, lse
    do = _f64(dout)
    dl = np.zeros_like(lse) if dlse is None else _f64(dlse)
    dvh = np.einsum("hqk,qhd->khd", p, do)
    dp = rnd(np.einsum("qhd,khd->hqk", do, vh))
    # softmax Jacobian, plus the LSE cotangent: d lse / d s = p
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) + p * np.where(np.isfinite(lse), dl, 0.0)[..., None]
    if softcap > 0:
        ds = ds * (1.0 - np.tanh(raw / softcap) ** 2)
    ds = rnd(ds * scale)
    dq = rnd(np.einsum("hqk,khd->qhd", ds, kh))
    dkh = np.einsum("hqk,qhd->khd", ds, q)
    dk = rnd(dkh.reshape(lk, hk, g, d).sum(2))
    dv = rnd(dvh.reshape(lk, hk, g, dv_dim).sum(2))
    if sinks is None:
        return out, lse, dq, dk, dv
    # d out_i / d sink = -p_sink_i out_i and d lse_i / d sink = p_sink_i
    delta = np.einsum("qhd,qhd->hq", do, out) - np.where(np.isfinite(lse), dl, 0.0)
    return out, lse, dq, dk, dv, -(p_sink[..., 0] * delta).sum(-1)


def _sink_kw(sinks):
    return {} if sinks is None else {"sinks": sinks}


def dense(q, k, v, *, scale, window, softcap=0.0, dout=None, dlse=None, impl=None, sinks=None,
          q_segment_ids=None, kv_segment_ids=None):
    """Batched (b, l, h, d) wrapper; lse (b, hq, lq); d sinks (hq,) summed over the batch. ``impl`` swaps the
    per-sequence function (tests pass a low-precision twin to measure the error a naive low-precision
    implementation makes). Segment ids (b, lq) / (b, lk): packed sequences, as ``attention``'s q_seg/k_seg."""
    def seg_kw(i):
        if q_segment_ids is None:
            return {}
        return {"q_seg": np.asarray(q_segment_ids)[i], "k_seg": np.asarray(kv_segment_ids)[i]}

    res = [(impl or attention)(q[i], k[i], v[i], scale=scale, window=window, softcap=softcap,
                     dout=None if dout is None else dout[i], dlse=None if dlse is None else dlse[i],
                     **_sink_kw(sinks), **seg_kw(i))
           for i in range(q.shape[0])]
    out = [np.stack(parts) for parts in zip(*res)]
    if len(out) == 6:
        out[5] = out[5].sum(0)
    return tuple(out)


def varlen(q, k, v, cu_q, cu_k, seqused_k=None, *, scale, window, softcap=0.0, dout=None, dlse=None, impl=None,
           sinks=None):
    """Packed (total, h, d); lse (hq, total_q). Rows outside every sequence: out 0, lse -inf (with sinks: the
    sink, like any row that sees no key), zero grads."""
    cu_q, cu_k = np.asarray(cu_q), np.asarray(cu_k)
    out = np.zeros(q.shape[:2] + v.shape[2:])
    lse = np.full((q.shape[1], q.shape[0]), -np.inf)
    grads = [np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)]
    if sinks is not None:  # rows outside every sequence: lse = sink, so d sink collects their dlse
        lse[:] = _f64(sinks)[:, None]
        covered = np.zeros(q.shape[0], bool)
        for b in range(len(cu_q) - 1):
            covered[cu_q[b]:cu_q[b + 1]] = True
        grads.append(np.zeros(q.shape[1]) if dlse is None else _f64(dlse)[:, ~covered].sum(-1))
    for b in range(len(cu_q) - 1):
        qs, qe = cu_q[b], cu_q[b + 1]
        ks = cu_k[b]
        ke = cu_k[b + 1] if seqused_k is None else cu_k[b] + np.asarray(seqused_k)[b]
        r = (impl or attention)(q[qs:qe], k[ks:ke], v[ks:ke], scale=scale, window=window, softcap=softcap,
                      dout=None if dout is None else dout[qs:qe],
                      dlse=None if dlse is None else dlse[:, qs:qe], **_sink_kw(sinks))
        out[qs:qe], lse[:, qs:qe] = r[0], r[1]
        if dout is not None:
            grads[0][qs:qe] += r[2]
            grads[1][ks:ke] += r[3]
            grads[2][ks:ke] += r[4]
            if sinks is not None:
                grads[3] += r[5]
    return (out, lse, *grads) if dout is not None else (out, lse)


def kvcache(q, keys, values, seqlens_k, leftpad=None, *, scale, window, softcap=0.0, impl=None, sinks=None):
    """q (b, lq, hq, d); keys/values per sequence already materialized (b, L, hk, d) in cache order (new keys
    written at cache_seqlens). Visible keys: ``[leftpad, seqlens_k)``; masks use positions relative to leftpad."""
    b = q.shape[0]
    outs, lses = [], []
    for i in range(b):
        lp = 0 if leftpad is None else int(leftpad[i])
        n = int(seqlens_k[i])
        o, l = (impl or attention)(q[i], keys[i, lp:n], values[i, lp:n], scale=scale, window=window, softcap=softcap,
                                   **_sink_kw(sinks))
        outs.append(o)
        lses.append(l)
    return np.stack(outs), np.stack(lses)

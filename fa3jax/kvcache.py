"""The KV-cache layer of ``flash_mha_with_kvcache``: rotary embeddings on q and the new keys, the backend's
attention, and the functional cache update. Rotary and the update are cheap, memory-bound and identical for every
backend; the attention itself is the backend's ``kvcache_forward``.
"""
from __future__ import annotations

import jax.numpy as jnp

from . import calls
from .backends.base import KVCacheArgs
from .registry import Plan
from .spec import AttentionSpec


def attention(plan: Plan, q, k_cache, v_cache, args: KVCacheArgs, row_ok, rotary_cos, rotary_sin):
    """(out, lse, (k_cache_new, v_cache_new) or None) of a validated call with sanitized ``args``."""
    spec = plan.spec
    kv = spec.kvcache
    if kv.rotary_dim:
        q_pos, k_pos = rotary_positions(spec, args)
        q = apply_rotary(q, rotary_cos, rotary_sin, q_pos, kv.rotary_interleaved)
        if args.k_new is not None:
            args = args._replace(k_new=apply_rotary(args.k_new, rotary_cos, rotary_sin, k_pos, kv.rotary_interleaved))
    out, lse = calls.kvcache_forward(plan.forward, spec, q, k_cache, v_cache, args)
    caches = updated_caches(spec, k_cache, v_cache, args, row_ok) if kv.return_updated_cache else None
    return out, lse, caches


def apply_rotary(x, cos, sin, pos, interleaved: bool):
    """Rotate the first ``rotary_dim = 2 * cos.shape[1]`` channels of x (b, l, h, d) at positions pos (b, l).

    ``interleaved``: channel pairs (0,1), (2,3), ... (GPT-J); else halves (i, i + rotary_dim/2) (GPT-NeoX).
    Positions are clamped into the table, so no index can fall outside it.
    """
    rd2 = cos.shape[1]
    pos = jnp.clip(pos, 0, cos.shape[0] - 1)
    c = cos[pos].astype(jnp.float32)[:, :, None, :]  # (b, l, 1, rd/2)
    s = sin[pos].astype(jnp.float32)[:, :, None, :]
    xr = x[..., : 2 * rd2].astype(jnp.float32)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        y = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1).reshape(xr.shape)
    else:
        x1, x2 = xr[..., :rd2], xr[..., rd2:]
        y = jnp.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return jnp.concatenate([y.astype(x.dtype), x[..., 2 * rd2:]], axis=-1)


def rotary_positions(spec: AttentionSpec, args: KVCacheArgs):
    """(q positions, new-key positions), absolute cache positions as FlashAttention uses them: new key t sits at
    ``cache_seqlens + t``; query i at ``cache_seqlens + i`` under causal/local masks, else all at
    ``cache_seqlens`` (the whole query chunk is treated as one position)."""
    b, lq = spec.batch, spec.seqlen_q
    base = args.cache_seqlens[:, None]
    qi = jnp.arange(lq, dtype=jnp.int32)[None, :]
    q_pos = base + qi if not spec.window.is_full else jnp.broadcast_to(base, (b, lq))
    k_pos = base + jnp.arange(spec.kvcache.seqlen_new, dtype=jnp.int32)[None, :]
    return q_pos, k_pos


def updated_caches(spec: AttentionSpec, k_cache, v_cache, args: KVCacheArgs, row_ok):
    """The caches with the new k/v written at ``cache_seqlens`` (functional: a scatter that XLA performs in place
    when the cache buffers are donated). Writes that a sanitized index marks invalid are dropped."""
    kv = spec.kvcache
    if not kv.seqlen_new:
        return k_cache, v_cache
    b, n = spec.batch, kv.seqlen_new
    pos = args.cache_seqlens[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]  # (b, n) < capacity
    if kv.paged:
        pt = args.page_table
        page = jnp.take_along_axis(pt, pos // kv.page_size, axis=1)
        page = jnp.where((page >= 0) & (page < kv.cache_batch), page, kv.cache_batch)  # out of range: dropped
        idx = (page, pos % kv.page_size)
    else:
        rows = jnp.arange(b, dtype=jnp.int32) if args.batch_idx is None else args.batch_idx
        rows = jnp.broadcast_to(rows[:, None], (b, n))
        if row_ok is not None:
            rows = jnp.where(row_ok[:, None], rows, kv.cache_batch)
        idx = (rows, pos)
    k_out = k_cache.at[idx].set(args.k_new, mode="drop")
    v_out = v_cache.at[idx].set(args.v_new, mode="drop")
    return k_out, v_out

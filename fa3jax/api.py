"""Public API, drop-in for flash-attn3-jax 0.2.3 (its parameters in its order; ours are keyword-only), plus ring
attention.

Each function: validate (-> frozen spec) -> plan (registry) -> the shared custom VJP (or the KV-cache layer).
Nothing here touches array values.
"""
from __future__ import annotations

from . import explicit, kvcache, registry, validation, vjp


def flash_mha(q, k, v, softmax_scale=None, is_causal=False, window_size=(-1, -1), *, softcap=0.0,
              return_softmax_lse=False, deterministic=False, q_segment_ids=None, kv_segment_ids=None,
              sinks=None, backend="auto"):
    """Attention over (batch, seqlen, heads, head_dim) tensors.

    Returns ``out`` (like q), or ``(out, lse)`` with lse float32 (batch, heads_q, seqlen_q) when
    ``return_softmax_lse``. Differentiable w.r.t. q, k, v, including through the LSE. GQA/MQA when
    ``heads_q % heads_k == 0``. Masks follow :mod:`fa3jax.masking` (FlashAttention's bottom-right convention).

    Packed sequences: with ``q_segment_ids`` (b, seqlen_q) and ``kv_segment_ids`` (b, seqlen_k), integers, a
    query sees only keys of equal id; causal/window masks use positions in the packed row, which is "inside each
    segment" when q and k share the packing. Served by the triton and xla backends.
    """
    backend = validation.validate_backend(backend)
    spec = validation.validate_dense(q, k, v, softmax_scale=softmax_scale, is_causal=is_causal,
                                     window_size=window_size, softcap=softcap,
                                     return_softmax_lse=return_softmax_lse, deterministic=deterministic,
                                     q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, sinks=sinks)
    args = validation.sanitize_dense(spec, q_segment_ids, kv_segment_ids, sinks)
    if explicit.layout(q) is not None:  # sharded in the arrays' types: per shard (or a ring) via shard_map
        if args is not None:
            raise NotImplementedError("segment ids or sinks with Explicit-axes sharded arrays are not supported yet")
        out, lse = explicit.attention(spec, backend, q, k, v)
    else:
        out, lse = vjp.attention(vjp.Execution(registry.plan(spec, backend)), q, k, v, args)
    return (out, lse) if return_softmax_lse else out


def flash_mha_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=-1, max_seqlen_k=-1,
                     softmax_scale=None, is_causal=False, window_size=(-1, -1), *, softcap=0.0,
                     return_softmax_lse=False, deterministic=False, sinks=None, backend="auto"):
    """Attention over packed variable-length sequences: q (total_q, heads, d), k/v (total_k, heads_k, d).

    Sequence ``b`` owns q rows ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and k/v rows starting at
    ``cu_seqlens_k[b]`` (``seqused_k[b]`` of them when given). ``cu_seqlens_k=None`` reuses ``cu_seqlens_q``.
    ``max_seqlen_*=-1`` derives the bound. Returns ``out`` or ``(out, lse)`` with lse (heads_q, total_q).
    ``sinks`` and a smaller value head dim as in :func:`flash_mha` (rows outside every sequence: lse = sink).
    """
    backend = validation.validate_backend(backend)
    spec = validation.validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale=softmax_scale, is_causal=is_causal, window_size=window_size,
                                      softcap=softcap, return_softmax_lse=return_softmax_lse,
                                      deterministic=deterministic, sinks=sinks)
    args = validation.sanitize_varlen(spec, cu_seqlens_q, cu_seqlens_k, seqused_k, sinks)
    out, lse = vjp.attention(vjp.Execution(registry.plan(spec, backend)), q, k, v, args)
    return (out, lse) if return_softmax_lse else out


def flash_mha_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_batch_idx=None,
                           cache_leftpad=None, page_table=None, rotary_cos=None, rotary_sin=None, softmax_scale=None,
                           is_causal=False, window_size=(-1, -1), num_splits=1, return_softmax_lse=False, *,
                           rotary_interleaved=True, softcap=0.0, return_updated_cache=False, sinks=None,
                           backend="auto"):
    """Decoding / chunked prefill against a contiguous or paged KV cache (inference only: no gradient).

    The input caches are never modified. Returns ``out``, then ``lse`` if ``return_softmax_lse``, then
    ``(k_cache_new, v_cache_new)`` if ``return_updated_cache`` (the caches with k/v written at
    ``cache_seqlens``; donate the cache buffers to ``jit`` to have XLA update them in place).
    """
    backend = validation.validate_backend(backend)
    spec = validation.validate_kvcache(
        q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, rotary_cos,
        rotary_sin, rotary_interleaved, softmax_scale=softmax_scale, is_causal=is_causal, window_size=window_size,
        softcap=softcap, num_splits=num_splits, return_softmax_lse=return_softmax_lse,
        return_updated_cache=return_updated_cache, sinks=sinks)
    args, row_ok = validation.sanitize_kvcache(spec, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, k, v,
                                               sinks)
    out, lse, caches = kvcache.attention(registry.plan(spec, backend), q, k_cache, v_cache, args, row_ok,
                                         rotary_cos, rotary_sin)
    result = [out]
    if return_softmax_lse:
        result.append(lse)
    if return_updated_cache:
        result.append(caches)
    return result[0] if len(result) == 1 else tuple(result)


def ring_attention(q, k, v, axis_name, *, softmax_scale=None, is_causal=False, window_size=(-1, -1), softcap=0.0,
                   return_softmax_lse=False, layout="contiguous", backend="auto"):
    """Sequence-parallel attention for code already inside ``shard_map`` over mesh axis ``axis_name``.

    ``q`` (b, lq_local, hq, d) and ``k``/``v`` (b, lk_local, hk, d) are this device's sequence chunks; the
    global sequences are ``lq_local * n`` / ``lk_local * n`` long (``n`` = the axis size) and are laid out per
    ``layout``: "contiguous" (device i holds chunk i) or "zigzag" (device i holds chunks i and 2n-1-i of 2n;
    see :func:`fa3jax.ring.zigzag_permute`), which balances causal work. Masks (causal, window, bottom-right
    alignment) refer to global positions. Returns the local ``out`` (like q), or ``(out, lse)`` with lse
    (b, hq, lq_local). Differentiable w.r.t. q, k, v (and through the LSE).
    """
    backend = validation.validate_backend(backend)
    spec, ring = validation.validate_ring(q, k, v, axis_name, layout, softmax_scale=softmax_scale,
                                          is_causal=is_causal, window_size=window_size, softcap=softcap,
                                          return_softmax_lse=return_softmax_lse, deterministic=False)
    out, lse = vjp.attention(vjp.Execution(registry.plan(spec, backend), ring), q, k, v, None)
    return (out, lse) if return_softmax_lse else out

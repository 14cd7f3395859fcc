"""Public API, drop-in for flash-attn3-jax 0.2.3 (extra keywords are ours).

Each function: validate (-> frozen spec) -> plan (registry) -> the shared custom VJP (or the kvcache layer) ->
backend. Nothing here touches array values except to route them.
"""
from __future__ import annotations

from . import kvcache as _kv
from . import registry, sharding, validation, vjp


def flash_mha(q, k, v, softmax_scale=None, is_causal=False, window_size=(-1, -1), softcap=0.0,
              return_softmax_lse=False, deterministic=False, backend="auto"):
    """Attention over (batch, seqlen, heads, head_dim) tensors.

    Returns ``out`` (like q), or ``(out, lse)`` with lse float32 (batch, heads_q, seqlen_q) when
    ``return_softmax_lse``. Differentiable w.r.t. q, k, v, including through the LSE. GQA/MQA when
    ``heads_q % heads_k == 0``. Masks follow :mod:`fa3jax.masking` (FlashAttention's bottom-right convention).
    """
    backend = validation.validate_backend(backend)
    spec = validation.validate_dense(q, k, v, softmax_scale=softmax_scale, is_causal=is_causal,
                                     window_size=window_size, softcap=softcap,
                                     return_softmax_lse=return_softmax_lse, deterministic=deterministic)
    if sharding.explicit_layout(q) is not None:  # sharded in the arrays' types: per shard / ring via shard_map
        return sharding.explicit_call(q, k, v, return_lse=return_softmax_lse, softmax_scale=spec.softmax_scale,
                                      is_causal=is_causal, window_size=window_size, softcap=softcap, backend=backend)
    plan = registry.plan(spec, backend)
    out, lse = vjp.attention(vjp.Execution(plan), q, k, v, None)
    return (out, lse) if return_softmax_lse else out


def flash_mha_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=-1, max_seqlen_k=-1,
                     softmax_scale=None, is_causal=False, window_size=(-1, -1), softcap=0.0,
                     return_softmax_lse=False, deterministic=False, backend="auto"):
    """Attention over packed variable-length sequences: q (total_q, heads, d), k/v (total_k, heads_k, d).

    Sequence ``b`` owns q rows ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and k/v rows starting at
    ``cu_seqlens_k[b]`` (``seqused_k[b]`` of them when given). ``cu_seqlens_k=None`` reuses ``cu_seqlens_q``.
    ``max_seqlen_*=-1`` derives the bound. Returns ``out`` or ``(out, lse)`` with lse (heads_q, total_q).
    """
    backend = validation.validate_backend(backend)
    spec = validation.validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale=softmax_scale, is_causal=is_causal, window_size=window_size,
                                      softcap=softcap, return_softmax_lse=return_softmax_lse,
                                      deterministic=deterministic)
    args = validation.sanitize_varlen(spec, cu_seqlens_q, cu_seqlens_k, seqused_k)
    plan = registry.plan(spec, backend)
    out, lse = vjp.attention(vjp.Execution(plan), q, k, v, args)
    return (out, lse) if return_softmax_lse else out


def flash_mha_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_batch_idx=None,
                           cache_leftpad=None, page_table=None, rotary_cos=None, rotary_sin=None,
                           rotary_interleaved=True, softmax_scale=None, is_causal=False, window_size=(-1, -1),
                           softcap=0.0, num_splits=1, return_softmax_lse=False, return_updated_cache=False,
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
        return_updated_cache=return_updated_cache)
    args, row_ok = validation.sanitize_kvcache(spec, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, k, v)
    if spec.kvcache.rotary_dim:
        q_pos, k_pos = _kv.rotary_positions(spec, args)
        q = _kv.apply_rotary(q, rotary_cos, rotary_sin, q_pos, spec.kvcache.rotary_interleaved)
        if k is not None:
            args = args._replace(k_new=_kv.apply_rotary(k, rotary_cos, rotary_sin, k_pos,
                                                        spec.kvcache.rotary_interleaved))
    plan = registry.plan(spec, backend)
    out, lse = vjp.call_kvcache(plan.forward, spec, q, k_cache, v_cache, args)
    result = [out]
    if return_softmax_lse:
        result.append(lse)
    if return_updated_cache:
        result.append(_kv.updated_caches(spec, k_cache, v_cache, args, row_ok))
    return result[0] if len(result) == 1 else tuple(result)

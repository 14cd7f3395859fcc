"""User input checking: the one place that turns public-API arguments into a frozen spec.

Everything here runs at trace time on shapes, dtypes and Python values, before any kernel is traced. Every
malformed call raises ``ValueError`` or ``TypeError`` naming the argument and the expected form. The
``sanitize_*`` functions are the runtime half: they clamp user-supplied *indices* (cu_seqlens, cache_seqlens,
page_table, ...) so that no backend can ever read or write out of bounds, whatever the values.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import registry
from .backends.base import DenseArgs, KVCacheArgs, VarlenArgs
from .masking import normalize_window
from .spec import RING_LAYOUTS, AttentionSpec, KVCacheSpec, RingConfig, VarlenSpec

BACKENDS = ("auto",) + registry.ORDER
FLOAT_DTYPES = ("float16", "bfloat16", "float32")
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------- primitives
def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (numbers.Number, np.generic))


def check_array(name: str, x, ndim: int, what: str):
    if not _is_array(x):
        raise TypeError(f"{name} must be an array {what}; got {type(x).__name__}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim} {what}; got {name}.shape={tuple(x.shape)}")
    return x


def _float_dtype(name: str, x) -> str:
    dt = jnp.dtype(x.dtype).name
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32; got {name}.dtype={dt}")
    return dt


def _int32_array(name: str, x, shape: tuple, what: str):
    if not _is_array(x):
        raise TypeError(f"{name} must be an int32 array of shape {shape} {what}; got {type(x).__name__}")
    if jnp.dtype(x.dtype) != jnp.int32:
        raise TypeError(f"{name} must be int32 {what}; got {name}.dtype={jnp.dtype(x.dtype).name}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape} {what}; got {name}.shape={tuple(x.shape)}")
    return x


def integer_array_like(name: str, x) -> tuple:
    """The shape of ``x`` if it is an array, list or tuple of integers of any width (sanitize makes it int32);
    floats and bools are refused."""
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x)
        except ValueError:
            raise TypeError(f"{name} must be an int or an integer array-like; got a ragged {type(x).__name__}")
    if not _is_array(x) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an int or an integer array-like; got "
                        + (f"{name}.dtype={jnp.dtype(x.dtype).name}" if _is_array(x) else type(x).__name__))
    return tuple(x.shape)


def _python_scalar(name: str, x, *, allow_none=False, kind="real") -> Optional[float]:
    """A Python or NumPy scalar (or a concrete 0-d array); traced values are refused because they are static."""
    if x is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a number; got None")
    if isinstance(x, bool) or isinstance(x, np.bool_):
        raise TypeError(f"{name} must be a number, not a bool; got {name}={x!r}")
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python/NumPy scalar, not a traced value; got {name}={x!r}")
    if _is_array(x):
        if x.shape != ():
            raise TypeError(f"{name} must be a scalar; got {name}.shape={tuple(x.shape)}")
        x = np.asarray(x).item()
    if kind == "int":
        if not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be an integer; got {name}={x!r}")
        return int(x)
    if not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {name}={x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite; got {name}={x!r}")
    return x


def check_bool(name: str, x) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise TypeError(f"{name} must be a bool; got {name}={x!r}")


def validate_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got backend={backend!r}")
    return backend


def _window(window_size, is_causal):
    if isinstance(window_size, (str, bytes)) or not hasattr(window_size, "__len__") or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right) of ints, -1 for unbounded; "
                         f"got window_size={window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size must hold ints; got window_size={window_size!r} ({side}={w!r})")
        if w < -1:
            raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded); got window_size={window_size!r}")
    return normalize_window(window_size, check_bool("is_causal", is_causal))


def _common(q, k, v, *, rank, softmax_scale, is_causal, window_size, softcap, deterministic, names=("q", "k", "v")):
    """Checks shared by all three entry points; returns (dtype, hq, hk, d, dv, scale, window, softcap). ``names``:
    what the caller calls q, k, v (the KV-cache entry point checks its caches here)."""
    nq, nk, nv = names
    what = "(batch, seqlen, heads, head_dim)" if rank == 4 else "(total_tokens, heads, head_dim)"
    for name, x in zip(names, (q, k, v)):
        check_array(name, x, rank, what)
    dt = _float_dtype(nq, q)
    for name, x in ((nk, k), (nv, v)):
        if _float_dtype(name, x) != dt:
            raise TypeError(f"{nq}, {nk} and {nv} must share a dtype; got {nq}.dtype={dt}, "
                            f"{name}.dtype={jnp.dtype(x.dtype).name}")
    hq, d = q.shape[-2], q.shape[-1]
    hk = k.shape[-2]
    shapes = f"{nq}.shape={tuple(q.shape)}, {nk}.shape={tuple(k.shape)}"
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{nk} and {nv} must have the same shape but for the head dim; got "
                         f"{nk}.shape={tuple(k.shape)}, {nv}.shape={tuple(v.shape)}")
    if k.shape[-1] != d:
        raise ValueError(f"{nq} and {nk} must have the same head_dim; got {shapes}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}]; got {nq}.shape={tuple(q.shape)}")
    dv = v.shape[-1]
    if not 1 <= dv <= d:  # MLA: a value head dim below the q/k one
        raise ValueError(f"{nv}'s head dim must be in [1, head_dim of {nq}/{nk}] (d_v <= d_qk); got "
                         f"{nq}.shape={tuple(q.shape)}, {nv}.shape={tuple(v.shape)}")
    if hq < 1 or hk < 1 or hq % hk != 0:
        raise ValueError(f"num_heads_q must be a positive multiple of num_heads_k (GQA/MQA); got {shapes}")
    scale = _python_scalar("softmax_scale", softmax_scale, allow_none=True)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    cap = _python_scalar("softcap", softcap)
    if cap < 0:
        raise ValueError(f"softcap must be >= 0 (0 disables it); got softcap={softcap!r}")
    window = _window(window_size, is_causal)
    check_bool("deterministic", deterministic)
    return dt, hq, hk, d, dv, scale, window, cap


def _check_sinks(sinks, hq: int) -> bool:
    """``sinks``: None, or a float32 array (hq,) of per-head logits. Returns whether they are given."""
    if sinks is None:
        return False
    if not _is_array(sinks):
        raise TypeError(f"sinks must be a float32 array of shape (num_heads_q,)=({hq},); got {type(sinks).__name__}")
    if jnp.dtype(sinks.dtype) != jnp.float32:
        raise TypeError(f"sinks must be float32; got sinks.dtype={jnp.dtype(sinks.dtype).name}")
    if tuple(sinks.shape) != (hq,):
        raise ValueError(f"sinks must have shape (num_heads_q,)=({hq},); got sinks.shape={tuple(sinks.shape)}")
    return True


# ------------------------------------------------------------------------------------------------ dense
def validate_dense(q, k, v, *, softmax_scale, is_causal, window_size, softcap, return_softmax_lse,
                   deterministic, seq_shards: int = 1, q_segment_ids=None, kv_segment_ids=None,
                   sinks=None) -> AttentionSpec:
    """``seq_shards``: q/k/v are one of that many sequence chunks (ring attention); the spec describes the whole
    sequence."""
    dt, hq, hk, d, dv, scale, window, cap = _common(
        q, k, v, rank=4, softmax_scale=softmax_scale, is_causal=is_causal, window_size=window_size,
        softcap=softcap, deterministic=deterministic)
    check_bool("return_softmax_lse", return_softmax_lse)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size; got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is not None:
        for name, ids, x in (("q_segment_ids", q_segment_ids, q), ("kv_segment_ids", kv_segment_ids, k)):
            shape = integer_array_like(name, ids)
            if shape != tuple(x.shape[:2]):
                raise ValueError(f"{name} must have shape (batch, seqlen)={tuple(x.shape[:2])}; "
                                 f"got {name}.shape={shape}")
    return AttentionSpec(mode="dense", batch=q.shape[0], seqlen_q=q.shape[1] * seq_shards,
                         seqlen_k=k.shape[1] * seq_shards,
                         num_heads_q=hq, num_heads_k=hk, head_dim=d, dtype=dt, softmax_scale=scale,
                         window=window, softcap=cap, deterministic=bool(deterministic),
                         has_segment_ids=q_segment_ids is not None, has_sinks=_check_sinks(sinks, hq),
                         head_dim_v=dv)


def sanitize_dense(spec: AttentionSpec, q_segment_ids, kv_segment_ids, sinks=None) -> Optional[DenseArgs]:
    """The runtime arguments of a dense call: None, or the segment ids as int32 (any value is safe: ids are only
    compared) and the sinks."""
    if not (spec.has_segment_ids or spec.has_sinks):
        return None
    if not spec.has_segment_ids:
        return DenseArgs(sinks=sinks)
    return DenseArgs(q_segment_ids=jnp.asarray(q_segment_ids).astype(jnp.int32),
                     k_segment_ids=jnp.asarray(kv_segment_ids).astype(jnp.int32), sinks=sinks)


def validate_ring(q, k, v, axis_name, layout, **dense) -> tuple[AttentionSpec, RingConfig]:
    """``ring_attention`` inside shard_map: q/k/v are this device's chunks; the spec describes the whole
    sequence. ``dense``: :func:`validate_dense`'s keywords."""
    if not isinstance(axis_name, str):
        raise ValueError(f"axis_name must be the name (str) of one mesh axis; got axis_name={axis_name!r}")
    if layout not in RING_LAYOUTS:
        raise ValueError(f"layout must be one of {RING_LAYOUTS}; got layout={layout!r}")
    n = int(jax.lax.axis_size(axis_name))
    spec = validate_dense(q, k, v, seq_shards=n, **dense)
    if layout == "zigzag":  # each device holds two equal halves
        for name, x in (("q", q), ("k", k)):
            if x.shape[1] % 2:
                raise ValueError(f"{name}: the zigzag layout needs an even local sequence length; got "
                                 f"{name}.shape={tuple(x.shape)}")
    return spec, RingConfig(axis_name, n, layout)


# ----------------------------------------------------------------------------------------------- varlen
def _max_seqlen(name: str, value, cu, total: int) -> int:
    value = _python_scalar(name, value, kind="int")
    if value == -1:
        try:  # concrete cu_seqlens: use the true maximum; traced: the total is a safe upper bound
            return int(np.max(np.diff(np.asarray(cu)))) if cu.shape[0] > 1 else 0
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, TypeError):
            return total
    if value < 0:
        raise ValueError(f"{name} must be >= 0, or -1 to derive it; got {name}={value}")
    return value


def validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, *,
                    softmax_scale, is_causal, window_size, softcap, return_softmax_lse,
                    deterministic, sinks=None) -> AttentionSpec:
    dt, hq, hk, d, dv, scale, window, cap = _common(
        q, k, v, rank=3, softmax_scale=softmax_scale, is_causal=is_causal, window_size=window_size,
        softcap=softcap, deterministic=deterministic)
    check_bool("return_softmax_lse", return_softmax_lse)
    if not _is_array(cu_seqlens_q) or len(cu_seqlens_q.shape) != 1 or cu_seqlens_q.shape[0] < 2:
        raise ValueError("cu_seqlens_q must be an int32 array of shape (batch + 1,) with batch >= 1; got "
                         + (f"cu_seqlens_q.shape={tuple(cu_seqlens_q.shape)}" if _is_array(cu_seqlens_q)
                            else f"{type(cu_seqlens_q).__name__}"))
    nb = cu_seqlens_q.shape[0] - 1
    _int32_array("cu_seqlens_q", cu_seqlens_q, (nb + 1,), "(batch + 1,)")
    if cu_seqlens_k is None:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"cu_seqlens_k is required when q and k have different token counts; "
                             f"got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    else:
        _int32_array("cu_seqlens_k", cu_seqlens_k, (nb + 1,), "(batch + 1,), batch taken from cu_seqlens_q")
    if seqused_k is not None:
        _int32_array("seqused_k", seqused_k, (nb,), "(batch,)")
    mq = _max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q, q.shape[0])
    mk = _max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k,
                     k.shape[0])
    return AttentionSpec(mode="varlen", batch=nb, seqlen_q=q.shape[0], seqlen_k=k.shape[0], num_heads_q=hq,
                         num_heads_k=hk, head_dim=d, dtype=dt, softmax_scale=scale, window=window, softcap=cap,
                         deterministic=bool(deterministic), has_sinks=_check_sinks(sinks, hq), head_dim_v=dv,
                         varlen=VarlenSpec(max_seqlen_q=mq, max_seqlen_k=mk, has_seqused_k=seqused_k is not None))


def sanitize_varlen(spec: AttentionSpec, cu_seqlens_q, cu_seqlens_k, seqused_k, sinks=None):
    """Make user cu_seqlens safe to index with: clamp into [0, total] and force them non-decreasing.

    Documented behaviour for malformed values: a decreasing entry is raised to its predecessor (that sequence
    becomes empty), an entry past the end is clamped to the total; ``seqused_k`` is clamped into
    ``[0, cu_k[b+1] - cu_k[b]]``. Rows of q not covered by any sequence produce out 0 / lse -inf.
    """
    def clean(cu, total):
        cu = jnp.clip(cu.astype(jnp.int32), 0, total)
        return jax.lax.cummax(cu, axis=0)

    cu_q = clean(cu_seqlens_q, spec.seqlen_q)
    cu_k = clean(cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k, spec.seqlen_k)
    used = None
    if seqused_k is not None:
        used = jnp.clip(seqused_k.astype(jnp.int32), 0, cu_k[1:] - cu_k[:-1])
    return VarlenArgs(cu_q, cu_k, used, sinks)


# ----------------------------------------------------------------------------------------------- kvcache
def validate_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, page_table,
                     rotary_cos, rotary_sin, rotary_interleaved, *, softmax_scale, is_causal, window_size, softcap,
                     num_splits, return_softmax_lse, return_updated_cache, sinks=None) -> AttentionSpec:
    dt, hq, hk, d, dv, scale, window, cap = _common(
        q, k_cache, v_cache, rank=4, softmax_scale=softmax_scale, is_causal=is_causal, window_size=window_size,
        softcap=softcap, deterministic=False, names=("q", "k_cache", "v_cache"))
    if dv != d:
        raise ValueError(f"the KV cache needs v_cache's head dim equal to k_cache's (no MLA cache yet); got "
                         f"k_cache.shape={tuple(k_cache.shape)}, v_cache.shape={tuple(v_cache.shape)}")
    check_bool("return_softmax_lse", return_softmax_lse)
    check_bool("return_updated_cache", return_updated_cache)
    check_bool("rotary_interleaved", rotary_interleaved)
    b, lq = q.shape[0], q.shape[1]
    paged = page_table is not None
    if cache_batch_idx is not None:
        _int32_array("cache_batch_idx", cache_batch_idx, (b,), "(batch,)")
    if paged:
        # with cache_batch_idx the table has one row per cache slot, as in FlashAttention: b reads row idx[b]
        rows, what = ((b, "(batch, max_pages_per_seq)") if cache_batch_idx is None else
                      (None, "(cache_slots, max_pages_per_seq) (rows picked by cache_batch_idx)"))
        if (not _is_array(page_table) or len(page_table.shape) != 2 or page_table.shape[0] < 1
                or rows not in (None, page_table.shape[0])):
            raise ValueError(f"page_table must be an int32 array of shape {what} with batch={b}; got "
                             + (f"page_table.shape={tuple(page_table.shape)}" if _is_array(page_table)
                                else type(page_table).__name__))
        _int32_array("page_table", page_table, tuple(page_table.shape), what)
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad cannot be combined with page_table")
        num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"paged k_cache must be (num_pages, page_size, heads, head_dim) with both >= 1; "
                             f"got k_cache.shape={tuple(k_cache.shape)}")
        pages_per_seq = page_table.shape[1]
        capacity = pages_per_seq * page_size
        cache_batch = num_pages
    else:
        cache_batch, capacity = k_cache.shape[0], k_cache.shape[1]
        page_size = pages_per_seq = 0
        if cache_batch_idx is None and cache_batch != b:
            raise ValueError(f"k_cache batch must equal q batch unless cache_batch_idx is given; "
                             f"got q.shape={tuple(q.shape)}, k_cache.shape={tuple(k_cache.shape)}")
        if cache_leftpad is not None:
            _int32_array("cache_leftpad", cache_leftpad, (b,), "(batch,)")

    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError("k and v (new keys/values) must be given together")
    if k is not None:
        check_array("k", k, 4, "(batch, seqlen_new, heads_k, head_dim)")
        check_array("v", v, 4, "(batch, seqlen_new, heads_k, head_dim)")
        expect = (b, k.shape[1], hk, d)
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != expect:
                raise ValueError(f"{name} (new) must have shape {expect} = (batch, seqlen_new, heads_k, head_dim); "
                                 f"got {name}.shape={tuple(x.shape)}")
            if jnp.dtype(x.dtype).name != dt:
                raise TypeError(f"{name} (new) must have the cache dtype {dt}; got {name}.dtype={jnp.dtype(x.dtype).name}")
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise ValueError(f"new k/v do not fit in the cache: k.shape[1]={seqlen_new} > capacity={capacity}")
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when new k/v are appended (it says where they go)")

    if cache_seqlens is not None:
        if isinstance(cache_seqlens, (numbers.Integral, np.integer)) and not isinstance(cache_seqlens, bool):
            if not 0 <= int(cache_seqlens) <= capacity - seqlen_new:
                raise ValueError(f"cache_seqlens must be in [0, capacity - seqlen_new] = [0, {capacity - seqlen_new}]; "
                                 f"got cache_seqlens={int(cache_seqlens)}")
        else:
            shape = integer_array_like("cache_seqlens", cache_seqlens)
            if shape not in ((), (b,)):
                raise ValueError(f"cache_seqlens must be a scalar or have shape (batch,)=({b},); "
                                 f"got cache_seqlens.shape={shape}")

    rotary_dim = 0
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        check_array("rotary_cos", rotary_cos, 2, "(seqlen_ro, rotary_dim / 2)")
        if tuple(rotary_sin.shape) != tuple(rotary_cos.shape):
            raise ValueError(f"rotary_sin must match rotary_cos; got rotary_cos.shape={tuple(rotary_cos.shape)}, "
                             f"rotary_sin.shape={tuple(getattr(rotary_sin, 'shape', ()))}")
        for name, x in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            _float_dtype(name, x)
        rotary_dim = 2 * rotary_cos.shape[1]
        if not 0 < rotary_dim <= d:
            raise ValueError(f"rotary_dim = 2 * rotary_cos.shape[1] must be in [2, head_dim={d}]; "
                             f"got rotary_cos.shape={tuple(rotary_cos.shape)}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos must cover every cache position: rotary_cos.shape[0] >= capacity={capacity}; "
                             f"got rotary_cos.shape={tuple(rotary_cos.shape)}")
    splits = _python_scalar("num_splits", num_splits, kind="int")
    if splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 = automatic); got num_splits={splits}")

    kv = KVCacheSpec(capacity=capacity, cache_batch=cache_batch, paged=paged, page_size=page_size,
                     pages_per_seq=pages_per_seq, seqlen_new=seqlen_new, rotary_dim=rotary_dim,
                     rotary_interleaved=bool(rotary_interleaved),
                     has_cache_batch_idx=cache_batch_idx is not None and not paged,  # paged: folded into the table
                     has_cache_leftpad=cache_leftpad is not None, num_splits=splits,
                     return_updated_cache=bool(return_updated_cache))
    return AttentionSpec(mode="kvcache", batch=b, seqlen_q=lq, seqlen_k=capacity, num_heads_q=hq, num_heads_k=hk,
                         head_dim=d, dtype=dt, softmax_scale=scale, window=window, softcap=cap, kvcache=kv,
                         has_sinks=_check_sinks(sinks, hq))


def sanitize_kvcache(spec: AttentionSpec, cache_seqlens, cache_batch_idx, cache_leftpad, page_table, k_new, v_new,
                     sinks=None):
    """Clamp user indices so no backend can touch memory outside the caches. Documented behaviour:

    * ``cache_seqlens`` is clamped into ``[0, capacity - seqlen_new]``.
    * ``cache_leftpad`` is clamped into ``[0, cache_seqlens]``.
    * a ``cache_batch_idx`` entry outside ``[0, cache slots)`` (paged: the page-table rows): that sequence sees
      an empty cache (only its new keys) and nothing is written to any cache for it. Paged, the table's rows are
      gathered here, so backends receive one row per query batch.
    * ``page_table`` entries outside ``[0, num_pages)`` are never dereferenced: the keys on such a page are
      masked out and new keys falling on it are not written.

    Returns ``(KVCacheArgs, row_ok)``; ``row_ok`` (b,) bool says which rows may write to the cache (None: all).
    """
    kv = spec.kvcache
    b = spec.batch
    if cache_seqlens is None:
        seqlens = jnp.full((b,), kv.capacity - kv.seqlen_new, jnp.int32)
    else:
        seqlens = jnp.broadcast_to(jnp.asarray(cache_seqlens).astype(jnp.int32), (b,))
    raw = seqlens if cache_seqlens is not None and cache_batch_idx is None else None
    seqlens = jnp.clip(seqlens, 0, kv.capacity - kv.seqlen_new)
    batch_idx, row_ok = None, None
    if cache_batch_idx is not None:
        slots = page_table.shape[0] if kv.paged else kv.cache_batch
        row_ok = (cache_batch_idx >= 0) & (cache_batch_idx < slots)
        seqlens = jnp.where(row_ok, seqlens, 0)
        # out-of-range rows read row 0 with an empty window; their writes are dropped (see updated_caches)
        batch_idx = jnp.where(row_ok, cache_batch_idx, 0).astype(jnp.int32)
        if kv.paged:  # backends see one table row per query batch; -1 pages: masked keys, dropped writes
            page_table = jnp.where(row_ok[:, None], page_table[batch_idx], -1)
            batch_idx = None
    leftpad = None
    if cache_leftpad is not None:
        leftpad = jnp.clip(cache_leftpad.astype(jnp.int32), 0, seqlens)
    return KVCacheArgs(seqlens_k=seqlens + kv.seqlen_new, cache_seqlens=seqlens, leftpad=leftpad,
                       batch_idx=batch_idx, page_table=page_table, k_new=k_new, v_new=v_new, sinks=sinks,
                       raw_cache_seqlens=raw), row_ok

"""JAX-ecosystem entry points on top of the public API: ``jax.nn.dot_product_attention``'s signature and
semantics, and an ``attention_fn`` for Flax's ``MultiHeadAttention``.

jax.nn aligns its causal mask and local windows top-left (query ``i`` sees keys ``i - left <= j <= i + right``),
FlashAttention bottom-right (shifted by ``seqlen_k - seqlen_q``). The adapter turns one into the other without a
new mask kind: it drops the query rows and keys that the top-left mask hides entirely, then re-expresses the
window for the remaining lengths (dense), or, with per-batch lengths, packs each batch row as a varlen sequence
whose query count makes the bottom-right shift a constant (see :func:`_varlen_plan`). Rows that see no key get
jax.nn's result: the plain mean of all values (its softmax over uniformly masked logits), and padded query rows
(``query_seq_lengths``) are zero.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import api, registry, validation

IMPLEMENTATIONS = (None,) + registry.ORDER


class _TopLeft(NamedTuple):
    """A top-left-aligned window; None = unbounded on that side."""

    left: Optional[int]
    right: Optional[int]


def _window(local_window_size, is_causal) -> _TopLeft:
    if local_window_size is None:
        left = right = None
    else:
        if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size, bool):
            local_window_size = (local_window_size, local_window_size)
        if (not isinstance(local_window_size, (tuple, list)) or len(local_window_size) != 2
                or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 0
                       for w in local_window_size)):
            raise ValueError(f"local_window_size must be an int >= 0 or a pair (left, right) of them; "
                             f"got local_window_size={local_window_size!r}")
        left, right = (int(w) for w in local_window_size)
    if validation.check_bool("is_causal", is_causal):
        right = 0 if right is None else min(right, 0)
    return _TopLeft(left, right)


def _lengths(name, x, batch, bound):
    if x is None:
        return None
    shape = validation.integer_array_like(name, x)
    if shape != (batch,):
        raise ValueError(f"{name} must have shape (batch,)=({batch},); got {name}.shape={shape}")
    return jnp.clip(jnp.asarray(x).astype(jnp.int32), 0, bound)


def _bottom_right(win: _TopLeft, shift: int) -> tuple:
    """FlashAttention's ``window_size`` equal to top-left ``win`` when seqlen_k - seqlen_q == ``shift``."""
    return (-1 if win.left is None else win.left + shift, -1 if win.right is None else win.right - shift)


def _dense(query, key, value, win: _TopLeft, scale, backend):
    """(out, lse) without per-batch lengths: rows past ``S + left`` see nothing and keys past ``T1 - 1 + right``
    are never seen, so cut them; the cut lengths make the bottom-right window exact (both sides >= 0)."""
    t, s = query.shape[1], key.shape[1]
    t1 = t if win.left is None else min(t, s + win.left)
    s1 = s if win.right is None else min(s, t1 + win.right)
    out, lse = api.flash_mha(query[:, :t1], key[:, :s1], value[:, :s1], scale, False,
                             _bottom_right(win, s1 - t1), return_softmax_lse=True, backend=backend)
    out = jnp.pad(out, ((0, 0), (0, t - t1), (0, 0), (0, 0)))
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, t - t1)), constant_values=-jnp.inf)
    return out, lse


def _varlen_plan(win: _TopLeft, t: int, s: int, q_len, kv_len):
    """Static (stride, window) and per-batch (query count, key count) of the varlen packing.

    Batch row ``b`` becomes sequence ``2b``: its queries are the ``T`` real rows plus zero rows up to
    ``lq[b] = lk[b] + D``, its keys the first ``lk[b]`` (those past ``T1[b] - 1 + right`` are never seen, where
    ``T1[b] = min(q_len, kv_len + left)`` bounds the rows that see anything). The bottom-right shift
    ``lk - lq = -D`` is then the same for every row, so one static window is exact; any
    ``max(T1 - lk) <= D <= left`` works, and ``D = min(left, T)`` satisfies both. Sequence ``2b + 1`` is an empty
    filler up to the next row's stride."""
    if win.left is None and win.right is None:  # no window: the shift does not matter
        return t, (-1, -1), q_len, kv_len
    d = t if win.left is None else min(win.left, t)
    t1 = q_len if win.left is None else jnp.minimum(q_len, kv_len + win.left)
    lk = kv_len if win.right is None else jnp.minimum(kv_len, t1 + win.right)
    return max(t, s + d), _bottom_right(win, -d), lk + d, lk


def _varlen(query, key, value, win: _TopLeft, scale, backend, q_len, kv_len):
    b, t, n, h = query.shape
    s, kh = key.shape[1], key.shape[2]
    stride, window, lq, lk = _varlen_plan(win, t, s, q_len, kv_len)
    zeros = jnp.zeros((b,), jnp.int32)
    starts = jnp.arange(b, dtype=jnp.int32)
    cu_q = jnp.append(jnp.stack([starts * stride, starts * stride + lq], 1).reshape(-1), b * stride)
    cu_k = jnp.append(jnp.stack([starts * s, starts * s + s], 1).reshape(-1), b * s)
    used = jnp.stack([lk, zeros], 1).reshape(-1)
    q = jnp.pad(query, ((0, 0), (0, stride - t), (0, 0), (0, 0))).reshape(b * stride, n, h)
    out, lse = api.flash_mha_varlen(q, key.reshape(b * s, kh, h), value.reshape(b * s, kh, h), cu_q.astype(jnp.int32),
                                    cu_k.astype(jnp.int32), used, stride, s, scale, False, window,
                                    return_softmax_lse=True, backend=backend)
    out = out.reshape(b, stride, n, h)[:, :t]
    lse = jnp.moveaxis(lse.reshape(n, b, stride), 1, 0)[..., :t]
    return out, lse


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                          query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                          implementation=None, return_residual=False):
    """``jax.nn.dot_product_attention`` served by fa3jax: same arguments, layout (``BTNH`` or ``TNH``), masks
    (top-left causal and windows, per-batch lengths), GQA and results, forward and gradients.

    ``implementation`` names an fa3jax backend: ``"cuda"``, ``"cudnn"``, ``"triton"``, ``"xla"`` or None
    (automatic).
    ``bias`` and ``mask`` are not supported (ValueError): express masks through ``is_causal``,
    ``local_window_size`` and the sequence lengths. ``return_residual=True`` also returns the log-sum-exp
    (``BTN``, no gradient) as jax.nn does.
    """
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            raise ValueError(f"fa3jax.dot_product_attention does not take {name} (got {name} of shape "
                             f"{getattr(x, 'shape', None)}): use is_causal, local_window_size, query_seq_lengths "
                             f"and key_value_seq_lengths, or jax.nn.dot_product_attention")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} (fa3jax backends; None = automatic); "
                         f"got implementation={implementation!r}")
    validation.check_bool("return_residual", return_residual)
    backend = "auto" if implementation is None else implementation
    win = _window(local_window_size, is_causal)
    rank = getattr(query, "ndim", None)
    if rank == 3:  # TNH: one batch row
        query, key, value = (x[None] if getattr(x, "ndim", None) == 3 else x for x in (query, key, value))
    for name, x in (("query", query), ("key", key), ("value", value)):
        validation.check_array(name, x, 4, "(batch, seqlen, heads, head_dim)")
    b, t = query.shape[0], query.shape[1]
    s = key.shape[1]
    q_len = _lengths("query_seq_lengths", query_seq_lengths, b, t)
    kv_len = _lengths("key_value_seq_lengths", key_value_seq_lengths, b, s)
    if q_len is None and kv_len is None:
        out, lse = _dense(query, key, value, win, scale, backend)
    else:
        out, lse = _varlen(query, key, value, win, scale, backend,
                           jnp.full((b,), t, jnp.int32) if q_len is None else q_len,
                           jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len)
    lse = jnp.moveaxis(lse, 1, 2)  # (b, t, n)
    live = jnp.ones((b, t), bool) if q_len is None else jnp.arange(t)[None, :] < q_len[:, None]
    empty = jnp.isneginf(lse) | ~live[:, :, None]
    # jax.nn's softmax over uniformly masked logits: the mean of all values (its kv head per query head)
    group = query.shape[2] // key.shape[2]
    mean_v = jnp.repeat(value.astype(jnp.float32).mean(axis=1), group, axis=1)[:, None].astype(out.dtype)
    out = jnp.where(empty[..., None], mean_v, out)
    out = jnp.where(live[:, :, None, None], out, jnp.zeros((), out.dtype))
    if rank == 3:
        out, lse, empty = out[0], lse[0], empty[0]
    if not return_residual:
        return out
    masked = jnp.float32(-0.7 * float(np.finfo(np.float32).max))  # jax.nn's masked logit (its large negative)
    residual = jax.lax.stop_gradient(jnp.where(empty, masked, lse).astype(key.dtype))
    return out, residual


def flax_attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True, dropout_rng=None,
                      dropout_rate=0.0, deterministic=False, dtype=None, precision=None, module=None,
                      promote_dtype=None, is_causal=False, *, implementation=None):
    """An ``attention_fn`` for ``flax.nnx.MultiHeadAttention`` (Flax's ``dot_product_attention`` signature).

    Served: any batch dims, GQA, ``is_causal`` (pass it to the layer call), ``dtype`` promotion as Flax does,
    dropout only when inactive (``dropout_rate == 0`` or ``deterministic``). Refused with ValueError: active
    dropout, ``bias``, every ``mask`` (including Flax's decode-cache mask; use ``is_causal`` or
    :func:`dot_product_attention`'s sequence lengths) and ``module`` (sowing attention weights, which are never
    formed). ``precision`` is ignored: the kernels accumulate in float32. Pick a backend with
    ``functools.partial(flax_attention_fn, implementation="xla")``.
    """
    if dropout_rate > 0.0 and not deterministic:
        raise ValueError(f"fa3jax attention has no dropout: got dropout_rate={dropout_rate} with "
                         f"deterministic={deterministic} (use dropout_rate=0 or deterministic=True)")
    if module is not None:
        raise ValueError("fa3jax attention never forms the attention weights, so it cannot sow them "
                         "(MultiHeadAttention(..., sow_weights=False))")
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            raise ValueError(f"fa3jax attention_fn takes no {name} (got {name} of shape {getattr(x, 'shape', None)}):"
                             f" call the layer with is_causal=True for a causal mask (decode-cache masks are not "
                             f"supported)")
    if promote_dtype is None:
        from flax.nnx.nn import dtypes  # only Flax users get here; fa3jax does not depend on Flax

        promote_dtype = dtypes.promote_dtype
    query, key, value = promote_dtype((query, key, value), dtype=dtype)
    shape = query.shape
    if query.ndim > 4:  # fold the batch dims into one, as Flax does

        def flat(x):
            return x.reshape((-1,) + x.shape[-3:])

        query, key, value = flat(query), flat(key), flat(value)
    out = dot_product_attention(query, key, value, is_causal=is_causal, implementation=implementation)
    return out.reshape(shape[:-1] + out.shape[-1:])

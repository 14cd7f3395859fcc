"""vmap support for backend calls: fold a vmapped axis into an axis the kernels already loop over.

Kernels launched through custom calls have no batching rule of their own. Every backend call goes through
:func:`batched`, which gives it a ``custom_vmap`` rule:

* dense / kvcache-free calls: the vmapped axis is merged into the batch axis (axis 0 of every array), so
  ``vmap`` costs one launch with ``V * b`` batch rows;
* varlen calls with unbatched ``cu_seqlens``: merged into the heads axis (GQA stays consistent because query
  head ``v * hq + h`` maps to kv head ``v * hk + h // G``; per-head arrays such as the sinks are tiled to match);
* anything else (batched index arrays, kvcache, batched ring offsets): a sequential ``lax.map``, correct and
  memory-light.

The rule calls the wrapped function again, so nested ``vmap`` folds once per level.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

from .spec import AttentionSpec

def _broadcast(x, batched, size):
    if batched:
        return x
    return jnp.broadcast_to(x, (size,) + x.shape)


def _fold(x, axis):
    """(V, ..., n@axis+1, ...) -> (..., V*n@axis, ...)."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _unfold(x, axis, size):
    """Inverse of :func:`_fold`: (..., V*n@axis, ...) -> (V, ..., n@axis, ...)."""
    x = x.reshape(x.shape[:axis] + (size, x.shape[axis] // size) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


@functools.lru_cache(maxsize=1024)
def batched(fn: Callable, spec: AttentionSpec, layouts: tuple, out_layouts: tuple):
    """Wrap ``fn(spec, *arrays) -> tuple`` with a vmap rule, jitted.

    ``layouts``/``out_layouts`` give, per positional array argument / output, one of ``"b"`` (batch on axis 0),
    ``"tokens"`` (varlen (total, h, d)), ``"lse"`` (varlen (h, total)), ``"meta"`` (index metadata: must be
    unbatched to fold, else sequential), ``"scalar"`` (ring offsets: same), or ``"heads"`` (one value per query
    head, e.g. the sinks: dense, as "meta"; varlen, folded with the heads). ``None`` arguments are allowed.

    Cached per (fn, spec, layouts), so ``fn`` must compare by value (e.g. a frozen dataclass of statics, not a
    closure): a repeated eager call then reuses the jitted wrapper and its compilation.
    """

    @custom_vmap
    def call(*arrays):
        return fn(spec, *arrays)

    @call.def_vmap
    def rule(axis_size, in_batched, *arrays):
        flags = [jax.tree_util.tree_reduce(lambda a, b: a or b, f, False) for f in in_batched]
        static = ("meta", "scalar", "heads") if spec.mode == "dense" else ("meta", "scalar")
        foldable = all(not f for f, lay in zip(flags, layouts) if lay in static)
        kinds = {lay for lay in layouts if lay not in ("meta", "scalar", "heads")}
        if foldable and kinds <= {"b"} and spec.mode == "dense":
            new_spec = dataclasses.replace(spec, batch=spec.batch * axis_size)
            axes_in = [0 if lay == "b" else None for lay in layouts]
            axes_out = [0 for _ in out_layouts]
        elif foldable and kinds <= {"tokens", "lse"} and spec.mode == "varlen":
            new_spec = dataclasses.replace(spec, num_heads_q=spec.num_heads_q * axis_size,
                                           num_heads_k=spec.num_heads_k * axis_size)
            head = {"tokens": 1, "lse": 0, "heads": 0}
            axes_in = [head.get(lay) for lay in layouts]
            axes_out = [head[lay] for lay in out_layouts]
        else:
            return _sequential(fn, spec, axis_size, in_batched, arrays, len(out_layouts))
        folded = [
            None if a is None else (_fold(_broadcast(a, f, axis_size), ax) if ax is not None else a)
            for a, f, ax in zip(arrays, flags, axes_in)
        ]
        outs = batched(fn, new_spec, layouts, out_layouts)(*folded)
        outs = tuple(_unfold(o, ax, axis_size) for o, ax in zip(outs, axes_out))
        return outs, tuple(True for _ in outs)

    return jax.jit(call)


def _sequential(fn, spec, axis_size, in_batched, arrays, n_out):
    flags = [jax.tree_util.tree_reduce(lambda a, b: a or b, f, False) for f in in_batched]
    idx_batched = [i for i, f in enumerate(flags) if f]

    def one(xs):
        full = list(arrays)
        for i, x in zip(idx_batched, xs):
            full[i] = x
        return fn(spec, *full)

    outs = jax.lax.map(one, [arrays[i] for i in idx_batched])
    return tuple(outs), tuple(True for _ in range(n_out))

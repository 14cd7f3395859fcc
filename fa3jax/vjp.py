"""The one custom VJP shared by every backend (and by ring attention).

The forward runs the plan's forward backend and saves (q, k, v, out, lse); the backward runs the plan's backward
backend on those residuals, with the cotangent of the LSE folded in (so ``return_softmax_lse=True`` outputs are
differentiable too). A plan whose forward and backward backends differ (cuda forward, triton/xla backward)
works because every backend uses the same LSE convention (natural log, -inf for empty rows).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from . import batching, registry
from .backends.base import DenseArgs, VarlenArgs
from .spec import AttentionSpec


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Sequence-parallel execution inside ``shard_map`` over mesh axis ``axis_name`` of size ``axis_size``.
    ``layout``: "contiguous" (device i holds chunk i) or "zigzag" (device i holds chunks i and 2n-1-i, which
    balances causal work)."""

    axis_name: str
    axis_size: int
    layout: str = "contiguous"


@dataclasses.dataclass(frozen=True)
class Execution:
    plan: registry.Plan
    ring: Optional[RingConfig] = None

    @property
    def spec(self) -> AttentionSpec:
        return self.plan.spec


# ----------------------------------------------------------------------- backend calls, with vmap rules
def _layouts(spec: AttentionSpec, n_arrays: int):
    a = "b" if spec.mode == "dense" else "tokens"
    return (a,) * n_arrays


def _meta_layouts(spec: AttentionSpec):
    return ("scalar", "scalar") if spec.mode == "dense" else ("meta", "meta", "meta")


def _pack(spec, args):
    return (None, None) if args is None else tuple(args)


def _unpack(spec, meta):
    if spec.mode == "dense":
        return DenseArgs(*meta) if spec.has_offsets else None
    return VarlenArgs(*meta)


def _lse_layout(spec):
    return "b" if spec.mode == "dense" else "lse"


def call_forward(backend_name: str, spec: AttentionSpec, q, k, v, args):
    """(out, lse) from backend ``backend_name``, batched under vmap by :mod:`fa3jax.batching`.

    With several devices, dense calls without ring offsets go through :mod:`fa3jax.sharding`'s
    custom-partitioned op (batch/head sharding per device, sequence sharding as ring attention); eager calls on
    arrays spread over several devices are jitted so that the partitioning applies. One device: unchanged."""
    from . import sharding

    routed = sharding.routes(spec)
    if routed and sharding.eager_sharded(q, k, v):
        return _jit_forward(backend_name, spec, q, k, v, args)
    backend = registry.get(backend_name)

    def fn(spec, q, k, v, *meta):
        if routed:
            return sharding.forward(backend_name, spec, q, k, v)
        return tuple(backend.forward(spec, q, k, v, _unpack(spec, meta)))

    layouts = _layouts(spec, 3) + _meta_layouts(spec)
    return batching.batched(fn, spec, layouts, (_layouts(spec, 1)[0], _lse_layout(spec)))(
        q, k, v, *_pack(spec, args))


_jit_forward = jax.jit(call_forward, static_argnums=(0, 1))


def call_backward(backend_name: str, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args):
    """(dq, dk, dv) from backend ``backend_name``; vmap and sharding as :func:`call_forward`."""
    from . import sharding

    routed = sharding.routes(spec)
    if routed and sharding.eager_sharded(q, k, v, out, lse, dout, dlse):
        return _jit_backward(backend_name, spec, q, k, v, out, lse, dout, dlse, args)
    backend = registry.get(backend_name)

    def fn(spec, q, k, v, out, lse, dout, dlse, *meta):
        if routed:
            return sharding.backward(backend_name, spec, q, k, v, out, lse, dout, dlse)
        return tuple(backend.backward(spec, q, k, v, out, lse, dout, dlse, _unpack(spec, meta)))

    a, l = _layouts(spec, 1)[0], _lse_layout(spec)
    layouts = (a, a, a, a, l, a, l) + _meta_layouts(spec)
    return batching.batched(fn, spec, layouts, (a, a, a))(q, k, v, out, lse, dout, dlse, *_pack(spec, args))


_jit_backward = jax.jit(call_backward, static_argnums=(0, 1))


# --------------------------------------------------------------------------------------- the custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(ex: Execution, q, k, v, args):
    """(out, lse) of a dense or varlen call, differentiable w.r.t. q, k, v (and through the LSE)."""
    return _forward(ex, q, k, v, args)


def _forward(ex: Execution, q, k, v, args):
    if ex.ring is not None:
        from . import ring

        return ring.ring_forward(ex, q, k, v)
    return call_forward(ex.plan.forward, ex.spec, q, k, v, args)


def _fwd(ex: Execution, q, k, v, args):
    out, lse = _forward(ex, q, k, v, args)
    return (out, lse), (q, k, v, out, lse, args)


def _bwd(ex: Execution, res, cts):
    q, k, v, out, lse, args = res
    dout, dlse = cts
    if ex.plan.backward is None:
        raise NotImplementedError(f"no backend can differentiate this call: {ex.plan.backward_reason}")
    dout = jnp.zeros_like(out) if dout is None else dout.astype(out.dtype)
    dlse = jnp.zeros_like(lse) if dlse is None else dlse.astype(jnp.float32)
    if ex.ring is not None:
        from . import ring

        dq, dk, dv = ring.ring_backward(ex, q, k, v, out, lse, dout, dlse)
    else:
        dq, dk, dv = call_backward(ex.plan.backward, ex.spec, q, k, v, out, lse, dout, dlse, args)
    zero_args = jax.tree_util.tree_map(lambda _: None, args)
    return dq, dk, dv, zero_args


attention.defvjp(_fwd, _bwd)


def call_kvcache(backend_name: str, spec: AttentionSpec, q, k_cache, v_cache, args):
    """(out, lse) of a kvcache call. Under vmap it runs sequentially (the index arrays usually differ per
    example, so there is no axis to fold into)."""
    backend = registry.get(backend_name)
    fields = type(args)._fields

    def fn(spec, q, k_cache, v_cache, *meta):
        return tuple(backend.kvcache_forward(spec, q, k_cache, v_cache, type(args)(*meta)))

    layouts = ("meta",) * (3 + len(fields))
    return batching.batched(fn, spec, layouts, ("b", "b"))(q, k_cache, v_cache, *args)

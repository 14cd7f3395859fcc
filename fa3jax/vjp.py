"""The one custom VJP shared by every backend (and by ring attention).

The forward runs the plan's forward backend and saves (q, k, v, out, lse); the backward runs the plan's backward
backend on those residuals, with the cotangent of the LSE folded in (so ``return_softmax_lse=True`` outputs are
differentiable too). The sinks (a runtime arg) get their cotangent here, from out and LSE (:func:`sink_grad`).
A plan whose forward and backward backends differ (cuda forward, triton/xla backward) works because every backend
uses the same LSE convention (natural log, -inf for empty rows).

Each half goes one of three ways: a ring over a mesh axis (:mod:`fa3jax.ring`), the custom-partitioned op when
several devices exist (:mod:`fa3jax.sharding`), or the plain backend call (:mod:`fa3jax.calls`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp

from . import calls, ring, sharding
from .registry import Plan
from .spec import AttentionSpec, RingConfig


@dataclasses.dataclass(frozen=True)
class Execution:
    """A plan, and the ring it runs on (None: one call over the whole sequence)."""

    plan: Plan
    ring: Optional[RingConfig] = None

    @property
    def spec(self) -> AttentionSpec:
        return self.plan.spec


def _forward_call(backend_name: str, spec: AttentionSpec, q, k, v, args):
    if not sharding.routes(spec):
        return calls.forward(backend_name, spec, q, k, v, args)
    if sharding.eager_sharded(q, k, v):  # jit, so that the partitioner sees the arrays' shardings
        return _jit_forward(backend_name, spec, q, k, v, args)
    return calls.forward(backend_name, spec, q, k, v, args, impl=sharding.forward)


_jit_forward = jax.jit(_forward_call, static_argnums=(0, 1))


def _backward_call(backend_name: str, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args):
    if not sharding.routes(spec):
        return calls.backward(backend_name, spec, q, k, v, out, lse, dout, dlse, args)
    if sharding.eager_sharded(q, k, v, out, lse, dout, dlse):
        return _jit_backward(backend_name, spec, q, k, v, out, lse, dout, dlse, args)
    return calls.backward(backend_name, spec, q, k, v, out, lse, dout, dlse, args, impl=sharding.backward)


_jit_backward = jax.jit(_backward_call, static_argnums=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attention(ex: Execution, q, k, v, args):
    """(out, lse) of a dense or varlen call, differentiable w.r.t. q, k, v (and through the LSE)."""
    return _forward(ex, q, k, v, args)


def _forward(ex: Execution, q, k, v, args):
    if ex.ring is not None:
        return ring.forward(ex.plan.forward, ex.spec, ex.ring, q, k, v)
    return _forward_call(ex.plan.forward, ex.spec, q, k, v, args)


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
        dq, dk, dv = ring.backward(ex.plan.backward, ex.spec, ex.ring, q, k, v, out, lse, dout, dlse)
    else:
        dq, dk, dv = _backward_call(ex.plan.backward, ex.spec, q, k, v, out, lse, dout, dlse, args)
    dargs = jax.tree_util.tree_map(lambda _: None, args)  # index metadata: no cotangent
    if ex.spec.has_sinks:
        dargs = dargs._replace(sinks=sink_grad(args.sinks, out, lse, dout, dlse))
    return dq, dk, dv, dargs


def sink_grad(sinks, out, lse, dout, dlse):
    """Cotangent of the sinks (float32 (hq,)) of a dense or varlen call, from its sink-inclusive out and LSE.

    With ``p_sink[i] = exp(sink - lse[i])`` (the sink's softmax weight in row i), ``d out[i] / d sink =
    -p_sink[i] out[i]`` and ``d lse[i] / d sink = p_sink[i]``, so ``d sink = -sum_i p_sink[i] (rowsum(dO[i] * O[i])
    - dlse[i])``, summed over every row of the head. Layouts: dense out (b, l, hq, dv), lse (b, hq, l); varlen
    out (total, hq, dv), lse (hq, total).
    """
    delta = jnp.swapaxes(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1), -1, -2) - dlse
    p_sink = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(sinks[:, None] - lse))
    axes = tuple(i for i in range(lse.ndim) if i != lse.ndim - 2)
    return -jnp.sum(p_sink * delta, axis=axes)


attention.defvjp(_fwd, _bwd)

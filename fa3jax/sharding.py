"""Automatic sharding of dense backend calls (``flash_mha``) with ``jax.experimental.custom_partitioning``.

Every dense forward/backward backend call without ring offsets is wrapped in a custom-partitioned op when more
than one device exists (:mod:`fa3jax.vjp` decides, with :func:`routes`). When XLA's SPMD partitioner meets the op it calls
:func:`_decide` with the sharding of ``q`` and picks, per dimension of the (b, l, h, d) layout:

* batch: sharded as q is (any mesh axes) when the batch divides by their size;
* heads: sharded as q is when both ``hq`` and ``hk`` divide by their size (GQA groups stay on one device),
  or, for MQA (``hk == 1``), q heads sharded and the single kv head replicated;
* sequence: when q's sequence axis is sharded over exactly one mesh axis ``A`` (not also used by batch/heads)
  and both ``lq`` and ``lk`` divide by its size, k/v are sharded the same way and the op runs
  :func:`fa3jax.ring.forward` / ``backward`` over ``A`` (contiguous layout);
* everything else (head_dim, a sequence sharded over several axes, sizes that do not divide, non-mesh
  shardings) is replicated: the partitioner then inserts the gathers, so results stay correct.

Each device runs the backend on its local shapes with an adjusted spec, so batch/head sharding costs no
communication at all, and sequence sharding costs only the ring's ``collective-permute``s. Outputs come back
sharded like q (out) and (b, h, l) accordingly (lse); dq like q, dk/dv like k.

Eagerly (no ``jit``), calls whose inputs are committed to several devices are run through ``jax.jit`` so the
same partitioning applies. With a single device nothing is wrapped (the path is exactly the unsharded one);
under a one-device ``jit`` or inside a fully manual ``shard_map`` the op lowers to the plain backend call.

Arrays whose *type* carries the sharding (meshes with Explicit axes, ``jax.make_mesh``'s default) never reach
the partitioner as unknown ops: :mod:`fa3jax.explicit` runs them per shard inside ``shard_map`` instead, with
the same rules (ring attention over a sharded sequence axis).

Limits: the sequence axis uses the contiguous layout (causal work is unbalanced across the ring; for balance
use :func:`fa3jax.ring_attention` with ``layout="zigzag"`` inside ``shard_map``); varlen and kvcache calls are not
partitioned (XLA's default: replicated); a vmapped axis that is itself sharded is not treated specially.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from . import calls, ring
from .spec import AttentionSpec, RingConfig

try:  # public alias in JAX 0.10; fall back to the internal class if it moves
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer


@functools.lru_cache(maxsize=None)
def _multi_device() -> bool:
    return jax.device_count() > 1


def routes(spec: AttentionSpec) -> bool:
    """Whether a backend call with ``spec`` goes through the custom-partitioned op (which partitions q/k/v only,
    so calls with runtime arrays beside them stay plain)."""
    return spec.mode == "dense" and not spec.has_dense_args and _multi_device()


def eager_sharded(*arrays) -> bool:
    """True for concrete (non-traced) arrays at least one of which lives on several devices."""
    multi = False
    for x in arrays:
        if x is None:
            continue
        if not isinstance(x, jax.Array) or isinstance(x, _Tracer):
            return False
        try:
            multi = multi or len(x.sharding.device_set) > 1
        except Exception:  # an array without a usable sharding: leave it alone
            return False
    return multi


# ------------------------------------------------------------------------------------------- the decision
@dataclasses.dataclass(frozen=True)
class Decision:
    batch: object  # PartitionSpec entry (None, a name or a tuple of names)
    heads: object
    kv_heads: object
    seq: Optional[str]  # ring axis
    ring_size: int
    local: AttentionSpec  # spec of the per-device call (global sequence lengths when ring)


def axis_names(entry) -> tuple:
    """The mesh axis names of one PartitionSpec entry."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def axes_size(mesh, entry) -> int:
    """How many shards one PartitionSpec entry makes."""
    n = 1
    for a in axis_names(entry):
        n *= mesh.shape[a]
    return n


def _decide(mesh, spec: AttentionSpec, sharding) -> Decision:
    entries = (None, None, None, None)
    if isinstance(sharding, NamedSharding) and not mesh.empty:
        entries = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    eb, el, eh = entries[0], entries[1], entries[2]
    if spec.batch % axes_size(mesh, eb):
        eb = None
    hq, hk = spec.num_heads_q, spec.num_heads_k
    sh = axes_size(mesh, eh)
    if hq % sh == 0 and hk % sh == 0:
        ekv = eh
    elif hq % sh == 0 and hk == 1:
        ekv = None  # MQA: every device keeps the one kv head
    else:
        eh = ekv = None
    used = set(axis_names(eb)) | set(axis_names(eh))
    seq, n = None, 1
    names = axis_names(el)
    if len(names) == 1 and names[0] not in used:
        size = mesh.shape[names[0]]
        if size > 1 and spec.seqlen_q % size == 0 and spec.seqlen_k % size == 0:
            seq, n = names[0], size
    local = spec.replace(batch=spec.batch // axes_size(mesh, eb), num_heads_q=hq // axes_size(mesh, eh),
                         num_heads_k=hk // axes_size(mesh, ekv))
    return Decision(eb, eh, ekv, seq, n, local)


def _shardings(mesh, d: Decision):
    """(q-like, kv-like, lse-like) NamedShardings of a decision."""
    return (NamedSharding(mesh, P(d.batch, d.seq, d.heads, None)),
            NamedSharding(mesh, P(d.batch, d.seq, d.kv_heads, None)),
            NamedSharding(mesh, P(d.batch, d.heads, d.seq)))


def _ring(d: Decision) -> RingConfig:
    return RingConfig(d.seq, d.ring_size, "contiguous")


def _rule(spec: AttentionSpec, backward: bool):
    """Shardy rule: batch and heads pass through; the sequence factor is shared by q and k when lq == lk so that
    propagation keeps q, k, v, out co-sharded (the partition callback then runs the ring)."""
    g = spec.group_size
    H = "(h g)" if g > 1 else "h"
    m = "l" if spec.seqlen_q == spec.seqlen_k else "m"
    qd, kd, ld = f"b l {H} d", f"b {m} h d", f"b {H} l"
    if backward:
        rule = f"{qd}, {kd}, {kd}, {qd}, {ld}, {qd}, {ld} -> {qd}, {kd}, {kd}"
    else:
        rule = f"{qd}, {kd}, {kd} -> {qd}, {ld}"
    return rule, ({"g": g} if g > 1 else {})


# -------------------------------------------------------------------------------------------- the two ops
@functools.lru_cache(maxsize=None)
def _forward_op(backend_name: str, spec: AttentionSpec):
    @custom_partitioning
    def op(q, k, v):
        return calls.local_forward(backend_name, spec, q, k, v, None)

    def infer(mesh, arg_shapes, result_shape):
        qs, _, ls = _shardings(mesh, _decide(mesh, spec, arg_shapes[0].sharding))
        return qs, ls

    def partition(mesh, arg_shapes, result_shape):
        d = _decide(mesh, spec, arg_shapes[0].sharding)
        qs, ks, ls = _shardings(mesh, d)

        def lower(q, k, v):
            if d.seq is None:
                return calls.local_forward(backend_name, d.local, q, k, v, None)
            return tuple(ring.forward(backend_name, d.local, _ring(d), q, k, v))

        return mesh, lower, (qs, ls), (qs, ks, ks)

    rule, sizes = _rule(spec, backward=False)
    op.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule, **sizes)
    return op


@functools.lru_cache(maxsize=None)
def _backward_op(backend_name: str, spec: AttentionSpec):
    @custom_partitioning
    def op(q, k, v, out, lse, dout, dlse):
        return calls.local_backward(backend_name, spec, q, k, v, out, lse, dout, dlse, None)

    def infer(mesh, arg_shapes, result_shape):
        qs, ks, _ = _shardings(mesh, _decide(mesh, spec, arg_shapes[0].sharding))
        return qs, ks, ks

    def partition(mesh, arg_shapes, result_shape):
        d = _decide(mesh, spec, arg_shapes[0].sharding)
        qs, ks, ls = _shardings(mesh, d)

        def lower(q, k, v, out, lse, dout, dlse):
            if d.seq is None:
                return calls.local_backward(backend_name, d.local, q, k, v, out, lse, dout, dlse, None)
            return tuple(ring.backward(backend_name, d.local, _ring(d), q, k, v, out, lse, dout, dlse))

        return mesh, lower, (qs, ks, ks), (qs, ks, ks, qs, ls, qs, ls)

    rule, sizes = _rule(spec, backward=True)
    op.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule, **sizes)
    return op


def forward(backend_name: str, spec: AttentionSpec, q, k, v, args=None):
    """(out, lse) of a dense call, partitioned per the input shardings (``args``: no ring offsets here)."""
    return tuple(_forward_op(backend_name, spec)(q, k, v))


def backward(backend_name: str, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args=None):
    """(dq, dk, dv) of a dense call, partitioned per the input shardings."""
    return tuple(_backward_op(backend_name, spec)(q, k, v, out, lse, dout, dlse))

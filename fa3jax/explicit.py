"""Dense attention on arrays whose *type* carries the sharding (meshes with Explicit axes, the
``jax.make_mesh`` default), run per shard inside ``shard_map``.

``custom_partitioning`` (:mod:`fa3jax.sharding`) never sees such shardings, so the same rules apply here by
hand: batch and head shardings of q are kept (k/v heads follow when ``hk`` divides, MQA's single head is
replicated, otherwise heads are replicated); a sequence sharded over one mesh axis runs ring attention over it;
a head_dim sharding or a sequence sharded over several axes is gathered first (``reshard``), so results never
depend on layout. Each shard runs the validated call's core (the custom VJP) on a per-shard spec.
"""
from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from . import registry, vjp
from .sharding import axes_size, axis_names
from .spec import AttentionSpec, RingConfig


def layout(q):
    """(mesh, q's 4-entry PartitionSpec) when q's type carries a sharding over Explicit mesh axes, else None."""
    try:
        sh = getattr(jax.typeof(q), "sharding", None)
    except TypeError:
        return None
    mesh = getattr(sh, "mesh", None)
    if mesh is None or not getattr(mesh, "axis_names", ()):
        return None
    explicit = {n for n, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if "Explicit" in str(t)}
    entries = tuple(sh.spec) + (None,) * (4 - len(tuple(sh.spec)))
    if not explicit or not any(a in explicit for e in entries for a in axis_names(e)):
        return None
    return mesh, entries


def attention(spec: AttentionSpec, backend: str, q, k, v):
    """(out, lse) of a validated dense call on explicitly sharded arrays (``layout(q)`` is not None)."""
    mesh, entries = layout(q)
    batch, seq, heads = entries[0], entries[1], entries[2]
    if len(axis_names(seq)) > 1:
        seq = None
    hq, hk = spec.num_heads_q, spec.num_heads_k
    kv_heads = heads if hk % axes_size(mesh, heads) == 0 else None
    if kv_heads is None and hk != 1:
        heads = None
    q_spec, kv_spec = P(batch, seq, heads, None), P(batch, seq, kv_heads, None)
    lse_spec = P(batch, heads, seq)
    q, k, v = (jax.sharding.reshard(x, NamedSharding(mesh, s)) for x, s in ((q, q_spec), (k, kv_spec), (v, kv_spec)))
    # Sequence lengths stay global: a ring step's spec describes the whole sequence.
    local = spec.replace(batch=spec.batch // axes_size(mesh, batch), num_heads_q=hq // axes_size(mesh, heads),
                         num_heads_k=hk // axes_size(mesh, kv_heads))
    ex = vjp.Execution(registry.plan(local, backend),
                       None if seq is None else RingConfig(axis_names(seq)[0], axes_size(mesh, seq)))

    def body(q, k, v):
        return vjp.attention(ex, q, k, v, None)

    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=(q_spec, lse_spec))(q, k, v)

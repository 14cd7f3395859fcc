"""Typing fresh values for ``shard_map``'s check (``check_vma``): loop carries and cond branches must agree on
which manual mesh axes a value varies over, and fresh constants (zeros, -inf) vary over none."""
from __future__ import annotations

import jax
from jax import lax


def _axes(x) -> frozenset:
    """Manual axes ``x`` varies over; the attribute moved between JAX releases (``vma`` vs
    ``manual_axis_type.varying``)."""
    t = jax.typeof(x)
    vma = getattr(t, "vma", None)
    if vma is None:
        vma = getattr(getattr(t, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def varying_like(x, *refs):
    """``x`` typed as varying over every manual mesh axis that one of ``refs`` (arrays or pytrees) varies over
    (a no-op outside shard_map)."""
    leaves = jax.tree_util.tree_leaves(refs)
    want = frozenset().union(*(_axes(r) for r in leaves))
    missing = tuple(sorted(want - _axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x

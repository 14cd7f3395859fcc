"""Ring attention and automatic sharding, on 8 virtual CPU devices (see conftest.py).

Reference: the unsharded ``flash_mha(..., backend="xla")`` (itself checked against float64 by the suite), forward
(out, lse) and the VJP w.r.t. q, k, v with random cotangents for both outputs.

The user ``shard_map``s run with the default ``check_vma=True``: every loop carry is typed as varying.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import fa3jax
from fa3jax import masking, ring

from .helpers import relerr, seeded_rng

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices; see conftest.py")

TOL = {"float32": 2e-5, "bfloat16": 1.5e-2}
B, L, D = 2, 64, 16


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


@functools.lru_cache(maxsize=None)
def _inputs(dtype, hq, hk, seed=0):
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    q, k, v = mk(B, L, hq, D), mk(B, L, hk, D), mk(B, L, hk, D)
    do, dl = mk(B, L, hq, D), jnp.asarray(rng.standard_normal((B, hq, L)), jnp.float32)
    return q, k, v, do, dl


def _fwd_bwd(f, q, k, v, do, dl):
    (out, lse), pull = jax.vjp(f, q, k, v)
    return (out, lse) + tuple(pull((do, dl)))


@functools.lru_cache(maxsize=None)
def _reference(dtype, hq, hk, causal, window, softcap):
    f = functools.partial(fa3jax.flash_mha, is_causal=causal, window_size=window, softcap=softcap,
                          return_softmax_lse=True, backend="xla")
    return jax.jit(functools.partial(_fwd_bwd, f))(*_inputs(dtype, hq, hk))


def _compare(got, ref, dtype):
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, (name, g.shape, r.shape, g.dtype, r.dtype)
        err = relerr(g, np.asarray(r.astype(jnp.float32), np.float64))
        assert err <= TOL[dtype], f"{name}: relative error {err:.3e} > {TOL[dtype]:.1e}"


# ------------------------------------------------------------------------------------ ring_attention
RING_CASES = [
    # (n, layout, causal, window, hq, hk, softcap, dtype)
    (2, "contiguous", False, (-1, -1), 4, 4, 0.0, "float32"),
    (4, "contiguous", True, (-1, -1), 4, 4, 0.0, "float32"),
    (8, "contiguous", True, (-1, -1), 4, 4, 0.0, "bfloat16"),
    (2, "zigzag", True, (-1, -1), 4, 4, 0.0, "float32"),
    (4, "zigzag", True, (-1, -1), 4, 4, 0.0, "bfloat16"),
    (8, "zigzag", True, (-1, -1), 4, 2, 0.0, "float32"),
    (4, "contiguous", False, (16, 0), 4, 4, 0.0, "float32"),
    (4, "zigzag", False, (8, 8), 4, 4, 0.0, "float32"),
    (8, "contiguous", False, (8, 8), 4, 4, 0.0, "bfloat16"),
    (4, "contiguous", True, (-1, -1), 4, 2, 0.0, "float32"),
    (8, "contiguous", False, (-1, -1), 4, 1, 5.0, "float32"),
    (4, "zigzag", True, (-1, -1), 4, 2, 5.0, "bfloat16"),
]


def _ring_id(c):
    n, layout, causal, window, hq, hk, cap, dtype = c
    return f"n{n}-{layout}-{'causal' if causal else 'w%d_%d' % window}-h{hq}x{hk}-cap{cap:g}-{dtype}"


@pytest.mark.parametrize("case", RING_CASES, ids=_ring_id)
def test_ring_attention_matches_unsharded(case):
    n, layout, causal, window, hq, hk, cap, dtype = case
    mesh = _mesh((n,), ("sp",))
    q, k, v, do, dl = _inputs(dtype, hq, hk)
    if layout == "zigzag":
        lay = lambda x, axis=1: ring.zigzag_permute(np.asarray(x), n, axis)  # noqa: E731
        unlay = lambda x, axis=1: ring.zigzag_unpermute(np.asarray(x), n, axis)  # noqa: E731
    else:
        lay = unlay = lambda x, axis=1: x  # noqa: E731

    local = jax.shard_map(
        lambda q, k, v: fa3jax.ring_attention(q, k, v, "sp", is_causal=causal, window_size=window, softcap=cap,
                                            return_softmax_lse=True, layout=layout),
        mesh=mesh, in_specs=P(None, "sp"), out_specs=(P(None, "sp"), P(None, None, "sp")))
    # the layout change happens outside the jitted ring (it is a user-side data layout step)
    out, lse, dq, dk, dv = jax.jit(functools.partial(_fwd_bwd, local))(lay(q), lay(k), lay(v), lay(do), lay(dl, axis=2))
    got = tuple(jnp.asarray(x) for x in (unlay(out), unlay(lse, axis=2), unlay(dq), unlay(dk), unlay(dv)))
    _compare(got, _reference(dtype, hq, hk, causal, window, cap), dtype)


def test_zigzag_roundtrip_and_layout():
    x = jnp.arange(2 * 16 * 3).reshape(2, 16, 3)
    z = ring.zigzag_permute(x, 4)
    np.testing.assert_array_equal(ring.zigzag_unpermute(z, 4), x)
    np.testing.assert_array_equal(ring.zigzag_permute(np.asarray(x), 4), z)  # numpy path agrees
    # device 1 of 4 holds chunks 1 and 6 (of 8, size 2)
    np.testing.assert_array_equal(z[:, 4:8], jnp.concatenate([x[:, 2:4], x[:, 12:14]], axis=1))
    with pytest.raises(ValueError, match="divide"):
        ring.zigzag_permute(jnp.zeros((1, 6)), 2)


def test_ring_attention_validation():
    mesh = _mesh((2,), ("sp",))
    q = jnp.zeros((1, 3, 2, 8), jnp.float32)

    def run(layout, axis="sp"):
        return jax.shard_map(lambda q: fa3jax.ring_attention(q, q, q, axis, layout=layout), mesh=mesh,
                             in_specs=P(), out_specs=P())(q)

    with pytest.raises(ValueError, match="q"):
        run("zigzag")  # odd local length
    with pytest.raises(ValueError, match="layout"):
        run("spiral")
    assert fa3jax.ring_attention is fa3jax.api.ring_attention


# ---------------------------------------------------------------------------------------- block skipping
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (16, 0), (8, 8), (3, -1), (0, 5)])
@pytest.mark.parametrize("lens", [(64, 64), (48, 64), (64, 40)])
def test_skip_predicate_matches_mask(window, lens):
    gq, gk = lens
    win = masking.Window(*window)
    rng = seeded_rng(window, lens)
    qi, kj = np.arange(gq)[:, None], np.arange(gk)[None, :]
    full = np.asarray(masking.allowed(qi, kj, gq, gk, win, np))
    for _ in range(60):
        q_lo, k_lo = int(rng.integers(0, gq)), int(rng.integers(0, gk))
        lq, lk = int(rng.integers(1, gq - q_lo + 1)), int(rng.integers(1, gk - k_lo + 1))
        want = bool(full[q_lo:q_lo + lq, k_lo:k_lo + lk].any())
        got = bool(ring.block_is_live(q_lo, lq, k_lo, lk, gq, gk, win))
        assert got == want, (q_lo, lq, k_lo, lk)


# ------------------------------------------------------------------------------------- automatic sharding
def _hlo_ops(compiled):
    txt = compiled.as_text()
    return txt, {op: len(re.findall(rf"\b{op}(-start)?\(", txt)) for op in
                 ("all-gather", "collective-permute", "all-to-all", "conditional", "dynamic-slice")}


def _auto(pspec, mesh, dtype="float32", hq=4, hk=4, causal=True, window=(-1, -1)):
    q, k, v, do, dl = _inputs(dtype, hq, hk)
    sh = NamedSharding(mesh, pspec)
    lse_sh = NamedSharding(mesh, P(pspec[0] if len(pspec) > 0 else None, pspec[2] if len(pspec) > 2 else None,
                                   pspec[1] if len(pspec) > 1 else None))
    args = [jax.device_put(x, sh) for x in (q, k, v, do)] + [jax.device_put(dl, lse_sh)]
    f = functools.partial(fa3jax.flash_mha, is_causal=causal, window_size=window, return_softmax_lse=True,
                          backend="xla")
    fb = jax.jit(functools.partial(_fwd_bwd, f))
    compiled = fb.lower(*args).compile()
    got = compiled(*args)
    _compare(got, _reference(dtype, hq, hk, causal, window, 0.0), dtype)
    assert got[0].sharding.is_equivalent_to(sh, 4), got[0].sharding
    return args, f, compiled


def test_sequence_sharded_jit_runs_ring():
    mesh = _mesh((4,), ("sp",))
    args, f, compiled = _auto(P(None, "sp"), mesh)
    txt, ops = _hlo_ops(compiled)
    assert ops["collective-permute"] > 0 and ops["all-gather"] == 0 and ops["all-to-all"] == 0, ops
    assert ops["conditional"] > 0, ops  # masked-out causal blocks are skipped at run time
    # eager calls on sharded arrays take the same path
    out_eager, lse_eager = f(*args[:3])
    ref = _reference("float32", 4, 4, True, (-1, -1), 0.0)
    assert relerr(out_eager, np.asarray(ref[0], np.float64)) <= TOL["float32"]


def test_ring_loop_carries_its_step_counter():
    """The ring's scans count steps in their carry: no scanned index array, so no dynamic-slice of one in the loop
    (blocks are small enough here that the xla backend's own loops fold away, leaving none at all)."""
    mesh = _mesh((4,), ("sp",))
    q, k, v, _, _ = _inputs("float32", 4, 4)
    sh = NamedSharding(mesh, P(None, "sp"))
    f = jax.jit(functools.partial(fa3jax.flash_mha, is_causal=True, backend="xla"))
    _, ops = _hlo_ops(f.lower(*(jax.device_put(x, sh) for x in (q, k, v))).compile())
    assert ops["collective-permute"] > 0 and ops["dynamic-slice"] == 0, ops


def test_sequence_sharded_gqa_window_with_data_parallel():
    mesh = _mesh((2, 4), ("dp", "sp"))
    _, _, compiled = _auto(P("dp", "sp"), mesh, hq=4, hk=2, causal=False, window=(8, 8))
    _, ops = _hlo_ops(compiled)
    assert ops["collective-permute"] > 0 and ops["all-gather"] == 0, ops


@pytest.mark.parametrize("pspec,axis", [(P("dp"), "dp"), (P(None, None, "tp"), "tp")], ids=["batch", "heads"])
def test_batch_and_head_sharding_need_no_communication(pspec, axis):
    mesh = _mesh((2,), (axis,))
    _, _, compiled = _auto(pspec, mesh, hq=4, hk=2)
    _, ops = _hlo_ops(compiled)
    assert ops["all-gather"] == 0 and ops["collective-permute"] == 0 and ops["all-to-all"] == 0, ops


def test_ring_permutes_keep_bfloat16():
    """k/v travel in their own dtype. Checked on the HLO that JAX emits (XLA:CPU later widens bf16 collectives
    to f32 in its own float-normalization pass, so the compiled CPU text is not the place to look)."""
    mesh = _mesh((4,), ("sp",))
    q, k, v, _, _ = _inputs("bfloat16", 4, 4)
    for layout in ("contiguous", "zigzag"):
        f = jax.jit(jax.shard_map(lambda q, k, v: fa3jax.ring_attention(q, k, v, "sp", is_causal=True, layout=layout),
                                  mesh=mesh, in_specs=P(None, "sp"), out_specs=P(None, "sp")))
        txt = f.lower(q, k, v).as_text()
        permutes = [ln for ln in txt.splitlines() if "collective_permute" in ln]
        assert len(permutes) == 2, permutes  # k and v, once per (scanned) ring step
        assert all(re.search(r"\(tensor<2x16x4x16xbf16>\) -> tensor<2x16x4x16xbf16>", ln) for ln in permutes), permutes


@pytest.mark.parametrize("spec", [P("dp"), P(None, "sp"), P("dp", "sp"), P("dp", "sp", "tp"), P(None, None, "tp")],
                         ids=["batch", "seq", "batch+seq", "batch+seq+heads", "heads"])
def test_explicit_axes_mesh(spec):
    """Meshes with Explicit axis types (jax.make_mesh's default): sharding lives in the arrays' types, which
    custom_partitioning does not see; flash_mha runs per shard (ring over a sharded sequence) via shard_map."""
    mesh = jax.make_mesh((2, 2, 2), ("dp", "sp", "tp"))
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((4, 64, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((4, 64, 2, 16)), jnp.float32)
    kw = dict(is_causal=True, window_size=(9, 0))
    ref, ref_lse = fa3jax.flash_mha(q, k, k, return_softmax_lse=True, **kw)
    gref = jax.grad(lambda q, k: fa3jax.flash_mha(q, k, k, **kw).sum(), argnums=(0, 1))(q, k)
    x, y = (jax.device_put(a, NamedSharding(mesh, spec)) for a in (q, k))
    f = jax.jit(lambda x, y: fa3jax.flash_mha(x, y, y, return_softmax_lse=True, **kw))
    out, lse = f(x, y)
    g = jax.jit(jax.grad(lambda x, y: fa3jax.flash_mha(x, y, y, **kw).sum(), argnums=(0, 1)))(x, y)
    for got, want in ((out, ref), (lse, ref_lse), (g[0], gref[0]), (g[1], gref[1])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    hlo = f.lower(x, y).compile().as_text()
    assert "all-gather" not in hlo
    assert ("collective-permute" in hlo) == (spec[1:2] == ("sp",))

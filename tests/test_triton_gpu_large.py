"""Triton on a real GPU at sizes the shared suite does not reach: multi-tile varlen batches, long caches with
split-KV, and a tensor of more than 2^31 elements.

The yardstick is the xla backend run on float32 copies of the same (rounded) inputs: the xla backend is itself
checked against the float64 reference on CPU (tests/test_xla.py), and in float32 its error is far below a bf16
kernel's. Errors are relative L2 norms; NaN or a -inf pattern that differs never passes.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import fa3jax  # noqa: E402
from fa3jax import registry  # noqa: E402

_OK, _WHY = registry.availability("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_WHY}")]

TOL = {"bfloat16": 2e-2, "float16": 1e-2}


def _rel(x, ref):
    x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref).astype(jnp.float32), np.float64)
    fin = np.isfinite(ref)
    assert not np.isnan(x).any(), "NaN"
    np.testing.assert_array_equal(np.isfinite(x), fin)
    den = np.linalg.norm(ref[fin])
    return float(np.linalg.norm(x[fin] - ref[fin]) / max(den, 1e-6))


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ------------------------------------------------------------------------------------------------ varlen
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (256, 0)], ids=["full", "causal", "local256"])
@pytest.mark.parametrize("seqused", [False, True], ids=["", "seqused"])
def test_varlen_multi_tile(d, window, seqused):
    lens_q = [1000, 0, 513, 2047, 1, 300]
    lens_k = [1000, 7, 700, 2047, 129, 0]
    hq, hk, dt = 8, 2, "bfloat16"
    cu_q = jnp.asarray(np.concatenate([[0], np.cumsum(lens_q)]), jnp.int32)
    cu_k = jnp.asarray(np.concatenate([[0], np.cumsum(lens_k)]), jnp.int32)
    used = jnp.asarray([900, 7, 650, 2047, 0, 0], jnp.int32) if seqused else None
    tq, tk = int(cu_q[-1]) + 5, int(cu_k[-1])  # 5 q rows outside every sequence
    ks = jax.random.split(jax.random.PRNGKey(d + 7 * window[0]), 5)
    q, k, v = _normal(ks[0], (tq, hq, d), dt), _normal(ks[1], (tk, hk, d), dt), _normal(ks[2], (tk, hk, d), dt)
    do, dl = _normal(ks[3], (tq, hq, d), dt), jax.random.normal(ks[4], (hq, tq), jnp.float32)

    def run(backend, q, k, v, do, dl):
        f = lambda q, k, v: fa3jax.flash_mha_varlen(q, k, v, cu_q, cu_k, used, max(lens_q), max(lens_k),
                                                    window_size=window, return_softmax_lse=True, backend=backend)
        (out, lse), pull = jax.vjp(f, q, k, v)
        return (out, lse) + tuple(pull((do, dl)))

    got = jax.jit(lambda *a: run("triton", *a))(q, k, v, do, dl)
    ref = jax.jit(lambda *a: run("xla", *a))(*(x.astype(jnp.float32) for x in (q, k, v, do)), dl)
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        err = _rel(g, r)
        assert err < TOL[dt], f"{name}: {err:.3g}"
    assert np.all(np.asarray(got[0][int(cu_q[-1]):], np.float32) == 0)  # uncovered rows


# ------------------------------------------------------------------------------------------------ kvcache
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged256"])
@pytest.mark.parametrize("lq,window", [(1, (-1, -1)), (1, (512, 0)), (7, (-1, 0))], ids=["decode", "local", "chunk7"])
def test_kvcache_long_splits(paged, lq, window):
    b, hq, hk, d, cap, dt = 3, 32, 8, 128, 8192, jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(lq + paged), 6)
    q = _normal(ks[0], (b, lq, hq, d), dt)
    if paged:
        page = 256
        npages = b * cap // page + 3
        kc, vc = _normal(ks[1], (npages, page, hk, d), dt), _normal(ks[2], (npages, page, hk, d), dt)
        pt = jax.random.permutation(ks[3], npages)[: b * cap // page].reshape(b, cap // page).astype(jnp.int32)
    else:
        kc, vc = _normal(ks[1], (b, cap, hk, d), dt), _normal(ks[2], (b, cap, hk, d), dt)
        pt = None
    kn, vn = _normal(ks[4], (b, lq, hk, d), dt), _normal(ks[5], (b, lq, hk, d), dt)
    lens = jnp.asarray([8000, 1, 4097], jnp.int32)

    def run(backend, splits, q, kc, vc, kn, vn):
        return fa3jax.flash_mha_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, page_table=pt,
                                             window_size=window, num_splits=splits, return_softmax_lse=True,
                                             backend=backend)

    f32 = [x.astype(jnp.float32) for x in (q, kc, vc, kn, vn)]
    ref = jax.jit(lambda *a: run("xla", 1, *a))(*f32)
    outs = []
    for splits in (1, 0, 5, 16):
        got = jax.jit(lambda *a: run("triton", splits, *a))(q, kc, vc, kn, vn)
        assert _rel(got[0], ref[0]) < TOL["bfloat16"], splits
        assert _rel(got[1], ref[1]) < 1e-3, splits
        outs.append(np.asarray(got[0], np.float32))
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=2e-2, rtol=0)  # same result whatever the split count


# ------------------------------------------------------------------------------------------- > 2^31 elements
def test_more_than_2_31_elements():
    """q/k/v/out of 2^31 + 2^21 elements each (4 GiB in bf16): element offsets overflow int32 in the last batch
    rows, which are checked against the same rows computed on their own (forward and gradients)."""
    b, l, h, d = 16385, 128, 16, 64
    assert b * l * h * d > 2 ** 31
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q, k, v, do = (_normal(kk, (b, l, h, d), jnp.bfloat16) for kk in ks)

    def fwd_bwd(q, k, v, do):
        out, pull = jax.vjp(lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=True, backend="triton"), q, k, v)
        return (out,) + tuple(pull(do))

    tail = slice(b - 3, b)
    full = jax.jit(fwd_bwd)(q, k, v, do)
    full_tail = [np.asarray(x[tail], np.float32) for x in full]
    del full
    part = jax.jit(fwd_bwd)(q[tail], k[tail], v[tail], do[tail])
    for name, x, y in zip(("out", "dq", "dk", "dv"), full_tail, part):
        np.testing.assert_array_equal(x, np.asarray(y, np.float32), err_msg=name)
    assert np.abs(full_tail[0]).max() > 0

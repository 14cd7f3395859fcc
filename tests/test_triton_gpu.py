"""TritonBackend on a real NVIDIA GPU (compute capability >= 8.0) against a float32 jnp reference.

Run on the GPU machine:  pytest -m gpu tests/test_triton_gpu.py -q   (add -s -m "gpu and slow" for the timings)
Everything here skips cleanly where the backend is unavailable (no GPU, no triton/jax_triton).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from fa3jax.backends.base import DenseArgs  # noqa: E402
from fa3jax.backends.triton import TritonBackend  # noqa: E402
from fa3jax.masking import Window, allowed  # noqa: E402
from fa3jax.spec import AttentionSpec  # noqa: E402

_OK, _WHY = TritonBackend().availability()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _OK, reason=f"triton backend unavailable: {_WHY}")]

# Relative L2 error budget against a float32 reference computed from the same (rounded) inputs.
TOL = {"bfloat16": 2e-2, "float16": 1e-2}


def _spec(b, lq, lk, hq, hk, d, dtype, window=(-1, -1), softcap=0.0, glen=None):
    return AttentionSpec(mode="dense", batch=b, seqlen_q=lq, seqlen_k=lk, num_heads_q=hq, num_heads_k=hk,
                         head_dim=d, dtype=dtype, softmax_scale=1.0 / math.sqrt(d), window=Window(*window),
                         softcap=softcap, has_offsets=glen is not None,
                         global_seqlen_q=None if glen is None else glen[0],
                         global_seqlen_k=None if glen is None else glen[1])


def _inputs(spec, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    dt = jnp.dtype(spec.dtype)
    b, lq, lk, hq, hk, d = (spec.batch, spec.seqlen_q, spec.seqlen_k, spec.num_heads_q, spec.num_heads_k,
                            spec.head_dim)
    q = jax.random.normal(keys[0], (b, lq, hq, d), jnp.float32).astype(dt)
    k = jax.random.normal(keys[1], (b, lk, hk, d), jnp.float32).astype(dt)
    v = jax.random.normal(keys[2], (b, lk, hk, d), jnp.float32).astype(dt)
    dout = jax.random.normal(keys[3], (b, lq, hq, d), jnp.float32).astype(dt)
    dlse = jax.random.normal(keys[4], (b, hq, lq), jnp.float32)
    return q, k, v, dout, dlse


def _reference(spec, offsets=(0, 0)):
    """float32 attention from the definition; returns (out, lse) as a function of (q, k, v) for jax.vjp."""
    g = spec.num_heads_q // spec.num_heads_k
    rows = jnp.arange(spec.seqlen_q)[:, None] + offsets[0]
    cols = jnp.arange(spec.seqlen_k)[None, :] + offsets[1]
    mask = allowed(rows, cols, spec.global_seqlen_q, spec.global_seqlen_k, spec.window, jnp)

    def f(q, k, v):
        ke, ve = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, ke, precision="highest") * spec.softmax_scale
        if spec.softcap > 0:
            s = spec.softcap * jnp.tanh(s / spec.softcap)
        s = jnp.where(mask, s, -jnp.inf)
        m = jnp.max(s, -1, keepdims=True)
        m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
        e = jnp.where(mask, jnp.exp(s - m), 0.0)
        l = jnp.sum(e, -1, keepdims=True)
        p = e / jnp.where(l > 0, l, 1.0)
        lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l > 0, l, 1.0))[..., 0] + m[..., 0], -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", p, ve, precision="highest"), lse

    return f


def _rel(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / den) if den > 0 else float(np.linalg.norm(x))


def _check(spec, offsets=None, backward=True, seed=0):
    be = TritonBackend()
    q, k, v, dout, dlse = _inputs(spec, seed)
    args = DenseArgs() if offsets is None else DenseArgs(jnp.int32(offsets[0]), jnp.int32(offsets[1]))
    fwd = jax.jit(lambda q, k, v, a: be.forward(spec, q, k, v, a))
    out, lse = fwd(q, k, v, args)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (spec.batch, spec.num_heads_q, spec.seqlen_q)
    f = _reference(spec, offsets or (0, 0))
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]

    # one jitted reference (forward + VJP): eager op-by-op dispatch would compile every primitive separately
    @jax.jit
    def reference(q, k, v, do, dl):
        out, pull = jax.vjp(f, q, k, v)
        return out, pull((do, dl))

    (ref_out, ref_lse), ref_grads = reference(*f32, dout.astype(jnp.float32), dlse)
    tol = TOL[spec.dtype]
    assert _rel(out, ref_out) < tol
    fin = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), ~fin)
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=2e-2, rtol=0)
    empty = ~fin  # (b, hq, lq) rows that see nothing: out exactly 0
    assert np.all(np.asarray(out, np.float32).transpose(0, 2, 1, 3)[empty] == 0)
    if not backward:
        return
    bwd = jax.jit(lambda q, k, v, o, lse, do, dlse, a: be.backward(spec, q, k, v, o, lse, do, dlse, a))
    grads = bwd(q, k, v, out, lse, dout, dlse, args)
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, name
        err = _rel(g, r)
        assert err < tol, f"{name}: relative error {err:.3g}"
    # No atomics anywhere: a second run must match bitwise, whatever spec.deterministic says.
    grads2 = bwd(q, k, v, out, lse, dout, dlse, args)
    for g, g2 in zip(grads, grads2):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g2))


@pytest.mark.parametrize("d", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0)], ids=["full", "causal"])
def test_head_dims(d, dtype, window):
    _check(_spec(2, 1000, 1000, 4, 4, d, dtype, window))


@pytest.mark.parametrize("lq,lk", [(777, 1031), (1031, 513), (1, 1000), (1000, 77)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (128, 64), (256, -1)],
                         ids=["full", "causal", "win128_64", "win256_inf"])
def test_lengths_and_windows(lq, lk, window):
    _check(_spec(2, lq, lk, 4, 4, 128, "bfloat16", window))


@pytest.mark.parametrize("hq,hk", [(8, 2), (8, 1), (6, 3)])
@pytest.mark.parametrize("d", [64, 128])
def test_gqa(hq, hk, d):
    _check(_spec(2, 1000, 1100, hq, hk, d, "bfloat16", (-1, 0)))


@pytest.mark.parametrize("d", [72, 80, 128])
@pytest.mark.parametrize("softcap", [5.0, 30.0])
def test_softcap_and_odd_dims(d, softcap):
    _check(_spec(1, 999, 999, 4, 2, d, "float16", (-1, 0), softcap=softcap))


@pytest.mark.parametrize("offsets,window", [((1024, 512), (-1, 0)), ((0, 1536), (-1, 0)), ((700, 600), (128, 64)),
                                            ((1536, 0), (-1, -1))])
def test_ring_offsets(offsets, window):
    # One block of a 2048-long sequence; some combinations see nothing at all (all rows empty).
    _check(_spec(1, 512, 640, 4, 2, 128, "bfloat16", window, glen=(2048, 2048)), offsets=offsets)


def test_forward_only_long():
    _check(_spec(1, 8191, 8191, 2, 1, 128, "bfloat16", (-1, 0)), backward=False)


def _bench(fn, *args, iters=20):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        r = fn(*args)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / iters


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_report_tflops(d, causal):
    """Prints forward and forward+backward TFLOPS (run with -s); asserts only that it ran."""
    seq = 4096
    b, h = 16384 // seq, 2048 // d  # 16k tokens, model width 2048, as FlashAttention's benchmarks
    spec = _spec(b, seq, seq, h, h, d, "bfloat16", (-1, 0) if causal else (-1, -1))
    be = TritonBackend()
    q, k, v, dout, dlse = _inputs(spec)
    args = DenseArgs()
    fwd = jax.jit(lambda q, k, v: be.forward(spec, q, k, v, args))

    def fwd_bwd(q, k, v, dout, dlse):
        out, lse = be.forward(spec, q, k, v, args)
        return be.backward(spec, q, k, v, out, lse, dout, dlse, args)

    fb = jax.jit(fwd_bwd)
    flops = 4 * b * h * seq * seq * d * (0.5 if causal else 1.0)
    t_f = _bench(fwd, q, k, v)
    t_fb = _bench(fb, q, k, v, dout, dlse)
    print(f"\n[triton] d={d} causal={causal} b={b} h={h} l={seq}: fwd {flops / t_f / 1e12:.0f} TFLOPS "
          f"({t_f * 1e3:.2f} ms), fwd+bwd {3.5 * flops / t_fb / 1e12:.0f} TFLOPS ({t_fb * 1e3:.2f} ms)")

"""TritonBackend on a real NVIDIA GPU (compute capability >= 8.0) against a float32 jnp reference.

Run on the GPU machine:  pytest -m gpu tests/test_triton_gpu.py -q   (add -s -m "gpu and slow" for the timings)
The sinks/MLA tests at the end (test_sinks_*) check against the float64 reference; their reference dominates the
run time (a few seconds per case on the host CPU).
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


# ------------------------------------------------------------------- attention sinks and MLA (d_v < d_qk)
# Through the public API (backend="triton"), against the float64 reference (fa3jax.reference) with the tolerance
# rule of tests/helpers.py: 3x the error of the reference computed with every intermediate in the input dtype.
# Gradients include the sinks' (fa3jax.vjp.sink_grad on the kernels' sink-inclusive out/LSE) and an LSE cotangent.
import functools  # noqa: E402

import fa3jax  # noqa: E402
from fa3jax import masking, reference  # noqa: E402
from fa3jax.backends.triton import tables  # noqa: E402
from fa3jax.tuning import Tuning, override  # noqa: E402

from .helpers import check, naive_lowp, rand, seeded_rng  # noqa: E402


def _sinks_arg(rng, hq, on):
    return jnp.asarray(rng.standard_normal(hq) * 2.0, jnp.float32) if on else None


def _check_against_reference(ref, low, got, dtype, names):
    for name, g, r, lo in zip(names, got, ref, low):
        check(name, g, r, lo, dtype)


@pytest.mark.parametrize("d,dv", [(128, 128), (192, 128), (128, 64)], ids=lambda x: str(x))
@pytest.mark.parametrize("lq,lk,window,softcap", [
    (1000, 1000, (-1, -1), 0.0), (1000, 1000, (-1, 0), 0.0), (1031, 513, (-1, 0), 0.0),  # rows that see no key
    (1000, 1100, (128, 64), 0.0), (1000, 1000, (256, -1), 30.0)], ids=["full", "causal", "causal_empty_rows",
                                                                      "win128_64", "win256_inf_softcap"])
@pytest.mark.parametrize("sinks", [True, False], ids=["sinks", "nosinks"])
def test_sinks_mla_dense(d, dv, lq, lk, window, softcap, sinks):
    if not sinks and d == dv:
        pytest.skip("plain attention: test_head_dims and the tests above")
    # hq=4: the float64 reference (and its bf16 twin) dominates the run time at these lengths
    rng = seeded_rng(d, dv, lq, lk, window, softcap, sinks)
    _dense_api_check(rng, 2, lq, lk, d, dv, window, softcap, sinks)


def _dense_api_check(rng, b, lq, lk, d, dv, window, softcap, sinks, segments=None):
    """flash_mha(backend="triton") on bf16 inputs (hq=4, hk=2), forward and VJP with an LSE cotangent, against the
    float64 reference; ``segments`` = (q_ids, k_ids) numpy int32. Returns (out, lse, sinks)."""
    dtype, hq, hk = "bfloat16", 4, 2
    q, q64 = rand(rng, (b, lq, hq, d), dtype)
    k, k64 = rand(rng, (b, lk, hk, d), dtype)
    v, v64 = rand(rng, (b, lk, hk, dv), dtype)
    do, do64 = rand(rng, (b, lq, hq, dv), dtype)
    dl64 = rng.standard_normal((b, hq, lq))
    s = _sinks_arg(rng, hq, sinks)
    kw = dict(window_size=window, softcap=softcap, return_softmax_lse=True, backend="triton")
    rkw = dict(scale=1.0 / math.sqrt(d), window=masking.normalize_window(window, False), softcap=softcap,
               dout=do64, dlse=dl64, sinks=None if s is None else np.asarray(s, np.float64))
    if segments is not None:
        kw.update(q_segment_ids=jnp.asarray(segments[0]), kv_segment_ids=jnp.asarray(segments[1]))
        rkw.update(q_segment_ids=segments[0], kv_segment_ids=segments[1])
    (out, lse), pull = jax.vjp(jax.jit(lambda q, k, v, s: fa3jax.flash_mha(q, k, v, sinks=s, **kw)), q, k, v, s)
    assert out.shape == (b, lq, hq, dv)
    grads = pull((do, jnp.asarray(dl64, jnp.float32)))
    ref = reference.dense(q64, k64, v64, **rkw)
    low = reference.dense(q64, k64, v64, impl=functools.partial(naive_lowp, dtype=dtype), **rkw)
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")[:len(ref)]
    _check_against_reference(ref, low, (out, lse) + tuple(grads[:len(ref) - 2]), dtype, names)
    return out, lse, s


@pytest.mark.parametrize("d,dv", [(128, 128), (192, 128), (128, 64)], ids=lambda x: str(x))
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (64, 32)], ids=["full", "causal", "win64_32"])
@pytest.mark.parametrize("seqused", [False, True])
def test_sinks_mla_varlen(d, dv, window, seqused):
    dtype, hq, hk = "bfloat16", 4, 2
    rng = seeded_rng(d, dv, window, seqused)
    lens_q, lens_k = [300, 0, 1000, 17, 513], [350, 5, 1000, 0, 513]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    tq, tk = int(cu_q[-1]) + 7, int(cu_k[-1])  # 7 trailing q rows belong to no sequence: lse = sink
    used = np.array([200, 5, 999, 0, 1], np.int32) if seqused else None
    q, q64 = rand(rng, (tq, hq, d), dtype)
    k, k64 = rand(rng, (tk, hk, d), dtype)
    v, v64 = rand(rng, (tk, hk, dv), dtype)
    do, do64 = rand(rng, (tq, hq, dv), dtype)
    dl64 = rng.standard_normal((hq, tq))
    s = _sinks_arg(rng, hq, True)
    pos = (jnp.asarray(cu_q), jnp.asarray(cu_k), None if used is None else jnp.asarray(used), max(lens_q),
           max(lens_k))
    kw = dict(window_size=window, return_softmax_lse=True, backend="triton")
    f = jax.jit(lambda q, k, v, s: fa3jax.flash_mha_varlen(q, k, v, *pos, sinks=s, **kw))
    (out, lse), pull = jax.vjp(f, q, k, v, s)
    grads = pull((do, jnp.asarray(dl64, jnp.float32)))
    rkw = dict(scale=1.0 / math.sqrt(d), window=masking.normalize_window(window, False), dout=do64, dlse=dl64,
               sinks=np.asarray(s, np.float64))
    ref = reference.varlen(q64, k64, v64, cu_q, cu_k, used, **rkw)
    low = reference.varlen(q64, k64, v64, cu_q, cu_k, used, impl=functools.partial(naive_lowp, dtype=dtype), **rkw)
    _check_against_reference(ref, low, (out, lse) + tuple(grads), dtype, ("out", "lse", "dq", "dk", "dv", "dsinks"))


@pytest.mark.parametrize("schedule", ["splits1", "splits3", "auto_split", "auto_streamk"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("lq,new,window,softcap", [(1, 0, (-1, 0), 0.0), (3, 3, (256, -1), 30.0)],
                         ids=["decode", "chunk_window_softcap"])
def test_sinks_kvcache(schedule, paged, lq, new, window, softcap):
    """The sink counted once by every schedule: unsplit, split-KV + combine, stream-K + combine. Sequence 1 has
    an empty cache (with lq=1 and no new key its rows see nothing: out 0, lse = sink)."""
    dtype, b, hq, hk, d, cap, page = "bfloat16", 4, 32, 8, 128, 4096, 256
    rng = seeded_rng(schedule, paged, lq, new)
    seqlens = np.array([cap - new - 1, 0, 1000, 2047], np.int32)
    q, q64 = rand(rng, (b, lq, hq, d), dtype)
    n_rows = b * cap // page if paged else b
    shape = (n_rows, page, hk, d) if paged else (b, cap, hk, d)
    kc, kc64 = rand(rng, shape, dtype)
    vc, vc64 = rand(rng, shape, dtype)
    kn, kn64 = rand(rng, (b, new, hk, d), dtype)
    vn, vn64 = rand(rng, (b, new, hk, d), dtype)
    pt = rng.permutation(n_rows).reshape(b, cap // page).astype(np.int32) if paged else None
    s = _sinks_arg(rng, hq, True)
    if paged:  # each sequence's cache in cache order
        keys, vals = kc64[pt].reshape(b, cap, hk, d), vc64[pt].reshape(b, cap, hk, d)
    else:
        keys, vals = kc64.copy(), vc64.copy()
    for i in range(b):
        keys[i, seqlens[i]:seqlens[i] + new] = kn64[i]
        vals[i, seqlens[i]:seqlens[i] + new] = vn64[i]
    num_splits = {"splits1": 1, "splits3": 3}.get(schedule, 0)
    tune = Tuning()
    if schedule.startswith("auto"):
        tune = Tuning(decode=tables.DECODE["paged" if paged else "contiguous"]._replace(schedule=schedule[5:]))
    kw = dict(k=kn if new else None, v=vn if new else None, cache_seqlens=jnp.asarray(seqlens),
              page_table=None if pt is None else jnp.asarray(pt), window_size=window, softcap=softcap,
              num_splits=num_splits, return_softmax_lse=True, sinks=s, backend="triton")
    with override(tune):  # traced here, so the forced schedule is the one compiled
        out, lse = jax.jit(lambda q, kc, vc: fa3jax.flash_mha_with_kvcache(q, kc, vc, **kw))(q, kc, vc)
    rkw = dict(scale=1.0 / math.sqrt(d), window=masking.normalize_window(window, False), softcap=softcap,
               sinks=np.asarray(s, np.float64))
    ref = reference.kvcache(q64, keys, vals, seqlens + new, **rkw)
    low = reference.kvcache(q64, keys, vals, seqlens + new, impl=functools.partial(naive_lowp, dtype=dtype), **rkw)
    _check_against_reference(ref, low, (out, lse), dtype, ("out", "lse"))
    if lq == 1 and new == 0:
        np.testing.assert_array_equal(np.asarray(lse[1]), np.broadcast_to(np.asarray(s)[:, None], (hq, lq)))
        assert np.all(np.asarray(out[1], np.float32) == 0)


# Packed sequences: segment ids through the public API (backend="triton"), against the float64 reference with the
# same ids; the kernels add "same segment" to their element mask (tests/test_triton_interpret_segments.py runs the
# same kernels under the CPU interpreter).
def _packed_ids(rng, b, length, n_seg, absent=None):
    """(b, length) int32: per row, n_seg contiguous segments of random lengths (ids 0..n_seg-1), or with
    ``absent`` the ids renamed so that id ``absent`` never occurs (its rows on the other side see no key)."""
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, length), n_seg - 1, replace=False))
        ids = np.searchsorted(cuts, np.arange(length), side="right").astype(np.int32)
        rows.append(np.where(ids >= absent, ids + 1, ids) if absent is not None else ids)
    return np.stack(rows)


@pytest.mark.parametrize("d,dv", [(64, 64), (128, 128), (192, 128)], ids=lambda x: str(x))
@pytest.mark.parametrize("case", ["full", "causal", "win128_64", "cross_causal", "no_key_rows_softcap_sinks",
                                  "interleaved"])
def test_segment_ids(d, dv, case):
    b = 2
    rng = seeded_rng(d, dv, case)
    lq = lk = 1000
    window, softcap, sinks = (-1, -1), 0.0, False
    qids = kids = _packed_ids(rng, b, lq, 6)
    if case == "causal":
        window = (-1, 0)
    elif case == "win128_64":
        window = (128, 64)
    elif case == "cross_causal":  # lq != lk, different packings of q and k
        lq, lk, window = 1031, 513, (-1, 0)
        qids, kids = _packed_ids(rng, b, lq, 4), _packed_ids(rng, b, lk, 4)
    elif case == "no_key_rows_softcap_sinks":  # query segment 2 has no key of its id
        kids = _packed_ids(rng, b, lk, 5, absent=2)
        softcap, sinks = 30.0, True
    elif case == "interleaved":  # ids scattered over the row, not contiguous runs
        qids = kids = rng.integers(0, 3, (b, lq)).astype(np.int32)
        window = (-1, 0)
    out, lse, s = _dense_api_check(rng, b, lq, lk, d, dv, window, softcap, sinks, segments=(qids, kids))
    if case == "no_key_rows_softcap_sinks":
        empty = qids == 2  # (b, lq)
        assert empty.any()
        assert np.all(np.asarray(out, np.float32)[empty] == 0)
        np.testing.assert_array_equal(np.asarray(lse).transpose(0, 2, 1)[empty],
                                      np.broadcast_to(np.asarray(s), (int(empty.sum()), s.shape[0])))

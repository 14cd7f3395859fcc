"""The shared suite on the CUDA backend (Hopper only). Gradients run through the CUDA backward where it is built
for the (dtype, head_dim), else through the registry's composition (another backend's backward on the cuda
forward's LSE). Head dims and dtypes follow the build."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import masking, reference, registry, tuning, validation
from fa3jax.backends.cuda import build_info, targets

from .helpers import check, naive_lowp, rand, seeded_rng
from .suite import AttentionSuite

pytestmark = pytest.mark.gpu

_BUILT = {(str(t), int(d)) for t, d in build_info().get("instances", ())}
_BUILT_BWD = {(str(t), int(d)) for t, d in build_info().get("bwd_instances", ())}
_BUILT_MLA = {(str(t), int(d), int(dv)) for t, d, dv in build_info().get("mla_instances", ())}
_BUILT_MLA_BWD = {(str(t), int(d), int(dv)) for t, d, dv in build_info().get("bwd_mla_instances", ())}
_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


class TestCuda(AttentionSuite):
    backend = "cuda"
    dtypes = tuple(sorted({_NAMES[t] for t, _ in _BUILT})) or ("bfloat16",)
    head_dims = tuple(sorted({d for _, d in _BUILT})) or (128,)
    # Varlen forward and backward are cuda's (extensions built before the varlen backward compose another
    # backend's backward with the cuda forward's out and LSE).
    supports_varlen = True
    supports_kvcache = False
    supports_paged = False

    # The shared cases have head dims <= 64, which ``_d`` maps onto the smallest built one: every built
    # (dtype, head_dim) instance also runs the dense case list below at its own head dim.
    @pytest.mark.parametrize("instance", sorted(_BUILT) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
    @pytest.mark.parametrize("case", [
        (2, 200, 200, 4, 4, False, (-1, -1), 0.0),
        (1, 300, 190, 4, 2, True, (-1, -1), 0.0),  # lq > lk: fully masked rows, GQA
        (1, 130, 400, 2, 1, True, (-1, -1), 0.0),  # lq < lk, MQA
        (2, 257, 257, 2, 2, False, (64, 16), 0.0),
        (1, 150, 150, 4, 2, True, (-1, -1), 20.0),
    ], ids=lambda c: f"q{c[1]}-k{c[2]}-h{c[3]}x{c[4]}-{'causal' if c[5] else 'w%d_%d' % c[6]}-cap{c[7]:g}")
    def test_built_instance(self, instance, case):
        if instance not in _BUILT:
            pytest.skip("no CUDA instance built")
        dtype, d = _NAMES[instance[0]], instance[1]
        b, lq, lk, hq, hk, causal, window, cap = case
        self._check_dense(b, lq, lk, hq, hk, d, causal, window, cap, dtype)


    @pytest.mark.parametrize("variant", ["plain", "wide"])
    @pytest.mark.parametrize("causal", [False, True])
    def test_forced_kernel_variant(self, variant, causal):
        """Every kernel the benchmarks can force computes the same attention (the wide one under a causal mask too);
        where wide tiles were not compiled the dispatcher falls back to the FwdPolicy kernel."""
        if ("bf16", 128) not in _BUILT:
            pytest.skip("bf16 d=128 not built")
        with tuning.override(tuning.Tuning(cuda_kernel=variant)):
            self._check_dense(2, 512, 512, 4, 4, 128, causal, (-1, -1), 0.0, "bfloat16")


def _dense_spec(q, k, v, **kw):
    return validation.validate_dense(q, k, v, softmax_scale=None, is_causal=kw.get("is_causal", False),
                                     window_size=kw.get("window_size", (-1, -1)), softcap=kw.get("softcap", 0.0),
                                     return_softmax_lse=False, deterministic=kw.get("deterministic", False),
                                     sinks=kw.get("sinks"))


# ------------------------------------------------------------------------------------------ attention sinks
# (b, lq, lk, hq, hk, causal, window, softcap, sink offset): the offset lifts the sinks of rows that see many keys,
# where sinks drawn around 0 would weigh too little for the checks to notice them.
SINK_CASES = [
    (2, 200, 333, 4, 2, False, (-1, -1), 0.0, 6.0),  # GQA, every row sees every key
    (1, 300, 190, 4, 2, True, (-1, -1), 0.0, 0.0),  # lq > lk: rows (and whole query blocks) that see no key
    (1, 130, 400, 4, 1, True, (-1, -1), 0.0, 4.0),  # lq < lk, MQA
    (2, 257, 257, 2, 2, False, (64, 16), 0.0, 2.0),
    (1, 150, 150, 4, 2, True, (-1, -1), 20.0, 0.0),  # softcap
    (1, 129, 700, 4, 2, False, (30, -1), 5.0, 1.0),  # left window + softcap
]


def _sink_case_id(c):
    b, lq, lk, hq, hk, causal, window, cap, off = c
    return (f"q{lq}-k{lk}-h{hq}x{hk}-{'causal' if causal else 'w%d_%d' % window}-cap{cap:g}"
            f"{'-off%g' % off if off else ''}")


def _sinks(rng, hq, offset=0.0):
    return jnp.asarray(rng.uniform(-2.0, 2.0, hq) + offset, jnp.float32)


def _dense_against_reference(rng, dtype, d, dv, case, sink_offset, backward):
    """One dense call, cuda forward: out (b, lq, hq, dv), lse and the gradients w.r.t. q, k, v (and the sinks,
    drawn with ``sink_offset``, None: none) against the float64 reference. ``backward``: "cuda" (the plan's must be
    cuda's own), "composed" (another backend's on the cuda forward's LSE) or None (either). Returns the float64
    inputs, the reference's keywords and the reference's results, for further checks."""
    b, lq, lk, hq, hk, causal, window, cap = case
    q, q64 = rand(rng, (b, lq, hq, d), dtype)
    k, k64 = rand(rng, (b, lk, hk, d), dtype)
    v, v64 = rand(rng, (b, lk, hk, dv), dtype)
    do, do64 = rand(rng, (b, lq, hq, dv), dtype)
    dl64 = rng.standard_normal((b, hq, lq))
    sinks = None if sink_offset is None else _sinks(rng, hq, sink_offset)
    scale = 0.7 / np.sqrt(d)
    kw = dict(softmax_scale=scale, is_causal=causal, window_size=window, softcap=cap, return_softmax_lse=True)
    plan = registry.plan(validation.validate_dense(q, k, v, deterministic=False, sinks=sinks, **kw), "cuda")
    assert plan.forward == "cuda", plan
    if backward is not None:
        assert (plan.backward == "cuda") == (backward == "cuda") and plan.backward is not None, plan
    rkw = dict(scale=scale, window=masking.normalize_window(window, causal), softcap=cap, dout=do64, dlse=dl64,
               sinks=None if sinks is None else np.asarray(sinks, np.float64))
    ref = reference.dense(q64, k64, v64, **rkw)
    low = reference.dense(q64, k64, v64, impl=functools.partial(naive_lowp, dtype=dtype), **rkw)

    def f(q, k, v, sinks):
        return fa3jax.flash_mha(q, k, v, sinks=sinks, backend="cuda", **kw)

    (out, lse), pull = jax.vjp(jax.jit(f), q, k, v, sinks)
    assert out.shape == (b, lq, hq, dv)
    check("out", out, ref[0], low[0], dtype)
    check("lse", lse, ref[1], low[1], dtype)
    grads = pull((do, jnp.asarray(dl64, jnp.float32)))
    names = ("dq", "dk", "dv") + (("dsinks",) if sinks is not None else ())
    for name, got, r, lo in zip(names, grads, ref[2:], low[2:]):
        check(name, got, r, lo, dtype)
    return (q64, k64, v64), rkw, ref, low


@pytest.mark.parametrize("instance", sorted(_BUILT) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("case", SINK_CASES, ids=_sink_case_id)
def test_sinks_forward_and_grads(instance, case):
    """Sinks on the cuda forward (folded in at normalization) with gradients w.r.t. q, k, v and the sinks against
    the float64 reference; the backward is cuda's own where built (it only needs the sink-inclusive LSE)."""
    if instance not in _BUILT:
        pytest.skip("no CUDA instance built")
    dtype, d = _NAMES[instance[0]], instance[1]
    rng = seeded_rng("cuda", "sinks", instance, case)
    inputs, rkw, ref, low = _dense_against_reference(rng, dtype, d, d, case[:-1], case[-1],
                                                     "cuda" if instance in _BUILT_BWD else None)
    # The case can catch an ignored sink: the sink-free attention misses the output's tolerance.
    ref0 = reference.dense(*inputs, **{**rkw, "sinks": None})
    with pytest.raises(AssertionError):
        check("out without sinks", ref0[0], ref[0], low[0], dtype)


@pytest.mark.parametrize("instance", sorted(_BUILT) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
def test_sinks_rows_that_see_no_key(instance):
    """A row that sees no key gives out 0 and lse = its head's sink exactly (-inf for a -inf sink), with finite
    gradients; such a row hands its whole LSE cotangent to the sink."""
    if instance not in _BUILT:
        pytest.skip("no CUDA instance built")
    dtype, d = _NAMES[instance[0]], instance[1]
    rng = seeded_rng("cuda", "sinks-empty", instance)
    q, _ = rand(rng, (1, 200, 3, d), dtype)  # causal, lq=200 > lk=60: rows 0..139 see nothing (two query blocks)
    k, _ = rand(rng, (1, 60, 3, d), dtype)
    v, _ = rand(rng, (1, 60, 3, d), dtype)
    sinks = jnp.asarray([0.5, -3.0, -np.inf], jnp.float32)

    def f(q, k, v, s):
        return fa3jax.flash_mha(q, k, v, is_causal=True, sinks=s, return_softmax_lse=True, backend="cuda")

    out, lse = jax.jit(f)(q, k, v, sinks)
    assert np.all(np.asarray(out[:, :140], np.float32) == 0)
    np.testing.assert_array_equal(np.asarray(lse[0, :, :140]), np.broadcast_to(np.asarray(sinks)[:, None], (3, 140)))
    assert np.all(np.isfinite(np.asarray(lse[:, :, 140:])))
    mask = jnp.zeros((1, 3, 200), jnp.float32).at[:, :, :140].set(1.0)
    g = jax.grad(lambda *a: jnp.sum(jnp.where(mask > 0, f(*a)[1], 0.0)), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for x in g:
        assert np.all(np.isfinite(np.asarray(x, np.float32)))
    np.testing.assert_allclose(np.asarray(g[3]), [140.0, 140.0, 0.0])
    assert np.all(np.asarray(g[0], np.float32) == 0)


@pytest.mark.parametrize("instance", sorted(_BUILT) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_match_triton(instance, causal):
    """cuda and triton agree on out, lse and the gradients (q, k, v, sinks) of a GQA call with sinks."""
    if instance not in _BUILT:
        pytest.skip("no CUDA instance built")
    dtype, d = _NAMES[instance[0]], instance[1]
    rng = seeded_rng("cuda", "sinks-vs-triton", instance, causal)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 333, h, d)), dtype) for h in (4, 2, 2))
    sinks = _sinks(rng, 4, 0.0 if causal else 6.0)
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)
    dl = jnp.asarray(rng.standard_normal((2, 4, 333)), jnp.float32)
    s = fa3jax.supports(fa3jax.flash_mha, q, k, v, is_causal=causal, sinks=sinks, backend="triton")
    if not s.supported:
        pytest.skip(s.reason)

    def run(backend):
        f = lambda q, k, v, s: fa3jax.flash_mha(q, k, v, is_causal=causal, sinks=s,  # noqa: E731
                                                return_softmax_lse=True, backend=backend)
        res, pull = jax.vjp(f, q, k, v, sinks)
        return (*res, *pull((do, dl)))

    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), run("cuda"), run("triton")):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), name
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3)
        assert err < tol, (name, err)


@pytest.mark.parametrize("instance", sorted(_BUILT_BWD) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_backward_is_cudas_own_and_matches_triton(instance, causal):
    """Where a backward instantiation is built, the plan's backward is cuda (not a composition), and its gradients
    agree with the triton backward's on the same inputs (both also meet the float64 reference in TestCuda)."""
    if instance not in _BUILT_BWD:
        pytest.skip("no CUDA backward built")
    dtype, d = _NAMES[instance[0]], instance[1]
    rng = np.random.default_rng(7 + d + causal)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 333, h, d)), dtype) for h in (4, 2, 2))
    spec = _dense_spec(q, k, v, is_causal=causal)
    plan = registry.plan(spec, "cuda")
    assert (plan.forward, plan.backward) == ("cuda", "cuda"), plan
    _assert_grads_match_triton(q, k, v, jnp.asarray(rng.standard_normal(q.shape), dtype), is_causal=causal)


def _assert_grads_match_triton(q, k, v, do, **kw):
    """cuda's dq, dk, dv of flash_mha(q, k, v, **kw) against triton's on the same inputs (finite, within a
    multiple of the low-precision rounding)."""
    def grads(backend):
        return jax.vjp(lambda q, k, v: fa3jax.flash_mha(q, k, v, backend=backend, **kw), q, k, v)[1](do)

    tol = 2e-2 if q.dtype == jnp.bfloat16 else 3e-3
    for name, a, b in zip(("dq", "dk", "dv"), grads("cuda"), grads("triton")):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), name
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3)
        assert err < tol, (name, err)


@pytest.mark.parametrize("instance", sorted(_BUILT_BWD) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
def test_backward_past_the_policy_tiles_length_matches_triton(instance):
    """An unmasked call with more than 4096 queries (a partial last tile): d=128's backward takes its 80-row step
    there (BwdPolicy min_seqlen_q), d=64 its 128-row one at any length; the gradients agree with triton's."""
    if instance not in _BUILT_BWD:
        pytest.skip("no CUDA backward built")
    dtype, d = _NAMES[instance[0]], instance[1]
    rng = np.random.default_rng(5 + d)
    q = jnp.asarray(rng.standard_normal((1, 4100, 2, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((1, 300, 1, d)), dtype) for _ in range(2))
    _assert_grads_match_triton(q, k, v, jnp.asarray(rng.standard_normal(q.shape), dtype))


@pytest.mark.parametrize("instance", sorted(_BUILT_BWD) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward_is_cudas_and_bitwise_repeatable(instance, causal):
    """deterministic=True stays on the cuda backward (dQ partials added in key-block order) and two runs give the
    same bits, under GQA and with many key blocks per query block, for every built (dtype, head_dim) (d=256 adds
    its dQ by vector reductions, the others by bulk adds)."""
    if instance not in _BUILT_BWD:
        pytest.skip("no CUDA backward built")
    dtype, d = _NAMES[instance[0]], instance[1]
    rng = np.random.default_rng(11 + causal + d)
    q = jnp.asarray(rng.standard_normal((2, 700, 4, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, 900, 2, d)), dtype) for _ in range(2))
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)
    plan = registry.plan(_dense_spec(q, k, v, is_causal=causal, deterministic=True), "cuda")
    assert (plan.forward, plan.backward) == ("cuda", "cuda"), plan
    f = jax.jit(lambda q, k, v: jax.vjp(
        lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=causal, deterministic=True, backend="cuda"),
        q, k, v)[1](do))
    first = [np.asarray(g) for g in f(q, k, v)]
    for _ in range(3):
        again = [np.asarray(g) for g in f(q, k, v)]
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), name


# ------------------------------------------------------------------------------------------ varlen
# (lens_q, lens_k or None (= lens_q), seqused_k or None, hq, hk, causal, window, softcap, sinks, trailing q rows
# outside every sequence)
VARLEN_CASES = [
    ([0, 1, 63, 64, 65, 129, 700], None, None, 4, 2, False, (-1, -1), 0.0, False, 0),
    ([65, 0, 1, 64, 63, 300], None, None, 4, 2, True, (-1, -1), 0.0, False, 5),
    ([100, 7, 0, 300, 64], [300, 1, 5, 100, 64], None, 6, 2, True, (-1, -1), 0.0, False, 0),  # lq != lk
    ([333, 64, 129, 1], None, None, 4, 1, False, (32, 8), 0.0, False, 0),
    ([100, 64, 200, 5, 0], [150, 64, 210, 9, 4], [150, 1, 100, 0, 4], 4, 2, False, (-1, -1), 0.0, False, 3),
    ([190, 65, 300], None, None, 4, 2, True, (-1, -1), 20.0, True, 7),
    ([200, 60, 1], [333, 0, 10], None, 4, 2, False, (-1, -1), 0.0, True, 0),  # a sequence with no keys
]


def _varlen_case_id(c):
    lq, lk, used, hq, hk, causal, window, cap, sinks, pad = c
    return (f"b{len(lq)}-max{max(lq)}-h{hq}x{hk}-{'causal' if causal else 'w%d_%d' % window}-cap{cap:g}"
            f"{'-lk' if lk else ''}{'-used' if used else ''}{'-sinks' if sinks else ''}{'-pad%d' % pad if pad else ''}")


def _varlen_inputs(rng, case, d, dtype, dv=None):
    """Packed inputs of a varlen case; v and the output's cotangent have head dim ``dv`` (None: d)."""
    dv = dv or d
    lens_q, lens_k, used, hq, hk, causal, window, cap, with_sinks, pad = case
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k or lens_q)]).astype(np.int32)
    tq, tk = int(cu_q[-1]) + pad, int(cu_k[-1]) + (pad if lens_k is None else 0)
    q, q64 = rand(rng, (tq, hq, d), dtype)
    k, k64 = rand(rng, (tk, hk, d), dtype)
    v, v64 = rand(rng, (tk, hk, dv), dtype)
    do, do64 = rand(rng, (tq, hq, dv), dtype)
    dl64 = rng.standard_normal((hq, tq))
    sinks = _sinks(rng, hq, 2.0) if with_sinks else None
    used = None if used is None else np.asarray(used, np.int32)
    return cu_q, cu_k, used, (q, k, v, do), (q64, k64, v64, do64), dl64, sinks


def _varlen_against_reference(rng, dtype, d, dv, case, backward):
    """One varlen call, cuda forward (v and out with head dim ``dv``), and its gradients against the float64
    reference per sequence; the q rows outside every sequence must get out 0 and lse -inf or the sink.
    ``backward``: "cuda" (the plan's must be cuda's own varlen backward) or "composed" (another backend's on the
    cuda forward's LSE)."""
    lens_q, lens_k, _, hq, hk, causal, window, cap, _, _ = case
    cu_q, cu_k, used, (q, k, v, do), (q64, k64, v64, do64), dl64, sinks = _varlen_inputs(rng, case, d, dtype, dv)
    scale = 0.7 / np.sqrt(d)
    kw = dict(softmax_scale=scale, is_causal=causal, window_size=window, softcap=cap, return_softmax_lse=True)
    max_q, max_k = max(lens_q), max(used if used is not None else (lens_k or lens_q))
    idx = (jnp.asarray(cu_q), jnp.asarray(cu_k), None if used is None else jnp.asarray(used))
    spec = validation.validate_varlen(q, k, v, *idx, max_q, max_k, deterministic=False, sinks=sinks, **kw)
    plan = registry.plan(spec, "cuda")
    assert plan.forward == "cuda" and plan.backward is not None, plan
    assert (plan.backward == "cuda") == (backward == "cuda"), plan
    rkw = dict(scale=scale, window=masking.normalize_window(window, causal), softcap=cap, dout=do64, dlse=dl64,
               sinks=None if sinks is None else np.asarray(sinks, np.float64))
    ref = reference.varlen(q64, k64, v64, cu_q, cu_k, used, **rkw)
    low = reference.varlen(q64, k64, v64, cu_q, cu_k, used, impl=functools.partial(naive_lowp, dtype=dtype), **rkw)

    def f(q, k, v, sinks):
        return fa3jax.flash_mha_varlen(q, k, v, *idx, max_q, max_k, sinks=sinks, backend="cuda", **kw)

    (out, lse), pull = jax.vjp(jax.jit(f), q, k, v, sinks)
    assert out.shape == (q.shape[0], hq, dv)
    check("out", out, ref[0], low[0], dtype)
    check("lse", lse, ref[1], low[1], dtype)
    covered = np.zeros(q.shape[0], bool)
    for b in range(len(lens_q)):
        covered[cu_q[b]:cu_q[b + 1]] = True
    assert np.all(np.asarray(out, np.float32)[~covered] == 0)
    want = -np.inf if sinks is None else np.asarray(sinks)[:, None]
    np.testing.assert_array_equal(np.asarray(lse)[:, ~covered], np.broadcast_to(want, (hq, int((~covered).sum()))))
    grads = pull((do, jnp.asarray(dl64, jnp.float32)))
    names = ("dq", "dk", "dv") + (("dsinks",) if sinks is not None else ())
    for name, got, r, lo in zip(names, grads, ref[2:], low[2:]):
        check(name, got, r, lo, dtype)




@pytest.mark.parametrize("instance", sorted(_BUILT) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_varlen_case_id)
def test_varlen_forward_and_grads(instance, case):
    """The cuda varlen forward (out, lse (hq, total_q)) and the cuda varlen backward, against the float64 reference per sequence: empty sequences and sequences shorter than a
    tile, lq != lk, GQA/MQA, masks, softcap, seqused_k, sinks, q rows outside every sequence (out 0, lse -inf or
    the sink)."""
    if instance not in _BUILT:
        pytest.skip("no CUDA instance built")
    dtype, d = _NAMES[instance[0]], instance[1]
    _varlen_against_reference(seeded_rng("cuda", "varlen", instance, case), dtype, d, d, case,
                              "cuda" if instance in _BUILT_BWD else "composed")


@pytest.mark.parametrize("instance", sorted(_BUILT) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_triton_under_jit_with_traced_cu_seqlens(instance, causal):
    """cuda and triton agree on out, lse and the gradients of a GQA varlen call with random lengths (incl. 0 and
    1) when cu_seqlens are traced jit arguments (max_seqlen_* then default to the totals: the cuda grid has many
    query blocks past every sequence's end, which its producer skips), with backend="auto" choosing the cuda
    forward and backward."""
    if instance not in _BUILT:
        pytest.skip("no CUDA instance built")
    dtype, d = _NAMES[instance[0]], instance[1]
    rng = seeded_rng("cuda", "varlen-vs-triton", instance, causal)
    lens = [int(x) for x in rng.integers(0, 600, 9)] + [0, 1, 1000]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)
    total = int(cu[-1])
    q = jnp.asarray(rng.standard_normal((total, 8, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((total, 2, d)), dtype) for _ in range(2))
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)
    dl = jnp.asarray(rng.standard_normal((8, total)), jnp.float32)
    s = fa3jax.supports(fa3jax.flash_mha_varlen, q, k, v, cu, cu, is_causal=causal, backend="triton")
    if not s.supported:
        pytest.skip(s.reason)
    auto = registry.plan(validation.validate_varlen(q, k, v, cu, cu, None, -1, -1, softmax_scale=None,
                                                    is_causal=causal, window_size=(-1, -1), softcap=0.0,
                                                    return_softmax_lse=True, deterministic=False), "auto")
    assert (auto.forward, auto.backward) == ("cuda", "cuda"), auto

    def run(backend):
        @jax.jit
        def g(q, k, v, cu, do, dl):
            f = lambda q, k, v: fa3jax.flash_mha_varlen(q, k, v, cu, cu, is_causal=causal,  # noqa: E731
                                                        return_softmax_lse=True, backend=backend)
            res, pull = jax.vjp(f, q, k, v)
            return (*res, *pull((do, dl)))
        return g(q, k, v, cu, do, dl)

    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), run("auto"), run("triton")):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        fin = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), fin, err_msg=name)
        err = np.max(np.abs(a[fin] - b[fin])) / max(np.max(np.abs(b[fin])), 1e-3)
        assert err < tol, (name, err)


# ------------------------------------------------------------------------------------------ MLA (d_v < d_qk)
# (b, lq, lk, hq, hk, causal, window, softcap, sink offset or None)
MLA_CASES = [
    (2, 200, 333, 4, 2, False, (-1, -1), 0.0, None),  # GQA, ragged tiles
    (1, 300, 190, 4, 2, True, (-1, -1), 0.0, None),  # lq > lk: rows (and a whole query block) that see no key
    (1, 130, 400, 2, 1, True, (-1, -1), 0.0, None),  # lq < lk, MQA
    (2, 257, 257, 2, 2, False, (64, 16), 0.0, None),
    (1, 150, 150, 4, 2, True, (-1, -1), 20.0, None),  # softcap
    (2, 200, 333, 4, 2, False, (-1, -1), 0.0, 6.0),  # sinks
]


def _mla_case_id(c):
    b, lq, lk, hq, hk, causal, window, cap, sink = c
    return (f"q{lq}-k{lk}-h{hq}x{hk}-{'causal' if causal else 'w%d_%d' % window}-cap{cap:g}"
            f"{'' if sink is None else '-sinks'}")


def _mla_id(i):
    return f"{i[0]}-d{i[1]}v{i[2]}"


def _mla_inputs(rng, dtype, b, lq, lk, hq, hk, d, dv):
    """Standard-normal q, k (head dim d), v and the output's cotangent (head dim dv)."""
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, dv), (b, lq, hq, dv)))


@pytest.mark.parametrize("instance", sorted(_BUILT_MLA) or [("bf16", 192, 128)], ids=_mla_id)
@pytest.mark.parametrize("case", MLA_CASES, ids=_mla_case_id)
def test_mla_forward_and_grads(instance, case):
    """The cuda MLA forward (v and out with their own head dim) and its gradients against the float64 reference:
    GQA/MQA, masks, softcap, sinks, lq != lk. The backward is cuda's own MLA kernel where built, else another
    backend's (triton, else xla) on the cuda forward's LSE."""
    if instance not in _BUILT_MLA:
        pytest.skip("no CUDA MLA instance built")
    dtype, d, dv = _NAMES[instance[0]], instance[1], instance[2]
    _dense_against_reference(seeded_rng("cuda", "mla", instance, case), dtype, d, dv, case[:-1], case[-1],
                             "cuda" if instance in _BUILT_MLA_BWD else "composed")


@pytest.mark.parametrize("instance", sorted(_BUILT_MLA) or [("bf16", 192, 128)], ids=_mla_id)
@pytest.mark.parametrize("causal", [False, True])
def test_mla_matches_triton(instance, causal):
    """cuda (forward; its own backward where built, else a composed one) and triton agree on out, lse and the
    gradients of a GQA MLA call, with backend="auto" choosing the cuda forward."""
    if instance not in _BUILT_MLA:
        pytest.skip("no CUDA MLA instance built")
    dtype, d, dv = _NAMES[instance[0]], instance[1], instance[2]
    rng = seeded_rng("cuda", "mla-vs-triton", instance, causal)
    q, k, v, do = _mla_inputs(rng, dtype, 2, 555, 555, 8, 2, d, dv)
    dl = jnp.asarray(rng.standard_normal((2, 8, 555)), jnp.float32)
    s = fa3jax.supports(fa3jax.flash_mha, q, k, v, is_causal=causal, backend="triton")
    if not s.supported:
        pytest.skip(s.reason)
    assert registry.plan(_dense_spec(q, k, v, is_causal=causal), "auto").forward == "cuda"

    def run(backend):
        f = lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=causal, return_softmax_lse=True,  # noqa: E731
                                             backend=backend)
        res, pull = jax.vjp(f, q, k, v)
        return (*res, *pull((do, dl)))

    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), run("auto"), run("triton")):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), name
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3)
        assert err < tol, (name, err)


@pytest.mark.parametrize("instance", sorted(_BUILT_MLA) or [("bf16", 192, 128)], ids=_mla_id)
@pytest.mark.parametrize("case", [VARLEN_CASES[1], VARLEN_CASES[4], VARLEN_CASES[5]], ids=_varlen_case_id)
def test_mla_varlen_forward_and_grads(instance, case):
    """The cuda varlen forward with v's own head dim (out (total_q, hq, d_v)) and its gradients (cuda's own MLA
    varlen backward where built, else composed) against the float64 reference per sequence (causal, lq != lk with
    seqused_k, softcap + sinks, q rows outside every sequence)."""
    if instance not in _BUILT_MLA:
        pytest.skip("no CUDA MLA instance built")
    dtype, d, dv = _NAMES[instance[0]], instance[1], instance[2]
    _varlen_against_reference(seeded_rng("cuda", "mla-varlen", instance, case), dtype, d, dv, case,
                              "cuda" if instance in _BUILT_MLA_BWD else "composed")


# ------------------------------------------------------------------------------------------ any head dim
# Head dims between the built instances (flash-attn3-jax's suite uses 32, 40 and 59): served by the smallest built
# kernel that holds them, TMA zero-filling the columns past d (multiples of 8) or, for the others (59), on copies
# zero-padded to the next multiple of 8 (fa3jax/backends/cuda/__init__.py _kernel_head_dim).
ANY_HEAD_DIMS = (8, 32, 40, 59, 72, 96, 112, 200)
ANY_DIM_CASES = [
    (2, 200, 333, 4, 2, False, (-1, -1), 0.0),  # GQA, ragged tiles
    (1, 300, 190, 4, 2, True, (-1, -1), 0.0),  # lq > lk: rows that see no key
    (2, 257, 257, 2, 2, False, (64, 16), 0.0),
    (1, 150, 150, 4, 1, True, (-1, -1), 20.0),  # MQA, softcap
]


def _any_dim_kernel(d, instances):
    """(dtype, kernel head dim) pairs of ``instances`` that serve head dim ``d`` (the smallest per dtype)."""
    dp = -(-d // 8) * 8
    out = {}
    for t, hd in sorted(instances):
        if hd >= dp and t not in out:
            out[t] = hd
    return out


def _any_dim_params(instances=_BUILT):
    return [(t, d) for d in ANY_HEAD_DIMS for t in sorted(_any_dim_kernel(d, instances))] or [("bf16", 40)]


@pytest.mark.parametrize("instance", _any_dim_params(), ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("case", ANY_DIM_CASES, ids=lambda c: f"q{c[1]}-k{c[2]}-h{c[3]}x{c[4]}-"
                         f"{'causal' if c[5] else 'w%d_%d' % c[6]}-cap{c[7]:g}")
def test_any_head_dim_forward_and_grads(instance, case):
    """A head dim without an instance of its own: the cuda forward, and cuda's own backward where a backward kernel
    holds it, against the float64 reference (GQA/MQA, causal with rows that see no key, a window, softcap)."""
    t, d = instance
    if t not in _any_dim_kernel(d, _BUILT):
        pytest.skip(f"no CUDA kernel built for {t} d={d}")
    backward = "cuda" if t in _any_dim_kernel(d, _BUILT_BWD) else "composed"
    _dense_against_reference(seeded_rng("cuda", "any-d", instance, case), _NAMES[t], d, d, case, None, backward)


@pytest.mark.parametrize("instance", _any_dim_params(), ids=lambda i: f"{i[0]}-d{i[1]}")
def test_any_head_dim_with_sinks(instance):
    t, d = instance
    if t not in _any_dim_kernel(d, _BUILT):
        pytest.skip(f"no CUDA kernel built for {t} d={d}")
    case = SINK_CASES[1]  # lq > lk under causal: rows that see only the sink; its last field is the sinks' offset
    _dense_against_reference(seeded_rng("cuda", "any-d-sinks", instance), _NAMES[t], d, d, case[:-1], 2.0, None)


@pytest.mark.parametrize("instance", [i for i in _any_dim_params() if i[1] in (40, 59, 96)] or [("bf16", 40)],
                         ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("case", [VARLEN_CASES[1], VARLEN_CASES[4], VARLEN_CASES[5]], ids=_varlen_case_id)
def test_any_head_dim_varlen_forward_and_grads(instance, case):
    """The varlen forward and backward at a head dim without an instance of its own, against the float64 reference
    per sequence (causal, lq != lk with seqused_k, softcap + sinks, q rows outside every sequence)."""
    t, d = instance
    if t not in _any_dim_kernel(d, _BUILT):
        pytest.skip(f"no CUDA kernel built for {t} d={d}")
    backward = "cuda" if t in _any_dim_kernel(d, _BUILT_BWD) else "composed"
    _varlen_against_reference(seeded_rng("cuda", "any-d-varlen", instance, case), _NAMES[t], d, d, case, backward)


@pytest.mark.parametrize("d", [32, 40, 59])
def test_flash_attn3_jax_head_dims_run_on_cuda_under_auto(d):
    """The head dims of flash-attn3-jax's suite plan onto the cuda forward under backend="auto" (the backward there
    follows the registry's measured order) and onto cuda's own backward under backend="cuda", which agrees with xla
    on out, lse and the gradients, deterministic mode included."""
    if "bf16" not in _any_dim_kernel(d, _BUILT_BWD):
        pytest.skip(f"no CUDA bf16 kernel built for d={d}")
    rng = seeded_rng("cuda", "fa3-dims", d)
    q = jnp.asarray(rng.standard_normal((2, 300, 4, d)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((2, 280, 2, d)), jnp.bfloat16) for _ in range(2))
    do = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    dl = jnp.asarray(rng.standard_normal((2, 4, 300)), jnp.float32)
    for det in (False, True):
        spec = _dense_spec(q, k, v, is_causal=True, deterministic=det)
        assert registry.plan(spec, "auto").forward == "cuda"
        plan = registry.plan(spec, "cuda")
        assert (plan.forward, plan.backward) == ("cuda", "cuda"), plan

        def run(backend):
            f = lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=True, return_softmax_lse=True,  # noqa: E731
                                                 deterministic=det, backend=backend)
            res, pull = jax.vjp(f, q, k, v)
            return (*res, *pull((do, dl)))

        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), run("cuda"), run("xla")):
            assert a.shape == b.shape, name
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            fin = np.isfinite(b)
            np.testing.assert_array_equal(np.isfinite(a), fin, err_msg=name)
            err = np.max(np.abs(a[fin] - b[fin])) / max(np.max(np.abs(b[fin])), 1e-3)
            assert err < 2e-2, (name, det, err)


# (b, lq, lk, hq, hk, causal, window, softcap): many key and query blocks per CTA, GQA/MQA, every mask kind.
MLA_BWD_CASES = [
    (2, 333, 555, 8, 2, False, (-1, -1), 0.0),
    (1, 600, 600, 4, 1, True, (-1, -1), 0.0),
    (1, 700, 300, 4, 2, True, (-1, -1), 0.0),  # lq > lk: query blocks that see no key
    (2, 450, 450, 4, 4, False, (100, 30), 0.0),
    (1, 400, 520, 4, 2, True, (-1, -1), 30.0),
]


@pytest.mark.parametrize("instance", sorted(_BUILT_MLA_BWD) or [("bf16", 192, 128)], ids=_mla_id)
@pytest.mark.parametrize("case", MLA_BWD_CASES, ids=lambda c: _mla_case_id((*c, None)))
def test_mla_backward_is_cudas_own_and_matches_xla(instance, case):
    """Where an MLA backward is built, the plan's backward is cuda's own, and its gradients (with an LSE cotangent)
    agree with xla's on the same inputs and the same cuda forward residuals (both also meet the float64 reference in
    test_mla_forward_and_grads); the dv gradient has v's head dim."""
    if instance not in _BUILT_MLA_BWD:
        pytest.skip("no CUDA MLA backward built")
    dtype, d, dv = _NAMES[instance[0]], instance[1], instance[2]
    b, lq, lk, hq, hk, causal, window, cap = case
    rng = seeded_rng("cuda", "mla-bwd-vs-xla", instance, case)
    q, k, v, do = _mla_inputs(rng, dtype, b, lq, lk, hq, hk, d, dv)
    dl = jnp.asarray(rng.standard_normal((b, hq, lq)), jnp.float32)
    kw = dict(is_causal=causal, window_size=window, softcap=cap, return_softmax_lse=True)
    plan = registry.plan(_dense_spec(q, k, v, is_causal=causal, window_size=window, softcap=cap), "cuda")
    assert (plan.forward, plan.backward) == ("cuda", "cuda"), plan

    def grads(backend):
        f = lambda q, k, v: fa3jax.flash_mha(q, k, v, backend=backend, **kw)  # noqa: E731
        return jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1]((do, dl)))(q, k, v)

    got, want = grads("cuda"), grads("xla")
    assert got[2].shape == v.shape
    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    for name, a, b_ in zip(("dq", "dk", "dv"), got, want):
        a, b_ = np.asarray(a, np.float32), np.asarray(b_, np.float32)
        assert np.all(np.isfinite(a)), name
        err = np.max(np.abs(a - b_)) / max(np.max(np.abs(b_)), 1e-3)
        assert err < tol, (name, err)


@pytest.mark.parametrize("instance", sorted(_BUILT_MLA_BWD) or [("bf16", 192, 128)], ids=_mla_id)
@pytest.mark.parametrize("causal", [False, True])
def test_mla_deterministic_backward_is_cudas_and_bitwise_repeatable(instance, causal):
    """deterministic=True stays on cuda's MLA backward under backend='cuda' and two runs give the same bits, dense
    and varlen, under GQA with many key blocks per query block."""
    if instance not in _BUILT_MLA_BWD:
        pytest.skip("no CUDA MLA backward built")
    dtype, d, dv = _NAMES[instance[0]], instance[1], instance[2]
    q, k, v, do = _mla_inputs(seeded_rng("cuda", "mla-det", instance, causal), dtype, 2, 700, 900, 4, 2, d, dv)
    plan = registry.plan(_dense_spec(q, k, v, is_causal=causal, deterministic=True), "cuda")
    assert (plan.forward, plan.backward) == ("cuda", "cuda"), plan
    dense = jax.jit(lambda q, k, v: jax.vjp(
        lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=causal, deterministic=True, backend="cuda"),
        q, k, v)[1](do))
    cu_q = jnp.asarray([0, 700, 1400], jnp.int32)
    cu_k = jnp.asarray([0, 900, 1800], jnp.int32)
    packed = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v, do)]
    varlen = jax.jit(lambda q, k, v: jax.vjp(
        lambda q, k, v: fa3jax.flash_mha_varlen(q, k, v, cu_q, cu_k, None, 700, 900, is_causal=causal,
                                                deterministic=True, backend="cuda"),
        q, k, v)[1](packed[3]))
    for f, args in ((dense, (q, k, v)), (varlen, packed[:3])):
        first = [np.asarray(g) for g in f(*args)]
        assert first[2].shape == args[2].shape
        for _ in range(3):
            again = [np.asarray(g) for g in f(*args)]
            for name, a, b in zip(("dq", "dk", "dv"), first, again):
                assert np.array_equal(a.view(np.uint16), b.view(np.uint16)), name


# ------------------------------------------------------------------------------------------ KV cache
# cuda's KV-cache forward against the xla backend: the same call on float32 copies of the inputs is the float32
# reference, and xla on the low-precision inputs the yardstick of helpers.check. Hostile indices follow
# validation.sanitize_kvcache's documented rule on every backend, so they are compared too.
_BUILT_KV = {(str(t), int(d)): int(n) for t, d, n in build_info().get("kvcache_instances", ())}
# (dtype, head dim): which pages that split key blocks its KV-cache kernel reads (C++ fwd_kvcache_page_reads: 0 none,
# 1 multiples of 8 rows, 2 any)
_KV_PAGE_READS = {(str(e[0]), int(e[1])): int(e[3]) for e in build_info().get("kvcache_head_dims", ()) if len(e) > 3}

# name: (b, lq, hq, hk, capacity, pages (0: contiguous; else pages of `pages` x the key block), seqlen_new, leftpad,
# batch_idx, causal, window, softcap, sinks, rotary, hostile)
KV_CASES = {
    "decode-gqa": (3, 1, 8, 2, 300, 0, 0, False, False, False, (-1, -1), 0.0, False, False, False),
    "decode-append-rotary-causal": (2, 1, 4, 4, 512, 0, 1, False, False, True, (-1, -1), 0.0, False, True, False),
    "prefill-causal-mqa": (2, 200, 4, 1, 1000, 0, 0, False, False, True, (-1, -1), 0.0, False, False, False),
    "append-leftpad-window": (3, 3, 4, 2, 400, 0, 3, True, False, True, (64, -1), 0.0, False, False, False),
    "batch_idx-append-softcap-sinks": (3, 2, 6, 3, 260, 0, 2, False, True, True, (-1, -1), 20.0, True, False, False),
    "chunk-window(20,10)": (2, 40, 4, 2, 500, 0, 40, False, False, False, (20, 10), 0.0, False, False, False),
    "hostile-contiguous": (3, 2, 4, 2, 200, 0, 1, True, True, True, (-1, -1), 0.0, False, False, True),
    "paged-decode": (3, 4, 8, 2, 0, 1, 0, False, False, True, (-1, -1), 0.0, False, False, False),
    "paged-append-batch_idx-rotary": (3, 3, 4, 2, 0, 1, 3, False, True, True, (100, -1), 0.0, True, True, False),
    "paged-2blocks-prefill": (2, 130, 4, 4, 0, 2, 0, False, False, False, (-1, -1), 10.0, False, False, False),
    "paged-hostile": (3, 2, 4, 2, 0, 1, 2, False, False, True, (-1, -1), 0.0, False, False, True),
    # Batch-1 GQA decode over a long cache: the case split-KV (num_splits=0 splits it) and GQA packing are for.
    "decode-gqa-long-sinks": (1, 1, 32, 8, 4096, 0, 0, False, False, False, (-1, -1), 0.0, True, False, False),
}


def _kv_inputs(rng, dtype, d, block_n, case, page_rows=None):
    """(arrays, kwargs) of one flash_mha_with_kvcache call of KV_CASES ``case``; ``page_rows``: the page size of a
    paged case instead of its multiple of ``block_n`` (with at least 4 key blocks of capacity)."""
    b, lq, hq, hk, cap, pages, snew, leftpad, bidx, causal, window, cap_soft, sinks, rotary, hostile = case
    page = page_rows if pages and page_rows else pages * block_n
    slots = b + 2 if bidx else b
    if page:
        pps = 4 if not page_rows else max(4, -(-4 * block_n // page_rows))
        cap = pps * page
        npages = slots * pps + 1
        kc, vc = (jnp.asarray(rng.standard_normal((npages, page, hk, d)), dtype) for _ in range(2))
        pt = rng.permutation(npages)[: slots * pps].reshape(slots, pps).astype(np.int32)
        if hostile:
            pt[0, 1], pt[1, 0], pt[2, 2] = -1, npages, np.iinfo(np.int32).max  # never dereferenced: masked keys
            if page_rows:  # pages inside a key block that also holds valid ones: only their columns are masked
                pt[0, pps // 2 + 1], pt[2, 1] = np.iinfo(np.int32).min, -5
        pt = jnp.asarray(pt)
    else:
        kc, vc = (jnp.asarray(rng.standard_normal((slots, cap, hk, d)), dtype) for _ in range(2))
        pt = None
    q = jnp.asarray(rng.standard_normal((b, lq, hq, d)), dtype)
    kn = vn = None
    if snew:
        kn, vn = (jnp.asarray(rng.standard_normal((b, snew, hk, d)), dtype) for _ in range(2))
    lens = rng.integers(1, cap - snew + 1, b).astype(np.int32)
    if hostile:
        lens[0], lens[1] = cap + 1000, -7  # clamped into [0, capacity - seqlen_new]
    kw = dict(cache_seqlens=jnp.asarray(lens), page_table=pt, is_causal=causal, window_size=window, softcap=cap_soft,
              return_softmax_lse=True, return_updated_cache=True)
    if leftpad:
        lp = rng.integers(0, 40, b).astype(np.int32)
        if hostile:
            lp[2] = 10**6  # clamped into [0, cache_seqlens]
        kw["cache_leftpad"] = jnp.asarray(lp)
    if bidx:
        idx = rng.permutation(slots)[:b].astype(np.int32)
        if hostile:
            idx[1] = slots + 3  # out of range: an empty cache, no write
        kw["cache_batch_idx"] = jnp.asarray(idx)
    if sinks:
        kw["sinks"] = jnp.asarray(rng.standard_normal(hq) + 2.0, jnp.float32)
    if rotary:
        ang = rng.uniform(0, 2 * np.pi, (cap, 16))
        kw["rotary_cos"], kw["rotary_sin"] = (jnp.asarray(f(ang), jnp.float32) for f in (np.cos, np.sin))
    return (q, kc, vc, kn, vn), kw


def _kv_run(backend, arrays, kw, cast=None):
    """jit-compiled call (cache_seqlens and the other index arrays traced) of ``backend``; ``cast``: float dtype
    the float inputs are cast to first (the float32 reference)."""
    def f(arrays, kw):
        if cast is not None:
            arrays = tuple(None if x is None else x.astype(cast) for x in arrays)
        return fa3jax.flash_mha_with_kvcache(*arrays, **kw, backend=backend)
    idx = {k: v for k, v in kw.items() if isinstance(v, jax.Array) and k not in ("rotary_cos", "rotary_sin")}
    static = {k: v for k, v in kw.items() if k not in idx}
    return jax.jit(lambda arrays, idx: f(arrays, {**static, **idx}))(arrays, idx)


# Page sizes whose key blocks span pages (not multiples of the key block: 128, or 80 at d=256): multiples of 8 rows
# are read as TMA boxes inside pages, the others gathered row by row by the producer (C++ fwd_kvcache_load).
KV_PAGE_ROWS = (1, 3, 8, 12, 16, 64, 100, 200, 256, 264, 300)
# (case, page_rows): every case with its own pages (multiples of the key block; None), and the paged ones with each
# page size above.
KV_CASE_PAGES = [(name, None) for name in sorted(KV_CASES)] + [
    (name, rows) for name in ("paged-2blocks-prefill", "paged-append-batch_idx-rotary", "paged-decode",
                              "paged-hostile") for rows in KV_PAGE_ROWS]


@pytest.mark.parametrize("instance", sorted(_BUILT_KV) or [("bf16", 128)], ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("name, page_rows", KV_CASE_PAGES,
                         ids=[n if r is None else f"{n}-page{r}" for n, r in KV_CASE_PAGES])
def test_kvcache_matches_xla(instance, name, page_rows):
    """out, lse and the updated caches of cuda's KV-cache forward against xla (float32 reference, low-precision
    yardstick) with backend="cuda" explicit: contiguous and paged caches (pages of whole key blocks, and of sizes
    whose key blocks span pages, hostile page-table entries inside them), appended k/v with rotary, leftpad,
    batch_idx, GQA/MQA, causal and windowed masks bottom-right aligned, softcap, sinks, hostile indices."""
    if instance not in _BUILT_KV:
        pytest.skip("no CUDA KV-cache instance built")
    if page_rows and targets.FEATURE_KVCACHE_ANY_PAGE not in build_info().get("features", ()):
        pytest.skip("this CUDA extension predates pages that are not multiples of the key block")
    block_n = _BUILT_KV[instance]
    if page_rows and page_rows % block_n and _KV_PAGE_READS.get(instance, 2) < (1 if page_rows % 8 == 0 else 2):
        # This kernel does not read such pages (C++ fwd_kvcache_page_served): cuda declines with the reason, and
        # auto serves the call elsewhere.
        arrays, kw = _kv_inputs(seeded_rng("cuda", "kvcache-refused"), _NAMES[instance[0]], instance[1], block_n,
                                KV_CASES[name], page_rows)
        refused = fa3jax.supports(fa3jax.flash_mha_with_kvcache, *arrays, **kw, backend="cuda")
        assert refused.forward is None and f"multiple of its key block {block_n}" in refused.reason, refused
        assert fa3jax.supports(fa3jax.flash_mha_with_kvcache, *arrays, **kw).forward not in (None, "cuda")
        return
    _kv_against_xla(instance, name, block_n, "kvcache", page_rows=page_rows)


def _kv_against_xla(instance, name, block_n, tag, page_rows=None, **extra):
    """One KV_CASES call on cuda against xla (see test_kvcache_matches_xla); ``block_n``: the serving kernel's key
    block (paged cases use pages of multiples of it unless ``page_rows``); ``extra``: more keyword arguments of the
    call (num_splits)."""
    dtype, d = _NAMES[instance[0]], instance[1]
    key = (tag, instance, name) + ((page_rows,) if page_rows else ())  # the earlier cases keep their inputs
    arrays, kw = _kv_inputs(seeded_rng("cuda", *key), dtype, d, block_n, KV_CASES[name], page_rows)
    kw.update(extra)
    assert fa3jax.supports(fa3jax.flash_mha_with_kvcache, *arrays, **kw, backend="cuda").forward == "cuda"
    out, lse, caches = _kv_run("cuda", arrays, kw)
    ref_out, ref_lse, _ = _kv_run("xla", arrays, kw, cast=jnp.float32)
    low_out, low_lse, low_caches = _kv_run("xla", arrays, kw)
    check("out", out, np.asarray(ref_out, np.float64), np.asarray(low_out.astype(jnp.float32), np.float64), dtype)
    check("lse", lse, np.asarray(ref_lse, np.float64), np.asarray(low_lse, np.float64), dtype)
    for got, want in zip(caches, low_caches):  # the shared layer's update: identical on every backend
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize("name", ["decode-gqa", "decode-gqa-long-sinks", "append-leftpad-window",
                                  "batch_idx-append-softcap-sinks", "prefill-causal-mqa", "hostile-contiguous",
                                  "paged-decode", "paged-append-batch_idx-rotary", "paged-hostile"])
def test_kvcache_num_splits_matches_xla(name, num_splits):
    """Split-KV (each row's key blocks in num_splits parts merged by LSE, the sink counted once; 0 = the kernel's
    automatic rule) and GQA packing (the decode cases) against xla, with hostile indices and empty splits (short
    rows), contiguous and paged."""
    instance = ("bf16", 128)
    if instance not in _BUILT_KV:
        pytest.skip("bf16 d=128 KV-cache kernel not built")
    if targets.FEATURE_KVCACHE_SPLITS not in build_info().get("features", ()):
        pytest.skip("this CUDA extension predates split-KV")
    _kv_against_xla(instance, name, _BUILT_KV[instance], f"kvcache-splits{num_splits}", num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 0, 5])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_traced_cache_seqlens_one_compilation(paged, num_splits):
    """cache_seqlens as a traced jit argument: one compilation of the cuda call serves every length (including
    0 and the full capacity), each matching xla, unsplit and split."""
    instance = ("bf16", 128)
    if instance not in _BUILT_KV:
        pytest.skip("bf16 d=128 KV-cache kernel not built")
    rng = seeded_rng("cuda", "kvcache-traced", paged, num_splits)
    bn = _BUILT_KV[instance]
    b, hq, hk, d = 2, 8, 2, 128
    if paged:
        kc, vc = (jnp.asarray(rng.standard_normal((9, 2 * bn, hk, d)), jnp.bfloat16) for _ in range(2))
        pt = jnp.asarray(rng.permutation(9)[:8].reshape(2, 4), jnp.int32)
        cap = 8 * bn
    else:
        cap, pt = 700, None
        kc, vc = (jnp.asarray(rng.standard_normal((b, cap, hk, d)), jnp.bfloat16) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.bfloat16)

    def call(backend):
        return jax.jit(lambda q, n: fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=n, page_table=pt,
                                                                  num_splits=num_splits, return_softmax_lse=True,
                                                                  backend=backend))
    f, g = call("cuda"), call("xla")
    for lens in ([3, 129], [cap, 0], [1, cap - 1]):
        n = jnp.asarray(lens, jnp.int32)
        (out, lse), (ref_out, ref_lse) = f(q, n), g(q, n)
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), atol=2e-2, rtol=0)
        np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(ref_lse)))
        fin = np.isfinite(np.asarray(ref_lse))
        np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(ref_lse)[fin], atol=2e-3, rtol=0)
    assert f._cache_size() == 1


# Head dims (multiples of 8) without a KV-cache kernel of their own: served by the narrowest one that holds them (the
# C++ dispatch's fwd_kernel_dim choice; build_info()["kvcache_head_dims"] gives its key block for paged caches).
_BUILT_KV_DIMS = {(str(e[0]), int(e[1])): int(e[2]) for e in build_info().get("kvcache_head_dims", ())}


@pytest.mark.parametrize("instance", [("bf16", 40), ("bf16", 96), ("fp16", 72), ("bf16", 200)],
                         ids=lambda i: f"{i[0]}-d{i[1]}")
@pytest.mark.parametrize("name", ["decode-gqa", "append-leftpad-window", "batch_idx-append-softcap-sinks",
                                  "hostile-contiguous", "paged-append-batch_idx-rotary", "paged-hostile"])
def test_kvcache_any_head_dim_matches_xla(instance, name):
    """cuda's KV-cache forward at a head dim between the built kernels (TMA zero-filling the columns past d, the
    output store clipping them) against xla, contiguous and paged, with appended keys, rotary, sinks and hostile
    indices."""
    if instance not in _BUILT_KV_DIMS or instance in _BUILT_KV:
        pytest.skip(f"no wider CUDA KV-cache kernel built for {instance}")
    _kv_against_xla(instance, name, _BUILT_KV_DIMS[instance], "kvcache-any-d")


# ------------------------------------------------------------------------------------------ workspace results
@pytest.mark.parametrize("kind", ["fwd", "bwd", "kvcache-split"])
def test_workspace_result_size_is_checked(monkeypatch, kind):
    """Every handler takes its workspace as its last result (a uint8 buffer XLA allocates, sized by the extension's
    own function) and checks it: one byte short is refused with an error naming the target and both sizes (nothing
    runs), a larger buffer gives the same bits as the exact one. The causal forward uses the tile counter, the
    KV-cache call (num_splits=3) the split parts after it, the deterministic backward the dQ accumulator."""
    from fa3jax.backends import cuda as cuda_mod

    ext, reason = cuda_mod._load_extension()
    if ext is None:
        pytest.skip(reason)
    if targets.FEATURE_WORKSPACE_RESULT not in build_info().get("features", ()):
        pytest.skip("this CUDA extension predates the workspace results")
    if ("bf16", 128) not in _BUILT_BWD or ("bf16", 128) not in _BUILT_KV:
        pytest.skip("bf16 d=128 forward, backward and KV-cache kernels not all built")
    rng = seeded_rng("cuda", "workspace", kind)
    bf = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)  # noqa: E731
    if kind == "kvcache-split":
        bn = _BUILT_KV[("bf16", 128)]
        kc, vc, q = bf(2, 4 * bn, 2, 128), bf(2, 4 * bn, 2, 128), bf(2, 1, 8, 128)
        lens = jnp.asarray([3 * bn, bn + 5], jnp.int32)
        run = lambda: fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=3,  # noqa: E731
                                                    return_softmax_lse=True, backend="cuda")
        fn, target = "kvcache_workspace", targets.FWD_KVCACHE_TARGET
    else:
        q, k, v = bf(2, 256, 4, 128), bf(2, 256, 2, 128), bf(2, 256, 2, 128)
        f = functools.partial(fa3jax.flash_mha, is_causal=True, deterministic=True, backend="cuda")
        if kind == "fwd":
            run = lambda: f(q, k, v, return_softmax_lse=True)  # noqa: E731
            fn, target = "fwd_workspace_bytes", targets.FWD_TARGET
        else:
            loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)  # noqa: E731
            run = lambda: jax.grad(loss, argnums=(0, 1, 2))(q, k, v)  # noqa: E731
            fn, target = "bwd_workspace_bytes", targets.BWD_TARGET
    real, needed = getattr(ext, fn), []

    def resized(delta):
        def size(*a, **kw):  # the real size (and split count), the bytes moved by delta
            got = real(*a, **kw)
            n = got[1] if isinstance(got, tuple) else got
            needed.append(int(n))
            return (got[0], n + delta) if isinstance(got, tuple) else n + delta
        return size

    def bits():  # traced afresh each time (the size is read while tracing; fa3jax's inner jits cache their traces)
        jax.clear_caches()
        return [np.asarray(x.astype(jnp.float32)) for x in jax.jit(lambda: run())()]

    exact = bits()
    monkeypatch.setattr(ext, fn, resized(4096))
    for name, a, b in zip(("out", "lse") if kind != "bwd" else ("dq", "dk", "dv"), exact, bits()):
        assert np.array_equal(a, b), f"{name} differs with a larger workspace"
    monkeypatch.setattr(ext, fn, resized(-1))
    with pytest.raises(Exception, match=rf"{target}: the workspace \(last result\) has") as err:
        bits()
    n = needed[-1]
    assert n > 0 and f"has {n - 1} bytes; this call needs {n}" in str(err.value), (n, str(err.value)[-500:])

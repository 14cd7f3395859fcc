"""The cudnn backend (jaxlib's cuDNN flash attention).

CPU: availability and its reason, the refusals (every configuration whose semantics cuDNN would change), the
planning of ``auto`` around it, the mask mapping (against jax.nn's own XLA implementation, which shares cuDNN's
top-left semantics), and the lowering of forward and backward for CUDA (cross-platform export: the custom calls,
their mask parameters and the LSE-cotangent branch). GPU: the shared suite on the cases cuDNN serves, plus
cuDNN-specific sizes, the recomputing backward path and cuDNN's backward on another backend's LSE.
"""
import functools
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import masking, reference, registry, validation
from fa3jax.backends import cudnn as cudnn_mod
from fa3jax.backends.cudnn import CudnnBackend

from .helpers import check, naive_lowp, rand
from .suite import AttentionSuite

S = jax.ShapeDtypeStruct
BF = jnp.bfloat16


def _spec(b=2, lq=64, lk=64, hq=4, hk=2, d=64, dv=None, dtype=BF, causal=False, window=(-1, -1), softcap=0.0,
          deterministic=False, segments=False, sinks=False):
    q, k = S((b, lq, hq, d), dtype), S((b, lk, hk, d), dtype)
    v = S((b, lk, hk, d if dv is None else dv), dtype)
    seg_q = S((b, lq), jnp.int32) if segments else None
    seg_k = S((b, lk), jnp.int32) if segments else None
    return validation.validate_dense(q, k, v, softmax_scale=None, is_causal=causal, window_size=window,
                                     softcap=softcap, return_softmax_lse=False, deterministic=deterministic,
                                     q_segment_ids=seg_q, kv_segment_ids=seg_k,
                                     sinks=S((hq,), jnp.float32) if sinks else None)


# --------------------------------------------------------------------------------------------------- CPU
@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU answer")
def test_unavailable_on_cpu_with_reason():
    ok, reason = registry.availability("cudnn")
    assert not ok and reason == "cudnn: JAX default backend is 'cpu', not 'gpu'"
    assert [n for n, _, _ in fa3jax.backends_info()] == ["cuda", "cudnn", "triton", "xla"]
    assert "cudnn" in validation.BACKENDS
    q = jnp.zeros((1, 16, 2, 64), BF)
    with pytest.raises(fa3jax.BackendUnavailableError, match=r"backend='cudnn' cannot serve this call: cudnn: JAX "
                                                            r"default backend is 'cpu'"):
        fa3jax.flash_mha(q, q, q, backend="cudnn")
    sup = fa3jax.supports(fa3jax.flash_mha, q, q, q, backend="cudnn")
    assert not sup.supported and "cudnn: JAX default backend is 'cpu'" in sup.reason
    with pytest.raises(NotImplementedError, match="cudnn: JAX default backend"):
        fa3jax.dot_product_attention(q, q, q, implementation="cudnn")


class _FakeDevice:
    def __init__(self, cc, kind):
        self.compute_capability, self.device_kind = cc, kind


@pytest.mark.parametrize("cc,platform,cudnn,expected", [
    ("9.0", "cuda 12080", 90800, (True, "")),
    ("8.0", "cuda 12080", 90800, (True, "")),
    ("7.5", "cuda 12080", 90800, (False, "cudnn: cuDNN flash attention needs compute capability >= 8.0 (sm80); "
                                        "found 7.5 (fake)")),
    ("gfx90a", "rocm 60300", 0, (False, "cudnn: needs an NVIDIA GPU with CUDA; found fake (rocm 60300)")),
    ("10.3", "cuda 12080", 90800, (False, "cudnn: compute capability 10.3 needs cuDNN >= 9.11; found 90800")),
    ("10.3", "cuda 12080", 91100, (True, "")),
])
def test_availability_on_gpus(monkeypatch, cc, platform, cudnn, expected):
    """The availability probe on (faked) GPU platforms: sm80+ NVIDIA only, and jax's cuDNN version rule."""
    fas, _ = cudnn_mod._jax_cudnn()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [_FakeDevice(cc, "fake")])
    monkeypatch.setattr(jax.extend.backend, "get_backend", lambda *a: type("B", (), {"platform_version": platform}))
    monkeypatch.setattr(fas, "check_cudnn_version", lambda: cudnn)
    assert CudnnBackend().availability() == expected


@pytest.mark.parametrize("kwargs,words", [
    (dict(dtype=jnp.float32), "dtype float32 not supported"),
    (dict(softcap=5.0), "softcap is not supported"),
    (dict(sinks=True), "sinks are not supported"),
    (dict(dv=32), r"MLA\) is not served; got head_dim_v=32, head_dim=64"),
    (dict(segments=True), "segment ids"),
    (dict(d=20), "head_dim must be a multiple of 8 and <= 256 .*got head_dim=20"),
    (dict(causal=True, lq=40, lk=64), r"agree only when seqlen_q == seqlen_k \(got window=\(-1, 0\), seqlen_q=40"),
    (dict(window=(8, 0), lq=64, lk=32), r"got window=\(8, 0\), seqlen_q=64, seqlen_k=32"),
    (dict(window=(8, 4)), r"only causal windows \(left, 0\).*got window=\(8, 4\)"),
    (dict(window=(8, -1)), r"got window=\(8, -1\)"),
    (dict(window=(-1, 3)), r"got window=\(-1, 3\)"),
    (dict(lk=0), "empty sequences are not supported"),
])
def test_forward_refusals(kwargs, words):
    spec = _spec(**kwargs)
    backend = CudnnBackend(compute_capability=(9, 0))
    with pytest.raises(NotImplementedError, match=words):
        backend.check_forward(spec)
    with pytest.raises(NotImplementedError, match=words):
        backend.check_backward(spec)


def test_refuses_other_modes_and_ring_blocks():
    backend = CudnnBackend(compute_capability=(9, 0))
    q = S((20, 4, 64), BF)
    cu = S((3,), jnp.int32)
    var = validation.validate_varlen(q, q, q, cu, None, None, 10, 10, softmax_scale=None, is_causal=False,
                                     window_size=(-1, -1), softcap=0.0, return_softmax_lse=False,
                                     deterministic=False)
    with pytest.raises(NotImplementedError, match="only dense calls are served \\(got mode 'varlen'\\)"):
        backend.check_forward(var)
    ring = _spec().replace(has_offsets=True, global_seqlen_q=256, global_seqlen_k=256)
    with pytest.raises(NotImplementedError, match="ring-attention block offsets"):
        backend.check_forward(ring)


@pytest.mark.parametrize("cc,d,ok", [((8, 0), 128, True), ((8, 6), 136, False), ((9, 0), 256, True),
                                     ((9, 0), 264, False), ((10, 0), 192, True), (None, 192, False)])
def test_head_dim_limit_follows_the_architecture(cc, d, ok):
    """jax's check: d % 8 == 0 and d <= 128 before sm90, <= 256 from sm90 on (no device: the sm80 limit)."""
    spec = _spec(d=d) if d <= validation.MAX_HEAD_DIM else None
    if spec is None:  # beyond what validation accepts at all: the limit function alone
        assert cudnn_mod.head_dim_limit(cc) < d
        return
    backend = CudnnBackend(compute_capability=cc)
    if ok:
        backend.check_forward(spec)
    else:
        with pytest.raises(NotImplementedError, match=f"<= {cudnn_mod.head_dim_limit(cc)} .*got head_dim={d}"):
            backend.check_forward(spec)


@pytest.mark.parametrize("kwargs,mask,window", [
    (dict(lq=64, lk=96), "NO_MASK", None),  # cross attention without a mask: any lengths
    (dict(causal=True), "CAUSAL", None),
    (dict(window=(16, 0)), "CAUSAL", 17),  # cuDNN keeps keys i - length < j <= i
    (dict(causal=True, window=(5, 7)), "CAUSAL", 6),  # causal folds the right side to 0
    (dict(window=(63, 0)), "CAUSAL", None),  # reaches key 0 from every row: plain causal
    (dict(window=(500, 0)), "CAUSAL", None),
])
def test_served_masks_map_onto_cudnn(kwargs, mask, window):
    spec = _spec(**kwargs)
    backend = CudnnBackend(compute_capability=(9, 0))
    backend.check_forward(spec)
    backend.check_backward(spec)
    mask_type, length = cudnn_mod.mask_args(spec)
    assert (mask_type.name, length) == (mask, window)


def test_deterministic_refuses_only_the_backward():
    spec = _spec(causal=True, deterministic=True)
    backend = CudnnBackend(compute_capability=(9, 0))
    backend.check_forward(spec)
    with pytest.raises(NotImplementedError, match="not bitwise deterministic"):
        backend.check_backward(spec)


@pytest.fixture
def cudnn_available(monkeypatch):
    """Plan as if the cudnn backend were available here (cuda and triton stay as they are)."""
    real = registry.availability

    def fake(name):
        return (True, "") if name == "cudnn" else real(name)

    monkeypatch.setattr(registry, "availability", fake)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="plans with cuda/triton unavailable")
def test_auto_planning_around_cudnn(cudnn_available):
    plan = registry.plan(_spec(causal=True), "auto")
    assert (plan.forward, plan.backward) == ("cudnn", "cudnn") and not plan.composed
    det = registry.plan(_spec(causal=True, deterministic=True), "auto")
    assert (det.forward, det.backward) == ("cudnn", "xla")
    assert any("backward by xla on the cudnn forward's LSE" in n and "not bitwise deterministic" in n
               for n in det.notes)
    bottom_right = registry.plan(_spec(causal=True, lq=32), "auto")  # cuDNN's causal is top-left: xla serves it
    assert (bottom_right.forward, bottom_right.backward) == ("xla", "xla")
    assert any("cudnn: cuDNN aligns causal masks" in n for n in bottom_right.notes)
    with pytest.raises(fa3jax.BackendUnavailableError, match="backend='cudnn' cannot serve this call: cudnn: softcap"):
        registry.plan(_spec(softcap=2.0), "cudnn")


@pytest.mark.parametrize("lq,lk,window", [(40, 40, (-1, 0)), (40, 40, (6, 0)), (40, 40, (0, 0)), (40, 40, (-1, -1)),
                                          (24, 56, (-1, -1))])
def test_mask_mapping_matches_jax_nn(lq, lk, window):
    """The configurations served are those where jax.nn's top-left causal/window (the semantics of its cudnn
    implementation, checked here through its xla one) equals ours; jax.nn gets exactly the window the backend
    passes to cuDNN (``local_window_size=(left, 0)`` -> ``sliding_window_length = left + 1``)."""
    rng = np.random.default_rng(lq * 1000 + lk + window[0])
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
               ((2, lq, 4, 32), (2, lk, 2, 32), (2, lk, 2, 32)))
    spec = _spec(lq=lq, lk=lk, d=32, window=window, dtype=jnp.float32)
    mask_type, length = cudnn_mod.mask_args(spec)
    kw = {}
    if mask_type.name == "CAUSAL":
        kw = dict(is_causal=True, local_window_size=None if length is None else (length - 1, 0))
    want = jax.nn.dot_product_attention(q, k, v, implementation="xla", **kw)
    got = fa3jax.flash_mha(q, k, v, window_size=window, backend="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_top_left_and_bottom_right_differ_when_lengths_differ():
    """Why causal with seqlen_q != seqlen_k is refused: the two alignments give different results."""
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((1, 24, 2, 32), (1, 56, 2, 32)))
    top_left = jax.nn.dot_product_attention(q, k, k, is_causal=True, implementation="xla")
    ours = fa3jax.flash_mha(q, k, k, is_causal=True, backend="xla")
    assert float(jnp.max(jnp.abs(top_left - ours))) > 0.1


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(lq=48, lk=80), dict(window=(9, 0), hk=1)])
def test_lse_cotangent_term_on_cpu(monkeypatch, kwargs):
    """The backward's handling of the LSE cotangent (cuDNN's kernel ignores it), checked on CPU by standing in the
    xla backend for cuDNN's forward and its dlse-free backward: the result must equal xla's own backward with dlse."""
    spec = _spec(b=2, hq=4, d=32, dtype=jnp.float16, **{"hk": 2, **kwargs})
    xla = registry.get("xla")
    monkeypatch.setattr(CudnnBackend, "_attend", lambda self, spec, q, k, v: xla.forward(spec, q, k, v, None))
    monkeypatch.setattr(CudnnBackend, "_grads", lambda self, spec, q, k, v, out, lse, dout: xla.backward(
        spec, q, k, v, out, lse, dout, jnp.zeros_like(lse), None))
    rng = np.random.default_rng(7)
    q, _ = rand(rng, (spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim), "float16")
    k, _ = rand(rng, (spec.batch, spec.seqlen_k, spec.num_heads_k, spec.head_dim), "float16")
    v, _ = rand(rng, (spec.batch, spec.seqlen_k, spec.num_heads_k, spec.head_dim), "float16")
    do, _ = rand(rng, q.shape, "float16")
    dlse = jnp.asarray(rng.standard_normal((spec.batch, spec.num_heads_q, spec.seqlen_q)), jnp.float32)
    out, lse = xla.forward(spec, q, k, v, None)
    backend = CudnnBackend(compute_capability=(9, 0))
    for cot in (dlse, jnp.zeros_like(dlse)):  # the zero cotangent takes the cheap branch
        got = jax.jit(lambda *a: backend.backward(spec, *a, None))(q, k, v, out, lse, do, cot)
        want = xla.backward(spec, q, k, v, out, lse, do, cot, None)
        for name, x, y in zip(("dq", "dk", "dv"), got, want):
            x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
            err = np.linalg.norm(x - y) / np.linalg.norm(y)
            assert err < 5e-3, f"{name}: relative error {err:.2e} with the LSE cotangent {cot.any()}"


def _export_for_cuda(monkeypatch, spec, with_backward=True):
    """StableHLO of the backend's forward (+ backward with a nonzero LSE cotangent) lowered for CUDA on this
    machine; jaxlib without CUDA reports no cuDNN version, so the version probe is stubbed."""
    fas, _ = cudnn_mod._jax_cudnn()
    monkeypatch.setattr(fas, "check_cudnn_version", lambda: 90800)
    backend = CudnnBackend(compute_capability=(9, 0))
    q = S((spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim), jnp.dtype(spec.dtype))
    k = S((spec.batch, spec.seqlen_k, spec.num_heads_k, spec.head_dim), jnp.dtype(spec.dtype))

    def step(q, k, v):
        out, lse = backend.forward(spec, q, k, v, None)
        if not with_backward:
            return out, lse
        return out, lse, backend.backward(spec, q, k, v, out, lse, out, lse, None)

    targets = ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
    exp = jax.export.export(jax.jit(step), platforms=["cuda"],
                            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(t) for t in targets])(q, k, k)
    return exp, exp.mlir_module()


def _calls(text):
    return re.findall(r"custom_call @(__cudnn\$\w+)", text)


def test_lowers_for_cuda_with_the_lse_cotangent_branch(monkeypatch):
    spec = _spec(window=(16, 0))
    exp, text = _export_for_cuda(monkeypatch, spec)
    assert [a.dtype for a in exp.out_avals] == [BF, jnp.float32, BF, BF, BF]
    assert exp.out_avals[1].shape == (2, 4, 64)  # the LSE: float32 (b, hq, lq)
    # forward; backward on the saved out/lse; in the LSE-cotangent branch one forward (v = k) and its backward
    assert sorted(_calls(text)) == sorted(["__cudnn$fmhaSoftmax"] * 2 + ["__cudnn$fmhaSoftmaxBackward"] * 2)
    assert text.count("stablehlo.case") == 1  # the LSE-cotangent branch runs only when dlse != 0
    configs = re.findall(r"sliding_window_length\\22: (\d+)", text)
    assert configs and set(configs) == {"17"}
    assert set(re.findall(r"mask_type\\22: \\22(\w+)\\22", text)) == {"CAUSAL"}


def test_recomputing_backward_path_lowers_too(monkeypatch):
    """Without the jax-private backward binding the backward is jax.vjp of the forward: one more forward."""
    assert cudnn_mod.direct_backward(), "this jax's cuDNN backward primitive changed its signature: update _BWD_*"
    monkeypatch.setattr(cudnn_mod, "direct_backward", lambda: False)
    _, text = _export_for_cuda(monkeypatch, _spec())
    assert sorted(_calls(text)) == sorted(["__cudnn$fmhaSoftmax"] * 4 + ["__cudnn$fmhaSoftmaxBackward"] * 2)
    assert set(re.findall(r"mask_type\\22: \\22(\w+)\\22", text)) == {"NO_MASK"}


# --------------------------------------------------------------------------------------------------- GPU
def _served(b, lq, lk, hq, hk, d, causal, window, cap, dtype, backend="cudnn") -> str:
    """'' when ``backend`` serves this flash_mha call on the device, else the reason."""
    q = S((b, lq, hq, d), jnp.dtype(dtype))
    k = S((b, lk, hk, d), jnp.dtype(dtype))
    sup = fa3jax.supports(fa3jax.flash_mha, q, k, k, is_causal=causal, window_size=window, softcap=cap,
                          backend=backend)
    return "" if sup.supported else sup.reason


@pytest.mark.gpu
class TestCudnn(AttentionSuite):
    backend = "cudnn"
    dtypes = ("bfloat16", "float16")
    supports_varlen = False
    supports_kvcache = False
    supports_paged = False

    def _check_dense(self, b, lq, lk, hq, hk, d, causal, window, cap, dtype):
        reason = _served(b, lq, lk, hq, hk, d, causal, window, cap, dtype)
        if reason:  # a refusal is the registry's business (covered on CPU); here: what cuDNN serves is right
            pytest.skip(reason)
        super()._check_dense(b, lq, lk, hq, hk, d, causal, window, cap, dtype)

    def test_fully_masked_rows_are_zero_with_finite_grads(self):
        pytest.skip("cudnn refuses every configuration with rows that see no key (causal needs seqlen_q == seqlen_k)")

    @pytest.mark.parametrize("case", [
        (2, 512, 512, 8, 8, 128, False, (-1, -1)),
        (2, 384, 384, 8, 2, 128, True, (-1, -1)),  # GQA
        (1, 256, 640, 4, 1, 64, False, (-1, -1)),  # cross attention, MQA
        (2, 300, 300, 4, 4, 64, False, (63, 0)),  # sliding window, ragged length
        (1, 257, 257, 4, 2, 256, True, (-1, -1)),  # d=256: sm90+ only
        (1, 128, 128, 2, 2, 72, True, (-1, -1)),  # a multiple of 8 that no other kernel specializes
    ], ids=lambda c: f"q{c[1]}-k{c[2]}-h{c[3]}x{c[4]}-d{c[5]}-{'causal' if c[6] else 'w%d_%d' % c[7]}")
    @pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
    def test_cudnn_sizes(self, case, dtype):
        b, lq, lk, hq, hk, d, causal, window = case
        self._check_dense(b, lq, lk, hq, hk, d, causal, window, 0.0, dtype)


def _grad_inputs(seed, b=2, l=192, hq=4, hk=2, d=64, dtype=BF):
    rng = np.random.default_rng(seed)
    q, _ = rand(rng, (b, l, hq, d), dtype)
    k, _ = rand(rng, (b, l, hk, d), dtype)
    v, _ = rand(rng, (b, l, hk, d), dtype)
    do, _ = rand(rng, (b, l, hq, d), dtype)
    dlse = jnp.asarray(rng.standard_normal((b, hq, l)), jnp.float32)
    return q, k, v, do, dlse


@pytest.mark.gpu
@pytest.mark.parametrize("dlse_zero", [False, True], ids=["dlse", "no-dlse"])
def test_recomputing_backward_equals_direct(monkeypatch, dlse_zero):
    """The fallback backward (jax.vjp of the forward) and the direct one (cuDNN's backward primitive on the saved
    residuals) give the same gradients, with and without an LSE cotangent."""
    spec = _spec(b=2, lq=192, lk=192, causal=True)
    backend = registry.get("cudnn")
    q, k, v, do, dlse = _grad_inputs(0)
    if dlse_zero:
        dlse = jnp.zeros_like(dlse)

    def grads(q, k, v, do, dlse):
        out, lse = backend.forward(spec, q, k, v, None)
        return backend.backward(spec, q, k, v, out, lse, do, dlse, None)

    direct = jax.jit(grads)(q, k, v, do, dlse)
    monkeypatch.setattr(cudnn_mod, "direct_backward", lambda: False)
    recomputed = jax.jit(lambda *a: grads(*a))(q, k, v, do, dlse)  # a new function: traced again
    for name, x, y in zip(("dq", "dk", "dv"), direct, recomputed):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=2e-2, rtol=2e-2,
                                   err_msg=name)


@pytest.mark.gpu
def test_backward_on_another_backends_lse():
    """A composed plan (e.g. the cuda forward, then cudnn's backward) hands cuDNN a foreign out/LSE: the LSE
    conventions (natural log, float32 (b, hq, lq)) must agree. Checked with the xla forward's residuals."""
    spec = _spec(b=2, lq=192, lk=192, causal=True)
    q, k, v, do, dlse = _grad_inputs(1)
    xla, cud = registry.get("xla"), registry.get("cudnn")
    out, lse = jax.jit(lambda q, k, v: xla.forward(spec, q, k, v, None))(q, k, v)
    out_c, lse_c = jax.jit(lambda q, k, v: cud.forward(spec, q, k, v, None))(q, k, v)
    np.testing.assert_allclose(np.asarray(lse_c), np.asarray(lse), atol=2e-2)
    want = jax.jit(lambda *a: xla.backward(spec, *a, None))(q, k, v, out, lse, do, dlse)
    got = jax.jit(lambda *a: cud.backward(spec, *a, None))(q, k, v, out, lse, do, dlse)
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        err = float(jnp.linalg.norm((x - y).astype(jnp.float32)) / jnp.linalg.norm(y.astype(jnp.float32)))
        assert err < 2e-2, f"{name}: relative error {err:.3e} between cudnn and xla backward on xla's residuals"


@pytest.mark.gpu
def test_auto_picks_cudnn_after_cuda():
    """On an sm80+ GPU, auto serves a causal self-attention call by cuda (Hopper, when built) or cudnn, and a
    bottom-right causal call with seqlen_q != seqlen_k by cuda or triton, never cudnn."""
    ok, reason = registry.availability("cudnn")
    assert ok, reason
    q = S((2, 256, 8, 128), BF)
    sup = fa3jax.supports(fa3jax.flash_mha, q, q, q, is_causal=True)
    cuda_ok = registry.availability("cuda")[0]
    assert sup.forward == ("cuda" if cuda_ok and not _served(2, 256, 256, 8, 8, 128, True, (-1, -1), 0.0,
                                                               "bfloat16", "cuda") else "cudnn")
    # cuda's own backward where the forward is cuda's and its backward is built, else cudnn's
    assert sup.backward == "cudnn" or sup.backward == sup.forward == "cuda", sup
    k = S((2, 384, 8, 128), BF)
    sup = fa3jax.supports(fa3jax.flash_mha, q, k, k, is_causal=True)
    assert sup.forward != "cudnn" and sup.backward != "cudnn"


def _dense_spec(seqlen_k, deterministic=False, d=64):
    return validation.validate_dense(S((1, 256, 2, d), BF), S((1, seqlen_k, 2, d), BF),
                                     S((1, seqlen_k, 2, d), BF), softmax_scale=None, is_causal=False,
                                     window_size=(-1, -1), softcap=0.0, return_softmax_lse=False,
                                     deterministic=deterministic)


def test_backward_candidates_after_a_cuda_forward_under_auto():
    """Under auto, a cuda forward's backward is cuda's own first at every length and head dim (measured faster than
    cuDNN's from 512 keys); cuDNN's and the others follow for what cuda's refuses, with cuDNN's and triton's first
    under deterministic=True; an explicit backend="cuda" keeps cuda's own first; other forwards keep their own order."""
    short, long_ = _dense_spec(1024), _dense_spec(4096)
    for d in (64, 128, 256):
        for n in (512, 1024, 4096, 16384):
            assert registry._backward_candidates("cuda", "auto", _dense_spec(n, d=d)) == \
                ("cuda", "cudnn", "triton", "xla")
    # deterministic: cuda's fixed-order dQ adds are slower than triton's backward under a causal mask
    for n in (1024, 8192):
        assert registry._backward_candidates("cuda", "auto", _dense_spec(n, True)) == ("cudnn", "triton", "cuda", "xla")
    assert registry._backward_candidates("cuda", "cuda", short) == ("cuda", "cudnn", "triton", "xla")
    assert registry._backward_candidates("triton", "auto", long_) == ("triton", "xla")
    assert registry._backward_candidates("xla", "auto", short) == ("xla",)

"""The shared suite on the CUDA backend (Hopper only). Gradients run through the CUDA backward where it is built
for the (dtype, head_dim), else through the registry's composition (another backend's backward on the cuda
forward's LSE). Head dims and dtypes follow the build."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import registry, tuning, validation
from fa3jax.backends.cuda import build_info

from .suite import AttentionSuite

pytestmark = pytest.mark.gpu

_BUILT = {(str(t), int(d)) for t, d in build_info().get("instances", ())}
_BUILT_BWD = {(str(t), int(d)) for t, d in build_info().get("bwd_instances", ())}
_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


class TestCuda(AttentionSuite):
    backend = "cuda"
    dtypes = tuple(sorted({_NAMES[t] for t, _ in _BUILT})) or ("bfloat16",)
    head_dims = tuple(sorted({d for _, d in _BUILT})) or (128,)
    supports_varlen = False
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
                                     window_size=(-1, -1), softcap=0.0, return_softmax_lse=False,
                                     deterministic=kw.get("deterministic", False))


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
    do = jnp.asarray(rng.standard_normal(q.shape), dtype)

    def grads(backend):
        f = lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=causal, backend=backend)  # noqa: E731
        return jax.vjp(f, q, k, v)[1](do)

    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    for name, a, b in zip(("dq", "dk", "dv"), grads("cuda"), grads("triton")):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.isfinite(a)), name
        err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-3)
        assert err < tol, (name, err)


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

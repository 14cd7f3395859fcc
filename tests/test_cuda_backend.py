"""The shared suite on the CUDA backend (Hopper only). Gradients run through the registry's composition (triton or
xla backward on the cuda forward's LSE) until the CUDA backward exists. Head dims and dtypes follow the build."""
import pytest

from fa3jax import tuning
from fa3jax.backends.cuda import build_info

from .suite import AttentionSuite

pytestmark = pytest.mark.gpu

_BUILT = {(str(t), int(d)) for t, d in build_info().get("instances", ())}
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

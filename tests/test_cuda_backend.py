"""The shared suite on the CUDA backend (Hopper only). Gradients run through the registry's composition (triton or
xla backward on the cuda forward's LSE) until the CUDA backward exists. Head dims and dtypes follow the build."""
import pytest

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

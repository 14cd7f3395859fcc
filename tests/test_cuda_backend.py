"""The shared suite on the CUDA backend (Hopper only). Gradients run through the registry's composition (triton or
xla backward on the cuda forward's LSE) until the CUDA backward exists."""
import pytest

from .suite import AttentionSuite

pytestmark = pytest.mark.gpu


class TestCuda(AttentionSuite):
    backend = "cuda"
    dtypes = ("bfloat16", "float16")
    head_dims = (64, 128, 256)
    supports_varlen = False
    supports_kvcache = False
    supports_paged = False

"""The shared suite on the Triton backend (GPU only; the interpreter tests in test_triton_interpret.py cover the
kernels' indexing on CPU)."""
import pytest

from .suite import AttentionSuite

pytestmark = pytest.mark.gpu


class TestTriton(AttentionSuite):
    backend = "triton"
    dtypes = ("bfloat16", "float16")

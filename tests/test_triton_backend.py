"""The shared suite on the Triton backend (GPU only; the interpreter tests in test_triton_interpret.py cover the
kernels' indexing on CPU)."""
import pytest

from .suite import AttentionSuite

pytestmark = pytest.mark.gpu


class TestTriton(AttentionSuite):
    backend = "triton"
    dtypes = ("bfloat16", "float16")


class TestTritonStreamK(TestTriton):
    """The kvcache tests again, with stream-K as the automatic decode schedule and every call automatic."""

    def setup_method(self, method):
        if "kvcache" not in method.__name__:
            pytest.skip("stream-K changes only the kvcache path (covered by TestTriton)")

    @pytest.fixture(autouse=True)
    def _streamk(self, monkeypatch):
        from fa3jax.backends.triton import tuning

        for layout, cfg in list(tuning.DECODE.items()):
            monkeypatch.setitem(tuning.DECODE, layout, cfg._replace(streamk=True))

    def _kvcache_case(self, **kw):
        return super()._kvcache_case(**{**kw, "num_splits": 0})

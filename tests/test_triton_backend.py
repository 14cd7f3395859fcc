"""The shared suite on the Triton backend (GPU only; the interpreter tests in test_triton_interpret.py cover the
kernels' indexing on CPU)."""
import pytest

from .suite import AttentionSuite

pytestmark = pytest.mark.gpu


class TestTriton(AttentionSuite):
    backend = "triton"
    dtypes = ("bfloat16", "float16")


class _Persistent(TestTriton):
    """The kvcache tests again, every call automatic (num_splits=0) with the one-wave ``schedule``."""

    schedule = ""

    def setup_method(self, method):
        if "kvcache" not in method.__name__:
            pytest.skip("the decode schedule changes only the kvcache path (covered by TestTriton)")

    @pytest.fixture(autouse=True)
    def _schedule(self, monkeypatch):
        from fa3jax.backends.triton import tables

        for layout, cfg in list(tables.DECODE.items()):
            monkeypatch.setitem(tables.DECODE, layout, cfg._replace(schedule=self.schedule))

    def _kvcache_case(self, **kw):
        return super()._kvcache_case(**{**kw, "num_splits": 0})


class TestTritonStreamK(_Persistent):
    schedule = "streamk"


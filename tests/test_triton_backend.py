"""The shared suite on the Triton backend (GPU only; the interpreter tests in test_triton_interpret.py cover the
kernels' indexing on CPU)."""
import pytest

from .suite import AttentionSuite

pytestmark = pytest.mark.gpu


class TestTriton(AttentionSuite):
    backend = "triton"
    dtypes = ("bfloat16", "float16")


class _Persistent(TestTriton):
    """The kvcache tests again, every call automatic (num_splits=0) with the decode ``schedule`` forced through
    fa3jax.tuning.override (the paged policy serves both cache layouts then)."""

    schedule = ""

    def setup_method(self, method):
        if "kvcache" not in method.__name__:
            pytest.skip("the decode schedule changes only the kvcache path (covered by TestTriton)")

    @pytest.fixture(autouse=True)
    def _schedule(self):
        from fa3jax.backends.triton import tables
        from fa3jax.tuning import Tuning, override

        with override(Tuning(decode=tables.DECODE["paged"]._replace(schedule=self.schedule))):
            yield

    def _kvcache_case(self, **kw):
        return super()._kvcache_case(**{**kw, "num_splits": 0})


class TestTritonStreamK(_Persistent):
    schedule = "streamk"


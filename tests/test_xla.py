"""The shared suite on the pure-JAX backend (runs everywhere, CI included)."""
from .suite import AttentionSuite


class TestXla(AttentionSuite):
    backend = "xla"

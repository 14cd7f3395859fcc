"""fa3jax: FlashAttention for JAX — Hopper CUDA kernels, Triton kernels and a blockwise XLA path, one API."""
from .api import flash_mha, flash_mha_varlen, flash_mha_with_kvcache
from .query import backends_info, supports
from .registry import BackendUnavailableError

__version__ = "0.1.0"

__all__ = [
    "flash_mha",
    "flash_mha_varlen",
    "flash_mha_with_kvcache",
    "ring_attention",
    "supports",
    "backends_info",
    "BackendUnavailableError",
]


def __getattr__(name):
    # ring attention pulls in shard_map machinery; import it on first use
    if name == "ring_attention":
        from .ring import ring_attention

        return ring_attention
    raise AttributeError(name)

"""fa3jax: FlashAttention for JAX — Hopper CUDA kernels, Triton kernels and a blockwise XLA path, one API."""
from .adapters import dot_product_attention, flax_attention_fn
from .api import flash_mha, flash_mha_varlen, flash_mha_with_kvcache, ring_attention
from .registry import BackendUnavailableError
from .support import Support, backends_info, supports

__version__ = "0.1.0"

__all__ = [
    "flash_mha",
    "flash_mha_varlen",
    "flash_mha_with_kvcache",
    "ring_attention",
    "dot_product_attention",
    "flax_attention_fn",
    "supports",
    "Support",
    "backends_info",
    "BackendUnavailableError",
]

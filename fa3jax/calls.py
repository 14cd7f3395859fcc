"""One backend call, with a vmap rule: the layer every execution path (VJP, ring, sharding, KV cache) goes
through to reach a backend's kernels.

:func:`forward`/:func:`backward` wrap a call in :func:`fa3jax.batching.batched`, so ``vmap`` folds into the
kernel's batch or heads axis; ``impl`` picks what runs per batch (the plain backend call, or the
custom-partitioned op of :mod:`fa3jax.sharding`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from . import batching, registry, tuning
from .backends.base import DenseArgs, KVCacheArgs, VarlenArgs
from .spec import AttentionSpec


def local_forward(backend_name: str, spec: AttentionSpec, q, k, v, args):
    """(out, lse) of backend ``backend_name`` on this device's arrays."""
    return tuple(registry.get(backend_name).forward(spec, q, k, v, args))


def local_backward(backend_name: str, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args):
    """(dq, dk, dv) of backend ``backend_name`` on this device's arrays."""
    return tuple(registry.get(backend_name).backward(spec, q, k, v, out, lse, dout, dlse, args))


def _token_layout(spec: AttentionSpec) -> str:
    return "b" if spec.mode == "dense" else "tokens"


def _lse_layout(spec: AttentionSpec) -> str:
    return "b" if spec.mode == "dense" else "lse"


def _meta_layouts(spec: AttentionSpec) -> tuple:
    """Layouts of the DenseArgs / VarlenArgs fields, in order (the sinks last: one value per query head)."""
    return ("scalar", "scalar", "b", "b", "heads") if spec.mode == "dense" else ("meta", "meta", "meta", "heads")


def _pack(spec: AttentionSpec, args) -> tuple:
    """Runtime metadata as positional arrays (None where absent): DenseArgs offsets or VarlenArgs."""
    if args is None:
        return (None,) * len(_meta_layouts(spec))
    return tuple(args)


def _unpack(spec: AttentionSpec, meta):
    if spec.mode == "dense":
        return DenseArgs(*meta) if spec.has_dense_args else None
    return VarlenArgs(*meta)


@dataclasses.dataclass(frozen=True)
class _Forward:
    """``fn`` of :func:`fa3jax.batching.batched` for a dense/varlen forward: hashable statics only, so the
    batched wrapper (and its compilation) is reused across calls."""

    backend_name: str
    impl: Callable
    tune: tuning.Tuning  # part of the cache key: a call traced under another override traces anew

    def __call__(self, spec, q, k, v, *meta):
        return self.impl(self.backend_name, spec, q, k, v, _unpack(spec, meta))


@dataclasses.dataclass(frozen=True)
class _Backward:
    backend_name: str
    impl: Callable
    tune: tuning.Tuning

    def __call__(self, spec, q, k, v, out, lse, dout, dlse, *meta):
        return self.impl(self.backend_name, spec, q, k, v, out, lse, dout, dlse, _unpack(spec, meta))


@dataclasses.dataclass(frozen=True)
class _KVCacheForward:
    backend_name: str
    tune: tuning.Tuning

    def __call__(self, spec, q, k_cache, v_cache, *meta):
        backend = registry.get(self.backend_name)
        return tuple(backend.kvcache_forward(spec, q, k_cache, v_cache, KVCacheArgs(*meta)))


def forward(backend_name: str, spec: AttentionSpec, q, k, v, args, impl=local_forward):
    """(out, lse) of a dense or varlen call; ``impl(backend_name, spec, q, k, v, args)`` runs it."""
    a = _token_layout(spec)
    fn = _Forward(backend_name, impl, tuning.current())
    return batching.batched(fn, spec, (a, a, a) + _meta_layouts(spec), (a, _lse_layout(spec)))(
        q, k, v, *_pack(spec, args))


def backward(backend_name: str, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args, impl=local_backward):
    """(dq, dk, dv) of a dense or varlen call; ``impl`` as in :func:`forward`."""
    a, l = _token_layout(spec), _lse_layout(spec)
    fn = _Backward(backend_name, impl, tuning.current())
    return batching.batched(fn, spec, (a, a, a, a, l, a, l) + _meta_layouts(spec), (a, a, a))(
        q, k, v, out, lse, dout, dlse, *_pack(spec, args))


def kvcache_forward(backend_name: str, spec: AttentionSpec, q, k_cache, v_cache, args: KVCacheArgs):
    """(out, lse) of a KV-cache call. Under vmap it runs sequentially (the index arrays usually differ per
    example, so there is no axis to fold into)."""
    layouts = ("meta",) * (3 + len(KVCacheArgs._fields))
    fn = _KVCacheForward(backend_name, tuning.current())
    return batching.batched(fn, spec, layouts, ("b", "b"))(q, k_cache, v_cache, *args)

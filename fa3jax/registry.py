"""Backend registry: which backends exist, which can run here, and which one serves a given spec.

``auto`` tries cuda (Hopper), then cudnn (jaxlib's cuDNN kernels, NVIDIA sm80+), then triton (NVIDIA sm80+), then
xla (decode-sized KV-cache calls, but batch-1 ones over short caches: triton before cuda, see ``auto_order``),
moving on when a backend is unavailable or raises ``NotImplementedError`` for the spec. The backward is planned separately: a backend without a
backward for the spec (e.g. cudnn under ``deterministic=True``) is paired with the next backend in that order that
has one, reusing the forward's LSE; under ``auto`` a cuda forward's backward is cuda's own (``_backward_candidates``),
except under ``deterministic=True``.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
from typing import Optional

from .backends.base import Backend
from .spec import AttentionSpec

log = logging.getLogger("fa3jax")

ORDER = ("cuda", "cudnn", "triton", "xla")
_MODULES = {
    "cuda": ("fa3jax.backends.cuda", "CudaBackend"),
    "cudnn": ("fa3jax.backends.cudnn", "CudnnBackend"),
    "triton": ("fa3jax.backends.triton", "TritonBackend"),
    "xla": ("fa3jax.backends.xla", "XlaBackend"),
}


class BackendUnavailableError(NotImplementedError):
    """An explicitly requested backend cannot serve the call (the message says which and why)."""


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[Optional[Backend], str]:
    module, cls = _MODULES[name]
    try:
        return getattr(importlib.import_module(module), cls)(), ""
    except Exception as e:  # a missing optional dependency or a broken module makes it unavailable, not a crash
        return None, f"{name}: cannot load {module}.{cls}: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def availability(name: str) -> tuple[bool, str]:
    """(available, reason) for backend ``name`` on the current default device. Never raises."""
    backend, reason = _load(name)
    if backend is None:
        return False, reason
    try:
        return backend.availability()
    except Exception as e:  # a probe that crashes means "not usable", with the crash as the reason
        return False, f"{name}: availability probe failed: {type(e).__name__}: {e}"


def get(name: str) -> Backend:
    backend, reason = _load(name)
    if backend is None:
        raise BackendUnavailableError(reason)
    return backend


def backends_info() -> list[tuple[str, bool, str]]:
    """[(name, available, reason)] for every registered backend, in ``auto`` order."""
    return [(n, *availability(n)) for n in ORDER]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Who runs a call: ``forward`` serves the forward; ``backward`` (or None, with ``backward_reason``) the VJP."""

    spec: AttentionSpec
    forward: str
    backward: Optional[str]
    backward_reason: str = ""
    notes: tuple = ()

    @property
    def composed(self) -> bool:
        return self.backward is not None and self.backward != self.forward


def _try(name: str, check: str, spec: AttentionSpec) -> str:
    """'' if backend ``name`` serves ``spec`` for ``check`` ('forward'/'backward'), else the reason."""
    ok, reason = availability(name)
    if not ok:
        return reason or f"{name}: unavailable"
    try:
        getattr(get(name), f"check_{check}")(spec)
    except NotImplementedError as e:
        return str(e) or f"{name}: unsupported"
    return ""


_warned: set = set()


def _note_fallback(reason: str):
    if reason not in _warned:
        _warned.add(reason)
        log.info("fa3jax: falling back: %s", reason)


def _first(names, check: str, spec: AttentionSpec) -> tuple[Optional[str], list[str]]:
    """The first of ``names`` that serves ``spec`` for ``check`` (or None), and the reasons of those before it."""
    reasons = []
    for name in names:
        reason = _try(name, check, spec)
        if not reason:
            return name, reasons
        reasons.append(reason)
    return None, reasons


def _backward_candidates(fwd: str, requested: str, spec: AttentionSpec) -> tuple:
    """Backends to try for the backward of a ``fwd`` forward, in order: the forward's own, then the later ones.
    Under ``auto``, cuda's own after a cuda forward (measured faster than cuDNN's at d = 64, 128 and 256 from 512
    keys), except that deterministic=True tries cuDNN's and triton's first (cuda's fixed-order dQ adds are slower
    under causal masks)."""
    own = (fwd,) + ORDER[ORDER.index(fwd) + 1:]
    if requested != "auto" or fwd != "cuda" or not spec.deterministic:
        return own
    first = ("cudnn", "triton")
    return first + tuple(n for n in own if n not in first)


# Under ``auto``, decode-sized KV-cache calls (at most KVCACHE_DECODE_ROWS query rows per kv head: one query tile of
# cuda's kernel) try triton first, whose split-KV decode measured faster; larger ones (prefill) cuda first. Batch-1
# decodes of caches up to KVCACHE_LATENCY_CAPACITY keys are latency-bound, and there cuda's single custom call (no
# XLA op of its own for the seqlens) measured faster per call than triton's; they keep cuda first (RESULTS.md).
KVCACHE_DECODE_ROWS = 64
KVCACHE_LATENCY_CAPACITY = 32768
AUTO_ORDER_KVCACHE_DECODE = ("triton", "cuda", "cudnn", "xla")


def kvcache_decode_sized(spec: AttentionSpec) -> bool:
    """Whether a KV-cache call has at most KVCACHE_DECODE_ROWS query rows per kv head."""
    group = max(spec.num_heads_q // max(spec.num_heads_k, 1), 1)
    return spec.mode == "kvcache" and spec.seqlen_q * group <= KVCACHE_DECODE_ROWS


def kvcache_latency_bound(spec: AttentionSpec) -> bool:
    """Whether a decode-sized KV-cache call is one batch row over at most KVCACHE_LATENCY_CAPACITY cache keys."""
    return kvcache_decode_sized(spec) and spec.batch == 1 and spec.kvcache.capacity <= KVCACHE_LATENCY_CAPACITY


def auto_order(spec: AttentionSpec) -> tuple:
    """The order in which ``auto`` tries the forward backends for ``spec``."""
    return AUTO_ORDER_KVCACHE_DECODE if kvcache_decode_sized(spec) and not kvcache_latency_bound(spec) else ORDER


def plan(spec: AttentionSpec, requested: str) -> Plan:
    """Choose the forward and backward backends for ``spec``. Raises BackendUnavailableError for an explicit
    backend that cannot serve the forward (naming the backend and the reason)."""
    if requested == "auto":
        order = auto_order(spec)
        fwd, notes = _first(order, "forward", spec)
        for name, reason in zip(order, notes):
            if availability(name)[0]:
                _note_fallback(reason)
        if fwd is None:  # xla serves every valid spec, so this is a bug, not a user error
            raise BackendUnavailableError("no backend can serve this call: " + "; ".join(notes))
        if spec.mode == "kvcache" and fwd in ("triton", "cuda"):
            rows = f"{KVCACHE_DECODE_ROWS} query rows (seqlen_q x GQA group) per kv head"
            if kvcache_latency_bound(spec):
                notes.append(f"kvcache under auto: cuda is tried first for a batch-1 decode of at most "
                             f"{KVCACHE_LATENCY_CAPACITY} cache keys (faster per call on the decode suite)")
            elif kvcache_decode_sized(spec):
                notes.append(f"kvcache under auto: triton is tried before cuda for calls of at most {rows} (faster "
                             f"on the decode suite)")
            else:
                notes.append(f"kvcache under auto: cuda is tried first for calls of more than {rows} (faster on the "
                             f"chunked-prefill suite)")
    else:
        fwd, notes = _first((requested,), "forward", spec)
        if fwd is None:
            raise BackendUnavailableError(f"backend={requested!r} cannot serve this call: {notes[0]}")
    bwd, bwd_reason = None, ""
    if spec.mode != "kvcache":
        bwd, reasons = _first(_backward_candidates(fwd, requested, spec), "backward", spec)
        bwd_reason = "; ".join(reasons)
        if bwd is not None and bwd != fwd:
            notes.append(f"backward by {bwd} on the {fwd} forward's LSE ({bwd_reason})")
    else:
        bwd_reason = "flash_mha_with_kvcache is inference-only: no gradient"
    return Plan(spec=spec, forward=fwd, backward=bwd, backward_reason=bwd_reason, notes=tuple(notes))

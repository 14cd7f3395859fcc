"""Triton backend: FlashAttention-2 style kernels (``fa3jax.triton_kernels``) launched through jax-triton.

Dense mode only for now. The backward is deterministic by construction (no atomics: dK/dV and dQ come from
separate kernels that each own their output rows, and the GQA group is reduced in-kernel in a fixed order), so
``spec.deterministic`` needs no special path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ...spec import AttentionSpec
from ..base import Backend, DenseArgs
from . import plan as _plan
from . import tuning

__all__ = ["TritonBackend", "tuning"]

_AVAILABILITY: tuple[bool, str] | None = None
_ARCH: str | None = None


def _probe() -> tuple[bool, str, str]:
    try:
        platform = jax.default_backend()
    except Exception as e:  # noqa: BLE001 - availability must never raise
        return False, f"jax backend unavailable: {e}", ""
    if platform != "gpu":
        return False, f"no NVIDIA GPU (jax default backend is {platform})", ""
    try:
        dev = jax.devices()[0]
        version = str(getattr(dev.client, "platform_version", "")).lower()
        if "rocm" in version or "hip" in version:
            return False, f"not an NVIDIA GPU ({version})", ""
        cc = getattr(dev, "compute_capability", None)
        if cc is None:
            return False, "cannot read the GPU compute capability", ""
        major, minor = (int(x) for x in str(cc).split(".")[:2])
    except Exception as e:  # noqa: BLE001
        return False, f"cannot inspect the GPU: {e}", ""
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0", ""
    try:
        import triton  # noqa: F401
        import jax_triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - jax_triton raises ImportError subclasses and others
        return False, f"triton/jax_triton not importable: {e}", ""
    return True, "", f"sm{major}{minor}"


def _arch() -> str:
    global _AVAILABILITY, _ARCH
    if _AVAILABILITY is None:
        ok, reason, arch = _probe()
        _AVAILABILITY, _ARCH = (ok, reason), arch
    return _ARCH or "sm90"


def _offsets(spec: AttentionSpec, args):
    if not spec.has_offsets:
        return None
    if args is None or args.q_offset is None or args.k_offset is None:
        raise ValueError("triton: spec.has_offsets but DenseArgs carries no q_offset/k_offset")
    return jnp.stack([jnp.asarray(args.q_offset, jnp.int32).reshape(()),
                      jnp.asarray(args.k_offset, jnp.int32).reshape(())])


class TritonBackend(Backend):
    name = "triton"

    def availability(self) -> tuple[bool, str]:
        _arch()
        return _AVAILABILITY

    def check_forward(self, spec: AttentionSpec) -> None:
        reason = _plan.check(spec)
        if reason:
            raise NotImplementedError(reason)

    def check_backward(self, spec: AttentionSpec) -> None:
        self.check_forward(spec)

    def forward(self, spec: AttentionSpec, q, k, v, args: DenseArgs | None = None):
        from . import launch

        self.check_forward(spec)
        b, lq, hq, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim
        if b * lq * hq == 0:
            return (jnp.zeros((b, lq, hq, d), q.dtype), jnp.full((b, hq, lq), -jnp.inf, jnp.float32))
        if spec.seqlen_k == 0:  # no key anywhere: every row is empty
            return (jnp.zeros((b, lq, hq, d), q.dtype), jnp.full((b, hq, lq), -jnp.inf, jnp.float32))
        fwd = _plan.plan_forward(spec, _arch())
        arrays = {"q": q, "k": k, "v": v, "offsets": _offsets(spec, args)}
        out, lse = launch.call(fwd, arrays)
        return out, lse

    def backward(self, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args: DenseArgs | None = None):
        from . import launch

        self.check_backward(spec)
        if q.size == 0 or k.size == 0:
            return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
        pre, dkdv, dq = _plan.plan_backward(spec, _arch(), has_dlse=dlse is not None)
        arrays = {"q": q, "k": k, "v": v, "out": out, "dout": dout.astype(q.dtype),
                  "lse": lse.astype(jnp.float32), "offsets": _offsets(spec, args)}
        if dlse is not None:
            arrays["dlse"] = dlse.astype(jnp.float32)
        (arrays["delta"],) = launch.call(pre, arrays)
        dk_, dv_ = launch.call(dkdv, arrays)
        (dq_,) = launch.call(dq, arrays)
        return dq_, dk_, dv_

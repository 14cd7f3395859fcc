"""Triton backend: FlashAttention-2 style kernels (``fa3jax.triton_kernels``) launched through jax-triton.

Modes: dense and varlen (forward and backward), kvcache (split-KV decode + LSE combine); packed-sequence segment
ids in dense (forward and backward; not with ring offsets: an element mask in the kernels, ``flash_common``);
attention sinks in every mode (the forward kernels fold them into out/LSE; the backward needs nothing more, see
``backends.base``); a value head dim below the q/k one (MLA) in dense and varlen, forward and backward. The backward
is deterministic by construction (no atomics: dK/dV and dQ come from separate kernels that each own their output
rows, and the GQA group is reduced in-kernel in a fixed order), so ``spec.deterministic`` needs no special path.
Launch decisions live in the ``plan_*`` modules (pure Python, one per kernel family: ``plan_dense``,
``plan_varlen``, ``plan_decode``); this module maps arrays onto them and passes them the Tuning in force
(:func:`fa3jax.tuning.current`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ...spec import AttentionSpec
from ...tuning import current as _current_tuning
from ..base import Backend, DenseArgs, KVCacheArgs, VarlenArgs
from . import plan_decode, plan_dense, plan_varlen, tables

__all__ = ["TritonBackend", "tables"]

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


def _num_sms() -> int:
    """Streaming multiprocessors of the default GPU (the split-KV heuristic fills them)."""
    try:
        return int(getattr(jax.devices()[0], "core_count", 0)) or plan_decode.DEFAULT_NUM_SMS
    except Exception:  # noqa: BLE001 - a heuristic input, never a reason to fail
        return plan_decode.DEFAULT_NUM_SMS


def _empty(shape_out, dtype, shape_lse, spec: AttentionSpec, args, head_axis: int):
    """out 0 and lse -inf (with sinks: the head's sink, along ``head_axis`` of the LSE) for a call with no key."""
    lse = jnp.full(shape_lse, -jnp.inf, jnp.float32)
    if spec.has_sinks:
        shape = [1] * len(shape_lse)
        shape[head_axis] = shape_lse[head_axis]
        lse = jnp.broadcast_to(jnp.asarray(args.sinks, jnp.float32).reshape(shape), shape_lse)
    return jnp.zeros(shape_out, dtype), lse


def _arch() -> str:
    global _AVAILABILITY, _ARCH
    if _AVAILABILITY is None:
        ok, reason, arch = _probe()
        _AVAILABILITY, _ARCH = (ok, reason), arch
    return _ARCH or "sm90"


def _mask_arrays(spec: AttentionSpec, args) -> dict:
    """The dense kernels' runtime mask array (``plan_common.mask_group`` names it): ring offsets, or the segment
    ids as one int32 vector, all query ids then all key ids; nothing without either."""
    if spec.has_offsets:
        if args is None or args.q_offset is None or args.k_offset is None:
            raise ValueError("triton: spec.has_offsets but DenseArgs carries no q_offset/k_offset")
        return {"offsets": jnp.stack([jnp.asarray(args.q_offset, jnp.int32).reshape(()),
                                      jnp.asarray(args.k_offset, jnp.int32).reshape(())])}
    if spec.has_segment_ids:
        if args is None or args.q_segment_ids is None or args.k_segment_ids is None:
            raise ValueError("triton: spec.has_segment_ids but DenseArgs carries no segment ids")
        return {"segment_ids": jnp.concatenate([jnp.asarray(args.q_segment_ids, jnp.int32).reshape(-1),
                                                jnp.asarray(args.k_segment_ids, jnp.int32).reshape(-1)])}
    return {}


_CHECKS = {"dense": plan_dense.check, "varlen": plan_varlen.check, "kvcache": plan_decode.check}


class TritonBackend(Backend):
    name = "triton"

    def availability(self) -> tuple[bool, str]:
        _arch()
        return _AVAILABILITY

    def check_forward(self, spec: AttentionSpec) -> None:
        if spec.has_segment_ids and spec.mode != "dense":
            raise NotImplementedError(f"triton: segment ids in mode {spec.mode!r} (dense calls only)")
        check = _CHECKS.get(spec.mode)
        reason = f"triton: unknown mode {spec.mode!r}" if check is None else check(spec)
        if reason:
            raise NotImplementedError(reason)

    def check_backward(self, spec: AttentionSpec) -> None:
        if spec.mode == "kvcache":
            raise NotImplementedError("triton: kvcache is inference-only")
        self.check_forward(spec)

    def forward(self, spec: AttentionSpec, q, k, v, args=None):
        from . import launch

        self.check_forward(spec)
        if spec.mode == "varlen":
            return self._varlen_forward(spec, q, k, v, args)
        b, lq, hq, dv = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim_v
        if b * lq * hq == 0 or spec.seqlen_k == 0:  # no key anywhere: every row is empty
            return _empty((b, lq, hq, dv), q.dtype, (b, hq, lq), spec, args, 1)
        fwd = plan_dense.plan_forward(spec, _arch(), _current_tuning())
        arrays = {"q": q, "k": k, "v": v, **_mask_arrays(spec, args), **_sinks(spec, args)}
        out, lse = launch.call(fwd, arrays)
        return out, lse

    def backward(self, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args=None):
        from . import launch

        self.check_backward(spec)
        if q.size == 0 or k.size == 0:
            return jnp.zeros_like(q), jnp.zeros_like(k), jnp.zeros_like(v)
        arrays = {"q": q, "k": k, "v": v, "out": out, "dout": dout.astype(q.dtype), "lse": lse.astype(jnp.float32)}
        if dlse is not None:
            arrays["dlse"] = dlse.astype(jnp.float32)
        if spec.mode == "varlen":
            arrays.update(_varlen_arrays(args))
            pre, dkdv, dq = plan_varlen.plan_backward(spec, _arch(), _current_tuning(), has_dlse=dlse is not None)
        else:
            arrays.update(_mask_arrays(spec, args))
            pre, dkdv, dq = plan_dense.plan_backward(spec, _arch(), _current_tuning(), has_dlse=dlse is not None)
        (arrays["delta"],) = launch.call(pre, arrays)
        dk_, dv_ = launch.call(dkdv, arrays)
        (dq_,) = launch.call(dq, arrays)
        return dq_, dk_, dv_

    def _varlen_forward(self, spec: AttentionSpec, q, k, v, args: VarlenArgs):
        from . import launch

        total_q, hq, dv = spec.seqlen_q, spec.num_heads_q, spec.head_dim_v
        if total_q * hq == 0 or spec.seqlen_k == 0:
            return _empty((total_q, hq, dv), q.dtype, (hq, total_q), spec, args, 0)
        arrays = {"q": q, "k": k, "v": v, **_varlen_arrays(args), **_sinks(spec, args)}
        return launch.call(plan_varlen.plan_forward(spec, _arch(), _current_tuning()), arrays)

    def kvcache_forward(self, spec: AttentionSpec, q, k_cache, v_cache, args: KVCacheArgs):
        from . import launch

        self.check_forward(spec)
        b, lq, hq, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim
        if b * lq * hq == 0 or spec.kvcache.capacity == 0:
            return _empty((b, lq, hq, d), q.dtype, (b, hq, lq), spec, args, 1)
        arrays = {"q": q, "k_cache": k_cache, "v_cache": v_cache, **_sinks(spec, args)}
        # The stand-ins for absent optional arrays are never read by the kernels (their HAS_* flag is off).
        for name in ("seqlens_k", "cache_seqlens", "leftpad", "batch_idx", "page_table"):
            x = getattr(args, name)
            if x is not None:
                arrays[name] = jnp.asarray(x, jnp.int32)
        if args.k_new is not None:
            arrays["k_new"], arrays["v_new"] = args.k_new.astype(q.dtype), args.v_new.astype(q.dtype)
        for launch_ in plan_decode.plan_forward(spec, _arch(), num_sms=_num_sms(), tune=_current_tuning()):
            outs = launch.call(launch_, arrays)
            arrays.update({name: x for (name, _, _), x in zip(launch_.outputs, outs)})
        return arrays["out"], arrays["lse"]


def _sinks(spec: AttentionSpec, args) -> dict:
    if not spec.has_sinks:
        return {}
    if args is None or args.sinks is None:
        raise ValueError("triton: spec.has_sinks but the args carry no sinks")
    return {"sinks": jnp.asarray(args.sinks, jnp.float32)}


def _varlen_arrays(args: VarlenArgs) -> dict:
    arrays = {"cu_seqlens_q": jnp.asarray(args.cu_seqlens_q, jnp.int32),
              "cu_seqlens_k": jnp.asarray(args.cu_seqlens_k, jnp.int32)}
    if args.seqused_k is not None:
        arrays["seqused_k"] = jnp.asarray(args.seqused_k, jnp.int32)
    return arrays

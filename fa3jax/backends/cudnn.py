"""cuDNN backend: the fused flash-attention kernels that ship inside jaxlib, i.e. what
``jax.nn.dot_product_attention(..., implementation="cudnn")`` runs, registered for the dense calls whose
semantics they reproduce exactly.

What it serves (everything else raises ``NotImplementedError`` with the reason, so ``auto`` moves on):
dense mode, bf16/fp16, NVIDIA sm80+; head_dim a multiple of 8 up to 128 (256 from sm90 on), the checks of
``jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention``; GQA/MQA; no mask; causal or a sliding
window ending at the diagonal (``window=(left, 0)``) only when ``seqlen_q == seqlen_k``, because cuDNN aligns
masks top-left and fa3jax bottom-right (:mod:`fa3jax.masking`); the two agree only on a square score matrix.
No softcap, sinks, segment ids, ring offsets, MLA or empty sequences.

How it fits the one custom VJP (:mod:`fa3jax.vjp`), which saves ``(q, k, v, out, lse)`` after the forward and
hands the backward ``dout`` and ``dlse``:

* **Forward** calls jax's cuDNN entry point (``fused_attention_stablehlo.dot_product_attention``, the function
  ``jax.nn.dot_product_attention`` calls) with ``return_residual=True``. That is cuDNN's training forward, whose
  second output is the softmax statistic the cuDNN backward consumes: the natural-log LSE of the scaled scores,
  float32 ``(b, hq, lq)``, i.e. exactly our LSE, at no extra cost. (``jax.nn`` would cast it to the input dtype,
  which is why we call one level below it.) So the LSE is always produced, ``return_softmax_lse`` needs no
  special planning, and the registry may pair this forward with another backend's backward (e.g. for
  ``deterministic=True``) on the same terms as the cuda backend.
* **Backward** is cuDNN's own backward kernel, fed the saved ``out`` and ``lse`` as its residuals (binding jax's
  backward primitive, so nothing is recomputed). jax names that primitive privately; when the installed jax's
  signature differs from the one bound here, the backend falls back to ``jax.vjp`` of the forward (cuDNN's
  gradients after a recomputed forward). Both give cuDNN's gradients for the output's cotangent only.
* **The LSE cotangent**: cuDNN's backward ignores one (jax's rule drops it). Its contribution is
  ``ds_ij = p_ij * dlse_i``, i.e. ``dq_i += scale * dlse_i * sum_j p_ij k_j`` and
  ``dk_j += scale * sum_i p_ij dlse_i q_i``: one more cuDNN forward with ``v = k`` (gives ``sum_j p_ij k_j``)
  and its backward with ``dout = dlse * q`` (its ``dv`` is ``sum_i p_ij dlse_i q_i``). That pair runs under a
  ``lax.cond`` on ``any(dlse != 0)``, so calls that do not differentiate through the LSE (the usual case) pay
  only the test.
* ``deterministic=True``: cuDNN's backward accumulates dQ with atomics unless XLA runs with its deterministic
  flags, so this backend refuses the backward then, and the registry pairs its forward with the next
  deterministic backward (triton, else xla) on cuDNN's LSE.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import jax
import jax.extend
import jax.numpy as jnp
from jax import lax

from ..spec import AttentionSpec
from .base import Backend

_DTYPES = ("bfloat16", "float16")
_MIN_CC = (8, 0)
# operand and parameter names of jax's cuDNN backward primitive, in binding order (jax 0.6 -- 0.10 at least)
_BWD_OPERANDS = ("query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets",
                 "page_table_k", "page_table_v", "activation", "fwd_output", "grad_output")
_BWD_PARAMS = ("scale", "seed", "dropout_rate", "variadic_args", "mask_type", "layout", "sliding_window_length")
_FWD_KEYWORDS = ("scale", "mask_type", "sliding_window_length", "return_residual")


@functools.lru_cache(maxsize=None)
def _jax_cudnn():
    """(jax's cuDNN attention module, '') or (None, reason). Never raises."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fas
    except Exception as e:  # noqa: BLE001 - a jax without the module makes the backend unavailable
        return None, f"cudnn: jax {jax.__version__} has no cuDNN attention module: {type(e).__name__}: {e}"
    try:
        params = inspect.signature(fas.dot_product_attention).parameters
        missing = [p for p in _FWD_KEYWORDS if p not in params]
        missing += [n for n in ("MaskType", "check_cudnn_version") if not hasattr(fas, n)]
    except Exception as e:  # noqa: BLE001
        return None, f"cudnn: cannot inspect jax's cuDNN attention: {type(e).__name__}: {e}"
    if missing:
        return None, f"cudnn: jax {jax.__version__}'s cuDNN attention lacks {missing}"
    return fas, ""


@functools.lru_cache(maxsize=None)
def direct_backward() -> bool:
    """Whether the installed jax's cuDNN backward primitive has the signature bound here (else the backward goes
    through ``jax.vjp`` of the forward, recomputing it)."""
    fas, _ = _jax_cudnn()
    try:
        names = tuple(inspect.signature(fas._dot_product_attention_bwd_impl).parameters)
        return (names == _BWD_OPERANDS + _BWD_PARAMS and hasattr(fas, "_dot_product_attention_bwd_p_wrapper")
                and hasattr(fas, "AttentionLayout"))
    except Exception:  # noqa: BLE001
        return False


def _parse_cc(cc) -> Optional[tuple]:
    try:
        major, minor = str(cc).split(".")[:2]
        return int(major), int(minor)
    except (ValueError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _device_cc() -> Optional[tuple]:
    """Compute capability of the default device, or None when it is not an NVIDIA GPU. Never raises."""
    try:
        if jax.default_backend() != "gpu":
            return None
        return _parse_cc(getattr(jax.devices()[0], "compute_capability", None))
    except Exception:  # noqa: BLE001
        return None


def head_dim_limit(cc: Optional[tuple]) -> int:
    """cuDNN's largest flash-attention head dim on compute capability ``cc`` (jax's check: 256 from sm90 on)."""
    return 256 if cc is not None and cc >= (9, 0) else 128


def mask_args(spec: AttentionSpec):
    """(mask_type, sliding_window_length) for jax's cuDNN call that reproduces ``spec.window`` exactly, or
    NotImplementedError. cuDNN's causal mask and window are aligned top-left (query i sees keys
    ``i - sliding_window_length < j <= i``), ours bottom-right: equal only when seqlen_q == seqlen_k."""
    fas, reason = _jax_cudnn()
    if fas is None:
        raise NotImplementedError(reason)
    w, lq, lk = spec.window, spec.seqlen_q, spec.seqlen_k
    if w.is_full:
        return fas.MaskType.NO_MASK, None
    if lq != lk:
        raise NotImplementedError(
            f"cudnn: cuDNN aligns causal masks and windows top-left, fa3jax bottom-right; they agree only when "
            f"seqlen_q == seqlen_k (got window={tuple(w)}, seqlen_q={lq}, seqlen_k={lk})")
    if w.right != 0:
        raise NotImplementedError(
            f"cudnn: cuDNN's sliding window ends at the diagonal; only causal windows (left, 0) map onto it "
            f"(got window={tuple(w)})")
    if w.left < 0 or w.left >= lk - 1:  # the window reaches key 0 from every query: plain causal
        return fas.MaskType.CAUSAL, None
    return fas.MaskType.CAUSAL, w.left + 1


class CudnnBackend(Backend):
    name = "cudnn"

    def __init__(self, compute_capability: Optional[tuple] = None):
        """``compute_capability`` (e.g. ``(9, 0)``) overrides the device's for the head-dim limit (tests)."""
        self._cc = compute_capability

    def _cc_now(self) -> Optional[tuple]:
        return self._cc if self._cc is not None else _device_cc()

    def availability(self) -> tuple[bool, str]:
        try:
            fas, reason = _jax_cudnn()
            if fas is None:
                return False, reason
            platform = jax.default_backend()
            if platform != "gpu":
                return False, f"cudnn: JAX default backend is {platform!r}, not 'gpu'"
            dev = jax.devices()[0]
            version = str(jax.extend.backend.get_backend().platform_version)  # what jax's own cc checks read
            cc = _parse_cc(getattr(dev, "compute_capability", None))
            if cc is None or "cuda" not in version.lower():
                return False, f"cudnn: needs an NVIDIA GPU with CUDA; found {dev.device_kind} ({version or platform})"
            if cc < _MIN_CC:
                return False, (f"cudnn: cuDNN flash attention needs compute capability >= 8.0 (sm80); found "
                               f"{cc[0]}.{cc[1]} ({dev.device_kind})")
            try:
                cudnn = int(fas.check_cudnn_version())
            except Exception as e:  # noqa: BLE001
                return False, f"cudnn: jaxlib does not see cuDNN: {type(e).__name__}: {e}"
            if cc == (10, 3) and cudnn < 91100:  # jax's own check
                return False, f"cudnn: compute capability 10.3 needs cuDNN >= 9.11; found {cudnn}"
            return True, ""
        except Exception as e:  # noqa: BLE001 - availability never raises
            return False, f"cudnn: availability check failed: {type(e).__name__}: {e}"

    def check_forward(self, spec: AttentionSpec) -> None:
        if spec.mode != "dense":
            raise NotImplementedError(f"cudnn: only dense calls are served (got mode {spec.mode!r})")
        if spec.dtype not in _DTYPES:
            raise NotImplementedError(f"cudnn: dtype {spec.dtype} not supported (bfloat16, float16 only)")
        if spec.has_sinks:
            raise NotImplementedError("cudnn: attention sinks are not supported")
        if spec.head_dim_v != spec.head_dim:
            raise NotImplementedError(f"cudnn: a value head dim different from the q/k one (MLA) is not served; "
                                      f"got head_dim_v={spec.head_dim_v}, head_dim={spec.head_dim}")
        if spec.softcap > 0:
            raise NotImplementedError(f"cudnn: softcap is not supported (got softcap={spec.softcap})")
        if spec.has_offsets:
            raise NotImplementedError("cudnn: ring-attention block offsets are not supported")
        if spec.has_segment_ids:
            raise NotImplementedError("cudnn: segment ids (packed sequences) are not supported")
        if spec.seqlen_q < 1 or spec.seqlen_k < 1:
            raise NotImplementedError(f"cudnn: empty sequences are not supported (got seqlen_q={spec.seqlen_q}, "
                                      f"seqlen_k={spec.seqlen_k})")
        cc = self._cc_now()
        limit = head_dim_limit(cc)
        if spec.head_dim % 8 or spec.head_dim > limit:
            where = "sm90+" if limit == 256 else "before sm90" if cc is not None else "without a known GPU"
            raise NotImplementedError(f"cudnn: head_dim must be a multiple of 8 and <= {limit} ({where}); "
                                      f"got head_dim={spec.head_dim}")
        mask_args(spec)

    def check_backward(self, spec: AttentionSpec) -> None:
        self.check_forward(spec)
        if spec.deterministic:
            raise NotImplementedError("cudnn: the cuDNN backward is not bitwise deterministic (atomic dQ "
                                      "accumulation); deterministic=True takes another backward")

    # ------------------------------------------------------------------------------------------- kernels
    def _attend(self, spec: AttentionSpec, q, k, v):
        """cuDNN's training forward: (out like q, lse float32 (b, hq, lq))."""
        fas, _ = _jax_cudnn()
        mask_type, window = mask_args(spec)
        out, lse = fas.dot_product_attention(q, k, v, scale=float(spec.softmax_scale), mask_type=mask_type,
                                             sliding_window_length=window, return_residual=True)
        return out, lse

    def _grads(self, spec: AttentionSpec, q, k, v, out, lse, dout):
        """cuDNN's backward for the output cotangent alone, on the residuals (out, lse)."""
        fas, _ = _jax_cudnn()
        mask_type, window = mask_args(spec)
        if not direct_backward():
            _, pull = jax.vjp(lambda q, k, v: self._attend(spec, q, k, v)[0], q, k, v)
            return pull(dout)
        unused = jnp.zeros((0,), q.dtype)
        dq, dk, dv = fas._dot_product_attention_bwd_p_wrapper.bind(
            q, k, v, unused, unused, unused, unused, unused, unused, unused, lse, out, dout,
            scale=float(spec.softmax_scale), seed=42, dropout_rate=0.0, variadic_args=(False, False),
            mask_type=mask_type, layout=fas.AttentionLayout.BTNH.value, sliding_window_length=window)
        return dq, dk, dv

    def _lse_grads(self, spec: AttentionSpec, q, k, dlse):
        """(dq, dk) float32 of ``sum(dlse * lse)``: ``ds_ij = p_ij dlse_i`` through one cuDNN forward with v = k
        (``sum_j p_ij k_j``) and its backward with dout = dlse * q (whose dv is ``sum_i p_ij dlse_i q_i``)."""
        w = jnp.swapaxes(dlse, 1, 2)[..., None]  # (b, lq, hq, 1)
        pk, lse_k = self._attend(spec, q, k, k)
        _, _, dk_t = self._grads(spec, q, k, k, pk, lse_k, (w * q.astype(jnp.float32)).astype(q.dtype))
        scale = spec.softmax_scale
        return scale * w * pk.astype(jnp.float32), scale * dk_t.astype(jnp.float32)

    def forward(self, spec: AttentionSpec, q, k, v, args):
        self.check_forward(spec)
        return self._attend(spec, q, k, v)

    def backward(self, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args):
        self.check_backward(spec)
        dq, dk, dv = self._grads(spec, q, k, v, out, lse, dout)

        def with_lse(dq, dk):
            dq_l, dk_l = self._lse_grads(spec, q, k, dlse)
            return (dq.astype(jnp.float32) + dq_l).astype(dq.dtype), (dk.astype(jnp.float32) + dk_l).astype(dk.dtype)

        dq, dk = lax.cond(jnp.any(dlse != 0), with_lse, lambda dq, dk: (dq, dk), dq, dk)
        return dq, dk, dv

"""Launch plans of the varlen (packed) forward kernel, ``triton_kernels/flash_varlen.py``.

Array names: q k v cu_seqlens_q cu_seqlens_k seqused_k (int32). Outputs: out (total_q, hq, d) in the input dtype,
lse (hq, total_q) float32. Every output element is written by the kernel (uncovered q rows get 0 / -inf).
No jax, no triton import here.
"""
from __future__ import annotations

import math
from typing import Optional

from ...spec import AttentionSpec
from . import tables
from .plan import Launch, _common_constexprs, _fit, _fwd_variant_constexprs, _reverse_m, score_scales


def check(spec: AttentionSpec) -> Optional[str]:
    """Reason the varlen kernel cannot serve ``spec`` (None if it can)."""
    if spec.mode != "varlen" or spec.varlen is None:
        return "triton varlen: not a varlen spec"
    if spec.has_offsets:
        return "triton varlen: ring offsets not supported"
    if spec.dtype not in ("float16", "bfloat16"):
        return f"triton varlen: dtype {spec.dtype} not supported (float16/bfloat16 only)"
    if not 1 <= spec.head_dim <= 256:
        return f"triton varlen: head_dim {spec.head_dim} outside [1, 256]"
    if spec.num_heads_k < 1 or spec.num_heads_q % spec.num_heads_k:
        return "triton varlen: num_heads_q must be a multiple of num_heads_k"
    if spec.num_heads_q > 65535 or spec.batch + 1 > 65535:
        return "triton varlen: more than 65535 heads or sequences (grid limit)"
    if spec.seqlen_q * spec.num_heads_q * max(spec.head_dim, 1) >= 2 ** 31:
        return "triton varlen: total_q * hq * d >= 2^31"
    return None


def plan_forward(spec: AttentionSpec, arch: str = "sm90", overrides: Optional[dict] = None) -> Launch:
    """``overrides``: {"fwd": (block_m, block_n, num_warps, num_stages)} (tests force small tiles)."""
    vs = spec.varlen
    cfg = tables.lookup_varlen_fwd(spec.head_dim, spec.dtype, spec.causal, arch)
    if overrides and "fwd" in overrides:
        cfg = tables.TileConfig(*overrides["fwd"])
    cfg = _fit(cfg, max(vs.max_seqlen_q, 1), max(vs.max_seqlen_k, 1))
    total_q, hq, d = spec.seqlen_q, spec.num_heads_q, spec.head_dim
    scale_in, scale_out = score_scales(spec)
    args = (("array", "q"), ("array", "k"), ("array", "v"), ("array", "cu_seqlens_q"), ("array", "cu_seqlens_k"),
            # Without seqused_k the kernel never reads this pointer; cu_seqlens_k stands in.
            ("array", "seqused_k" if vs.has_seqused_k else "cu_seqlens_k"),
            ("i32", total_q), ("i32", spec.batch), ("f32", scale_in), ("f32", scale_out))
    meta = _common_constexprs(spec) + [("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n)]
    meta += [("MASK", (int(spec.window.left), int(spec.window.right), bool(spec.softcap > 0.0), False)),
             ("HAS_SEQUSED", bool(vs.has_seqused_k)),
             ("REVERSE_M", _reverse_m(spec))] + _fwd_variant_constexprs(spec, cfg)
    # max(1, ...): with max_seqlen_q == 0 the uncovered-row slice still needs programs.
    grid_m = max(1, math.ceil(vs.max_seqlen_q / cfg.block_m))
    return Launch(
        module="flash_varlen", kernel="_varlen_attn_fwd", args=args,
        outputs=(("out", (total_q, hq, d), spec.dtype), ("lse", (hq, total_q), "float32")),
        grid=(grid_m, hq, spec.batch + 1), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=tuple(meta))

"""Launch plans of the varlen (packed) kernels: forward ``flash_varlen._varlen_attn_fwd``, backward
``flash_varlen_bwd`` (after the dense preprocess).

Array names: q k v sinks out dout lse dlse cu_seqlens_q cu_seqlens_k seqused_k (int32), then delta from the
preprocess. Outputs: out (total_q, hq, dv) in the input dtype (dv = spec.head_dim_v), lse (hq, total_q) float32;
delta (hq, total_q) float32; dk (total_k, hk, d), dv (total_k, hk, dv) and dq (total_q, hq, d) in the input dtype.
sinks float32 (hq,): forward only. Every output element is written by the kernels
(uncovered q rows get 0 / -inf, rows outside every sequence or past seqused_k get zero gradients), so no output
needs a pre-fill. No jax, no triton import here.
"""
from __future__ import annotations

import math
from typing import Optional

from ...spec import AttentionSpec
from ...tuning import DEFAULT, Tuning
from . import tables
from .plan_common import (GRID_LIMIT, Launch, fit, fwd_variant_constexprs, mask_group, preprocess_launch,
                          reverse_m, reverse_n, score_scales, shape_constexprs, sinks_group, tile,
                          unsupported_dtype)


def check(spec: AttentionSpec) -> Optional[str]:
    """Reason the varlen kernels cannot serve ``spec`` (None if they can); validation already holds the rest."""
    if spec.mode != "varlen" or spec.varlen is None:
        return "triton varlen: not a varlen spec"
    if spec.has_offsets:
        return "triton varlen: ring offsets not supported"
    if spec.num_heads_q > GRID_LIMIT or spec.batch + 1 > GRID_LIMIT:
        return f"triton varlen: more than {GRID_LIMIT} heads or sequences (grid limit)"
    if spec.seqlen_q * spec.num_heads_q * spec.head_dim >= 2 ** 31:
        return "triton varlen: total_q * hq * d >= 2^31"
    return unsupported_dtype(spec, "varlen")


def _sequence_args(spec: AttentionSpec) -> list[tuple[str, str]]:
    # Without seqused_k the kernels never read this pointer; cu_seqlens_k stands in.
    return [("array", "cu_seqlens_q"), ("array", "cu_seqlens_k"),
            ("array", "seqused_k" if spec.varlen.has_seqused_k else "cu_seqlens_k")]


def plan_forward(spec: AttentionSpec, arch: str = "sm90", tune: Tuning = DEFAULT) -> Launch:
    vs = spec.varlen
    cfg = tile(tune, "fwd", tables.lookup_varlen_fwd(spec.head_dim, spec.dtype, spec.causal, arch))
    cfg = fit(cfg, max(vs.max_seqlen_q, 1), max(vs.max_seqlen_k, 1))
    total_q, hq, dv = spec.seqlen_q, spec.num_heads_q, spec.head_dim_v
    scale_in, scale_out = score_scales(spec)
    mask_args, mask_meta = mask_group(spec)
    sinks_arg, sinks_meta = sinks_group(spec, "q")
    args = [("array", "q"), ("array", "k"), ("array", "v"), sinks_arg, *_sequence_args(spec), *mask_args,
            ("i32", total_q), ("i32", spec.batch), ("f32", scale_in), ("f32", scale_out)]
    meta = shape_constexprs(spec) + [("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n)]
    meta += mask_meta + [("HAS_SEQUSED", bool(vs.has_seqused_k)), ("REVERSE_M", reverse_m(spec))]
    meta += fwd_variant_constexprs(spec, cfg) + [sinks_meta]
    # max(1, ...): with max_seqlen_q == 0 the uncovered-row slice still needs programs.
    grid_m = max(1, math.ceil(vs.max_seqlen_q / cfg.block_m))
    return Launch(
        module="flash_varlen", kernel="_varlen_attn_fwd", args=tuple(args),
        outputs=(("out", (total_q, hq, dv), spec.dtype), ("lse", (hq, total_q), "float32")),
        grid=(grid_m, hq, spec.batch + 1), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=tuple(meta))


def plan_backward(spec: AttentionSpec, arch: str = "sm90", tune: Tuning = DEFAULT,
                  has_dlse: bool = True) -> tuple[Launch, Launch, Launch]:
    """(preprocess, dkdv, dq)."""
    vs = spec.varlen
    cfgs = tables.lookup(spec.head_dim, spec.dtype, spec.causal, arch)
    mq, mk = max(vs.max_seqlen_q, 1), max(vs.max_seqlen_k, 1)
    total_q, total_k, hq, hk, d = spec.seqlen_q, spec.seqlen_k, spec.num_heads_q, spec.num_heads_k, spec.head_dim
    pre_cfg = fit(tile(tune, "bwd_pre", cfgs.bwd_pre), total_q, total_k)
    kv_cfg = fit(tile(tune, "bwd_dkdv", cfgs.bwd_dkdv), mq, mk)
    q_cfg = fit(tile(tune, "bwd_dq", cfgs.bwd_dq), mq, mk)
    scale_in, scale_out = score_scales(spec)
    pre = preprocess_launch(spec, pre_cfg, 1, total_q, has_dlse, (hq, total_q))

    mask_args, mask_meta = mask_group(spec)
    arrays = [("array", n) for n in ("q", "k", "v", "dout", "lse", "delta")] + _sequence_args(spec) + mask_args
    scales = [("f32", scale_in), ("f32", scale_out), ("f32", spec.softmax_scale)]
    mask_meta = mask_meta + [("HAS_SEQUSED", bool(vs.has_seqused_k))]
    # max(1, ...): with max_seqlen == 0 the extra slice (rows outside every sequence) still needs programs.
    dkdv = Launch(
        module="flash_varlen_bwd", kernel="_varlen_bwd_dkdv",
        args=tuple(arrays + [("i32", total_q), ("i32", total_k), ("i32", spec.batch)] + scales),
        outputs=(("dk", (total_k, hk, d), spec.dtype), ("dv", (total_k, hk, spec.head_dim_v), spec.dtype)),
        grid=(max(1, math.ceil(vs.max_seqlen_k / kv_cfg.block_n)), hk, spec.batch + 1),
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        constexprs=tuple(shape_constexprs(spec) + [("BLOCK_M", kv_cfg.block_m), ("BLOCK_N", kv_cfg.block_n)]
                         + mask_meta + [("REVERSE_N", reverse_n(spec)), ("OVERLAP", bool(kv_cfg.overlap))]))
    dq = Launch(
        module="flash_varlen_bwd", kernel="_varlen_bwd_dq",
        args=tuple(arrays + [("i32", total_q), ("i32", spec.batch)] + scales),
        outputs=(("dq", (total_q, hq, d), spec.dtype),),
        grid=(max(1, math.ceil(vs.max_seqlen_q / q_cfg.block_m)), hq, spec.batch + 1),
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        constexprs=tuple(shape_constexprs(spec) + [("BLOCK_M", q_cfg.block_m), ("BLOCK_N", q_cfg.block_n)]
                         + mask_meta + [("REVERSE_M", reverse_m(spec))]))
    return pre, dkdv, dq

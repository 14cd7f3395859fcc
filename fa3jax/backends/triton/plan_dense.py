"""Launch plans of the dense kernels: forward ``flash_fwd._attn_fwd``, backward ``flash_bwd`` (preprocess, dK/dV,
dQ).

Array names: q k v sinks out dout lse dlse offsets segment_ids, then delta from the preprocess. Layouts: q (B, Lq,
HQ, D), k (B, Lk, HK, D), v (B, Lk, HK, DV), out (B, Lq, HQ, DV) with DV = spec.head_dim_v, lse/delta float32 (B, HQ,
Lq), sinks float32 (HQ,) (forward only: the backward needs no sink), segment_ids int32 (B * Lq + B * Lk,): the query
ids then the key ids, each flattened (``plan_common.mask_group``). No jax, no triton import here.
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
    """Reason the dense kernels cannot serve ``spec`` (None if they can); validation already holds the rest."""
    if spec.mode != "dense":
        return f"triton: mode {spec.mode!r} not served by the dense plan"
    if spec.num_heads_q > GRID_LIMIT or spec.batch > GRID_LIMIT:
        return f"triton: more than {GRID_LIMIT} heads or batch rows (grid limit)"
    if spec.has_segment_ids and spec.has_offsets:
        return "triton: segment ids together with ring offsets (a sequence-parallel block) are not supported"
    return unsupported_dtype(spec, "dense")


def configs(spec: AttentionSpec, arch: str, tune: Tuning = DEFAULT) -> tables.KernelConfigs:
    """The table's tiles for ``spec`` (or the ones ``tune`` forces), shrunk to the problem."""
    cfgs = tables.lookup(spec.head_dim, spec.dtype, spec.causal, arch)
    lq, lk = spec.seqlen_q, spec.seqlen_k
    return tables.KernelConfigs(*(fit(tile(tune, name, getattr(cfgs, name)), lq, lk)
                                  for name in tables.KernelConfigs._fields))


def plan_forward(spec: AttentionSpec, arch: str = "sm90", tune: Tuning = DEFAULT) -> Launch:
    cfg = configs(spec, arch, tune).fwd
    b, lq, hq, dv = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim_v
    scale_in, scale_out = score_scales(spec)
    mask_args, mask_meta = mask_group(spec)
    sinks_arg, sinks_meta = sinks_group(spec, "q")
    args = [("array", "q"), ("array", "k"), ("array", "v"), sinks_arg, *mask_args,
            ("i32", spec.seqlen_q), ("i32", spec.seqlen_k), ("f32", scale_in), ("f32", scale_out)]
    meta = shape_constexprs(spec) + [("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n)]
    meta += mask_meta + [("REVERSE_M", reverse_m(spec))] + fwd_variant_constexprs(spec, cfg) + [sinks_meta]
    return Launch(
        module="flash_fwd", kernel="_attn_fwd", args=tuple(args),
        outputs=(("out", (b, lq, hq, dv), spec.dtype), ("lse", (b, hq, lq), "float32")),
        grid=(math.ceil(lq / cfg.block_m), hq, b), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=tuple(meta))


def plan_backward(spec: AttentionSpec, arch: str = "sm90", tune: Tuning = DEFAULT,
                  has_dlse: bool = True) -> tuple[Launch, Launch, Launch]:
    """(preprocess, dkdv, dq)."""
    cfgs = configs(spec, arch, tune)
    b, lq, lk, hq, hk, d = (spec.batch, spec.seqlen_q, spec.seqlen_k, spec.num_heads_q, spec.num_heads_k,
                            spec.head_dim)
    scale_in, scale_out = score_scales(spec)
    pre = preprocess_launch(spec, cfgs.bwd_pre, b, lq, has_dlse, (b, hq, lq))
    mask_args, mask_meta = mask_group(spec)
    args = [("array", n) for n in ("q", "k", "v", "dout", "lse", "delta")] + mask_args
    args += [("i32", lq), ("i32", lk), ("f32", scale_in), ("f32", scale_out), ("f32", spec.softmax_scale)]
    kv_cfg, q_cfg = cfgs.bwd_dkdv, cfgs.bwd_dq
    dkdv = Launch(
        module="flash_bwd", kernel="_bwd_dkdv", args=tuple(args),
        outputs=(("dk", (b, lk, hk, d), spec.dtype), ("dv", (b, lk, hk, spec.head_dim_v), spec.dtype)),
        grid=(math.ceil(lk / kv_cfg.block_n), hk, b), num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        constexprs=tuple(shape_constexprs(spec) + [("BLOCK_M", kv_cfg.block_m), ("BLOCK_N", kv_cfg.block_n)]
                         + mask_meta + [("REVERSE_N", reverse_n(spec)), ("OVERLAP", bool(kv_cfg.overlap))]))
    dq = Launch(
        module="flash_bwd", kernel="_bwd_dq", args=tuple(args),
        outputs=(("dq", (b, lq, hq, d), spec.dtype),),
        grid=(math.ceil(lq / q_cfg.block_m), hq, b), num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        constexprs=tuple(shape_constexprs(spec) + [("BLOCK_M", q_cfg.block_m), ("BLOCK_N", q_cfg.block_n)]
                         + mask_meta + [("REVERSE_M", reverse_m(spec))]))
    return pre, dkdv, dq

"""Launch plans of the varlen (packed) backward kernels, ``triton_kernels/flash_varlen_bwd.py``.

``plan_varlen.check`` decides whether a spec can be served (same limits as the forward).

Array names: q k v out dout lse dlse cu_seqlens_q cu_seqlens_k seqused_k (int32), then delta from the preprocess.
Outputs: delta (hq, total_q) float32; dk, dv (total_k, hk, d) and dq (total_q, hq, d) in the input dtype. Every
dq/dk/dv element is written by the kernels (rows outside every sequence or past seqused_k get 0), so no output
needs a pre-fill. No jax, no triton import here.
"""
from __future__ import annotations

import math
from typing import Optional

from ...spec import AttentionSpec
from . import tables
from .plan import Launch, _common_constexprs, _fit, _reverse_m, _reverse_n, score_scales


def plan_backward(spec: AttentionSpec, arch: str = "sm90", overrides: Optional[dict] = None,
                  has_dlse: bool = True) -> tuple[Launch, Launch, Launch]:
    """(preprocess, dkdv, dq). ``overrides`` maps "bwd_pre"/"bwd_dkdv"/"bwd_dq" to (block_m, block_n, warps,
    stages) (tests force small tiles)."""
    vs = spec.varlen
    cfgs = tables.lookup(spec.head_dim, spec.dtype, spec.causal, arch)
    if overrides:
        cfgs = cfgs._replace(**{k: tables.TileConfig(*v) for k, v in overrides.items()})
    mq, mk = max(vs.max_seqlen_q, 1), max(vs.max_seqlen_k, 1)
    pre_cfg = _fit(cfgs.bwd_pre, spec.seqlen_q, spec.seqlen_k)
    kv_cfg = _fit(cfgs.bwd_dkdv, mq, mk)
    q_cfg = _fit(cfgs.bwd_dq, mq, mk)
    total_q, total_k, hq, hk, d = spec.seqlen_q, spec.seqlen_k, spec.num_heads_q, spec.num_heads_k, spec.head_dim
    scale_in, scale_out = score_scales(spec)

    # The dense preprocess with batch 1 and seqlen_q = total_q: its delta layout (1, hq, total_q) is (hq, total_q).
    pre = Launch(
        module="flash_bwd", kernel="_bwd_preprocess",
        args=(("array", "out"), ("array", "dout"), ("array", "dlse" if has_dlse else "out"), ("i32", total_q)),
        outputs=(("delta", (hq, total_q), "float32"),),
        grid=(max(1, math.ceil(total_q / pre_cfg.block_m)), hq, 1),
        num_warps=pre_cfg.num_warps, num_stages=pre_cfg.num_stages,
        constexprs=(("NUM_HEADS_Q", hq), ("HEAD_DIM", d), ("HEAD_DIM_PAD", tables.head_dim_pad(d)),
                    ("BLOCK_M", pre_cfg.block_m), ("HAS_DLSE", bool(has_dlse))))

    arrays = [("array", n) for n in ("q", "k", "v", "dout", "lse", "delta", "cu_seqlens_q", "cu_seqlens_k")]
    # Without seqused_k the kernels never read this pointer; cu_seqlens_k stands in.
    arrays += [("array", "seqused_k" if vs.has_seqused_k else "cu_seqlens_k")]
    scales = [("f32", scale_in), ("f32", scale_out), ("f32", spec.softmax_scale)]
    mask_meta = [("MASK", (int(spec.window.left), int(spec.window.right), bool(spec.softcap > 0.0), False)),
                 ("HAS_SEQUSED", bool(vs.has_seqused_k))]
    # max(1, ...): with max_seqlen == 0 the extra slice (rows outside every sequence) still needs programs.
    dkdv = Launch(
        module="flash_varlen_bwd", kernel="_varlen_bwd_dkdv",
        args=tuple(arrays + [("i32", total_q), ("i32", total_k), ("i32", spec.batch)] + scales),
        outputs=(("dk", (total_k, hk, d), spec.dtype), ("dv", (total_k, hk, d), spec.dtype)),
        grid=(max(1, math.ceil(vs.max_seqlen_k / kv_cfg.block_n)), hk, spec.batch + 1),
        num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        constexprs=tuple(_common_constexprs(spec) + [("BLOCK_M", kv_cfg.block_m), ("BLOCK_N", kv_cfg.block_n)]
                         + mask_meta + [("REVERSE_N", _reverse_n(spec)), ("OVERLAP", bool(kv_cfg.overlap))]))
    dq = Launch(
        module="flash_varlen_bwd", kernel="_varlen_bwd_dq",
        args=tuple(arrays + [("i32", total_q), ("i32", spec.batch)] + scales),
        outputs=(("dq", (total_q, hq, d), spec.dtype),),
        grid=(max(1, math.ceil(vs.max_seqlen_q / q_cfg.block_m)), hq, spec.batch + 1),
        num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        constexprs=tuple(_common_constexprs(spec) + [("BLOCK_M", q_cfg.block_m), ("BLOCK_N", q_cfg.block_n)]
                         + mask_meta + [("REVERSE_M", _reverse_m(spec))]))
    return pre, dkdv, dq

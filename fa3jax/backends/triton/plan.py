"""Launch plans: everything the host decides about a kernel launch, as plain Python data.

A :class:`Launch` names the kernel, lists its positional arguments (named arrays and typed scalars, in kernel
signature order), its outputs, grid, warps/stages and constexprs. The jax-triton path (``launch.py``) and the
Triton-interpreter tests both execute these plans, so the tests cover the same grid/constexpr logic the GPU runs.
No jax, no triton import here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from ...spec import AttentionSpec
from . import tables

LOG2E = 1.4426950408889634


@dataclasses.dataclass(frozen=True)
class Launch:
    module: str  # submodule of fa3jax.triton_kernels
    kernel: str  # @triton.jit function in it
    # ("array", name) | ("i32", int) | ("f32", float), in kernel signature order; outputs follow them.
    args: tuple[tuple[str, Any], ...]
    outputs: tuple[tuple[str, tuple[int, ...], str], ...]  # (name, shape, dtype name)
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    constexprs: tuple[tuple[str, Any], ...]

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.constexprs)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def _fit(cfg: tables.TileConfig, lq: int, lk: int) -> tables.TileConfig:
    """Shrink tiles that are larger than the problem (decode-like shapes); fewer warps for the smaller tiles."""
    bm = min(cfg.block_m, _pow2_at_least(lq)) if cfg.block_m else 0
    bn = min(cfg.block_n, _pow2_at_least(lk)) if cfg.block_n else 0
    warps = cfg.num_warps
    if (bm, bn) != (cfg.block_m, cfg.block_n) and max(bm, bn) <= 64:
        warps = min(warps, 4)
    return cfg._replace(block_m=bm, block_n=bn, num_warps=warps)


def configs(spec: AttentionSpec, arch: str, overrides: Optional[dict] = None) -> tables.KernelConfigs:
    """Tuning-table entry for ``spec``; ``overrides`` maps a field of KernelConfigs ("fwd", "bwd_dkdv", ...) to a
    (block_m, block_n, num_warps, num_stages) tuple (tests use it to force small tiles)."""
    cfgs = tables.lookup(spec.head_dim, spec.dtype, spec.causal, arch)
    if overrides:
        cfgs = cfgs._replace(**{k: tables.TileConfig(*v) for k, v in overrides.items()})
    lq, lk = spec.seqlen_q, spec.seqlen_k
    return tables.KernelConfigs(_fit(cfgs.fwd, lq, lk), _fit(cfgs.bwd_dkdv, lq, lk), _fit(cfgs.bwd_dq, lq, lk),
                                _fit(cfgs.bwd_pre, lq, lk))


def score_scales(spec: AttentionSpec) -> tuple[float, float]:
    """(scale_in, scale_out) of the kernels: s*log2(e) = qk * scale_in, or tanh(qk * scale_in) * scale_out."""
    if spec.softcap > 0.0:
        return spec.softmax_scale / spec.softcap, spec.softcap * LOG2E
    return spec.softmax_scale * LOG2E, 1.0


def _common_constexprs(spec: AttentionSpec) -> list[tuple[str, Any]]:
    return [
        ("NUM_HEADS_Q", spec.num_heads_q),
        ("NUM_HEADS_K", spec.num_heads_k),
        ("HEAD_DIM", spec.head_dim),
        ("HEAD_DIM_PAD", tables.head_dim_pad(spec.head_dim)),
    ]


def _mask_constexprs(spec: AttentionSpec) -> list[tuple[str, Any]]:
    return [("MASK", (int(spec.window.left), int(spec.window.right), bool(spec.softcap > 0.0),
                      bool(spec.has_offsets)))]


def _reverse_m(spec: AttentionSpec) -> bool:
    # With a right bound the last query rows see the most keys; with only a left bound the first ones do.
    return spec.window.right >= 0


def _reverse_n(spec: AttentionSpec) -> bool:
    # Key tiles: with only a left bound the last keys are seen by the most rows (causal: the first keys).
    return spec.window.left >= 0 and spec.window.right < 0


def _fwd_variant_constexprs(spec: AttentionSpec, cfg: tables.TileConfig) -> list[tuple[str, Any]]:
    """Constexprs of the forward tile loop shared by the dense and varlen kernels (``flash_fwd._fwd_tiles``)."""
    return [("SCALE_POS", bool(spec.softmax_scale > 0.0)), ("OVERLAP", bool(cfg.overlap))]


def _seq_args(spec: AttentionSpec) -> list[tuple[str, Any]]:
    return [("array", "offsets" if spec.has_offsets else "q"), ("i32", spec.global_seqlen_q),
            ("i32", spec.global_seqlen_k), ("i32", spec.seqlen_q), ("i32", spec.seqlen_k)]


def check(spec: AttentionSpec) -> Optional[str]:
    """Reason this backend cannot serve ``spec`` (None if it can)."""
    if spec.mode != "dense":
        return f"triton: mode {spec.mode!r} not served by the dense plan"
    if spec.dtype not in ("float16", "bfloat16"):
        return f"triton: dtype {spec.dtype} not supported (float16/bfloat16 only)"
    if spec.head_dim > 256:
        return f"triton: head_dim {spec.head_dim} > 256"
    if spec.head_dim < 1:
        return "triton: empty head dim"
    if spec.num_heads_k < 1 or spec.num_heads_q % spec.num_heads_k:
        return "triton: num_heads_q must be a multiple of num_heads_k"
    if spec.num_heads_q > 65535 or spec.batch > 65535:
        return "triton: more than 65535 heads or batch rows (grid limit)"
    return None


def plan_forward(spec: AttentionSpec, arch: str = "sm90", overrides: Optional[dict] = None) -> Launch:
    cfg = configs(spec, arch, overrides).fwd
    b, lq, hq, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim
    scale_in, scale_out = score_scales(spec)
    args = [("array", "q"), ("array", "k"), ("array", "v")]
    args += _seq_args(spec) + [("f32", scale_in), ("f32", scale_out)]
    meta = _common_constexprs(spec) + [("BLOCK_M", cfg.block_m), ("BLOCK_N", cfg.block_n)]
    meta += _mask_constexprs(spec) + [("REVERSE_M", _reverse_m(spec))] + _fwd_variant_constexprs(spec, cfg)
    return Launch(
        module="flash_fwd", kernel="_attn_fwd", args=tuple(args),
        outputs=(("out", (b, lq, hq, d), spec.dtype), ("lse", (b, hq, lq), "float32")),
        grid=(math.ceil(lq / cfg.block_m), hq, b), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        constexprs=tuple(meta))


def plan_backward(spec: AttentionSpec, arch: str = "sm90", overrides: Optional[dict] = None,
                  has_dlse: bool = True) -> tuple[Launch, Launch, Launch]:
    """(preprocess, dkdv, dq). Array names: q k v out dout lse dlse offsets, then delta from the preprocess."""
    cfgs = configs(spec, arch, overrides)
    b, lq, lk, hq, hk, d = (spec.batch, spec.seqlen_q, spec.seqlen_k, spec.num_heads_q, spec.num_heads_k,
                            spec.head_dim)
    scale_in, scale_out = score_scales(spec)
    pre_cfg = cfgs.bwd_pre
    pre = Launch(
        module="flash_bwd", kernel="_bwd_preprocess",
        args=(("array", "out"), ("array", "dout"), ("array", "dlse" if has_dlse else "out"), ("i32", lq)),
        outputs=(("delta", (b, hq, lq), "float32"),),
        grid=(math.ceil(lq / pre_cfg.block_m), hq, b), num_warps=pre_cfg.num_warps, num_stages=pre_cfg.num_stages,
        constexprs=(("NUM_HEADS_Q", hq), ("HEAD_DIM", d), ("HEAD_DIM_PAD", tables.head_dim_pad(d)),
                    ("BLOCK_M", pre_cfg.block_m), ("HAS_DLSE", bool(has_dlse))))
    args = [("array", n) for n in ("q", "k", "v", "dout", "lse", "delta")]
    args += _seq_args(spec) + [("f32", scale_in), ("f32", scale_out), ("f32", spec.softmax_scale)]
    kv_cfg, q_cfg = cfgs.bwd_dkdv, cfgs.bwd_dq
    dkdv = Launch(
        module="flash_bwd", kernel="_bwd_dkdv", args=tuple(args),
        outputs=(("dk", (b, lk, hk, d), spec.dtype), ("dv", (b, lk, hk, d), spec.dtype)),
        grid=(math.ceil(lk / kv_cfg.block_n), hk, b), num_warps=kv_cfg.num_warps, num_stages=kv_cfg.num_stages,
        constexprs=tuple(_common_constexprs(spec) + [("BLOCK_M", kv_cfg.block_m), ("BLOCK_N", kv_cfg.block_n)]
                         + _mask_constexprs(spec)
                         + [("REVERSE_N", _reverse_n(spec)), ("OVERLAP", bool(kv_cfg.overlap))]))
    dq = Launch(
        module="flash_bwd", kernel="_bwd_dq", args=tuple(args),
        outputs=(("dq", (b, lq, hq, d), spec.dtype),),
        grid=(math.ceil(lq / q_cfg.block_m), hq, b), num_warps=q_cfg.num_warps, num_stages=q_cfg.num_stages,
        constexprs=tuple(_common_constexprs(spec) + [("BLOCK_M", q_cfg.block_m), ("BLOCK_N", q_cfg.block_n)]
                         + _mask_constexprs(spec) + [("REVERSE_M", _reverse_m(spec))]))
    return pre, dkdv, dq

"""Launch plans: everything the host decides about a kernel launch, as plain Python data; the pieces every kernel
family shares (``plan_dense``, ``plan_varlen``, ``plan_decode``).

A :class:`Launch` names the kernel, lists its positional arguments (named arrays and typed scalars, in kernel
signature order), its outputs, grid, warps/stages and constexprs. The jax-triton path (``launch.py``) and the
Triton-interpreter tests both execute these plans, so the tests cover the same grid/constexpr logic the GPU runs.
Every plan function takes a :class:`fa3jax.tuning.Tuning` (``tune``) for forced choices. No jax, no triton import.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from ...spec import AttentionSpec
from ...tuning import Tuning
from . import tables

LOG2E = 1.4426950408889634
GRID_LIMIT = 65535  # CUDA's limit on grid dimensions y and z


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


def pow2_at_least(n: int, floor: int = 16) -> int:
    p = floor
    while p < n:
        p *= 2
    return p


def fit(cfg: tables.TileConfig, lq: int, lk: int) -> tables.TileConfig:
    """Shrink tiles that are larger than the problem (decode-like shapes); fewer warps for the smaller tiles."""
    bm = min(cfg.block_m, pow2_at_least(lq)) if cfg.block_m else 0
    bn = min(cfg.block_n, pow2_at_least(lk)) if cfg.block_n else 0
    warps = cfg.num_warps
    if (bm, bn) != (cfg.block_m, cfg.block_n) and max(bm, bn) <= 64:
        warps = min(warps, 4)
    return cfg._replace(block_m=bm, block_n=bn, num_warps=warps)


def tile(tune: Tuning, name: str, table_entry: tables.TileConfig) -> tables.TileConfig:
    """The tile ``name`` ("fwd", "bwd_dkdv", ...) that ``tune`` forces, else the table's."""
    forced = tune.tile(name)
    return table_entry if forced is None else tables.TileConfig(*forced)


def score_scales(spec: AttentionSpec) -> tuple[float, float]:
    """(scale_in, scale_out) of the kernels: s*log2(e) = qk * scale_in, or tanh(qk * scale_in) * scale_out."""
    if spec.softcap > 0.0:
        return spec.softmax_scale / spec.softcap, spec.softcap * LOG2E
    return spec.softmax_scale * LOG2E, 1.0


def shape_constexprs(spec: AttentionSpec) -> list[tuple[str, Any]]:
    """Head counts and head dims of the dense/varlen kernels: HEAD_DIM for q/k, HEAD_DIM_V for v/out (MLA: may be
    smaller), each with the padded power of two its tiles use."""
    return [("NUM_HEADS_Q", spec.num_heads_q), ("NUM_HEADS_K", spec.num_heads_k), ("HEAD_DIM", spec.head_dim),
            ("HEAD_DIM_PAD", tables.head_dim_pad(spec.head_dim)), ("HEAD_DIM_V", spec.head_dim_v),
            ("HEAD_DIM_V_PAD", tables.head_dim_pad(spec.head_dim_v))]


def sinks_group(spec: AttentionSpec, stand_in: str) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """The sinks as a kernel argument and its constexpr: (("array", "sinks"), ("HAS_SINKS", True)), or without
    sinks the array ``stand_in`` (never read) and HAS_SINKS False, which compiles the sink-free kernel."""
    return ("array", "sinks" if spec.has_sinks else stand_in), ("HAS_SINKS", bool(spec.has_sinks))


def mask_group(spec: AttentionSpec) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """The spec's mask as kernel arguments: (runtime args, constexprs), the only place that spells it out.

    The constexpr ``MASK`` = (window left, window right, softcap on, ring offsets on, segment ids on); field order
    is ``flash_common._LEFT/_RIGHT/_SOFTCAP/_OFFSETS/_SEGMENTS``. The runtime args (dense kernels only: the mask's
    int32 array and the global lengths, ``flash_common._mask_pos``) follow the kernel's input arrays; varlen and
    decode kernels mask with each sequence's own lengths and take none. The array is ``offsets`` (ring: q and k
    offsets) or ``segment_ids`` (all query ids (b, lq) then all key ids (b, lk), flattened; never together with
    offsets, see ``plan_dense.check``)."""
    mask = (int(spec.window.left), int(spec.window.right), bool(spec.softcap > 0.0), bool(spec.has_offsets),
            bool(spec.has_segment_ids))
    args: list[tuple[str, Any]] = []
    if spec.mode == "dense":
        # Without offsets or segment ids the kernel never reads this pointer; q stands in so that no array is
        # created.
        name = "offsets" if spec.has_offsets else "segment_ids" if spec.has_segment_ids else "q"
        args = [("array", name), ("i32", spec.global_seqlen_q), ("i32", spec.global_seqlen_k)]
    return args, [("MASK", mask)]


def reverse_m(spec: AttentionSpec) -> bool:
    # With a right bound the last query rows see the most keys; with only a left bound the first ones do.
    return spec.window.right >= 0


def reverse_n(spec: AttentionSpec) -> bool:
    # Key tiles: with only a left bound the last keys are seen by the most rows (causal: the first keys).
    return spec.window.left >= 0 and spec.window.right < 0


def fwd_variant_constexprs(spec: AttentionSpec, cfg: tables.TileConfig) -> list[tuple[str, Any]]:
    """Constexprs of the forward tile loop shared by the dense and varlen kernels (``flash_fwd._fwd_tiles``)."""
    return [("SCALE_POS", bool(spec.softmax_scale > 0.0)), ("OVERLAP", bool(cfg.overlap))]


def preprocess_launch(spec: AttentionSpec, cfg: tables.TileConfig, batch: int, rows: int, has_dlse: bool,
                      delta_shape: tuple[int, ...]) -> Launch:
    """``flash_bwd._bwd_preprocess`` (delta = rowsum(dO * O) - dLSE) over ``batch`` x ``rows`` query rows; the
    varlen plan passes batch 1 and rows = total_q, whose (1, hq, total_q) delta layout is (hq, total_q). It reads
    only out/dout, so its HEAD_DIM is the value head dim."""
    hq, d = spec.num_heads_q, spec.head_dim_v
    return Launch(
        module="flash_bwd", kernel="_bwd_preprocess",
        args=(("array", "out"), ("array", "dout"), ("array", "dlse" if has_dlse else "out"), ("i32", rows)),
        outputs=(("delta", delta_shape, "float32"),),
        grid=(max(1, math.ceil(rows / cfg.block_m)), hq, batch), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        constexprs=(("NUM_HEADS_Q", hq), ("HEAD_DIM", d), ("HEAD_DIM_PAD", tables.head_dim_pad(d)),
                    ("BLOCK_M", cfg.block_m), ("HAS_DLSE", bool(has_dlse))))


def unsupported_dtype(spec: AttentionSpec, family: str) -> Optional[str]:
    if spec.dtype not in ("float16", "bfloat16"):
        return f"triton {family}: dtype {spec.dtype} not supported (float16/bfloat16 only)"
    return None

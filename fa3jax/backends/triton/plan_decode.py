"""Launch plans of the KV-cache (decode) kernels, ``triton_kernels/flash_decode.py``: the split-KV grid with its
combine, the stream-K grid with its combine, and the choice between them.

Array names: q k_cache v_cache k_new v_new seqlens_k cache_seqlens leftpad batch_idx page_table (int32 for the
index arrays; absent optional arrays are replaced by a stand-in the kernel never reads). With more than one split
the first launch outputs out_acc/lse_acc (fp32 partials) and a second launch, ``_decode_combine``, merges them
into out/lse. ``sinks`` (float32 (hq,)) goes to the launch that produces the final out/lse (the unsplit decode, or
the combine), so that it is counted once. No jax, no triton import here.
"""
from __future__ import annotations

import math
from typing import Optional

from ...spec import AttentionSpec
from ...tuning import DEFAULT, Tuning
from . import tables
from .plan_common import (GRID_LIMIT, Launch, mask_group, pow2_at_least, score_scales, sinks_group, tile,
                          unsupported_dtype)

DEFAULT_NUM_SMS = 132  # H100 SXM
MAX_SPLITS = 64
# Stream-K programs read every sequence length (a vector of next_pow2(batch) lanes) to find their tiles.
PERSISTENT_MAX_BATCH = 1024
SCHEDULES = ("split", "streamk")


def choose_num_splits(batch: int, heads_k: int, cache_len: int, num_sms: int, m_tiles: int = 1,
                      programs_per_sm: int = 2, min_keys_per_split: int = 256, max_splits: int = MAX_SPLITS) -> int:
    """Number of KV splits for a decode launch (pure Python, host side).

    Split only when (batch * heads_k * m_tiles) programs leave SMs idle; then take as many splits as fit in one
    wave of ``programs_per_sm`` programs per SM (one decode program per SM keeps too few bytes in flight),
    rounding down: a partly filled second wave costs more than the split saves (benchmarks/RESULTS.md). Never go
    below ``min_keys_per_split`` keys per split (a split then costs more in the combine than it saves).
    """
    work = max(1, batch * heads_k * m_tiles)
    if cache_len <= min_keys_per_split or work >= num_sms * 0.8:
        return 1
    want = (programs_per_sm * num_sms) // work
    by_len = max(1, cache_len // min_keys_per_split)
    return int(max(1, min(want, by_len, max_splits, MAX_SPLITS)))


def choose_schedule(batch: int, heads_k: int, cache_len: int, num_sms: int, m_tiles: int,
                    policy: tables.DecodeConfig) -> str:
    """Decode schedule for num_splits=0: the policy's, or for "auto": stream-K when each program of one wave
    streams at least ``policy.streamk_min_keys`` keys, else splits (below that the combine launch and the
    per-piece start-up cost more than the balanced wave saves)."""
    if m_tiles != 1 or batch > PERSISTENT_MAX_BATCH:
        return "split"
    if policy.schedule != "auto":
        return policy.schedule
    per_head = max(1, (policy.programs_per_sm * num_sms) // max(1, heads_k))
    if batch * cache_len >= per_head * policy.streamk_min_keys:
        return "streamk"
    return "split"


def persistent_programs(batch: int, heads_k: int, cache_tiles: int, num_sms: int, programs_per_sm: int = 2,
                        min_tiles: int = 4) -> int:
    """Programs per kv head G of the one-wave stream-K grid: at most ``programs_per_sm`` per SM over all kv
    heads, and at least ``min_tiles`` key tiles per program at full caches."""
    wave = max(1, (programs_per_sm * num_sms) // max(1, heads_k))
    return int(max(1, min(wave, math.ceil(batch * max(cache_tiles, 1) / max(1, min_tiles)))))


def check(spec: AttentionSpec) -> Optional[str]:
    """Reason the decode kernels cannot serve ``spec`` (None if they can); validation already holds the rest."""
    kv = spec.kvcache
    if spec.mode != "kvcache" or kv is None:
        return "triton kvcache: not a kvcache spec"
    if kv.paged and (kv.page_size < 16 or kv.page_size % 16):
        return f"triton kvcache: page_size {kv.page_size} is not a multiple of 16"
    if spec.batch > GRID_LIMIT or spec.num_heads_k > GRID_LIMIT:
        return f"triton kvcache: more than {GRID_LIMIT} batch rows or kv heads (grid limit)"
    if spec.head_dim_v != spec.head_dim:
        return (f"triton kvcache: a value head dim different from the q/k one (MLA) is not supported; got "
                f"{spec.head_dim_v=}, {spec.head_dim=}")
    return unsupported_dtype(spec, "kvcache")


def policy(spec: AttentionSpec, tune: Tuning = DEFAULT) -> tables.DecodeConfig:
    """The decode policy for ``spec``'s cache layout (or the one ``tune`` forces)."""
    forced = tune.decode
    if forced is None:
        return tables.DECODE["paged" if spec.kvcache.paged else "contiguous"]
    if forced.schedule not in SCHEDULES + ("auto",):
        raise ValueError(f"decode schedule {forced.schedule!r} is not one of {SCHEDULES + ('auto',)}")
    return forced


def _block_n(spec: AttentionSpec, cfg_block_n: int, pol: tables.DecodeConfig) -> int:
    kv = spec.kvcache
    bn = min(cfg_block_n, pol.block_n, pow2_at_least(max(kv.capacity, 1)))
    if kv.paged:  # a tile must stay inside one page: largest power of two dividing page_size, at most bn
        p = kv.page_size & -kv.page_size
        bn = min(bn, p)
    return max(16, bn)


def plan_forward(spec: AttentionSpec, arch: str = "sm90", num_splits: Optional[int] = None,
                 num_sms: int = DEFAULT_NUM_SMS, tune: Tuning = DEFAULT) -> tuple[Launch, ...]:
    """(decode,) or (decode, combine). ``num_splits``: None -> ``spec.kvcache.num_splits`` (0 = auto: the
    policy's schedule, which applies with one query tile only)."""
    kv = spec.kvcache
    b, lq, hq, hk, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.num_heads_k, spec.head_dim
    group = hq // hk
    cfg = tile(tune, "fwd", tables.lookup(d, spec.dtype, spec.causal, arch).fwd)
    block_m = min(cfg.block_m, pow2_at_least(lq * group))
    pol = policy(spec, tune)
    block_n = _block_n(spec, cfg.block_n, pol)
    m_tiles = math.ceil(lq * group / block_m)
    splits = kv.num_splits if num_splits is None else num_splits
    schedule = choose_schedule(b, hk, kv.capacity, num_sms, m_tiles, pol)
    if splits <= 0 and schedule == "streamk":
        return _plan_streamk(spec, block_m, block_n, pol, num_sms, tune.decode_programs)
    if splits <= 0:
        splits = choose_num_splits(b, hk, kv.capacity, num_sms, m_tiles, pol.programs_per_sm,
                                   pol.min_keys_per_split, pol.max_splits)
    splits = max(1, min(int(splits), math.ceil(max(kv.capacity, 1) / block_n), MAX_SPLITS))
    if tune.fwd is not None:
        warps, stages = cfg.num_warps if block_m >= 128 else min(cfg.num_warps, 4), cfg.num_stages
    elif block_m >= 128:  # chunked prefill with many rows: the forward's tiles
        warps, stages = cfg.num_warps, cfg.num_stages
    else:
        warps = pol.num_warps
        stages = pol.stages_split if splits > 1 else pol.stages_nosplit
    hd_pad = tables.head_dim_pad(d)
    block_n = _fit_stages(block_n, hd_pad, stages)  # shrinking the tile keeps splits <= key tiles
    meta = (("NUM_HEADS_Q", hq), ("NUM_HEADS_K", hk), ("HEAD_DIM", d), ("HEAD_DIM_PAD", hd_pad),
            ("BLOCK_M", block_m), ("BLOCK_N", block_n), ("NUM_SPLITS", splits)) + _layout_and_mask(spec)
    final = (("out", (b, lq, hq, d), spec.dtype), ("lse", (b, hq, lq), "float32"))
    if splits == 1:
        outputs = final
    else:
        outputs = (("out_acc", (splits, b, lq, hq, d), "float32"), ("lse_acc", (splits, b, hq, lq), "float32"))
    # The sink is counted once: by the decode launch when unsplit (its HAS_SINKS acts only with NUM_SPLITS == 1),
    # else by the combine.
    sinks_arg, sinks_meta = sinks_group(spec, "seqlens_k")
    decode = Launch(module="flash_decode", kernel="_decode_fwd", args=_common_args(spec) + (sinks_arg,),
                    outputs=outputs, grid=(m_tiles * splits, hk, b), num_warps=warps, num_stages=stages,
                    constexprs=meta + ((sinks_meta[0], sinks_meta[1] and splits == 1),))
    if splits == 1:
        return (decode,)
    cm = min(64, pow2_at_least(lq))
    combine = Launch(module="flash_decode", kernel="_decode_combine",
                     args=(("array", "out_acc"), ("array", "lse_acc"), sinks_group(spec, "lse_acc")[0], ("i32", lq)),
                     outputs=final, grid=(math.ceil(lq / cm), hq, b), num_warps=4, num_stages=1,
                     constexprs=(("NUM_HEADS_Q", hq), ("HEAD_DIM", d), ("HEAD_DIM_PAD", hd_pad), ("BLOCK_M", cm),
                                 ("NUM_SPLITS", splits), ("SPLITS_PAD", pow2_at_least(splits, 2)), sinks_meta))
    return decode, combine


def _fit_stages(block_n: int, hd_pad: int, stages: int) -> int:
    """block_n halved until the K and V tiles of every pipeline stage fit in shared memory (227 KiB on sm90,
    ~160 KiB kept as the budget so that two programs can share an SM)."""
    while block_n > 16 and block_n * hd_pad * 4 * max(stages, 1) > 160 * 1024:
        block_n //= 2
    return block_n


def _common_args(spec: AttentionSpec) -> tuple:
    kv = spec.kvcache
    scale_in, scale_out = score_scales(spec)
    stand_in = "seqlens_k"
    return (("array", "q"), ("array", "k_cache"), ("array", "v_cache"),
            ("array", "k_new" if kv.seqlen_new else "k_cache"), ("array", "v_new" if kv.seqlen_new else "v_cache"),
            ("array", "seqlens_k"), ("array", "cache_seqlens"),
            ("array", "leftpad" if kv.has_cache_leftpad else stand_in),
            ("array", "batch_idx" if kv.has_cache_batch_idx and not kv.paged else stand_in),
            ("array", "page_table" if kv.paged else stand_in),
            ("i32", spec.seqlen_q), ("i32", kv.capacity), ("i32", kv.seqlen_new), ("i32", kv.cache_batch),
            ("i32", kv.pages_per_seq), ("f32", scale_in), ("f32", scale_out))


def _layout_and_mask(spec: AttentionSpec) -> tuple:
    """The cache-layout constexpr group LAYOUT (field order: flash_decode._PAGED ...) and the mask group."""
    kv = spec.kvcache
    layout = (bool(kv.paged), int(kv.page_size) if kv.paged else 0, bool(kv.seqlen_new), bool(kv.has_cache_leftpad),
              bool(kv.has_cache_batch_idx and not kv.paged))
    return (("LAYOUT", layout),) + tuple(mask_group(spec)[1])


def _plan_streamk(spec: AttentionSpec, block_m: int, block_n: int, pol: tables.DecodeConfig, num_sms: int,
                  programs: Optional[int]) -> tuple[Launch, Launch]:
    """One-wave stream-K decode over grid (hk, G), then its combine over grid (hk, b); see
    ``flash_decode._decode_fwd_persistent``. ``programs`` forces G."""
    kv = spec.kvcache
    b, lq, hq, hk, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.num_heads_k, spec.head_dim
    hd_pad = tables.head_dim_pad(d)
    stages = pol.stages_nosplit
    block_n = _fit_stages(block_n, hd_pad, stages)
    cache_tiles = math.ceil(max(kv.capacity, 1) / block_n)
    g = programs or persistent_programs(b, hk, cache_tiles, num_sms, pol.programs_per_sm,
                                        math.ceil(pol.min_keys_per_split / block_n))
    shape = (("NUM_HEADS_Q", hq), ("NUM_HEADS_K", hk), ("HEAD_DIM", d), ("HEAD_DIM_PAD", hd_pad),
             ("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_B", pow2_at_least(b)))
    final = (("out", (b, lq, hq, d), spec.dtype), ("lse", (b, hq, lq), "float32"))
    partial = (("out_acc", (hk, g + b, block_m, d), "float32"), ("lse_acc", (hk, g + b, block_m), "float32"))
    decode = Launch(module="flash_decode", kernel="_decode_fwd_persistent",
                    args=_common_args(spec) + (("i32", b),), outputs=partial,
                    grid=(hk, g, 1), num_warps=pol.num_warps, num_stages=stages,
                    constexprs=shape + _layout_and_mask(spec))
    sinks_arg, sinks_meta = sinks_group(spec, "seqlens_k")  # the partials are sink-free: the combine adds it once
    combine = Launch(module="flash_decode", kernel="_decode_combine_streamk",
                     args=(("array", "out_acc"), ("array", "lse_acc"), ("array", "seqlens_k"),
                           ("array", "leftpad" if kv.has_cache_leftpad else "seqlens_k"), sinks_arg, ("i32", lq)),
                     outputs=final, grid=(hk, b, 1), num_warps=4, num_stages=1,
                     constexprs=shape + (("NUM_PROGRAMS", g), ("PROGRAMS_PAD", pow2_at_least(g, 2)))
                     + _layout_and_mask(spec) + (sinks_meta,))
    return decode, combine

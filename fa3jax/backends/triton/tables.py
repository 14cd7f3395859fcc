"""Static launch configurations of the Triton kernels: no autotuning at call time.

Keys are ``(head_dim_bucket, dtype, causal, arch)``: the bucket is the padded head dim the kernel computes with
(64 covers every head_dim <= 64, 128 covers 65..128, 256 covers 129..256), ``causal`` is ``spec.window.right
== 0`` (any other window uses the non-causal entry), ``arch`` is ``"sm90"``, ``"sm80"``, ...

Entries marked "measured" were measured on the target GPU (H100 SXM for sm90; numbers in benchmarks/RESULTS.md);
the others are guesses to be measured. Why the guesses look as they do:
  * forward: BLOCK_M=128 with 8 warps (two warpgroups, 64 rows each, as wgmma wants); BLOCK_N shrinks with the
    head dim so that Q and 2-3 stages of K/V fit in 227 KiB of shared memory and the fp32 accumulator in registers.
  * dK/dV: the key tile is resident (K, V and two fp32 accumulators), so BLOCK_N * D stays small.
  * dQ: the mirror image with one accumulator, so a larger query tile fits.

A value head dim below the q/k one (MLA, e.g. 192/128) uses the q/k head dim's entry: its V/O tiles are narrower,
so the entry needs less shared memory than with d_v = d (192/128 and 128/64 compile for sm_90 within 227 KiB,
tests/test_triton_aot.py; not measured on the GPU yet). Attention sinks change no tile (one load per program).

The tables are read-only module constants; a forced choice goes through :class:`fa3jax.tuning.Tuning`.
"""
from __future__ import annotations

import types
from typing import NamedTuple


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Issue the next tile's QK^T (forward) or dP^T (dK/dV) before this tile's accumulating product, so that
    # product overlaps the elementwise work; costs registers for a second score tile. dQ ignores it (no gain).
    overlap: bool = False


class KernelConfigs(NamedTuple):
    fwd: TileConfig
    bwd_dkdv: TileConfig
    bwd_dq: TileConfig
    bwd_pre: TileConfig  # block_n unused


_PRE = TileConfig(128, 0, 4, 1)

# (head_dim_bucket, dtype, causal, arch) -> configs. dtype entries are duplicated on purpose: fp16 and bf16 run
# the same MMA rate, but they are measured separately.
_TABLE: dict[tuple[int, str, bool, str], KernelConfigs] = {}


def _put(bucket, arch, causal, fwd, dkdv, dq, pre=_PRE):
    for dtype in ("float16", "bfloat16"):
        _TABLE[(bucket, dtype, causal, arch)] = KernelConfigs(TileConfig(*fwd), TileConfig(*dkdv), TileConfig(*dq),
                                                              pre)


# --- Hopper (sm90), every entry measured on the H100 (see benchmarks/RESULTS.md). All fit in 227 KiB of shared
# memory (tests/test_triton_aot.py); some of the fastest entries spill a little: spill-free candidates were slower.
_put(64, "sm90", False, fwd=(128, 128, 8, 3), dkdv=(32, 128, 4, 3), dq=(64, 64, 4, 3))
_put(64, "sm90", True, fwd=(128, 128, 8, 3), dkdv=(64, 64, 4, 2), dq=(64, 64, 4, 3))
for _causal in (False, True):
    # 128x64/8w/4st forward with overlap never lost to 128x128 (which asks 288 KiB with 4 stages and does not launch).
    _put(128, "sm90", _causal, fwd=(128, 64, 8, 4, True), dkdv=(32, 128, 8, 3, True), dq=(64, 64, 4, 2))
_put(256, "sm90", False, fwd=(128, 32, 8, 3), dkdv=(32, 64, 8, 2), dq=(128, 32, 8, 2))
_put(256, "sm90", True, fwd=(128, 64, 8, 2), dkdv=(32, 32, 4, 2), dq=(128, 32, 8, 2))

# --- Ampere (sm80/sm86/sm89), initial guesses, to be measured (compile for sm_80; small spills remain).
for _causal in (False, True):
    _put(64, "sm80", _causal, fwd=(128, 64, 4, 3), dkdv=(64, 64, 4, 2), dq=(64, 64, 4, 2))
    _put(128, "sm80", _causal, fwd=(128, 64, 8, 2), dkdv=(32, 128, 8, 2), dq=(64, 64, 4, 2))
    _put(256, "sm80", _causal, fwd=(64, 64, 8, 2), dkdv=(32, 32, 4, 1), dq=(64, 32, 8, 2))
_TABLE = types.MappingProxyType(_TABLE)  # read-only from here on

# Varlen forward: every sequence's last key block is partial and costs a full one, so a narrower BLOCK_N wastes
# less (measured, unmasked d=128; causal keeps the dense causal entry, already 128x64).
_VARLEN_FWD = types.MappingProxyType({
    (128, dtype, False, "sm90"): TileConfig(128, 64, 8, 3) for dtype in ("float16", "bfloat16")})


class DecodeConfig(NamedTuple):
    """Split-KV decode (flash_decode) launch policy for one cache layout. Decode is bandwidth-bound: what matters
    is bytes in flight per SM, not the MMA shape."""

    block_n: int
    num_warps: int
    stages_split: int  # pipeline stages when the cache is split
    stages_nosplit: int
    programs_per_sm: int  # what the automatic split count aims for
    min_keys_per_split: int  # below this a split costs more in the combine than it saves
    max_splits: int
    # With num_splits=0 and one query tile: "split" (choose_num_splits), "streamk" (the one-wave grid of
    # flash_decode._decode_fwd_persistent) or "auto" (plan_decode.choose_schedule).
    schedule: str = "split"
    streamk_min_keys: int = 16384  # "auto": stream-K only when each program streams at least this many keys


# Measured on the H100 (see benchmarks/RESULTS.md): 3 pipeline stages when split, 4 for an unsplit contiguous
# cache; splits fill at most one wave of 2 programs per SM and at most 16 (more splits lost to the combine);
# "auto" takes stream-K only where each program streams >= 16k keys (below that it lost to splits).
DECODE = types.MappingProxyType({
    "contiguous": DecodeConfig(64, 4, 3, 4, 2, 256, 16, schedule="auto"),
    "paged": DecodeConfig(64, 4, 3, 3, 2, 256, 16, schedule="auto"),
})

# Used for any key that is not in the table: small tiles that compile everywhere.
DEFAULT = KernelConfigs(TileConfig(64, 64, 4, 2), TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2), _PRE)


def head_dim_pad(head_dim: int) -> int:
    """Power of two the kernels compute with (tl.dot wants at least 16 on the reduction axis)."""
    p = 16
    while p < head_dim:
        p *= 2
    return p


def head_dim_bucket(head_dim: int) -> int:
    return max(64, head_dim_pad(head_dim))


def arch_family(arch: str) -> str:
    """sm86/sm89 use the sm80 entries, sm100+ the sm90 ones until they get their own."""
    try:
        major = int(arch[2:-1])  # "sm90" -> 9, "sm100" -> 10
    except ValueError:
        return arch
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return arch


def lookup(head_dim: int, dtype: str, causal: bool, arch: str) -> KernelConfigs:
    key = (head_dim_bucket(head_dim), dtype, bool(causal), arch_family(arch))
    return _TABLE.get(key, DEFAULT)


def lookup_varlen_fwd(head_dim: int, dtype: str, causal: bool, arch: str) -> TileConfig:
    """The varlen forward's tile: its own entry where one was measured, else the dense forward's."""
    key = (head_dim_bucket(head_dim), dtype, bool(causal), arch_family(arch))
    return _VARLEN_FWD.get(key) or lookup(head_dim, dtype, causal, arch).fwd

"""Static launch configurations of the Triton kernels: no autotuning at call time.

Keys are ``(head_dim_bucket, dtype, causal, arch)``: the bucket is the padded head dim the kernel computes with
(64 covers every head_dim <= 64, 128 covers 65..128, 256 covers 129..256), ``causal`` is ``spec.window.right
== 0`` (any other window uses the non-causal entry), ``arch`` is ``"sm90"``, ``"sm80"``, ...

Entries whose comment does not cite a measurement are initial guesses, to be measured on the target GPU (H100
SXM for sm90; every sm90 entry, the varlen forward's and the decode policy are measured). The reasoning
behind the guesses:
  * forward: BLOCK_M=128 with 8 warps (two warpgroups, 64 rows each, as wgmma wants), BLOCK_N=128 up to d=128
    and 64 at d=256 so that Q + 2-3 stages of K/V fit in the 227 KiB of shared memory and the fp32
    accumulator (BLOCK_M x D) stays in registers.
  * dK/dV: the key tile is the resident one (BLOCK_N rows of K, V, dK, dV), the query tile streams; dK and dV
    are two fp32 accumulators, so BLOCK_N * D is kept at 128 * 128 / 2 per warpgroup at most.
  * dQ: mirror image of dK/dV with one accumulator, so a larger query tile fits.
"""
from __future__ import annotations

from typing import NamedTuple


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Let a wgmma run during the elementwise work. Forward: QK^T of the next key tile is issued before PV of this
    # one (flash_fwd._fwd_tiles_overlap), so PV runs during the next tile's softmax; needs registers for two
    # score tiles. dK/dV: dP^T is computed before P^T, so the dV product runs while dS^T is formed. dQ ignores it
    # (its overlap loop measured no gain in session 6 and was removed). Triton waits for any product whose result
    # the loop reads at once, so only accumulating products can overlap.
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


# --- Hopper (sm90), every entry measured on the H100. Every entry fits in 227 KiB of shared memory
# (tests/test_triton_aot.py, compiled with jax-triton's divisibility hints). Some of the fastest entries spill
# (ptxas -v on those compiles, session 7, bytes of spill stores): d=64 dK/dV 460 (non-causal) / 348 (causal),
# d=256 dK/dV 564 / 1120, d=256 causal forward 88 and dQ 20; the measured candidates without spills were slower.
# d=64 backward measured on the H100 (session 7 run 2, b=2 s=8192 h=16 bf16, interleaved with flash-attn3-jax,
# fwd+bwd ratio to it non-causal/causal): dK/dV (dQ at the old 128x64/8w/2st) 32x128/4w/3st 0.96/0.92, 32x64/4w/3st
# 0.93/0.93, 64x64/4w/2st 0.85/0.93, the old guess 64x128/8w/2st 0.76/0.85; dQ (dK/dV old) 64x64/4w/3st
# 0.89/1.04, 64x64/4w/2st 0.88/1.00, old 128x64/8w/2st 0.77/0.86. The forward is session 6 run 2's.
_put(64, "sm90", False, fwd=(128, 128, 8, 3), dkdv=(32, 128, 4, 3), dq=(64, 64, 4, 3))
_put(64, "sm90", True, fwd=(128, 128, 8, 3), dkdv=(64, 64, 4, 2), dq=(64, 64, 4, 3))
for _causal in (False, True):
    # d=128 bwd measured on the H100 (2026-11-25, 16k tokens, fwd+bwd TFLOPS, non-causal/causal): dkdv
    # 32x128/8w/2st 337/367 -> 64x128/8w/1st 351/373; dq 128x64/8w/2st 337/367 -> 64x64/4w/2st 351/378.
    # d=128 fwd measured on the H100 (2026-11-25, 16k tokens, fwd TFLOPS, benchmarks/triton_sweep.py; several
    # values = repeated runs). Causal, bf16, s=1k/2k/4k/8k/16k: 128x128/8w/3st 245/316-319/375-376/413-415/447-463,
    # 128x64/8w/3st 277/348-351/396-400/431-437/447-466, 128x64/8w/4st 264-267/338-342/393-394/430-431/457-477;
    # fp16 s=2k/4k/16k: 315/367/450, 337/385/433, 332/382/461. 128x64/8w/4st is the one that never loses (+3-8%).
    # Non-causal, bf16, s=2k/4k/16k: 128x128/8w/3st 425-429/450-457/471-493, 128x64/8w/3st 439/462/489 (within
    # noise: kept); 128x128/8w/4st asks for 288 KiB of shared memory and does not launch.
    # Session 6 (2026-11-25, same shapes, candidates interleaved with flash-attn3-jax in one process, ratios to it,
    # benchmarks/RESULTS.md session 6). Forward 128x64/8w/4st+overlap: run 1 non-causal s=2k/4k/16k 0.64/0.70/0.71
    # against 0.65/0.67/0.67 for 128x128/8w/3st, causal 0.65/0.65/0.76 against 0.64/0.63/0.71 without overlap; run
    # 5 (another machine) within 1% of the best candidate on every row (overlap gains nothing there), so it stays.
    # dK/dV 32x128/8w/3st+overlap, run 5, fwd+bwd s=4k/16k: 0.62/0.61 against 0.53/0.49 for 64x128/8w/1st, causal
    # 0.59/0.60 against 0.53/0.55 (64x128/8w/2st+overlap spills 744 B and reads 0.39). dQ keeps 64x64/4w/2st:
    # 128x64/8w/2st+overlap read 0.58-0.61 against 0.59-0.62 in run 5 (64x64 + overlap spills 88 B: 0.47-0.49).
    # d=64 keeps its forward: overlap read 0.90-0.92x of it in run 2.
    _put(128, "sm90", _causal, fwd=(128, 64, 8, 4, True), dkdv=(32, 128, 8, 3, True), dq=(64, 64, 4, 2))
# d=256 measured on the H100 (session 7 run 1, 2026-11-25, b=2 s=8192 h=16 bf16, candidates interleaved in one
# process, TFLOPS non-causal/causal; benchmarks/RESULTS.md). Forward: 128x32/8w/3st 437/399, 128x64/8w/2st
# 432/436, the earlier guess 128x32/8w/2st 348/353, 64x64/8w/2st 236/239. fwd+bwd, dK/dV (dQ at the old
# 64x32/8w/2st): 32x64/8w/2st 163/161, 32x32/4w/2st 157/168, 32x64/8w/2st+overlap 155/166, old 16x64/8w/2st
# 125/135. dQ (dK/dV at the old entry): 128x32/8w/2st 154/172, 64x32/4w/2st 142/156, old 64x32/8w/2st 125/136.
_put(256, "sm90", False, fwd=(128, 32, 8, 3), dkdv=(32, 64, 8, 2), dq=(128, 32, 8, 2))
_put(256, "sm90", True, fwd=(128, 64, 8, 2), dkdv=(32, 32, 4, 2), dq=(128, 32, 8, 2))

# --- Ampere (sm80/sm86/sm89), initial guesses, to be measured (compile for sm_80; small spills remain).
for _causal in (False, True):
    _put(64, "sm80", _causal, fwd=(128, 64, 4, 3), dkdv=(64, 64, 4, 2), dq=(64, 64, 4, 2))
    _put(128, "sm80", _causal, fwd=(128, 64, 8, 2), dkdv=(32, 128, 8, 2), dq=(64, 64, 4, 2))
    _put(256, "sm80", _causal, fwd=(64, 64, 8, 2), dkdv=(32, 32, 4, 1), dq=(64, 32, 8, 2))

# Varlen forward (packed sequences): most sequences end inside a key block, and the last, partial block of every
# sequence costs a full block, so a narrower BLOCK_N wastes less. Measured on the H100 (2026-11-25, 16384 tokens,
# lengths uniform in [L/2, 3L/2], d=128 bf16 unmasked, two rounds, benchmarks/RESULTS.md session 4 run 11): mean
# L 512 / 1024 / 2048: 128x128/8w/3st 248,247 / 313,321 / 406,410 TFLOPS; 128x64/8w/3st 286,283 / 352,359 /
# 438,432 (varlen/dense 0.96-0.97 / 0.92-0.95 / 0.99-1.01). Causal varlen keeps the causal entry (already 128x64).
_VARLEN_FWD: dict[tuple[int, str, bool, str], TileConfig] = {
    (128, dtype, False, "sm90"): TileConfig(128, 64, 8, 3) for dtype in ("float16", "bfloat16")}


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
    # With num_splits=0 and one query tile: "split" (choose_num_splits), "streamk" or "batch" (one-wave grids of
    # flash_decode._decode_fwd_persistent) or "auto" (plan_kvcache.choose_schedule).
    schedule: str = "split"
    streamk_min_keys: int = 16384  # "auto": stream-K only when each program streams at least this many keys


# Measured on the H100 (2026-11-25, hq=32 hk=8 d=128 bf16; benchmarks/RESULTS.md sessions 2 and 5): contiguous:
# 3 stages when split (b=8: 2.84 TB/s vs 2.53 with 4), 4 when not (b=64: 3.05 vs 2.87). Splits fill at most one
# wave of programs (choose_num_splits rounds down): b=8 (64 programs) takes 4 splits, 2.98 / 3.04 TB/s at cache
# 32k / 128k against 2.82 / 2.89 with 5 and 2.81 / 2.84 with 8 (3 stages). Paged: 2 programs per SM (b=8: 4
# splits 2.46 / 2.95 TB/s at 4k / 32k, against 2.19 / 2.88 with the earlier 9 splits) and at most 16 splits
# (b=1, 8 programs: 16 splits 2.33 / 2.85 TB/s at 32k / 128k, 32 splits 2.17 / 2.73, 24 splits 2.04 / 2.54), and
# 3 stages, split or not (b=1 4k 16 splits: 0.72 vs 0.69 TB/s; b=8 4 splits: 2.46 vs 2.43 at 4k, equal at 32k;
# b=64 32k unsplit: 3.059 vs 3.054; 2 stages 3.005). Paged b=64 (512 programs, two waves) stays unsplit: 2 splits
# gained 2.5-5.7 us at cache 32k in three interleaved sweeps (session 7 runs 1-3) but lost at 4k (365.8 against
# 358.9 us) and, in the decode suite, at 128k (11276 us against flash-attn3-jax's 11198; unsplit in session 5:
# 11197 against 11201), so session 7 reverted that rule. Session 8 (runs 1-3): the one-wave stream-K schedule
# beats the split grid where each program streams many keys (paged b=64 32k 2807 vs 2816 us, 128k 11158 vs
# 11213; b=8 128k 1414 vs 1426; contiguous b=64 32k 2795 vs 2802, b=8 128k 1406 vs 1413) and loses below (b=64
# 4k 368 vs 360, b=8 32k contiguous 364 vs 360, b=1 every cache), hence "auto" with 16k keys per program.
# Contiguous b=1 takes at most 16 splits like paged (run 5: 55.6 / 183.5 us at 32k / 128k against 60.7 / 194.0
# with the 33 that one wave allowed; 24 splits 58.6 / 198.7).
DECODE = {
    "contiguous": DecodeConfig(64, 4, 3, 4, 2, 256, 16, schedule="auto"),
    "paged": DecodeConfig(64, 4, 3, 3, 2, 256, 16, schedule="auto"),
}

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

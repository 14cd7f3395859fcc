"""The varlen (packed) Triton forward kernel under Triton's CPU interpreter, against ``fa3jax.reference.varlen``.

Same scheme as ``tests/test_triton_interpret.py`` (whose numpy-backed tensor shim this reuses): kernels run in
worker subprocesses with ``TRITON_INTERPRET=1``; the test functions read JSON verdicts. Outputs are pre-filled
with NaN so that any element the kernel forgets to write (uncovered rows, tiles past a sequence's end) fails.
The cases run on the compact grid (one program per real query tile) unless they force the per-sequence grid with
``compact_max_batch``; ``MAP_CASES`` check the compact grid's tile map itself on many random packings.
On the GPU the same kernel runs through TritonBackend in the shared suite (tests/test_triton_backend.py).
"""
from __future__ import annotations

import pathlib
import sys
import zlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.triton_interp_harness import main, results_fixture  # noqa: E402
from tests.test_triton_interpret import _NpTensor, _rel  # noqa: E402

TOL = 1e-2

# Sequences: empty q sequences, empty k sequences, q rows before cu_q[0] and after cu_q[-1] (uncovered).
_CU_Q = [3, 20, 20, 45, 52, 53]
_CU_K = [0, 30, 31, 31, 70, 72]
_TQ, _TK = 60, 75
CASES = {
    "full_d64": dict(hq=2, hk=2, d=64, window=(-1, -1), blocks=(16, 16)),
    "causal_d40_seqused": dict(hq=2, hk=2, d=40, window=(-1, 0), blocks=(16, 32), seqused=[25, 1, 0, 33, 0]),
    "window_8_4_gqa": dict(hq=4, hk=2, d=16, window=(8, 4), blocks=(16, 16)),
    "window_16_inf_mqa": dict(hq=4, hk=1, d=16, window=(16, -1), blocks=(32, 16), seqused=[30, 0, 0, 20, 2]),
    "softcap_causal_d64": dict(hq=2, hk=1, d=64, window=(-1, 0), softcap=2.0, blocks=(16, 16)),
    "no_uncovered_one_seq": dict(hq=1, hk=1, d=32, window=(-1, 0), blocks=(16, 16), cu_q=[0, 37], cu_k=[0, 50],
                                 tq=37, tk=50),
}


def _packing(seed, batch, max_q, max_k, pad_q=(0, 0), pad_k=(0, 0), p_empty=0.25):
    """cu_q, cu_k, tq, tk for ``batch`` random sequences (lengths up to max_q / max_k, a fraction empty), with
    pad_q = (rows before cu_q[0], rows after cu_q[-1]) left uncovered."""
    rng = np.random.default_rng(seed)
    lq = np.where(rng.random(batch) < p_empty, 0, rng.integers(1, max_q + 1, batch))
    lk = rng.integers(0, max_k + 1, batch)
    cu_q = (pad_q[0] + np.concatenate([[0], np.cumsum(lq)])).tolist()
    cu_k = (pad_k[0] + np.concatenate([[0], np.cumsum(lk)])).tolist()
    return dict(cu_q=cu_q, cu_k=cu_k, tq=cu_q[-1] + pad_q[1], tk=cu_k[-1] + pad_k[1])


# Empty sequences (length 0) at the start, in the middle and at the end, next to uncovered rows on both sides.
_EDGES = dict(cu_q=[5, 5, 5, 20, 20, 37, 38, 60, 60, 60], cu_k=[0, 3, 3, 30, 31, 31, 40, 70, 72, 72], tq=70, tk=75)
# Lengths = 1 (mod 16) and 166 uncovered rows: the compact grid's spare programs number exactly cdiv(166, 16) =
# 11, so each fills one tile of rows (the bound in flash_varlen's docstring is tight here).
_TIGHT = dict(cu_q=[3, 20, 37], cu_k=[0, 17, 40], tq=200, tk=40)
# The compact grid's tile map: many short sequences (most shorter than BLOCK_M, a quarter empty, batch 40 so that
# the cu_q scan is wider than its smallest SEQ_PAD), long ones under the causal reversal, and the per-sequence grid
# (fallback for large batches) forced through compact_max_batch.
_SHORT = _packing(1, 40, 7, 20, pad_q=(4, 9), pad_k=(2, 3))
CASES.update({
    "many_short_causal": dict(hq=2, hk=1, d=32, window=(-1, 0), blocks=(16, 16), **_SHORT),
    "many_short_full_bm32": dict(hq=2, hk=2, d=16, window=(-1, -1), blocks=(32, 16), **_SHORT),
    "empty_edges_window": dict(hq=2, hk=1, d=16, window=(8, 4), blocks=(16, 16), **_EDGES),
    "empty_edges_left_only": dict(hq=2, hk=2, d=16, window=(12, -1), blocks=(16, 16), **_EDGES),
    "uncovered_tight": dict(hq=2, hk=1, d=16, window=(-1, -1), blocks=(16, 16), **_TIGHT),
    "long_causal_reversed": dict(hq=2, hk=2, d=16, window=(-1, 0), blocks=(16, 16), seqused=[60, 0, 20, 16],
                                 cu_q=[2, 72, 72, 105, 121], cu_k=[0, 80, 80, 120, 136], tq=130, tk=140),
    "long_window_reversed": dict(hq=2, hk=2, d=16, window=(20, 3), blocks=(16, 32),
                                 cu_q=[0, 70, 75, 108], cu_k=[0, 64, 64, 100], tq=108, tk=100),
    "fallback_many_short_causal": dict(hq=2, hk=1, d=32, window=(-1, 0), blocks=(16, 16), compact_max_batch=0,
                                       **_SHORT),
    "fallback_edges_window": dict(hq=2, hk=1, d=16, window=(8, 4), blocks=(16, 16), compact_max_batch=4, **_EDGES),
})

# Tile-map cases: batches, BLOCK_M, random packings per batch (cycling through: no padding and no empty
# sequence; padding and 30% empty; padding and 90% empty).
MAP_CASES = {
    "map_small_batches": dict(batches=(1, 2, 3, 5, 16, 17), block_m=16, trials=6),
    "map_bm64": dict(batches=(1, 7, 40), block_m=64, trials=4),
    "map_batch_1024": dict(batches=(1024,), block_m=16, trials=3),
}


def _interpret(launch, arrays):
    """Execute a plan.Launch in the interpreter; outputs start as NaN (float) so unwritten elements show."""
    import triton.language as tl

    from fa3jax.backends.triton import launch as launch_mod

    tl_types = {np.dtype(np.float16): tl.float16, np.dtype(np.float32): tl.float32, np.dtype(np.int32): tl.int32}
    np_types = {"float16": np.float16, "float32": np.float32}
    outs = [np.full(shape, np.nan, np_types[dt]) for _, shape, dt in launch.outputs]
    args = []
    for kind, value in launch.args:
        if kind == "array":
            a = np.ascontiguousarray(arrays[value])
            args.append(_NpTensor(a, tl_types[a.dtype]))
        elif kind == "i32":
            args.append(int(value))
        else:
            args.append(float(np.float32(value)))
    args += [_NpTensor(o, tl_types[o.dtype]) for o in outs]
    launch_mod.kernel(launch)[launch.grid](*args, **launch.meta)
    return outs


def _run_case(name):
    if name in MAP_CASES:
        return _run_map_case(name)
    from fa3jax import reference
    from fa3jax.backends.triton import plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, VarlenSpec

    c = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    cu_q = np.asarray(c.get("cu_q", _CU_Q), np.int32)
    cu_k = np.asarray(c.get("cu_k", _CU_K), np.int32)
    tq, tk = c.get("tq", _TQ), c.get("tk", _TK)
    hq, hk, d = c["hq"], c["hk"], c["d"]
    seqused = None if "seqused" not in c else np.asarray(c["seqused"], np.int32)
    q = rng.standard_normal((tq, hq, d)).astype(np.float16)
    k = rng.standard_normal((tk, hk, d)).astype(np.float16)
    v = rng.standard_normal((tk, hk, d)).astype(np.float16)
    window = Window(*c["window"])
    scale = float(1.0 / np.sqrt(d))
    cap = c.get("softcap", 0.0)
    ref_out, ref_lse = reference.varlen(q, k, v, cu_q, cu_k, seqused, scale=scale, window=window, softcap=cap)
    len_k = np.diff(cu_k) if seqused is None else seqused
    spec = AttentionSpec(mode="varlen", batch=len(cu_q) - 1, seqlen_q=tq, seqlen_k=tk, num_heads_q=hq,
                         num_heads_k=hk, head_dim=d, dtype="float16", softmax_scale=scale, window=window,
                         softcap=cap, varlen=VarlenSpec(int(np.diff(cu_q).max()), int(len_k.max()),
                                                        seqused is not None))
    assert plan_varlen.check(spec) is None, plan_varlen.check(spec)
    overrides = {"fwd": c["blocks"] + (4, 1)}
    if "compact_max_batch" in c:
        overrides["compact_max_batch"] = c["compact_max_batch"]
    launch = plan_varlen.plan_forward(spec, "sm90", overrides=overrides)
    arrays = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  seqused_k=seqused if seqused is not None else cu_k)
    out, lse = _interpret(launch, arrays)
    finite = np.isfinite(ref_lse)
    covered = np.zeros(tq, bool)
    covered[cu_q[0]:cu_q[-1]] = True
    empty = ~finite  # (hq, tq): rows that see nothing (incl. uncovered rows)
    return {
        "out": _rel(out, ref_out),
        "lse": float(np.max(np.abs(lse[finite] - ref_lse[finite]), initial=0.0)),
        "lse_inf_match": bool(np.array_equal(np.isneginf(lse), empty)),
        "empty_out_zero": bool(np.all(out.transpose(1, 0, 2)[empty] == 0)),
        "n_empty": int(empty.sum()),
        "n_uncovered": int((~covered).sum()),
        "no_nan": bool(np.all(np.isfinite(out)) and not np.any(np.isnan(lse))),
        "compact": launch.meta["SEQ_PAD"] > 0,
        "n_short": int(np.sum((np.diff(cu_q) > 0) & (np.diff(cu_q) < c["blocks"][0]))),
        "n_zero_len": int(np.sum(np.diff(cu_q) == 0)),
    }


def _tile_map_probe():
    """``_probe_tile_map`` as a kernel: flash_varlen's tile map alone, storing (b, j, n_tiles) of every program.
    Defined at module level because the interpreter re-parses a kernel's source and resolves its names in the
    module's globals, which the worker fills in here (the pytest process never imports triton's kernels)."""
    import triton
    import triton.language as tl

    from fa3jax.backends.triton import launch as launch_mod

    launch_mod.kernels_package()
    from fa3jax.triton_kernels.flash_varlen import _varlen_tile_of

    globals().update(tl=tl, _varlen_tile_of=_varlen_tile_of)
    return triton.jit(_probe_tile_map)


def _probe_tile_map(CU_Q, OUT, batch, BLOCK_M: tl.constexpr, SEQ_PAD: tl.constexpr):  # noqa: F821
    t = tl.program_id(0)  # noqa: F821
    b, j, n_tiles = _varlen_tile_of(CU_Q, t, batch, BLOCK_M, SEQ_PAD)  # noqa: F821
    tl.store(OUT + 3 * t, b)  # noqa: F821
    tl.store(OUT + 3 * t + 1, j)  # noqa: F821
    tl.store(OUT + 3 * t + 2, n_tiles)  # noqa: F821


def _run_map_case(name):
    """Every real tile (b, m) gets exactly one program, the rest are spare programs (b == batch) numbered 0, 1, ...,
    and there are enough of them to fill the uncovered rows one tile each: checked for the grid that the plan
    launches, on random packings with empty sequences and uncovered rows at both ends."""
    import triton.language as tl

    from fa3jax.backends.triton import plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, VarlenSpec

    c = MAP_CASES[name]
    probe = _tile_map_probe()
    bm = c["block_m"]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    checked, failures = 0, []
    for batch in c["batches"]:
        for trial in range(c["trials"]):
            max_q = int(rng.choice([1, bm - 1, bm, bm + 1, 3 * bm]))
            pad = (int(rng.integers(0, 2 * bm)), int(rng.integers(0, 5 * bm))) if trial % 3 else (0, 0)
            pk = _packing(int(rng.integers(1 << 30)), batch, max_q, 4, pad_q=pad, p_empty=(0.0, 0.3, 0.9)[trial % 3])
            cu_q = np.asarray(pk["cu_q"], np.int32)
            tq = max(pk["tq"], 1)
            spec = AttentionSpec(mode="varlen", batch=batch, seqlen_q=tq, seqlen_k=pk["tk"], num_heads_q=1,
                                 num_heads_k=1, head_dim=16, dtype="float16", softmax_scale=0.25,
                                 window=Window(-1, -1), varlen=VarlenSpec(max(tq, bm), 4, False))  # keeps bm
            launch = plan_varlen.plan_forward(spec, "sm90", overrides={"fwd": (bm, 16, 4, 1)})
            assert launch.meta["BLOCK_M"] == bm and launch.meta["SEQ_PAD"] >= batch
            n_progs = launch.grid[0]
            out = np.full((n_progs, 3), -7, np.int32)
            probe[(n_progs,)](_NpTensor(cu_q, tl.int32), _NpTensor(out, tl.int32), batch,
                              BLOCK_M=bm, SEQ_PAD=launch.meta["SEQ_PAD"])
            tiles = -(-np.diff(cu_q) // bm)
            n_tiles = int(tiles.sum())
            want = [(b, j) for b in range(batch) for j in range(tiles[b])]
            want += [(batch, p) for p in range(n_progs - n_tiles)]
            uncovered = int(cu_q[0] + tq - cu_q[-1])
            checked += 1
            if ([tuple(r) for r in out[:, :2].tolist()] != want or not np.all(out[:, 2] == n_tiles)
                    or n_progs - n_tiles < max(1, -(-uncovered // bm))):
                failures.append(dict(batch=batch, cu_q=cu_q.tolist()[:50], tq=tq, grid=n_progs, n_tiles=n_tiles))
    return {"checked": checked, "failures": failures[:3], "n_failures": len(failures)}


results = results_fixture(__file__, {**CASES, **MAP_CASES}, nproc=2)


@pytest.mark.parametrize("name", list(CASES))
def test_varlen_forward_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["no_nan"], r
    assert r["out"] < TOL, r
    assert r["lse"] < 1e-2, r
    assert r["lse_inf_match"] and r["empty_out_zero"], r


def test_varlen_edge_cases_are_exercised(results):
    assert sum(results[n].get("n_uncovered", 0) for n in CASES) > 0
    assert sum(results[n].get("n_empty", 0) for n in CASES) > 0
    assert {results[n].get("compact") for n in CASES} == {True, False}  # both grids
    assert results["many_short_causal"]["n_short"] >= 20 and results["many_short_causal"]["n_zero_len"] >= 5


@pytest.mark.parametrize("name", list(MAP_CASES))
def test_varlen_tile_map_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["checked"] > 0 and r["n_failures"] == 0, r


def test_varlen_plan():
    from fa3jax.backends.triton import plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, VarlenSpec

    spec = AttentionSpec(mode="varlen", batch=3, seqlen_q=1000, seqlen_k=1200, num_heads_q=8, num_heads_k=2,
                         head_dim=96, dtype="bfloat16", softmax_scale=0.1, window=Window(-1, 0),
                         varlen=VarlenSpec(500, 700, False))
    assert plan_varlen.check(spec) is None
    launch = plan_varlen.plan_forward(spec, "sm90")
    bm = launch.meta["BLOCK_M"]
    # Compact grid: batch + (total_q - batch) // BLOCK_M + 1 programs per head, at most one per real tile plus
    # the spare ones; max_seqlen_q plays no part in it.
    assert launch.grid == (3 + 997 // bm + 1, 8, 1) and launch.meta["SEQ_PAD"] == 16
    assert launch.outputs == (("out", (1000, 8, 96), "bfloat16"), ("lse", (8, 1000), "float32"))
    assert all(k.isupper() for k in launch.meta)
    assert plan_varlen.check(spec.replace(dtype="float32"))
    assert plan_varlen.check(spec.replace(mode="dense", varlen=None))
    empty = spec.replace(varlen=VarlenSpec(0, 0, False))
    e = plan_varlen.plan_forward(empty, "sm90")  # the tiles shrink to 16 rows; still a program per 16 rows
    assert e.grid == (3 + 997 // e.meta["BLOCK_M"] + 1, 8, 1)
    # SEQ_PAD: the next power of two >= batch; beyond COMPACT_MAX_BATCH the per-sequence grid.
    cap = plan_varlen.COMPACT_MAX_BATCH
    big = spec.replace(batch=cap, seqlen_q=100 * cap)
    assert plan_varlen.plan_forward(big, "sm90").meta["SEQ_PAD"] == cap
    assert plan_varlen.plan_forward(spec.replace(batch=17), "sm90").meta["SEQ_PAD"] == 32
    fallback = plan_varlen.plan_forward(big.replace(batch=cap + 1), "sm90")
    assert fallback.grid == (-(-500 // bm), 8, cap + 2) and fallback.meta["SEQ_PAD"] == 0
    forced = plan_varlen.plan_forward(spec, "sm90", overrides={"compact_max_batch": 2})
    assert forced.grid == (-(-500 // bm), 8, 4) and forced.meta["SEQ_PAD"] == 0
    assert plan_varlen.plan_forward(empty, "sm90", overrides={"compact_max_batch": 0}).grid[0] == 1


def test_varlen_compact_grid_bound():
    """Host-side arithmetic of the compact grid: for any packing the plan's program count covers the real tiles
    plus cdiv(uncovered rows, BLOCK_M) spare programs, and never exceeds cdiv(total_q, BLOCK_M) + batch."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        bm = int(rng.choice([16, 32, 64, 128]))
        batch = int(rng.integers(1, 50))
        lens = rng.integers(0, 3 * bm, batch) * (rng.random(batch) > 0.3)
        if rng.random() < 0.3:
            lens = (lens // bm) * bm + 1  # every sequence ends with a one-row tile: the bound is tightest
        covered = int(lens.sum())
        uncovered = int(rng.integers(0, 4 * bm)) if rng.random() < 0.7 else 0
        total_q = covered + uncovered
        n_progs = batch + (total_q - batch) // bm + 1  # plan_varlen.plan_forward
        n_tiles = int((-(-lens // bm)).sum())
        assert n_progs - n_tiles >= max(1, -(-uncovered // bm)), (bm, lens.tolist(), uncovered)
        assert n_progs <= -(-total_q // bm) + batch or total_q == 0


if __name__ == "__main__":
    main(__file__, _run_case, CASES)

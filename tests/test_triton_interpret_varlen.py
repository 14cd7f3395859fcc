"""The varlen (packed) Triton forward kernel under Triton's CPU interpreter, against ``fa3jax.reference.varlen``.

Same scheme as ``tests/test_triton_interpret.py`` (``tests/triton_interp_harness.py``): kernels run in worker
subprocesses with ``TRITON_INTERPRET=1``; the test functions read JSON verdicts. Outputs are pre-filled with NaN
so that any element the kernel forgets to write (uncovered rows, tiles past a sequence's end) fails.
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

from tests.triton_interp_harness import interpret, main, rel, results_fixture  # noqa: E402

TOL = 1e-2

# Sequences: empty q sequences, empty k sequences, q rows before cu_q[0] and after cu_q[-1] (uncovered).
_CU_Q = [3, 20, 20, 45, 52, 53]
_CU_K = [0, 30, 31, 31, 70, 72]
_TQ, _TK = 60, 75
CASES = {
    "full_d64": dict(hq=2, hk=2, d=64, window=(-1, -1), blocks=(16, 16)),
    "causal_d40_seqused": dict(hq=2, hk=2, d=40, window=(-1, 0), blocks=(16, 32), seqused=[25, 1, 0, 33, 0]),
    "window_8_4_gqa": dict(hq=4, hk=2, d=16, window=(8, 4), blocks=(16, 16), overlap=False),
    "window_16_inf_mqa": dict(hq=4, hk=1, d=16, window=(16, -1), blocks=(32, 16), seqused=[30, 0, 0, 20, 2]),
    "softcap_causal_d64": dict(hq=2, hk=1, d=64, window=(-1, 0), softcap=2.0, blocks=(16, 16)),
    "no_uncovered_one_seq": dict(hq=1, hk=1, d=32, window=(-1, 0), blocks=(16, 16), cu_q=[0, 37], cu_k=[0, 50],
                                 tq=37, tk=50),
}


def _run_case(name):
    from fa3jax import reference
    from fa3jax.backends.triton import plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, VarlenSpec
    from fa3jax.tuning import Tuning

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
    launch = plan_varlen.plan_forward(spec, "sm90", Tuning(fwd=c["blocks"] + (4, 1, c.get("overlap", True))))
    arrays = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  seqused_k=seqused if seqused is not None else cu_k)
    out, lse = interpret(launch, arrays)
    finite = np.isfinite(ref_lse)
    covered = np.zeros(tq, bool)
    covered[cu_q[0]:cu_q[-1]] = True
    empty = ~finite  # (hq, tq): rows that see nothing (incl. uncovered rows)
    return {
        "out": rel(out, ref_out),
        "lse": float(np.max(np.abs(lse[finite] - ref_lse[finite]), initial=0.0)),
        "lse_inf_match": bool(np.array_equal(np.isneginf(lse), empty)),
        "empty_out_zero": bool(np.all(out.transpose(1, 0, 2)[empty] == 0)),
        "n_empty": int(empty.sum()),
        "n_uncovered": int((~covered).sum()),
        "no_nan": bool(np.all(np.isfinite(out)) and not np.any(np.isnan(lse))),
    }


results = results_fixture(__file__, CASES, nproc=2)


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


def test_varlen_plan():
    from fa3jax.backends.triton import plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, VarlenSpec

    spec = AttentionSpec(mode="varlen", batch=3, seqlen_q=1000, seqlen_k=1200, num_heads_q=8, num_heads_k=2,
                         head_dim=96, dtype="bfloat16", softmax_scale=0.1, window=Window(-1, 0),
                         varlen=VarlenSpec(500, 700, False))
    assert plan_varlen.check(spec) is None
    launch = plan_varlen.plan_forward(spec, "sm90")
    assert launch.grid == (-(-500 // launch.meta["BLOCK_M"]), 8, 4)
    assert launch.outputs == (("out", (1000, 8, 96), "bfloat16"), ("lse", (8, 1000), "float32"))
    assert all(k.isupper() for k in launch.meta)
    assert plan_varlen.check(spec.replace(dtype="float32"))
    assert plan_varlen.check(spec.replace(mode="dense", varlen=None))
    empty = spec.replace(varlen=VarlenSpec(0, 0, False))
    assert plan_varlen.plan_forward(empty, "sm90").grid[0] == 1
    # The varlen forward has its own (narrower-key) tile for unmasked d=128 on sm90; causal and other archs keep
    # the dense forward's entry.
    from fa3jax.backends.triton import tables
    full = spec.replace(window=Window(-1, -1))  # head_dim 96: the d=128 bucket
    varlen_tile = plan_varlen.plan_forward(full, "sm90").meta
    assert (varlen_tile["BLOCK_M"], varlen_tile["BLOCK_N"]) == tuple(tables.lookup_varlen_fwd(96, "bfloat16", False,
                                                                                              "sm90")[:2])
    assert tables.lookup_varlen_fwd(96, "bfloat16", False, "sm90") != tables.lookup(96, "bfloat16", False, "sm90").fwd
    for causal, arch in ((True, "sm90"), (False, "sm80")):
        assert tables.lookup_varlen_fwd(96, "bfloat16", causal, arch) == tables.lookup(96, "bfloat16", causal, arch).fwd


if __name__ == "__main__":
    main(__file__, _run_case, CASES)

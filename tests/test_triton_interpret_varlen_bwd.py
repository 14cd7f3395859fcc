"""The varlen (packed) Triton backward kernels under Triton's CPU interpreter, against ``fa3jax.reference.varlen``.

Same scheme as ``tests/test_triton_interpret_varlen.py``: kernels run in worker subprocesses with
``TRITON_INTERPRET=1`` over numpy-backed tensors, outputs pre-filled with NaN so that any element the kernels
forget to write (rows outside every sequence, rows past seqused_k, key tiles past a sequence's end) fails. The
backward consumes the float64 reference's out/lse (rounded to the kernel dtypes), so it is tested on its own.
On the GPU they run through TritonBackend in the shared suite (tests/test_triton_backend.py).
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

# Empty q sequence (20, 20), empty k sequence (31, 31), q rows before cu_q[0] / after cu_q[-1] and k rows
# before cu_k[0] / after cu_k[-1] (outside every sequence).
_CU_Q = [3, 20, 20, 45, 52, 53]
_CU_K = [2, 30, 31, 31, 70, 72]
_TQ, _TK = 60, 75  # seqused_k must stay <= the cu_k difference (the host sanitizer clamps it)
_B16 = {"bwd_dkdv": (16, 16), "bwd_dq": (16, 16)}
_MIX = {"bwd_dkdv": (16, 32), "bwd_dq": (32, 16)}
CASES = {
    "full_d64": dict(hq=2, hk=2, d=64, window=(-1, -1), blocks=_B16),
    "causal_d40_seqused_gqa42": dict(hq=4, hk=2, d=40, window=(-1, 0), blocks=_MIX, seqused=[25, 1, 0, 33, 0]),
    # overlap (tables.TileConfig.overlap) is on for the dK/dV kernel except where a case sets it False.
    "window_8_4_gqa42": dict(hq=4, hk=2, d=16, window=(8, 4), blocks=_B16, overlap=False),
    "window_16_inf_mqa41_seqused": dict(hq=4, hk=1, d=16, window=(16, -1), blocks=_MIX, seqused=[28, 0, 0, 20, 2]),
    "softcap_causal_d64": dict(hq=2, hk=1, d=64, window=(-1, 0), softcap=2.0, blocks=_B16),
    "no_uncovered_one_seq": dict(hq=1, hk=1, d=32, window=(-1, 0), blocks=_MIX, cu_q=[0, 37], cu_k=[0, 50],
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
    dout = rng.standard_normal((tq, hq, d)).astype(np.float16)
    dlse = rng.standard_normal((hq, tq)).astype(np.float32)
    window = Window(*c["window"])
    scale = float(1.0 / np.sqrt(d))
    cap = c.get("softcap", 0.0)
    out, lse, ref_dq, ref_dk, ref_dv = reference.varlen(q, k, v, cu_q, cu_k, seqused, scale=scale, window=window,
                                                        softcap=cap, dout=dout, dlse=dlse)
    len_k = np.diff(cu_k) if seqused is None else seqused
    spec = AttentionSpec(mode="varlen", batch=len(cu_q) - 1, seqlen_q=tq, seqlen_k=tk, num_heads_q=hq,
                         num_heads_k=hk, head_dim=d, dtype="float16", softmax_scale=scale, window=window,
                         softcap=cap, varlen=VarlenSpec(int(np.diff(cu_q).max()), int(len_k.max()),
                                                        seqused is not None))
    assert plan_varlen.check(spec) is None, plan_varlen.check(spec)
    tune = Tuning(**{key: c["blocks"][key] + (4, 1, c.get("overlap", True)) for key in ("bwd_dkdv", "bwd_dq")})
    pre, dkdv, dq_launch = plan_varlen.plan_backward(spec, "sm90", tune)
    arrays = dict(q=q, k=k, v=v, dout=dout, dlse=dlse, out=out.astype(np.float16), lse=lse.astype(np.float32),
                  cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqused_k=seqused if seqused is not None else cu_k)
    (arrays["delta"],) = interpret(pre, arrays)
    dk, dv = interpret(dkdv, arrays)
    (dq,) = interpret(dq_launch, arrays)

    q_in = np.zeros(tq, bool)
    k_in = np.zeros(tk, bool)
    for b in range(len(cu_q) - 1):
        q_in[cu_q[b]:cu_q[b + 1]] = True
        k_in[cu_k[b]:cu_k[b] + len_k[b]] = True
    res = {key: rel(x, ref) for key, x, ref in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv))}
    res["no_nan"] = bool(all(np.all(np.isfinite(x)) for x in (dq, dk, dv)))
    res["outside_zero"] = bool(np.all(dq[~q_in] == 0) and np.all(dk[~k_in] == 0) and np.all(dv[~k_in] == 0))
    # Structurally zero gradients (rows that see nothing, keys nobody sees) must come out exactly zero.
    res["struct_zero"] = bool(np.all(dq[ref_dq == 0] == 0) and np.all(dk[ref_dk == 0] == 0)
                              and np.all(dv[ref_dv == 0] == 0))
    res["n_q_outside"] = int((~q_in).sum())
    res["n_k_outside"] = int((~k_in).sum())
    dk2, dv2 = interpret(dkdv, arrays)
    (dq2,) = interpret(dq_launch, arrays)
    res["bitwise_repeat"] = bool(np.array_equal(dq, dq2) and np.array_equal(dk, dk2) and np.array_equal(dv, dv2))
    return res


results = results_fixture(__file__, CASES, nproc=2)


@pytest.mark.parametrize("name", list(CASES))
def test_varlen_backward_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["no_nan"], r
    for key in ("dq", "dk", "dv"):
        assert r[key] < TOL, f"{key}: relative error {r[key]:.3g} ({r})"
    assert r["outside_zero"] and r["struct_zero"], r
    assert r["bitwise_repeat"], r


def test_varlen_backward_edge_cases_are_exercised(results):
    assert sum(results[n].get("n_q_outside", 0) for n in CASES) > 0
    assert sum(results[n].get("n_k_outside", 0) for n in CASES) > 0


def test_varlen_backward_plan():
    from fa3jax.backends.triton import plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, VarlenSpec

    spec = AttentionSpec(mode="varlen", batch=3, seqlen_q=1000, seqlen_k=1200, num_heads_q=8, num_heads_k=2,
                         head_dim=96, dtype="bfloat16", softmax_scale=0.1, window=Window(-1, 0),
                         varlen=VarlenSpec(500, 700, True))
    pre, dkdv, dq = plan_varlen.plan_backward(spec, "sm90")
    assert pre.outputs == (("delta", (8, 1000), "float32"),) and pre.grid[1:] == (8, 1)
    assert dkdv.grid == (-(-700 // dkdv.meta["BLOCK_N"]), 2, 4)
    assert dkdv.outputs == (("dk", (1200, 2, 96), "bfloat16"), ("dv", (1200, 2, 96), "bfloat16"))
    assert dq.grid == (-(-500 // dq.meta["BLOCK_M"]), 8, 4)
    assert dq.outputs == (("dq", (1000, 8, 96), "bfloat16"),)
    assert ("array", "seqused_k") in dkdv.args and dkdv.meta["HAS_SEQUSED"]
    assert all(k.isupper() for launch in (pre, dkdv, dq) for k in launch.meta)
    empty = spec.replace(varlen=VarlenSpec(0, 0, False))
    _, dkdv0, dq0 = plan_varlen.plan_backward(empty, "sm90", has_dlse=False)
    assert dkdv0.grid[0] == 1 and dq0.grid[0] == 1
    assert ("array", "seqused_k") not in dkdv0.args


if __name__ == "__main__":
    main(__file__, _run_case, CASES)

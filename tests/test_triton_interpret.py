"""The Triton kernels under Triton's CPU interpreter, against a float64 numpy reference.

The interpreter is chosen when ``@triton.jit`` runs, i.e. when the kernel modules are imported, and that choice
sticks for the whole process. To leave other tests of the same pytest run untouched, the kernels run in worker
subprocesses (``python tests/test_triton_interpret.py --worker CASE...``) that set ``TRITON_INTERPRET=1`` before
importing anything; the test functions only read their JSON verdicts.

Kernel arguments are numpy arrays wrapped by ``tests/triton_interp_harness.py`` (float16: numpy has no bfloat16).

The launches come from :mod:`fa3jax.backends.triton.plan_dense`, the same plans the jax-triton path executes,
with tile sizes forced small (a :class:`fa3jax.tuning.Tuning`) so that every tile-range branch (masked edge
tiles, unmasked interior tiles, skipped tiles) is reached at small sequence lengths.
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

TOL = 1e-2  # relative L2 error; fp16 inputs, fp16 P in the PV product, fp32 accumulation

# name -> case. window is (left, right) after normalization (-1 = unbounded); causal is (left, 0).
# blocks: forced tiles (block_m, block_n) for fwd / dkdv / dq; small so that several tiles exist.
_B16 = {"fwd": (16, 16), "bwd_dkdv": (16, 16), "bwd_dq": (16, 16)}
_MIX = {"fwd": (32, 16), "bwd_dkdv": (16, 32), "bwd_dq": (32, 16)}
_MIX2 = {"fwd": (16, 32), "bwd_dkdv": (32, 16), "bwd_dq": (16, 32)}
CASES = {
    "full_b2_l37_d64": dict(b=2, lq=37, lk=37, hq=2, hk=2, d=64, window=(-1, -1), blocks=_B16),
    # overlap (tables.TileConfig.overlap) is on for the forward and dK/dV kernels except in the cases that set it
    # False; the forward takes flash_fwd._fwd_tiles_overlap where the head dim needs no padding and there is no
    # softcap.
    "full_interior_l64": dict(b=1, lq=64, lk=64, hq=1, hk=1, d=16, window=(-1, -1), blocks=_MIX, overlap=False),
    "causal_l65_d40": dict(b=1, lq=65, lk=65, hq=2, hk=2, d=40, window=(-1, 0), blocks=_B16),
    "causal_lq37_lk80_d16": dict(b=1, lq=37, lk=80, hq=2, hk=2, d=16, window=(-1, 0), blocks=_MIX),
    "causal_lq80_lk37_empty_rows": dict(b=1, lq=80, lk=37, hq=2, hk=2, d=40, window=(-1, 0), blocks=_MIX2),
    "window_8_4_l65_d64": dict(b=1, lq=65, lk=65, hq=2, hk=2, d=64, window=(8, 4), blocks=_B16),
    "window_8_4_lq70_lk50": dict(b=1, lq=70, lk=50, hq=1, hk=1, d=40, window=(8, 4), blocks=_MIX),
    "window_16_inf_lq50_lk77": dict(b=2, lq=50, lk=77, hq=2, hk=1, d=16, window=(16, -1), blocks=_MIX2),
    "window_3_2_lq40_lk20_empty": dict(b=1, lq=40, lk=20, hq=1, hk=1, d=16, window=(3, 2), blocks=_B16),
    "gqa_4_2_causal_d40": dict(b=2, lq=37, lk=37, hq=4, hk=2, d=40, window=(-1, 0), blocks=_B16),
    "mqa_4_1_window_16_inf": dict(b=1, lq=65, lk=65, hq=4, hk=1, d=16, window=(16, -1), blocks=_MIX),
    "softcap_causal_d64": dict(b=1, lq=37, lk=50, hq=2, hk=1, d=64, window=(-1, 0), softcap=2.0, blocks=_B16),
    "softcap_full_d40": dict(b=1, lq=33, lk=33, hq=1, hk=1, d=40, window=(-1, -1), softcap=1.5, blocks=_MIX),
    # scale < 0 takes the kernels' other scaling path (SCALE_POS off), masked tiles included.
    "causal_negative_scale_d16": dict(b=1, lq=40, lk=40, hq=2, hk=1, d=16, window=(-1, 0), scale=-0.3, blocks=_B16),
    "decode_lq1_lk65_causal": dict(b=2, lq=1, lk=65, hq=4, hk=2, d=64, window=(-1, 0), blocks=_B16),
    # Ring attention blocks: global positions = offset + local index, masks against the global lengths.
    "ring_causal_q32_k16": dict(b=1, lq=32, lk=48, hq=2, hk=2, d=16, window=(-1, 0), blocks=_MIX,
                                offsets=(32, 16), glen=(96, 96)),
    "ring_window_q64_k50": dict(b=1, lq=37, lk=40, hq=2, hk=1, d=40, window=(8, 4), blocks=_B16,
                               offsets=(64, 50), glen=(100, 90)),
    "ring_rows_past_end": dict(b=1, lq=32, lk=32, hq=1, hk=1, d=16, window=(-1, 0), blocks=_B16,
                               offsets=(70, 60), glen=(96, 96)),
    "ring_full_neg_offset": dict(b=1, lq=24, lk=40, hq=1, hk=1, d=16, window=(-1, -1), blocks=_MIX,
                                 offsets=(-5, 10), glen=(64, 45)),
}


def _reference(c, q, k, v, dout, dlse):
    """float64 forward and backward from the definition, mask from fa3jax.masking.allowed."""
    from fa3jax.masking import Window, allowed

    q, k, v, dout, dlse = (x.astype(np.float64) for x in (q, k, v, dout, dlse))
    hq, hk, d = c["hq"], c["hk"], c["d"]
    g = hq // hk
    ke, ve = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = c.get("scale", 1.0 / np.sqrt(d))
    cap = c.get("softcap", 0.0)
    qo, ko = c.get("offsets", (0, 0))
    global_seqlen_q, global_seqlen_k = c.get("glen", (c["lq"], c["lk"]))
    rows = np.arange(c["lq"])[:, None] + qo
    cols = np.arange(c["lk"])[None, :] + ko
    mask = allowed(rows, cols, global_seqlen_q, global_seqlen_k, Window(*c["window"]), np)  # (lq, lk)
    raw = np.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    if cap > 0:
        t = np.tanh(raw / cap)
        s = cap * t
    else:
        t = None
        s = raw
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m_safe), 0.0)
    l = e.sum(-1, keepdims=True)
    p = e / np.where(l > 0, l, 1.0)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l > 0, l, 1.0))[..., 0] + m_safe[..., 0], -np.inf)
    out = np.einsum("bhqk,bkhd->bqhd", p, ve)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, ve)
    delta = np.einsum("bqhd,bqhd->bhq", dout, out) - dlse
    ds = p * (dp - delta[..., None])
    if t is not None:
        ds = ds * (1 - t * t)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dke = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dve = np.einsum("bhqk,bqhd->bkhd", p, dout)
    b, lk = k.shape[:2]
    dk = dke.reshape(b, lk, hk, g, d).sum(3)
    dv = dve.reshape(b, lk, hk, g, d).sum(3)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, row_empty=~mask.any(1), col_empty=~mask.any(0))


def _spec(c):
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec

    global_seqlen_q, global_seqlen_k = c.get("glen", (None, None))
    return AttentionSpec(mode="dense", batch=c["b"], seqlen_q=c["lq"], seqlen_k=c["lk"], num_heads_q=c["hq"],
                         num_heads_k=c["hk"], head_dim=c["d"], dtype="float16",
                         softmax_scale=float(c.get("scale", 1.0 / np.sqrt(c["d"]))), window=Window(*c["window"]),
                         softcap=c.get("softcap", 0.0), has_offsets=global_seqlen_q is not None,
                         global_seqlen_q=global_seqlen_q, global_seqlen_k=global_seqlen_k)


def _run_case(name):
    from fa3jax.backends.triton import plan_dense
    from fa3jax.tuning import Tuning

    c = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    b, lq, lk, hq, hk, d = (c[x] for x in ("b", "lq", "lk", "hq", "hk", "d"))
    q = rng.standard_normal((b, lq, hq, d)).astype(np.float16)
    k = rng.standard_normal((b, lk, hk, d)).astype(np.float16)
    v = rng.standard_normal((b, lk, hk, d)).astype(np.float16)
    dout = rng.standard_normal((b, lq, hq, d)).astype(np.float16)
    dlse = rng.standard_normal((b, hq, lq)).astype(np.float32)
    ref = _reference(c, q, k, v, dout, dlse)
    spec = _spec(c)
    arrays = dict(q=q, k=k, v=v, dout=dout, dlse=dlse, offsets=np.asarray(c.get("offsets", (0, 0)), np.int32))

    tiles = {key: c["blocks"][key] + (4, 1, c.get("overlap", True)) for key in ("fwd", "bwd_dkdv", "bwd_dq")}
    tune = Tuning(**tiles)
    fwd = plan_dense.plan_forward(spec, "sm90", tune)
    out, lse = interpret(fwd, arrays)
    res = {"out": rel(out, ref["out"])}
    finite = np.isfinite(ref["lse"])
    res["lse_inf_match"] = bool(np.array_equal(np.isneginf(lse), ~finite))
    res["lse"] = float(np.max(np.abs(lse[finite] - ref["lse"][finite]), initial=0.0))
    empty_rows = ref["row_empty"]
    res["empty_rows"] = int(empty_rows.sum())
    res["empty_out_zero"] = bool(np.all(out[:, empty_rows] == 0))

    arrays.update(out=out, lse=lse)
    pre, dkdv, dq_launch = plan_dense.plan_backward(spec, "sm90", tune)
    (arrays["delta"],) = interpret(pre, arrays)
    dk, dv = interpret(dkdv, arrays)
    (dq,) = interpret(dq_launch, arrays)
    for key, x in (("dq", dq), ("dk", dk), ("dv", dv)):
        res[key] = rel(x, ref[key])
    res["empty_dq_zero"] = bool(np.all(dq[:, empty_rows] == 0))
    res["empty_dkdv_zero"] = bool(np.all(dk[:, ref["col_empty"]] == 0) and np.all(dv[:, ref["col_empty"]] == 0))
    # Repeat the backward: must be bitwise identical (no atomics anywhere).
    dk2, dv2 = interpret(dkdv, arrays)
    (dq2,) = interpret(dq_launch, arrays)
    res["bitwise_repeat"] = bool(np.array_equal(dq, dq2) and np.array_equal(dk, dk2) and np.array_equal(dv, dv2))
    return res


results = results_fixture(__file__, CASES, nproc=4)


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < TOL, f"{key}: relative error {r[key]:.3g} ({r})"
    assert r["lse"] < 1e-2, r
    assert r["lse_inf_match"], r
    assert r["empty_out_zero"] and r["empty_dq_zero"] and r["empty_dkdv_zero"], r
    assert r["bitwise_repeat"], r


def test_empty_rows_are_exercised(results):
    # The suite must reach the "row sees no key" path, not only claim to.
    assert sum(results[n].get("empty_rows", 0) for n in CASES) > 0


def test_availability_on_cpu_does_not_raise():
    from fa3jax.backends.triton import TritonBackend

    ok, reason = TritonBackend().availability()
    assert isinstance(ok, bool) and isinstance(reason, str)
    if not ok:
        assert reason


def test_plan_shapes_and_tuning():
    from fa3jax.backends.triton import plan_dense, tables
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec

    for d, pad in ((8, 16), (40, 64), (64, 64), (72, 128), (80, 128), (96, 128), (192, 256), (256, 256)):
        assert tables.head_dim_pad(d) == pad
    spec = AttentionSpec(mode="dense", batch=2, seqlen_q=1000, seqlen_k=1037, num_heads_q=8, num_heads_k=2,
                         head_dim=96, dtype="bfloat16", softmax_scale=0.1, window=Window(-1, 0))
    fwd = plan_dense.plan_forward(spec, "sm90")
    meta = fwd.meta
    assert meta["HEAD_DIM"] == 96 and meta["HEAD_DIM_PAD"] == 128 and meta["REVERSE_M"]
    assert fwd.grid == (-(-1000 // meta["BLOCK_M"]), 8, 2)
    pre, dkdv, dq = plan_dense.plan_backward(spec, "sm90")
    assert dkdv.grid[1:] == (2, 2) and dq.grid[1:] == (8, 2)
    assert dkdv.outputs[0][1] == (2, 1037, 2, 96)
    # Unknown arch falls back to the default entry; sm89 maps to the sm80 one.
    assert tables.lookup(128, "float16", True, "sm75") == tables.DEFAULT
    assert tables.lookup(128, "float16", True, "sm89") == tables.lookup(128, "float16", True, "sm80")
    bad = spec.replace(dtype="float32")
    assert plan_dense.check(bad) and plan_dense.check(spec.replace(mode="varlen"))
    assert plan_dense.check(spec.replace(num_heads_q=65536, num_heads_k=1))  # grid limit
    assert plan_dense.check(spec) is None
    # The mask reaches the kernels as one constexpr group and the runtime offsets/global lengths as arguments.
    assert meta["MASK"] == (-1, 0, False, False, False) and ("i32", spec.global_seqlen_k) in fwd.args


def test_backend_wiring_with_fake_jax_triton(monkeypatch):
    """TritonBackend.forward/backward under jax.jit with a stand-in jax_triton that checks what it is given
    (arrays, int and float32 scalars, out shapes, constexprs) and returns zeros: the host glue without a GPU."""
    import types

    import jax
    import jax.numpy as jnp

    from fa3jax.backends.base import DenseArgs
    from fa3jax.backends.triton import TritonBackend, launch
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec

    calls = []

    def triton_call(*args, kernel, out_shape, grid, num_warps, num_stages, name, **meta):
        assert all(isinstance(a, (jax.Array, int, np.float32)) for a in args), [type(a) for a in args]
        assert len(grid) == 3 and all(isinstance(g, int) and g > 0 for g in grid)
        assert all(k.isupper() for k in meta)
        calls.append((kernel, grid, meta))
        return [jnp.zeros(o.shape, o.dtype) for o in out_shape]

    monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=triton_call))
    monkeypatch.setattr(launch, "kernel", lambda lnch: lnch.kernel)
    spec = AttentionSpec(mode="dense", batch=2, seqlen_q=33, seqlen_k=47, num_heads_q=4, num_heads_k=2,
                         head_dim=40, dtype="bfloat16", softmax_scale=0.2, window=Window(8, 0),
                         has_offsets=True, global_seqlen_q=100, global_seqlen_k=100)
    q = jnp.ones((2, 33, 4, 40), jnp.bfloat16)
    k = jnp.ones((2, 47, 2, 40), jnp.bfloat16)
    args = DenseArgs(jnp.int32(10), jnp.int32(3))
    be = TritonBackend()
    out, lse = jax.jit(lambda q, k, v, a: be.forward(spec, q, k, v, a))(q, k, k, args)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (2, 4, 33) and lse.dtype == jnp.float32
    grads = jax.jit(lambda *xs: be.backward(spec, *xs))(q, k, k, out, lse, q, lse, args)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    assert [c[0] for c in calls] == ["_attn_fwd", "_bwd_preprocess", "_bwd_dkdv", "_bwd_dq"]
    # fa3jax.tuning.override reaches the plans at trace time.
    from fa3jax.tuning import Tuning, override

    calls.clear()
    with override(Tuning(fwd=(16, 16, 4, 1))):
        jax.jit(lambda q, k, v, a: be.forward(spec, q, k, v, a))(q, k, k, args)
    assert (calls[0][2]["BLOCK_M"], calls[0][2]["BLOCK_N"]) == (16, 16) and calls[0][1][0] == 3
    with pytest.raises(NotImplementedError):
        be.check_forward(spec.replace(dtype="float32"))


if __name__ == "__main__":
    main(__file__, _run_case, CASES)

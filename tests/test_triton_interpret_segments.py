"""Packed-sequence segment ids in the Triton dense kernels, under Triton's CPU interpreter, against the float64
reference (``fa3jax.reference.dense`` with ``q_segment_ids``/``kv_segment_ids``).

Same worker-subprocess scheme as ``tests/test_triton_interpret_sinks_mla.py`` (``tests/triton_interp_harness.py``):
the launches come from ``plan_dense`` with small forced tiles, so several tiles per row and partial edge tiles are
reached at tiny sizes; outputs start as NaN. Checked: out, LSE, dq/dk/dv (and d sinks where the case has sinks)
within ``FACTOR`` times the float16 reference's error; rows whose segment sees no key give out exactly 0 and LSE
exactly -inf (or the sink). Segment ids are per batch row (the kernels find row b's ids at b * lq, and the key
ids after all query ids), so most cases pack the two rows differently. On the GPU the same kernels run in
``tests/test_triton_gpu.py`` (``test_segment_ids``).
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

_B16 = {"fwd": (16, 16), "bwd_dkdv": (16, 16), "bwd_dq": (16, 16)}
_MIX = {"fwd": (32, 16), "bwd_dkdv": (16, 32), "bwd_dq": (32, 16)}

# q_lens / k_lens: per batch row, the lengths of consecutive segments (ids 0, 1, ...); "k_ids_of" renames key
# segments (ids absent from the queries make query segments that see no key); "interleave": random ids in
# [0, n) instead of contiguous runs. window after normalization ((left, 0) = causal).
CASES = {
    "seg_full_gqa": dict(q_lens=[[7, 13, 20], [40]], hq=4, hk=2, d=32, window=(-1, -1), blocks=_B16),
    "seg_causal": dict(q_lens=[[5, 9, 20, 14], [24, 24]], hq=2, hk=1, d=16, window=(-1, 0), blocks=_MIX),
    "seg_window_softcap": dict(q_lens=[[10, 17, 23], [1, 30, 19]], hq=2, hk=2, d=40, window=(6, 3), softcap=3.0,
                               blocks=_B16),
    "seg_left_window_mqa": dict(q_lens=[[33, 14], [3, 3, 41]], hq=4, hk=1, d=16, window=(9, -1), blocks=_MIX),
    # query segment 1 has no key segment of its id: its rows see no key (out 0, lse -inf)
    "seg_rows_without_keys": dict(q_lens=[[10, 12, 10], [16, 16]], k_lens=[[15, 17], [20, 12]],
                                  k_ids_of=[[0, 2], [0, 5]], hq=2, hk=1, d=16, window=(-1, -1), blocks=_B16),
    # lq != lk: cross packing, causal bottom-right (diagonal shift lk - lq) on packed positions
    "seg_cross_causal_lq_lt_lk": dict(q_lens=[[10, 14], [24]], k_lens=[[20, 20], [40]], hq=4, hk=1, d=32,
                                      window=(-1, 0), blocks=_MIX),
    "seg_cross_window_lq_gt_lk": dict(q_lens=[[20, 20], [5, 35]], k_lens=[[12, 12], [16, 8]], hq=2, hk=2, d=16,
                                      window=(8, 2), softcap=2.0, blocks=_B16),
    # non-contiguous ids (tokens of one segment scattered over the row), with sinks: empty rows get lse = sink
    "seg_interleaved_sinks": dict(q_lens=[[36], [36]], interleave=3, hq=2, hk=1, d=16, window=(-1, -1), sinks=True,
                                  blocks=_B16),
    "seg_causal_sinks_empty_rows": dict(q_lens=[[8, 8, 16], [32]], k_lens=[[16, 16], [32]], k_ids_of=[[0, 1], [3]],
                                        hq=2, hk=2, d=16, window=(-1, 0), sinks=True, blocks=_MIX),
    # MLA with power-of-two head dims: the forward's overlapped unmasked loop exists but segments skip it
    "seg_mla_128_64_causal": dict(q_lens=[[11, 21], [32]], hq=2, hk=1, d=128, dv=64, window=(-1, 0), blocks=_B16),
}


def _ids(lens, names=None):
    names = list(range(len(lens))) if names is None else names
    return np.concatenate([np.full(n, names[i], np.int32) for i, n in enumerate(lens)])


def segment_ids(c, rng):
    """(q_ids (b, lq), k_ids (b, lk)) of a case."""
    if "interleave" in c:
        n = c["interleave"]
        q = np.stack([rng.integers(0, n, sum(lens)).astype(np.int32) for lens in c["q_lens"]])
        return q, q.copy()
    q = np.stack([_ids(lens) for lens in c["q_lens"]])
    k_lens = c.get("k_lens", c["q_lens"])
    names = c.get("k_ids_of", [None] * len(k_lens))
    return q, np.stack([_ids(lens, nm) for lens, nm in zip(k_lens, names)])


def _run_case(name):
    from fa3jax.backends.triton import plan_dense
    from fa3jax.masking import allowed
    from tests.test_triton_interpret_sinks_mla import _empty_row_checks, _fwd_bwd, dense_problem, fwd_bwd_verdicts

    c = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    qids, kids = segment_ids(c, rng)
    (b, lq), lk = qids.shape, kids.shape[1]
    spec, arrays, ref, low, sinks = dense_problem(c, rng, b, lq, lk, segments=(qids, kids))
    assert plan_dense.check(spec) is None, plan_dense.check(spec)
    got = _fwd_bwd(plan_dense, spec, c, arrays, sinks)
    res = fwd_bwd_verdicts(got, ref, low)
    pos_ok = allowed(np.arange(lq)[:, None], np.arange(lk)[None, :], lq, lk, spec.window, np)
    sees = (pos_ok[None] & (qids[:, :, None] == kids[:, None, :])).any(-1)  # (b, lq)
    hq = spec.num_heads_q
    _empty_row_checks(res, got[0], got[1], sinks, np.broadcast_to(~sees[:, None, :], (b, hq, lq)), (2, 1))
    # segments really cut something: some position-visible pair is masked by the ids alone
    res["segments_matter"] = bool((pos_ok[None] & (qids[:, :, None] != kids[:, None, :])).any())
    return res


results = results_fixture(__file__, CASES, nproc=2)


@pytest.mark.parametrize("name", list(CASES))
def test_segments_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["shapes_ok"] and r["no_nan"] and r["segments_matter"], r
    want = ["out", "lse", "dq", "dk", "dv"] + (["dsinks"] if CASES[name].get("sinks") else [])
    assert r["names"] == want
    for key in want:
        assert r[key] <= r[key + "_tol"], f"{key}: relative error {r[key]:.3g} > {r[key + '_tol']:.3g} ({r})"
    assert r["empty_out_zero"] and r["empty_lse_exact"], r


def test_rows_without_keys_are_exercised(results):
    for name in ("seg_rows_without_keys", "seg_causal_sinks_empty_rows"):
        assert results[name].get("n_empty", 0) > 0, (name, results[name])


def _spec(**kw):
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec

    base = dict(mode="dense", batch=2, seqlen_q=100, seqlen_k=120, num_heads_q=8, num_heads_k=2, head_dim=64,
                dtype="bfloat16", softmax_scale=0.125, window=Window(-1, 0), has_segment_ids=True)
    return AttentionSpec(**{**base, **kw})


def test_plans_carry_segment_ids():
    from fa3jax.backends.triton import plan_dense

    spec = _spec()
    launches = [plan_dense.plan_forward(spec, "sm90"), *plan_dense.plan_backward(spec, "sm90")[1:]]
    for l in launches:
        assert l.meta["MASK"] == (-1, 0, False, False, True) and ("array", "segment_ids") in l.args, l
    plain = plan_dense.plan_forward(spec.replace(has_segment_ids=False), "sm90")
    assert plain.meta["MASK"] == (-1, 0, False, False, False) and ("array", "segment_ids") not in plain.args
    assert "ring offsets" in plan_dense.check(spec.replace(has_offsets=True, global_seqlen_q=200,
                                                           global_seqlen_k=240))


def test_backend_serves_dense_segment_ids_only(monkeypatch):
    """TritonBackend's host glue with a stand-in jax_triton (as tests/test_triton_interpret_sinks_mla.py does):
    dense calls with segment ids pass the check and hand every dense launch the ids as one int32 vector (query
    ids then key ids); ring blocks and other modes with segment ids are refused with a reason."""
    import types

    import jax
    import jax.numpy as jnp

    from fa3jax.backends.base import DenseArgs
    from fa3jax.backends.triton import TritonBackend, launch
    from fa3jax.spec import VarlenSpec

    calls = []

    def triton_call(*args, kernel, out_shape, grid, num_warps, num_stages, name, **meta):
        calls.append((kernel, meta, [np.asarray(a) for a in args if isinstance(a, jax.Array)]))
        return [jnp.zeros(o.shape, o.dtype) for o in out_shape]

    monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=triton_call))
    monkeypatch.setattr(launch, "kernel", lambda lnch: lnch.kernel)
    be = TritonBackend()
    spec = _spec(seqlen_q=5, seqlen_k=3, num_heads_q=2, num_heads_k=1, head_dim=16)
    be.check_forward(spec)
    be.check_backward(spec)
    qids = jnp.asarray([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]], jnp.int16)
    kids = jnp.asarray([[0, 1, 1], [3, 3, 2]], jnp.int32)
    args = DenseArgs(q_segment_ids=qids, k_segment_ids=kids)
    q = jnp.ones((2, 5, 2, 16), jnp.bfloat16)
    k = v = jnp.ones((2, 3, 1, 16), jnp.bfloat16)
    out, lse = be.forward(spec, q, k, v, args)
    grads = be.backward(spec, q, k, v, out, lse, out, lse, args)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    want = np.asarray([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 0, 1, 1, 3, 3, 2], np.int32)
    dense = [c for c in calls if c[0] in ("_attn_fwd", "_bwd_dkdv", "_bwd_dq")]
    assert [c[0] for c in dense] == ["_attn_fwd", "_bwd_dkdv", "_bwd_dq"]
    for kernel, meta, arrays in dense:
        assert meta["MASK"][4] is True, kernel
        assert any(a.dtype == np.int32 and np.array_equal(a, want) for a in arrays), kernel
    ring = spec.replace(has_offsets=True, global_seqlen_q=10, global_seqlen_k=6)
    with pytest.raises(NotImplementedError, match="ring offsets"):
        be.check_forward(ring)
    vspec = spec.replace(mode="varlen", batch=1, varlen=VarlenSpec(5, 3, False))
    with pytest.raises(NotImplementedError, match="segment ids"):
        be.check_forward(vspec)


if __name__ == "__main__":
    main(__file__, _run_case, CASES)

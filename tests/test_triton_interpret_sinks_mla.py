"""Attention sinks and a value head dim below the q/k one (MLA) in the Triton kernels, under Triton's CPU
interpreter, against the float64 reference (``fa3jax.reference``).

Same worker-subprocess scheme as ``tests/test_triton_interpret.py`` (``tests/triton_interp_harness.py``): kernels
run in subprocesses with ``TRITON_INTERPRET=1`` over numpy arrays (float16), outputs pre-filled with NaN so that an
element the kernels forget to write fails. The launches come from the same plans the GPU path executes
(``plan_dense``, ``plan_varlen``, ``plan_decode``) with small forced tiles, so that masked edge tiles, unmasked
interior tiles (and the forward's overlapped loop) are reached at tiny sizes.

Checked: out, LSE (sink included), dq/dk/dv from the unchanged backward kernels fed the sink-inclusive LSE, and
d sinks from :func:`fa3jax.vjp.sink_grad` on the kernels' out/LSE. Tolerance: ``FACTOR`` times the error of the
reference computed with every intermediate rounded to float16 (``tests.helpers.naive_lowp``), the rule of
``tests/helpers.py``. Rows that see no key must give out exactly 0 and lse exactly the sink. The KV-cache cases
run the unsplit kernel, split-KV (3 splits, automatic) and stream-K (3 and 13 programs, automatic), which must all
count the sink once. On the GPU the same kernels run in tests/test_triton_gpu.py and tests/test_sinks_mla.py.
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

from tests.triton_interp_harness import interpret, main, results_fixture  # noqa: E402

FACTOR = 3.0  # as tests/helpers.py
FLOOR = 3e-4  # float16 floor of tests/helpers.py

_B16 = {"fwd": (16, 16), "bwd_dkdv": (16, 16), "bwd_dq": (16, 16)}
_MIX = {"fwd": (32, 16), "bwd_dkdv": (16, 32), "bwd_dq": (32, 16)}

# dense: window after normalization ((left, 0) = causal); dv = value head dim (default d)
DENSE = {
    "dense_sinks_full_gqa": dict(b=2, lq=37, lk=37, hq=4, hk=2, d=32, window=(-1, -1), sinks=True, blocks=_B16),
    # causal with lq > lk: the first rows see no key (out 0, lse = sink)
    "dense_sinks_causal_empty_rows": dict(b=1, lq=40, lk=24, hq=2, hk=1, d=16, window=(-1, 0), sinks=True,
                                          blocks=_MIX),
    "dense_sinks_window_softcap": dict(b=1, lq=50, lk=50, hq=2, hk=2, d=40, window=(8, 4), softcap=3.0, sinks=True,
                                       blocks=_B16),
    "dense_sinks_left_window_mqa": dict(b=1, lq=45, lk=60, hq=4, hk=1, d=16, window=(16, -1), sinks=True,
                                        blocks=_MIX),
    # a sink far above every score: almost all of each row's mass, out ~ 0
    "dense_sinks_dominant": dict(b=1, lq=20, lk=20, hq=2, hk=2, d=16, window=(-1, 0), sinks=True, sink_shift=12.0,
                                 blocks=_B16),
    "dense_mla_192_128_causal": dict(b=1, lq=33, lk=33, hq=2, hk=1, d=192, dv=128, window=(-1, 0), blocks=_B16),
    "dense_mla_192_128_sinks_full": dict(b=1, lq=24, lk=40, hq=2, hk=2, d=192, dv=128, window=(-1, -1), sinks=True,
                                         blocks=_MIX),
    # 128/64: both powers of two, so the forward's overlapped unmasked loop runs with V's own stride
    "dense_mla_128_64_sinks_window": dict(b=2, lq=40, lk=40, hq=2, hk=1, d=128, dv=64, window=(6, -1), sinks=True,
                                          blocks=_B16),
    "dense_mla_128_64_softcap_causal": dict(b=1, lq=30, lk=30, hq=2, hk=2, d=128, dv=64, window=(-1, 0),
                                            softcap=2.0, blocks=_MIX),
    # padded value lanes (48 -> 64) next to padded q/k lanes (80 -> 128)
    "dense_mla_80_48_gqa_sinks": dict(b=1, lq=33, lk=33, hq=4, hk=2, d=80, dv=48, window=(-1, 0), sinks=True,
                                      blocks=_B16),
}

# varlen: empty q sequence, empty k sequence, q/k rows outside every sequence
_CU_Q = [3, 20, 20, 45, 52, 53]
_CU_K = [2, 30, 31, 31, 70, 72]
_TQ, _TK = 60, 75
VARLEN = {
    "varlen_sinks_causal_gqa_seqused": dict(hq=4, hk=2, d=40, window=(-1, 0), sinks=True, blocks=_MIX,
                                            seqused=[25, 1, 0, 33, 0]),
    "varlen_sinks_full": dict(hq=2, hk=2, d=16, window=(-1, -1), sinks=True, blocks=_B16),
    "varlen_sinks_window_softcap_mqa": dict(hq=4, hk=1, d=16, window=(8, 4), softcap=4.0, sinks=True, blocks=_B16),
    "varlen_mla_192_128_causal_sinks": dict(hq=2, hk=1, d=192, dv=128, window=(-1, 0), sinks=True, blocks=_B16),
    "varlen_mla_128_64_full_seqused": dict(hq=2, hk=2, d=128, dv=64, window=(-1, -1), blocks=_MIX,
                                           seqused=[28, 0, 0, 20, 2]),
}

# kvcache (forward only): contiguous and paged, with every schedule
KV_VARIANTS = {
    "s1": dict(num_splits=1), "s3": dict(num_splits=3), "s0": dict(num_splits=0, schedule="split"),
    "k3": dict(num_splits=0, schedule="streamk", programs=3), "k13": dict(num_splits=0, schedule="streamk",
                                                                          programs=13),
    "k0": dict(num_splits=0, schedule="streamk"),
}
KVCACHE = {
    # row 2 has an empty cache: every query row of it sees no key (lse = sink)
    "kv_contig_sinks_gqa": dict(b=3, lq=1, hq=4, hk=2, d=64, cap=80, cache_b=3, seqlens=[37, 80, 0],
                                window=(-1, 0)),
    "kv_contig_sinks_leftpad_new_softcap": dict(b=2, lq=3, hq=2, hk=1, d=40, cap=64, cache_b=2, seqlens=[20, 58],
                                                leftpad=[5, 0], new=3, window=(5, -1), softcap=3.0),
    "kv_paged_sinks_hostile": dict(b=2, lq=2, hq=8, hk=2, d=64, cap=80, page=16, num_pages=12, seqlens=[70, 41],
                                   new=2, window=(-1, 0), bad_pages=[(0, 1, -3), (1, 2, 12)]),
    "kv_contig_sinks_window_empty_rows": dict(b=1, lq=6, hq=2, hk=1, d=16, cap=48, cache_b=1, seqlens=[2],
                                              window=(3, 2)),
}
CASES = {**DENSE, **VARLEN, **KVCACHE}


def _err(got, ref, low):
    """(error, tolerance) of ``got`` against the float64 ``ref``, the tolerance from the float16 twin ``low``."""
    from tests.helpers import relerr

    base = relerr(low, ref)
    base = base if np.isfinite(base) else 0.0
    return relerr(got, ref), FACTOR * max(base, FLOOR)


def _sinks(rng, hq, c):
    return (rng.standard_normal(hq) * 2.0 + c.get("sink_shift", 0.0)).astype(np.float32)


def _sink_grad(sinks, out, lse, dout, dlse):
    import jax.numpy as jnp

    from fa3jax.vjp import sink_grad

    return np.asarray(sink_grad(jnp.asarray(sinks), jnp.asarray(out), jnp.asarray(lse), jnp.asarray(dout),
                                jnp.asarray(dlse)))


def _verdicts(res, names, got, ref, low):
    for name, g, r, lo in zip(names, got, ref, low):
        res[name], res[name + "_tol"] = _err(g, r, lo)


def fwd_bwd_verdicts(got, ref, low) -> dict:
    """Verdicts of [out, lse, dq, dk, dv(, dsinks)]: each name's error and tolerance, the names, shapes, no NaN."""
    res = {}
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")[:len(got)]
    _verdicts(res, names, got, ref, low)
    res["names"] = list(names)
    res["shapes_ok"] = all(tuple(g.shape) == tuple(r.shape) for g, r in zip(got, ref))
    res["no_nan"] = bool(all(not np.any(np.isnan(g)) for g in got))
    return res


def _fwd_bwd(plan, spec, c, arrays, sinks):
    """Interpret the plan's forward, then its backward on the kernel's own out/LSE; d sinks by
    ``fa3jax.vjp.sink_grad``. Returns [out, lse, dq, dk, dv(, dsinks)]."""
    from fa3jax.tuning import Tuning

    tune = Tuning(**{key: c["blocks"][key] + (4, 1, True) for key in ("fwd", "bwd_dkdv", "bwd_dq")})
    out, lse = interpret(plan.plan_forward(spec, "sm90", tune), arrays)
    arrays.update(out=out, lse=lse)
    pre, dkdv, dq_launch = plan.plan_backward(spec, "sm90", tune)
    (arrays["delta"],) = interpret(pre, arrays)
    dk, dv = interpret(dkdv, arrays)
    (dq,) = interpret(dq_launch, arrays)
    got = [out, lse, dq, dk, dv]
    if sinks is not None:
        got.append(_sink_grad(sinks, out, lse, arrays["dout"], arrays["dlse"]))
    return got


def dense_problem(c, rng, b, lq, lk, segments=None):
    """A dense case's float16 inputs, its float64 reference and float16 twin, and its spec: returns (spec,
    arrays, ref, low, sinks). ``segments``: (q_ids (b, lq), k_ids (b, lk)) for packed sequences (the kernels then
    read them as ``segment_ids``, query ids then key ids)."""
    import functools

    from fa3jax import reference
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec
    from tests.helpers import naive_lowp

    hq, hk, d = c["hq"], c["hk"], c["d"]
    dv = c.get("dv", d)
    q = rng.standard_normal((b, lq, hq, d)).astype(np.float16)
    k = rng.standard_normal((b, lk, hk, d)).astype(np.float16)
    v = rng.standard_normal((b, lk, hk, dv)).astype(np.float16)
    dout = rng.standard_normal((b, lq, hq, dv)).astype(np.float16)
    dlse = rng.standard_normal((b, hq, lq)).astype(np.float32)
    sinks = _sinks(rng, hq, c) if c.get("sinks") else None
    scale, cap, window = 1.0 / np.sqrt(d), c.get("softcap", 0.0), Window(*c["window"])
    rkw = dict(scale=scale, window=window, softcap=cap, dout=dout, dlse=dlse,
               sinks=None if sinks is None else sinks.astype(np.float64))
    arrays = dict(q=q, k=k, v=v, dout=dout, dlse=dlse, sinks=sinks)
    if segments is not None:
        rkw.update(q_segment_ids=segments[0], kv_segment_ids=segments[1])
        arrays["segment_ids"] = np.concatenate([segments[0].reshape(-1), segments[1].reshape(-1)])
    ref = reference.dense(q, k, v, **rkw)
    low = reference.dense(q, k, v, impl=functools.partial(naive_lowp, dtype="float16"), **rkw)
    spec = AttentionSpec(mode="dense", batch=b, seqlen_q=lq, seqlen_k=lk, num_heads_q=hq, num_heads_k=hk,
                         head_dim=d, head_dim_v=dv, dtype="float16", softmax_scale=float(scale), window=window,
                         softcap=cap, has_sinks=sinks is not None, has_segment_ids=segments is not None)
    return spec, arrays, ref, low, sinks


def _dense_case(c, rng):
    from fa3jax.backends.triton import plan_dense
    from fa3jax.masking import allowed

    b, lq, lk = c["b"], c["lq"], c["lk"]
    spec, arrays, ref, low, sinks = dense_problem(c, rng, b, lq, lk)
    got = _fwd_bwd(plan_dense, spec, c, arrays, sinks)
    sees = allowed(np.arange(lq)[:, None], np.arange(lk)[None, :], lq, lk, spec.window, np).any(1)
    return got, ref, low, sinks, np.broadcast_to(~sees, (b, spec.num_heads_q, lq))


def _varlen_case(c, rng):
    import functools

    from fa3jax import reference
    from fa3jax.backends.triton import plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, VarlenSpec
    from tests.helpers import naive_lowp

    cu_q, cu_k = np.asarray(_CU_Q, np.int32), np.asarray(_CU_K, np.int32)
    hq, hk, d = c["hq"], c["hk"], c["d"]
    dv = c.get("dv", d)
    seqused = None if "seqused" not in c else np.asarray(c["seqused"], np.int32)
    q = rng.standard_normal((_TQ, hq, d)).astype(np.float16)
    k = rng.standard_normal((_TK, hk, d)).astype(np.float16)
    v = rng.standard_normal((_TK, hk, dv)).astype(np.float16)
    dout = rng.standard_normal((_TQ, hq, dv)).astype(np.float16)
    dlse = rng.standard_normal((hq, _TQ)).astype(np.float32)
    sinks = _sinks(rng, hq, c) if c.get("sinks") else None
    scale, cap, window = 1.0 / np.sqrt(d), c.get("softcap", 0.0), Window(*c["window"])
    rkw = dict(scale=scale, window=window, softcap=cap, dout=dout, dlse=dlse,
               sinks=None if sinks is None else sinks.astype(np.float64))
    ref = reference.varlen(q, k, v, cu_q, cu_k, seqused, **rkw)
    low = reference.varlen(q, k, v, cu_q, cu_k, seqused, impl=functools.partial(naive_lowp, dtype="float16"), **rkw)
    len_k = np.diff(cu_k) if seqused is None else seqused
    spec = AttentionSpec(mode="varlen", batch=len(cu_q) - 1, seqlen_q=_TQ, seqlen_k=_TK, num_heads_q=hq,
                         num_heads_k=hk, head_dim=d, head_dim_v=dv, dtype="float16", softmax_scale=float(scale),
                         window=window, softcap=cap, has_sinks=sinks is not None,
                         varlen=VarlenSpec(int(np.diff(cu_q).max()), int(len_k.max()), seqused is not None))
    assert plan_varlen.check(spec) is None, plan_varlen.check(spec)
    arrays = dict(q=q, k=k, v=v, dout=dout, dlse=dlse, sinks=sinks, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  seqused_k=seqused if seqused is not None else cu_k)
    got = _fwd_bwd(plan_varlen, spec, c, arrays, sinks)
    # rows that see no key (in an empty sequence, masked, or outside every sequence): out 0
    empty = np.isneginf(ref[1]) if sinks is None else np.zeros_like(ref[1], bool)
    if sinks is not None:
        from fa3jax.masking import allowed

        for bi in range(len(cu_q) - 1):
            lq_b, lk_b = cu_q[bi + 1] - cu_q[bi], len_k[bi]
            sees = allowed(np.arange(lq_b)[:, None], np.arange(lk_b)[None, :], lq_b, lk_b, window, np).any(1)
            empty[:, cu_q[bi]:cu_q[bi + 1]] = ~sees[None, :]
        outside = np.ones(_TQ, bool)
        outside[cu_q[0]:cu_q[-1]] = False
        empty[:, outside] = True
    return got, ref, low, sinks, empty


def _empty_row_checks(res, out, lse, sinks, empty, lse_axes):
    """empty (same layout as lse): rows that see no key. out there must be 0, lse the sink (or -inf)."""
    res["n_empty"] = int(empty.sum())
    out_rows = np.moveaxis(out, lse_axes[0], lse_axes[1])  # out's head axis to where lse has it
    res["empty_out_zero"] = bool(np.all(out_rows[empty] == 0))
    want = np.full(lse.shape, -np.inf) if sinks is None else np.broadcast_to(
        sinks.reshape([-1 if i == lse_axes[1] else 1 for i in range(lse.ndim)]), lse.shape)
    res["empty_lse_exact"] = bool(np.array_equal(lse[empty], want[empty]))


def _kv_case(c, rng):
    from fa3jax import reference
    from fa3jax.masking import allowed
    from tests.helpers import naive_lowp
    from tests.test_triton_interpret_kvcache import _materialize, build_case, run_variant

    spec, arrays = build_case(c, rng, has_sinks=True)
    b, lq, hq, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim
    sinks = arrays["sinks"] = _sinks(rng, hq, c)
    q = arrays["q"]
    rkw = dict(scale=spec.softmax_scale, window=spec.window, softcap=spec.softcap, seqlen_q=lq,
               sinks=sinks.astype(np.float64))
    ref, low = [np.zeros((b, lq, hq, d)), np.zeros((b, hq, lq))], [np.zeros((b, lq, hq, d)), np.zeros((b, hq, lq))]
    sees = np.zeros((b, hq, lq), bool)
    for i, (ks, vs, kpos, sk) in enumerate(_materialize(c, arrays["k_cache"], arrays["v_cache"], arrays)):
        ref[0][i], ref[1][i] = reference.attention(q[i], ks, vs, seqlen_k=sk, k_pos=kpos, **rkw)
        low[0][i], low[1][i] = naive_lowp(q[i], ks, vs, dtype="float16", seqlen_k=sk, k_pos=kpos, **rkw)
        sees[i] = allowed(np.arange(lq)[:, None], kpos[None, :], lq, sk, spec.window, np).any(1)[None, :]
    res, outs = {}, {}
    for key, kw in KV_VARIANTS.items():
        out, lse, launches = run_variant(spec, arrays, kw)
        outs[key] = out
        res[f"{key}_kernels"] = [l.kernel for l in launches]
        _verdicts(res, (f"{key}_out", f"{key}_lse"), (out, lse), ref, low)
        sub = {}
        _empty_row_checks(sub, out, lse, sinks, ~sees, (2, 1))
        res[f"{key}_empty_ok"] = sub["empty_out_zero"] and sub["empty_lse_exact"]
        res["n_empty"] = sub["n_empty"]
    res["schedule_spread"] = max(float(np.max(np.abs(outs[k].astype(np.float64) - outs["s1"]))) for k in outs)
    return res


def _run_case(name):
    c = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name in KVCACHE:
        return _kv_case(c, rng)
    got, ref, low, sinks, empty = (_dense_case if name in DENSE else _varlen_case)(c, rng)
    res = fwd_bwd_verdicts(got, ref, low)
    _empty_row_checks(res, got[0], got[1], sinks, empty, (2, 1) if name in DENSE else (1, 0))
    return res


results = results_fixture(__file__, CASES, nproc=2)


@pytest.mark.parametrize("name", list(DENSE) + list(VARLEN))
def test_dense_varlen_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    assert r["shapes_ok"] and r["no_nan"], r
    want = ["out", "lse", "dq", "dk", "dv"] + (["dsinks"] if CASES[name].get("sinks") else [])
    assert r["names"] == want
    for key in want:
        assert r[key] <= r[key + "_tol"], f"{key}: relative error {r[key]:.3g} > {r[key + '_tol']:.3g} ({r})"
    assert r["empty_out_zero"] and r["empty_lse_exact"], r


@pytest.mark.parametrize("name", list(KVCACHE))
def test_kvcache_sinks_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    for key in KV_VARIANTS:
        for part in ("out", "lse"):
            err, tol = r[f"{key}_{part}"], r[f"{key}_{part}_tol"]
            assert err <= tol, f"{key} {part}: relative error {err:.3g} > {tol:.3g} ({r})"
        assert r[f"{key}_empty_ok"], (key, r)
    # the schedules really differ: unsplit, split + combine, stream-K + combine
    assert r["s1_kernels"] == ["_decode_fwd"]
    assert r["s3_kernels"] == ["_decode_fwd", "_decode_combine"]
    assert r["k3_kernels"] == ["_decode_fwd_persistent", "_decode_combine_streamk"]
    assert r["schedule_spread"] < 5e-3, r  # the sink is counted once whatever the schedule


def test_edge_rows_are_exercised(results):
    """Rows that see no key (lse = sink) are reached in every family, not only claimed."""
    for family in (DENSE, VARLEN, KVCACHE):
        assert sum(results[n].get("n_empty", 0) for n in family if CASES[n].get("sinks", True)) > 0


def test_plans_carry_sinks_and_value_head_dim():
    from fa3jax.backends.triton import plan_decode, plan_dense, plan_varlen
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, KVCacheSpec, VarlenSpec

    spec = AttentionSpec(mode="dense", batch=2, seqlen_q=100, seqlen_k=120, num_heads_q=8, num_heads_k=2,
                         head_dim=192, head_dim_v=128, dtype="bfloat16", softmax_scale=0.1, window=Window(-1, 0),
                         has_sinks=True)
    fwd = plan_dense.plan_forward(spec, "sm90")
    assert fwd.meta["HAS_SINKS"] and ("array", "sinks") in fwd.args
    assert (fwd.meta["HEAD_DIM"], fwd.meta["HEAD_DIM_PAD"], fwd.meta["HEAD_DIM_V"], fwd.meta["HEAD_DIM_V_PAD"]) == (
        192, 256, 128, 128)
    assert fwd.outputs[0] == ("out", (2, 100, 8, 128), "bfloat16")
    pre, dkdv, dq = plan_dense.plan_backward(spec, "sm90")
    assert pre.meta["HEAD_DIM"] == 128  # the preprocess reads out/dout only
    assert dkdv.outputs == (("dk", (2, 120, 2, 192), "bfloat16"), ("dv", (2, 120, 2, 128), "bfloat16"))
    assert dq.outputs == (("dq", (2, 100, 8, 192), "bfloat16"),)
    assert all(("array", "sinks") not in l.args for l in (pre, dkdv, dq))  # the backward needs no sink
    plain = plan_dense.plan_forward(spec.replace(has_sinks=False, head_dim_v=192), "sm90")
    assert not plain.meta["HAS_SINKS"] and ("array", "sinks") not in plain.args
    vspec = spec.replace(mode="varlen", batch=3, varlen=VarlenSpec(50, 60, False))
    vf = plan_varlen.plan_forward(vspec, "sm90")
    assert vf.meta["HAS_SINKS"] and vf.outputs[0] == ("out", (100, 8, 128), "bfloat16")
    assert plan_varlen.plan_backward(vspec, "sm90")[1].outputs[1] == ("dv", (120, 2, 128), "bfloat16")
    kv = KVCacheSpec(capacity=4096, cache_batch=2, paged=False, page_size=0, pages_per_seq=0, seqlen_new=0,
                     rotary_dim=0, rotary_interleaved=False, has_cache_batch_idx=False, has_cache_leftpad=False,
                     num_splits=4, return_updated_cache=False)
    kspec = AttentionSpec(mode="kvcache", batch=2, seqlen_q=1, seqlen_k=4096, num_heads_q=8, num_heads_k=2,
                          head_dim=128, dtype="bfloat16", softmax_scale=0.1, window=Window(-1, 0), kvcache=kv,
                          has_sinks=True)
    decode, combine = plan_decode.plan_forward(kspec, "sm90")
    # split: the partials stay sink-free, the combine counts the sink once
    assert not decode.meta["HAS_SINKS"] and combine.meta["HAS_SINKS"] and ("array", "sinks") in combine.args
    (single,) = plan_decode.plan_forward(kspec, "sm90", num_splits=1)
    assert single.meta["HAS_SINKS"] and ("array", "sinks") in single.args
    assert plan_decode.check(kspec.replace(head_dim_v=64)) and "MLA" in plan_decode.check(kspec.replace(head_dim_v=64))


def test_backend_wiring_with_sinks_and_mla(monkeypatch):
    """TritonBackend's host glue with a stand-in jax_triton (as tests/test_triton_interpret.py does): the sinks
    reach the launches that read them (the dense/varlen forwards, the unsplit decode or the combine) and out/dv
    have the value head dim; a call with no key at all returns out 0 and lse = the sinks without any launch."""
    import types

    import jax
    import jax.numpy as jnp

    from fa3jax.backends.base import DenseArgs, KVCacheArgs, VarlenArgs
    from fa3jax.backends.triton import TritonBackend, launch
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, KVCacheSpec, VarlenSpec

    calls = []

    def triton_call(*args, kernel, out_shape, grid, num_warps, num_stages, name, **meta):
        assert all(isinstance(a, (jax.Array, int, np.float32)) for a in args)
        calls.append((kernel, meta, [a.shape for a in args if isinstance(a, jax.Array)]))
        return [jnp.zeros(o.shape, o.dtype) for o in out_shape]

    monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_call=triton_call))
    monkeypatch.setattr(launch, "kernel", lambda lnch: lnch.kernel)
    be = TritonBackend()
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0], jnp.float32)
    spec = AttentionSpec(mode="dense", batch=2, seqlen_q=33, seqlen_k=47, num_heads_q=4, num_heads_k=2,
                         head_dim=192, head_dim_v=128, dtype="bfloat16", softmax_scale=0.2, window=Window(-1, 0),
                         has_sinks=True)
    q = jnp.ones((2, 33, 4, 192), jnp.bfloat16)
    k = jnp.ones((2, 47, 2, 192), jnp.bfloat16)
    v = jnp.ones((2, 47, 2, 128), jnp.bfloat16)
    args = DenseArgs(sinks=sinks)
    out, lse = jax.jit(lambda q, k, v, a: be.forward(spec, q, k, v, a))(q, k, v, args)
    assert out.shape == (2, 33, 4, 128) and lse.shape == (2, 4, 33)
    assert calls[-1][0] == "_attn_fwd" and calls[-1][1]["HAS_SINKS"] and (4,) in calls[-1][2]
    grads = jax.jit(lambda *xs: be.backward(spec, *xs))(q, k, v, out, lse, out, lse, args)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    vspec = spec.replace(mode="varlen", batch=1, seqlen_q=33, seqlen_k=47, varlen=VarlenSpec(33, 47, False))
    vargs = VarlenArgs(jnp.asarray([0, 33], jnp.int32), jnp.asarray([0, 47], jnp.int32), sinks=sinks)
    out, lse = jax.jit(lambda q, k, v, a: be.forward(vspec, q, k, v, a))(q[0], k[0], v[0], vargs)
    assert out.shape == (33, 4, 128) and calls[-1][0] == "_varlen_attn_fwd" and calls[-1][1]["HAS_SINKS"]
    kv = KVCacheSpec(capacity=256, cache_batch=2, paged=False, page_size=0, pages_per_seq=0, seqlen_new=0,
                     rotary_dim=0, rotary_interleaved=False, has_cache_batch_idx=False, has_cache_leftpad=False,
                     num_splits=3, return_updated_cache=False)
    kspec = spec.replace(mode="kvcache", seqlen_q=1, seqlen_k=256, head_dim=64, head_dim_v=64, kvcache=kv)
    kargs = KVCacheArgs(jnp.asarray([10, 256], jnp.int32), jnp.asarray([10, 256], jnp.int32), sinks=sinks)
    cache = jnp.ones((2, 256, 2, 64), jnp.bfloat16)
    calls.clear()
    be.kvcache_forward(kspec, jnp.ones((2, 1, 4, 64), jnp.bfloat16), cache, cache, kargs)
    assert [c[0] for c in calls] == ["_decode_fwd", "_decode_combine"]
    assert not calls[0][1]["HAS_SINKS"] and calls[1][1]["HAS_SINKS"] and (4,) in calls[1][2]
    # no key anywhere: no launch, lse = the sinks
    calls.clear()
    empty = spec.replace(seqlen_k=0)
    out, lse = be.forward(empty, q, k[:, :0], v[:, :0], args)
    assert not calls and out.shape == (2, 33, 4, 128) and np.all(np.asarray(out, np.float32) == 0)
    np.testing.assert_array_equal(np.asarray(lse), np.broadcast_to(np.asarray(sinks)[None, :, None], (2, 4, 33)))
    out, lse = be.forward(vspec.replace(seqlen_k=0), q[0], k[0, :0], v[0, :0], vargs)
    np.testing.assert_array_equal(np.asarray(lse), np.broadcast_to(np.asarray(sinks)[:, None], (4, 33)))


if __name__ == "__main__":
    main(__file__, _run_case, CASES)

"""The KV-cache decode kernels (split-KV + combine) under Triton's CPU interpreter, against a float64 reference.

Same worker-subprocess scheme as ``tests/test_triton_interpret.py``. Index arrays go through the real
``fa3jax.validation.sanitize_kvcache`` (page tables are passed through unsanitized, with hostile entries).
The reference materializes each sequence's keys in cache order (cache rows, new keys at ``cache_seqlens + t``),
drops keys on invalid pages and outside ``[leftpad, seqlens_k)``, and runs ``fa3jax.reference.attention`` with
positions relative to leftpad. Every case runs with several split counts and stream-K program counts; all must
match the reference and each other. On the GPU they run through TritonBackend in the shared suite (tests/test_triton_backend.py).
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
# Per variant: the split count (0 = the automatic count) and what the Tuning forces: the decode schedule and, for
# stream-K, a fixed number of programs per kv head (13 exceeds some cases' key tiles: programs with no tiles).
VARIANTS = {
    "s1": dict(num_splits=1), "s3": dict(num_splits=3), "s5": dict(num_splits=5),
    "s0": dict(num_splits=0, schedule="split"),
    "k1": dict(num_splits=0, schedule="streamk", programs=1), "k3": dict(num_splits=0, schedule="streamk", programs=3),
    "k13": dict(num_splits=0, schedule="streamk", programs=13), "k0": dict(num_splits=0, schedule="streamk"),
}

CASES = {
    # contiguous cache, decode, GQA, one row with an empty cache (all its rows: out 0 / lse -inf)
    "contig_decode_gqa": dict(b=3, lq=1, hq=4, hk=2, d=64, cap=80, cache_b=3, seqlens=[37, 80, 0],
                              window=(-1, 0)),
    # cache_batch_idx (one out of range -> empty cache), leftpad, 3 new keys, chunked prefill causal
    "contig_batchidx_leftpad_new": dict(b=3, lq=3, hq=2, hk=2, d=40, cap=64, cache_b=4, seqlens=[20, 61, 9],
                                        batch_idx=[2, 0, 7], leftpad=[5, 0, 3], new=3, window=(-1, 0)),
    # paged, page 16, hostile page-table entries, new keys, GQA group 4, softcap, leftpad
    "paged16_hostile_softcap": dict(b=2, lq=2, hq=8, hk=2, d=64, cap=80, page=16, num_pages=12,
                                    seqlens=[70, 41], leftpad=[18, 0], new=2, window=(-1, 0), softcap=2.0,
                                    bad_pages=[(0, 1, -3), (1, 2, 12), (0, 4, 1000)]),
    # paged, page 32, local window, chunked prefill, odd head dim
    "paged32_window": dict(b=2, lq=4, hq=2, hk=2, d=40, cap=96, page=32, num_pages=7, seqlens=[90, 33],
                           new=4, window=(16, -1), bad_pages=[(1, 2, -1)]),
    # narrow window with lq > visible keys: some rows see nothing
    "contig_window_3_2_empty_rows": dict(b=1, lq=6, hq=1, hk=1, d=16, cap=48, cache_b=1, seqlens=[2],
                                         new=0, window=(3, 2)),
    # stream-K across sequences: empty sequences between full ones, partial last tiles
    "contig_ragged_streamk": dict(b=6, lq=1, hq=4, hk=2, d=32, cap=64, cache_b=6, seqlens=[50, 0, 0, 17, 63, 3],
                                  window=(-1, 0)),
}


def _materialize(c, k_cache, v_cache, args):
    """Per sequence: (keys, values, positions relative to leftpad, seqlen_k for the mask)."""
    b, cap = c["b"], c["cap"]
    res = []
    for i in range(b):
        cs, sk = int(args["cache_seqlens"][i]), int(args["seqlens_k"][i])
        lp = int(args["leftpad"][i]) if "leftpad" in c else 0
        keys = np.zeros((cap,) + k_cache.shape[2:], np.float64)
        vals = np.zeros_like(keys)
        ok = np.zeros(cap, bool)
        for p in range(cs):
            if "page" in c:
                page = int(args["page_table"][i, p // c["page"]])
                if not 0 <= page < c["num_pages"]:
                    continue
                src = (page, p % c["page"])
            else:
                src = (int(args["batch_idx"][i]) if "batch_idx" in c else i, p)
            keys[p], vals[p], ok[p] = k_cache[src], v_cache[src], True
        for t in range(c.get("new", 0)):
            keys[cs + t], vals[cs + t], ok[cs + t] = args["k_new"][i, t], args["v_new"][i, t], True
        pos = np.arange(cap)
        vis = ok & (pos >= lp) & (pos < sk)
        res.append((keys[vis], vals[vis], pos[vis] - lp, sk - lp))
    return res


def build_case(c, rng, has_sinks=False):
    """The spec and the kernel arrays (by launch name) of case ``c``: random float16 caches/q/new keys, index
    arrays through the real ``sanitize_kvcache`` (the page table unsanitized, hostile entries included)."""
    import jax.numpy as jnp

    from fa3jax.backends.triton import plan_decode
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, KVCacheSpec
    from fa3jax.validation import sanitize_kvcache

    b, lq, hq, hk, d, cap, new = c["b"], c["lq"], c["hq"], c["hk"], c["d"], c["cap"], c.get("new", 0)
    paged = "page" in c
    if paged:
        pps = cap // c["page"]
        cache_shape = (c["num_pages"], c["page"], hk, d)
        pt = rng.permutation(c["num_pages"])[: b * pps].reshape(b, pps).astype(np.int32)
        for (i, j, val) in c.get("bad_pages", ()):
            pt[i, j] = val
    else:
        pps = 0
        cache_shape = (c["cache_b"], cap, hk, d)
        pt = None
    k_cache = rng.standard_normal(cache_shape).astype(np.float16)
    v_cache = rng.standard_normal(cache_shape).astype(np.float16)
    q = rng.standard_normal((b, lq, hq, d)).astype(np.float16)
    k_new = rng.standard_normal((b, new, hk, d)).astype(np.float16) if new else None
    v_new = rng.standard_normal((b, new, hk, d)).astype(np.float16) if new else None
    kvs = KVCacheSpec(capacity=cap, cache_batch=cache_shape[0], paged=paged, page_size=c.get("page", 0),
                      pages_per_seq=pps, seqlen_new=new, rotary_dim=0, rotary_interleaved=False,
                      has_cache_batch_idx="batch_idx" in c, has_cache_leftpad="leftpad" in c, num_splits=0,
                      return_updated_cache=False)
    spec = AttentionSpec(mode="kvcache", batch=b, seqlen_q=lq, seqlen_k=cap, num_heads_q=hq, num_heads_k=hk,
                         head_dim=d, dtype="float16", softmax_scale=float(1.0 / np.sqrt(d)),
                         window=Window(*c["window"]), softcap=c.get("softcap", 0.0), kvcache=kvs,
                         has_sinks=has_sinks)
    assert plan_decode.check(spec) is None, plan_decode.check(spec)
    opt = lambda key: None if key not in c else jnp.asarray(c[key], jnp.int32)  # noqa: E731
    sargs, _ = sanitize_kvcache(spec, jnp.asarray(c["seqlens"], jnp.int32), opt("batch_idx"), opt("leftpad"),
                                None if pt is None else jnp.asarray(pt), k_new, v_new)
    arrays = {f: np.asarray(getattr(sargs, f)) for f in sargs._fields if getattr(sargs, f) is not None}
    arrays["page_table"] = pt  # unsanitized on purpose
    if pt is None:
        arrays.pop("page_table")
    arrays.update(q=q, k_cache=k_cache, v_cache=v_cache)
    if new:
        arrays.update(k_new=k_new, v_new=v_new)
    return spec, arrays


def run_variant(spec, arrays, kw):
    """Interpret the launches of one ``VARIANTS`` entry in order; returns (out, lse, launches)."""
    from fa3jax.backends.triton import plan_decode, tables
    from fa3jax.tuning import Tuning

    policy = tables.DECODE["paged" if spec.kvcache.paged else "contiguous"]
    if "schedule" in kw:
        policy = policy._replace(schedule=kw["schedule"])
    tune = Tuning(fwd=(16, 16, 4, 1), decode=policy, decode_programs=kw.get("programs"))
    launches = plan_decode.plan_forward(spec, "sm90", num_splits=kw["num_splits"], tune=tune)
    arrs = dict(arrays)
    for launch in launches:
        got = interpret(launch, arrs)
        arrs.update({nm: x for (nm, _, _), x in zip(launch.outputs, got)})
    return arrs["out"], arrs["lse"], launches


def _run_case(name):
    from fa3jax import reference

    c = CASES[name]
    spec, arrays = build_case(c, np.random.default_rng(zlib.crc32(name.encode())))
    b, lq, hq, d = spec.batch, spec.seqlen_q, spec.num_heads_q, spec.head_dim
    q = arrays["q"]
    ref_out = np.zeros((b, lq, hq, d))
    ref_lse = np.zeros((b, hq, lq))
    for i, (ks, vs, kpos, sk) in enumerate(_materialize(c, arrays["k_cache"], arrays["v_cache"], arrays)):
        ref_out[i], ref_lse[i] = reference.attention(q[i], ks, vs, scale=spec.softmax_scale, window=spec.window,
                                                     softcap=spec.softcap, seqlen_q=lq, seqlen_k=sk, k_pos=kpos)
    finite = np.isfinite(ref_lse)
    res = {"n_empty": int((~finite).sum())}
    outs = {}
    for key, kw in VARIANTS.items():
        out, lse, launches = run_variant(spec, arrays, kw)
        outs[key] = out
        res[f"{key}_kernel"] = launches[0].kernel
        res[f"{key}_nsplit"] = launches[0].meta.get("NUM_SPLITS", 0)
        res[f"{key}_out"] = rel(out, ref_out)
        res[f"{key}_lse"] = float(np.max(np.abs(lse[finite] - ref_lse[finite]), initial=0.0))
        res[f"{key}_inf"] = bool(np.array_equal(np.isneginf(lse), ~finite) and not np.any(np.isnan(lse)))
        res[f"{key}_empty0"] = bool(np.all(out.transpose(0, 2, 1, 3)[~finite] == 0))
    res["split_spread"] = max(float(np.max(np.abs(outs[k].astype(np.float64) - outs["s1"]))) for k in VARIANTS)
    return res


results = results_fixture(__file__, CASES, nproc=2)


@pytest.mark.parametrize("name", list(CASES))
def test_kvcache_forward_interpreted(results, name):
    r = results[name]
    assert "error" not in r, r.get("error")
    for k in VARIANTS:
        assert r[f"{k}_out"] < TOL, (k, r)
        assert r[f"{k}_lse"] < 1e-2, (k, r)
        assert r[f"{k}_inf"] and r[f"{k}_empty0"], (k, r)
    assert r["s3_nsplit"] > 1  # the split path (partials + combine) really ran
    assert r["s0_kernel"] == "_decode_fwd" and r["k3_kernel"] == "_decode_fwd_persistent"
    assert r["split_spread"] < 5e-3, r  # splits and stream-K agree within fp16 rounding of the output


def test_kvcache_edge_cases_are_exercised(results):
    assert sum(results[n].get("n_empty", 0) for n in CASES) > 0


def test_choose_num_splits():
    from fa3jax.backends.triton.plan_decode import MAX_SPLITS, choose_num_splits

    assert choose_num_splits(1, 8, 100, 132) == 1  # short cache
    assert choose_num_splits(64, 16, 32768, 132) == 1  # enough programs already
    assert choose_num_splits(1, 8, 32768, 132, programs_per_sm=2) == 33  # 8 programs -> 8 * 33 <= 2 per SM
    assert choose_num_splits(1, 8, 32768, 132, programs_per_sm=1) == 16
    assert choose_num_splits(8, 8, 32768, 132, programs_per_sm=2) == 4  # 64 * 5 would start a second wave
    assert choose_num_splits(1, 8, 32768, 132, programs_per_sm=4, min_keys_per_split=1024) == 32  # key floor
    assert choose_num_splits(1, 8, 32768, 132, programs_per_sm=4, max_splits=20) == 20
    assert choose_num_splits(1, 1, 600, 132) == 2  # limited by keys per split
    for b in (1, 2, 7):
        for hk in (1, 4, 32):
            for n in (0, 1, 255, 4096, 10 ** 6):
                assert 1 <= choose_num_splits(b, hk, n, 132) <= MAX_SPLITS


def test_kvcache_plan():
    from fa3jax.backends.triton import plan_decode, tables
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec, KVCacheSpec
    from fa3jax.tuning import Tuning

    kvs = KVCacheSpec(capacity=8192, cache_batch=600, paged=True, page_size=48, pages_per_seq=171, seqlen_new=1,
                      rotary_dim=0, rotary_interleaved=False, has_cache_batch_idx=False, has_cache_leftpad=False,
                      num_splits=0, return_updated_cache=False)
    spec = AttentionSpec(mode="kvcache", batch=1, seqlen_q=1, seqlen_k=8192, num_heads_q=32, num_heads_k=4,
                         head_dim=128, dtype="bfloat16", softmax_scale=0.1, window=Window(-1, 0), kvcache=kvs)
    assert plan_decode.check(spec) is None
    decode, combine = plan_decode.plan_forward(spec, "sm90")
    meta = decode.meta
    assert meta["LAYOUT"][1] % meta["BLOCK_N"] == 0 and meta["BLOCK_N"] == 16  # page 48 = 16 * 3
    assert meta["BLOCK_M"] == 16 and decode.grid == (meta["NUM_SPLITS"], 4, 1) and meta["NUM_SPLITS"] > 1
    assert combine.outputs == (("out", (1, 1, 32, 128), "bfloat16"), ("lse", (1, 32, 1), "float32"))
    (single,) = plan_decode.plan_forward(spec, "sm90", num_splits=1)
    assert single.outputs[0][0] == "out"
    assert plan_decode.check(spec.replace(kvcache=kvs.__class__(**{**kvs.__dict__, "page_size": 24})))
    assert plan_decode.check(spec.replace(dtype="float32"))

    # stream-K: one wave over the kv heads, partial slots (hk, programs + batch), combine grid (hk, batch)
    streamk = Tuning(decode=tables.DECODE["paged"]._replace(schedule="streamk"))
    decode, combine = plan_decode.plan_forward(spec, "sm90", tune=streamk)
    g = plan_decode.persistent_programs(1, 4, 8192 // 16, 132, 2, 256 // 16)
    assert g == 32 and decode.kernel == "_decode_fwd_persistent" and decode.grid == (4, g, 1)
    assert combine.grid == (4, 1, 1)
    assert decode.outputs[0] == ("out_acc", (4, g + 1, 16, 128), "float32")
    assert combine.outputs == (("out", (1, 1, 32, 128), "bfloat16"), ("lse", (1, 32, 1), "float32"))
    # explicit split counts and multi-tile queries keep the split kernel
    assert plan_decode.plan_forward(spec, "sm90", num_splits=2, tune=streamk)[0].kernel == "_decode_fwd"
    chunk = spec.replace(seqlen_q=64)
    assert plan_decode.plan_forward(chunk, "sm90", tune=streamk)[0].kernel == "_decode_fwd"
    with pytest.raises(ValueError, match="schedule"):
        plan_decode.plan_forward(spec, "sm90", tune=Tuning(decode=streamk.decode._replace(schedule="batch")))


def test_persistent_programs_and_schedule():
    from fa3jax.backends.triton import tables
    from fa3jax.backends.triton.plan_decode import choose_schedule, persistent_programs

    assert persistent_programs(64, 8, 512, 132) == 33  # one wave of 2 programs per SM over 8 kv heads
    assert persistent_programs(1, 8, 64, 132, min_tiles=4) == 16  # 64 tiles, at least 4 per program
    assert persistent_programs(3, 300, 10, 132) == 1  # more kv heads than a wave holds
    assert persistent_programs(2, 8, 0, 132) == 1
    auto = tables.DecodeConfig(64, 4, 3, 3, 2, 256, 16, schedule="auto", streamk_min_keys=16384)
    assert choose_schedule(64, 8, 32768, 132, 1, auto) == "streamk"
    assert choose_schedule(64, 8, 4096, 132, 1, auto) == "split"  # 64 * 4k / 33 < 16k keys per program
    assert choose_schedule(8, 8, 131072, 132, 1, auto) == "streamk"  # 8 * 128k / 33 >= 16k keys per program
    assert choose_schedule(8, 8, 32768, 132, 1, auto) == "split"
    assert choose_schedule(1, 8, 131072, 132, 1, auto) == "split"
    assert choose_schedule(64, 8, 32768, 132, 2, auto) == "split"  # several query tiles
    assert choose_schedule(2048, 8, 4096, 132, 1, auto) == "split"  # too many sequences for one program's lanes
    assert choose_schedule(64, 8, 4096, 132, 1, auto._replace(schedule="streamk")) == "streamk"


if __name__ == "__main__":
    main(__file__, _run_case, CASES)

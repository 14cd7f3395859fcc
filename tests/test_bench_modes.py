"""The benchmark's added modes on CPU (xla backend): the chunked-prefill suite, decode timed per call, sinks cost,
deterministic=True cost."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import bench

from .test_bench_cli import _png_title, _run

FAST = bench.TimingOptions(warmup=1, repeats=3, min_time=0.0, max_calls=2)


def _finite_pos(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_prefill_flops_hand_count():
    """b=2, hq=4, d=16, cache 8, 3 new queries at positions 5, 6, 7: they see 6 + 7 + 8 = 21 keys."""
    cfg = bench.PrefillConfig("contiguous", 2, 8, heads_q=4, heads_k=2, headdim=16, new=3)
    assert cfg.q_len == 3 and cfg.keys_seen == 21
    assert cfg.flops == 4 * 2 * 4 * 16 * 21
    # the same count from the bottom-right causal mask itself (query i at cache - new + i sees keys j <= it)
    for cache, new in ((8, 3), (256, 64), (8192, 512), (32768, 2048), (64, 64)):
        i, j = np.arange(new)[:, None], np.arange(cache)[None, :]
        c = bench.PrefillConfig("paged", 8, cache, new=new)
        assert c.keys_seen == int(np.sum(j <= cache - new + i))
        assert c.flops == 4 * 8 * 32 * 128 * c.keys_seen
    # issue 20's rows: 2 layouts x batch 1, 8 x cache 8k, 32k x 512, 2048 new
    from fa3jax.bench.cli import build_parser, resolve
    o = resolve(build_parser().parse_args(["--suite", "prefill", "--full"]))
    cfgs = bench.prefill_configs(o)
    assert len(cfgs) == 16 and {(c.heads_q, c.heads_k, c.headdim, c.dtype, c.page_size) for c in cfgs} == \
        {(32, 8, 128, "bf16", 256)}
    assert {(c.layout, c.batch, c.cache, c.new) for c in cfgs} == {
        (lay, b, c, n) for lay in ("contiguous", "paged") for b in (1, 8) for c in (8192, 32768) for n in (512, 2048)}


def test_prefill_inputs_shapes():
    """q holds the chunk, the caches are full (cache_seqlens = cache), paged pages are a permutation of the pool."""
    cfg = bench.PrefillConfig("paged", 2, 512, new=64)
    q, kc, vc, sl, pt = bench.cache_inputs(cfg, 1, seed=0)[0]
    assert q.shape == (2, 64, 32, 128) and q.dtype == jnp.bfloat16
    assert kc.shape == vc.shape == (4, 256, 8, 128) and sl.tolist() == [512, 512]
    assert sorted(np.asarray(pt).ravel().tolist()) == [0, 1, 2, 3] and float(jnp.std(kc.astype(jnp.float32))) > 0.5


def test_run_prefill_guard_best_and_ratio():
    """In-process: the causal xla impl passes the guard; a non-causal one is WRONG and untimed; two grouped variants
    (standing in for flash-attn3-jax's num_splits) give a ``:best`` row, and fa3_ratio = best time / row time."""
    causal = bench.fa3jax_kvcache_impl("xla", causal=True)
    full = bench.DecodeImpl("not-causal", bench.fa3jax_kvcache_impl("xla", causal=False).fn)
    group = [bench.DecodeImpl(f"{bench.FA3_NAME}:s{s}", causal.fn, group=bench.FA3_NAME) for s in (1, 4)]
    cfg = bench.PrefillConfig("contiguous", 1, 64, new=64)  # the whole cache is the chunk: row 0 sees one key
    rows = bench.run_prefill([cfg], [causal, full] + group, FAST, log=lambda s: None)
    by = {r["impl"]: r for r in rows}
    assert by["not-causal"]["status"] == "WRONG" and "ms" not in by["not-causal"]
    assert by["not-causal"]["max_rel_err"] > bench.WRONG_TOL
    best = by[f"{bench.FA3_NAME}:best"]
    variants = [by[f"{bench.FA3_NAME}:s{s}"] for s in (1, 4)]
    assert best["ms"] == min(v["ms"] for v in variants) and best["best_of"] in {v["impl"] for v in variants}
    x = by["fa3jax:xla"]
    assert x["status"] == "ok" and x["max_rel_err"] == 0.0 and _finite_pos(x["ms"])
    assert x["fa3_ratio"] == best["ms"] / x["ms"]
    assert x["tflops"] == pytest.approx(cfg.flops / (x["ms"] * 1e-3) / 1e12)
    assert all("fa3_ratio" not in v for v in variants + [best])
    table = bench.prefill_table(rows)
    assert f"(x{x['fa3_ratio']:.2f})" in table and "WRONG err" in table


def test_bench_prefill_small(tmp_path):
    """The CLI: --suite prefill on the CPU preset (reduced), its JSON, table, plot and --record section."""
    md = tmp_path / "RESULTS.md"
    r = _run("bench", "--suite", "prefill", "--small", "--caches", "256", "--new-tokens", "16,64", "--out-dir",
             str(tmp_path), "--record", "--results-md", str(md), timeout=200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| layout | batch | cache | new | GFLOP | fa3jax:xla |" in r.stdout
    files = list(tmp_path.glob("prefill-*.json"))
    assert len(files) == 1, list(tmp_path.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["complete"] and doc["suite"] == "prefill" and "prefill: 4*b*hq*d" in doc["flops_convention"]
    ok = [row for row in doc["results"] if row["status"] == "ok"]
    assert {(row["impl"], row["layout"], row["batch"], row["cache"], row["new"]) for row in ok} == {
        ("fa3jax:xla", lay, b, 256, n) for lay in ("contiguous", "paged") for b in (1, 2) for n in (16, 64)}
    for row in ok:
        cfg = bench.PrefillConfig(row["layout"], row["batch"], row["cache"], new=row["new"])
        assert row["flops"] == cfg.flops and row["max_rel_err"] <= bench.WRONG_TOL
        assert _finite_pos(row["ms"]) and row["tflops"] == pytest.approx(row["flops"] / row["ms"] / 1e9)
        assert len(row["trials_ms"]) == 3 and all(_finite_pos(t) for t in row["trials_ms"])
    section = md.read_text()
    assert section.startswith("\n## prefill: ") and "--suite prefill" in section and "| layout | batch |" in section
    assert _png_title(files[0].with_suffix(".png")).startswith("chunked prefill TFLOPS, bf16, d=128, hq=32, hk=8")


def test_decode_per_call_rows():
    """In-process: --per-call adds per_call_ms (the median of its own trials) beside the chained time; without it
    the rows are as before."""
    cfg = bench.DecodeConfig("paged", 1, 256)
    impls = [bench.fa3jax_kvcache_impl("xla")]
    plain, _ = bench.run_decode([cfg], impls, FAST, 1 << 16, log=lambda s: None, unroll=2)
    assert plain[0]["status"] == "ok" and not any(k.startswith("per_call") for k in plain[0])
    rows, _ = bench.run_decode([cfg], impls, FAST, 1 << 16, log=lambda s: None, unroll=2, per_call=True)
    r = rows[0]
    assert r["status"] == "ok" and _finite_pos(r["ms"]) and _finite_pos(r["per_call_ms"])
    assert len(r["per_call_trials_ms"]) == 3 and r["per_call_ms"] == sorted(r["per_call_trials_ms"])[1]
    assert r["per_call_calls_per_trial"] >= 2
    t = bench.decode_table(rows, {})
    assert f"; call {r['per_call_ms'] * 1e3:.1f} us" in t and "dispatch included" in t
    assert "call" not in bench.decode_table(plain, {})


def test_bench_decode_per_call_cli(tmp_path):
    r = _run("bench", "--suite", "decode", "--small", "--per-call", "--caches", "256", "--batches", "1",
             "--no-plot", "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| layout | batch | cache | K/V MiB | fa3jax:xla |" in r.stdout and "; call " in r.stdout
    doc = json.loads(next(tmp_path.glob("decode-*.json")).read_text())
    ok = [row for row in doc["results"] if row["status"] == "ok"]
    assert len(ok) == 2 and all(_finite_pos(row["per_call_ms"]) and _finite_pos(row["ms"]) for row in ok)
    assert doc["options"]["per_call"] is True
    assert next(tmp_path.glob("decode-*.md")).read_text().startswith("\n## decode (per call): ")


def test_option_suites():
    """--sinks and --deterministic belong to the attn suite, --per-call to decode; each new option is in --help."""
    from fa3jax.bench.cli import build_parser, resolve
    for argv in (["--suite", "decode", "--sinks"], ["--suite", "prefill", "--per-call"], ["--per-call"],
                 ["--suite", "decode", "--deterministic"], ["--suite", "varlen", "--deterministic"]):
        with pytest.raises(SystemExit):
            resolve(build_parser().parse_args(argv))
    assert resolve(build_parser().parse_args(["--deterministic", "--sinks"]))["deterministic"] is True
    text = build_parser().format_help()
    for opt in ("--sinks", "--deterministic", "--per-call", "--new-tokens", "prefill"):
        assert opt in text


def test_sinks_variants_and_gradient():
    """with_variants(sinks=True) puts X+sinks right after each fa3jax impl only; its fwd+bwd differentiates the sinks."""
    impls = [bench.fa3jax_impl("xla"), bench.Impl("jax.nn:xla", lambda cfg: None)]
    names = [i.name for i in bench.with_variants(impls, sinks=True)]
    assert names == ["fa3jax:xla", "fa3jax:xla+sinks", "jax.nn:xla"]
    cfg = bench.AttnConfig("fwd+bwd", True, "bf16", 32, 2, 64, 2)
    sets = bench.attn_inputs(cfg, 1, seed=0)
    from fa3jax.bench.attn import sinks_inputs
    q, k, v, ct, s = sinks_inputs(cfg, sets)[0]
    assert s.shape == (2,) and s.dtype == jnp.float32 and float(jnp.std(s)) > 0
    impl = bench.with_variants(impls, sinks=True)[1]
    grads = jax.jit(bench.timed_fn(impl.forward(cfg), cfg.mode, grad_rest=1))(q, k, v, ct, s)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, (2,)]
    assert all(bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads) and float(jnp.abs(grads[3]).max()) > 0


def _assert_variant_rows(rows: list, variant: str, wrong: str, legend: str) -> None:
    """In both modes: fa3jax:xla and its ``variant`` row are ok and exact, the variant carries its ratio field
    (its time / the plain time) and no other variant's, the plain row none; ``wrong`` (a variant computing
    something else) is WRONG. The table puts the variant's column after the plain one, with its ratio in the
    cell and ``legend`` below."""
    suffix = bench.variant_suffix(variant)
    field = bench.ratio_field(suffix)
    others = [bench.ratio_field(v) for v in bench.VARIANTS if bench.ratio_field(v) != field]
    for mode in ("fwd", "fwd+bwd"):
        by = {r["impl"]: r for r in rows if r["mode"] == mode}
        plain, v = by["fa3jax:xla"], by[variant]
        assert plain["status"] == v["status"] == "ok" and v["max_rel_err"] == 0.0
        assert _finite_pos(v["ms"]) and v[field] == v["ms"] / plain["ms"] and v["flops"] == plain["flops"]
        assert field not in plain and not any(f in v for f in others)
        assert by[wrong]["status"] == "WRONG"
    t = bench.attn_table(rows)
    header = t.splitlines()[0]
    assert header.index("| fa3jax:xla |") < header.index(f"| {variant} |")
    assert f"({suffix.lstrip('+')} {by[variant][field]:.3f})" in t and legend in t


def test_run_attn_sinks_guard_and_ratio():
    """In-process: the +sinks row is guarded against fa3jax:xla with the same sinks (an impl that ignores them is
    WRONG under a causal mask, where row 0 sees one key) and carries sinks_ratio = its time / the plain time."""
    ignores = bench.Impl("fa3jax:fake+sinks", lambda cfg: (lambda q, k, v, s: fa3jax.flash_mha(
        q, k, v, is_causal=cfg.causal, backend="xla")), sinks=True)
    impls = bench.with_variants([bench.fa3jax_impl("xla")], sinks=True) + [ignores]
    cfgs = [bench.AttnConfig(m, True, "bf16", 32, 2, 64, 2) for m in ("fwd", "fwd+bwd")]
    rows = bench.run_attn(cfgs, impls, FAST, log=lambda s: None)
    _assert_variant_rows(rows, "fa3jax:xla+sinks", "fa3jax:fake+sinks", "time with sinks / time without")


def test_bench_attn_sinks_cli(tmp_path):
    r = _run("bench", "--small", "--sinks", "--seqlens", "128", "--tokens", "256", "--causal", "no", "--no-plot",
             "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| fa3jax:xla | fa3jax:xla+sinks | jax.nn:xla |" in r.stdout
    doc = json.loads(next(tmp_path.glob("attn-*.json")).read_text())
    ok = {(row["impl"], row["mode"]): row for row in doc["results"] if row["status"] == "ok"}
    assert set(ok) == {(i, m) for i in ("fa3jax:xla", "fa3jax:xla+sinks", "jax.nn:xla") for m in ("fwd", "fwd+bwd")}
    for m in ("fwd", "fwd+bwd"):
        with_, without = ok[("fa3jax:xla+sinks", m)], ok[("fa3jax:xla", m)]
        assert with_["sinks_ratio"] == with_["ms"] / without["ms"] and with_["max_rel_err"] <= bench.WRONG_TOL
    assert next(tmp_path.glob("attn-*.md")).read_text().startswith("\n## attn (sinks): ")


def test_run_attn_deterministic_guard_and_ratio():
    """In-process: with_variants puts X+sinks then X+det right after each fa3jax impl only; the +det row calls
    deterministic=True, is guarded against the plain reference (an impl that drops the causal mask is WRONG), and
    carries det_ratio = its time / the plain time; the table shows it as (det R)."""
    impls = [bench.fa3jax_impl("xla"), bench.Impl("jax.nn:xla", lambda cfg: None)]
    assert [i.name for i in bench.with_variants(impls, sinks=True, deterministic=True)] == \
        ["fa3jax:xla", "fa3jax:xla+sinks", "fa3jax:xla+det", "jax.nn:xla"]
    det = bench.with_variants(impls[:1], deterministic=True)
    assert [i.name for i in det] == ["fa3jax:xla", "fa3jax:xla+det"] and det[1].deterministic and not det[1].sinks
    full = bench.Impl("fa3jax:fake+det", lambda cfg: (lambda q, k, v: fa3jax.flash_mha(
        q, k, v, is_causal=False, deterministic=True, backend="xla")), deterministic=True)
    cfgs = [bench.AttnConfig(m, True, "bf16", 32, 2, 64, 2) for m in ("fwd", "fwd+bwd")]
    rows = bench.run_attn(cfgs, det + [full], FAST, log=lambda s: None)
    _assert_variant_rows(rows, "fa3jax:xla+det", "fa3jax:fake+det", "time deterministic / time without")


def test_bench_attn_deterministic_cli(tmp_path):
    """The CLI with --deterministic and --sinks: both variant columns, each with its own ratio to the plain row."""
    r = _run("bench", "--small", "--deterministic", "--sinks", "--seqlens", "128", "--tokens", "256", "--causal",
             "no", "--no-plot", "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| fa3jax:xla | fa3jax:xla+sinks | fa3jax:xla+det | jax.nn:xla |" in r.stdout
    doc = json.loads(next(tmp_path.glob("attn-*.json")).read_text())
    ok = {(row["impl"], row["mode"]): row for row in doc["results"] if row["status"] == "ok"}
    names = ("fa3jax:xla", "fa3jax:xla+sinks", "fa3jax:xla+det", "jax.nn:xla")
    assert set(ok) == {(i, m) for i in names for m in ("fwd", "fwd+bwd")}
    for m in ("fwd", "fwd+bwd"):
        det, plain = ok[("fa3jax:xla+det", m)], ok[("fa3jax:xla", m)]
        assert _finite_pos(det["ms"]) and det["det_ratio"] == det["ms"] / plain["ms"]
        assert det["max_rel_err"] <= bench.WRONG_TOL and "sinks_ratio" not in det
        assert not {"det_ratio", "sinks_ratio"} & set(plain) and "det_ratio" not in ok[("fa3jax:xla+sinks", m)]
        assert f"(det {det['det_ratio']:.3f})" in r.stdout
    assert doc["options"]["deterministic"] is True
    assert next(tmp_path.glob("attn-*.md")).read_text().startswith("\n## attn (sinks) (deterministic): ")


def test_measure_each_times_the_others_when_one_fails():
    """Interleaved rounds when every function runs; when one raises, the others are still timed one by one and the
    failing one's entry is its exception (the suites then give it a skipped row)."""
    x = jnp.arange(8.0)
    good = jax.jit(lambda a: a * 2)

    def bad(a):
        raise RuntimeError("kernel refused")

    both = bench.measure_each({"good": good, "other": jax.jit(lambda a: a + 1)}, [(x,)], FAST)
    assert all(_finite_pos(m["time_s"]) and len(m["trials_s"]) == 3 for m in both.values())
    res = bench.measure_each({"good": good, "bad": bad}, [(x,)], FAST)
    assert _finite_pos(res["good"]["time_s"]) and isinstance(res["bad"], RuntimeError)
    assert bench.measure_each({}, [(x,)], FAST) == {}

"""The command line (`python -m fa3jax info|demo|bench`) and the benchmark harness's bookkeeping, on CPU."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fa3jax import bench

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "fa3jax", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _png_title(path: Path) -> str:
    """The PNG's Title text chunk (the plot's suptitle), after checking the file is a PNG."""
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        return im.text["Title"]


def test_info():
    r = _run("info")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("cuda", "triton", "xla"):
        assert name in r.stdout
    assert "xla     available: yes" in r.stdout
    assert "jax" in r.stdout and "default device" in r.stdout


def test_demo():
    r = _run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "demo: OK" in r.stdout
    for name in ("out", "dq", "dk", "dv"):
        assert f"  {name}: max |err|" in r.stdout


def test_bench_small(tmp_path):
    r = _run("bench", "--small", "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| mode | causal | dtype |" in r.stdout and "fa3jax:xla" in r.stdout
    files = list(tmp_path.glob("attn-*.json"))
    assert len(files) == 1, list(tmp_path.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["complete"] and doc["env"]["device_kind"] and doc["env"]["jax"]
    ok = [row for row in doc["results"] if row["status"] == "ok"]
    assert {row["impl"] for row in ok} == {"fa3jax:xla", "jax.nn:xla"}
    assert {(row["mode"], row["causal"], row["seqlen"]) for row in ok} == {
        (m, c, s) for m in ("fwd", "fwd+bwd") for c in (False, True) for s in (256, 512)}
    for row in ok:
        assert row["ms"] > 0 and row["tflops"] > 0 and row["max_rel_err"] <= bench.WRONG_TOL
        assert row["batch"] * row["seqlen"] == 1024 and row["heads"] == 2 and row["headdim"] == 64
    assert (tmp_path / files[0].with_suffix(".md").name).exists()
    assert _png_title(files[0].with_suffix(".png")).startswith("attention TFLOPS, bf16, d=64, h=2, b*s=1024, on cpu")
    assert f"plot: {files[0].with_suffix('.png')}" in r.stdout


def test_bench_decode_small(tmp_path):
    """The decode suite's CPU preset: every row timed by fa3jax:xla, its table, JSON and bar plot."""
    png = tmp_path / "plots" / "decode.png"  # --plot chooses the PNG's path (its folder is created)
    r = _run("bench", "--suite", "decode", "--small", "--out-dir", str(tmp_path), "--plot", str(png), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| layout | batch | cache | K/V MiB | fa3jax:xla |" in r.stdout
    files = list(tmp_path.glob("decode-*.json"))
    assert len(files) == 1, list(tmp_path.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["complete"] and doc["suite"] == "decode" and doc["copy"]["tbps"] > 0
    ok = [row for row in doc["results"] if row["status"] == "ok"]
    assert {(row["impl"], row["layout"], row["batch"], row["cache"]) for row in ok} == {
        ("fa3jax:xla", lay, b, c) for lay in ("contiguous", "paged") for b in (1, 2) for c in (256, 1024)}
    assert all(row["tbps"] > 0 and row["max_rel_err"] <= bench.WRONG_TOL for row in ok)
    assert _png_title(png).startswith("decode bandwidth, bf16, d=128, hq=32, hk=8, on cpu")
    assert f"plot: {png}" in r.stdout and not list(tmp_path.glob("*.png"))


def test_bench_no_plot(tmp_path):
    r = _run("bench", "--suite", "varlen", "--small", "--varlen-means", "64", "--varlen-tokens", "256", "--modes",
             "fwd", "--causal", "no", "--no-plot", "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(list(tmp_path.glob("varlen-*.json"))) == 1 and not list(tmp_path.glob("*.png"))
    assert "plot:" not in r.stdout


def test_flops_convention():
    cfg = bench.AttnConfig("fwd", False, "bf16", 128, 16, 1024, 16)
    assert cfg.flops == 4 * 16 * 1024**2 * 16 * 128
    assert bench.AttnConfig("fwd", True, "bf16", 128, 16, 1024, 16).flops == cfg.flops / 2
    assert bench.AttnConfig("fwd+bwd", False, "bf16", 128, 16, 1024, 16).flops == 3.5 * cfg.flops
    assert bench.DecodeConfig("paged", 8, 4096).kv_bytes == 2 * 8 * 4096 * 8 * 128 * 2


def test_mla_rows(tmp_path):
    """--mla / --headdim-v: FLOPs count 2·b·s²·h·(d + d_v), rows and table carry d x d_v, v has its own head dim,
    impls without MLA skip with a reason; configs without it keep their rows' fields."""
    mla = bench.AttnConfig("fwd", False, "bf16", 192, 16, 2048, 8, headdim_v=128)
    assert mla.flops == 2 * 8 * 2048**2 * 16 * (192 + 128) and mla.shape_v == (8, 2048, 16, 128)
    assert "d192x128" in mla.label()
    from fa3jax.bench import attn
    assert "headdim_v" not in attn._row(bench.AttnConfig("fwd", False, "bf16", 128, 16, 1024, 16), "x", "ok")
    from fa3jax.bench.cli import build_parser, resolve
    o = resolve(build_parser().parse_args(["--mla"]))
    assert (o["headdims"], o["headdim_v"], o["dtypes"], o["seqlens"], o["tokens"], o["heads"]) == \
        ([192], 128, ["bf16"], [2048, 16384], 16384, 16)
    r = _run("bench", "--mla", "--seqlens", "64", "--tokens", "128", "--heads", "2", "--modes", "fwd", "--causal",
             "yes", "--impls", "xla", "--no-plot", "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| fwd | yes | bf16 | 192x128 | 2 | 64 | 2 |" in r.stdout, r.stdout
    assert "v's head dim must equal q/k's (no MLA)" in r.stdout
    rows = json.loads(next(tmp_path.glob("attn-*.json")).read_text())["results"]
    assert any(x["impl"] == "fa3jax:xla" and x["status"] == "ok" and x["headdim_v"] == 128 for x in rows)


def test_table_marks_wrong_skips_and_ratio():
    base = dict(mode="fwd", causal=False, dtype="bf16", headdim=128, heads=16, seqlen=512, batch=32)
    rows = [
        dict(base, impl="flash-attn3-jax", status="ok", ms=2.0, tflops=100.0),
        dict(base, impl="fa3jax:cuda", status="ok", ms=1.0, tflops=200.0, note="backward by triton"),
        dict(base, impl="fa3jax:triton", status="WRONG", max_rel_err=0.3),
        dict(base, impl="jax.nn:cudnn", status="skipped", reason="cuDNN is not detected"),
    ]
    t = bench.attn_table(rows)
    assert "200.0 TF / 1.000 ms (x2.00)" in t
    assert "WRONG err 3.0e-01" in t
    assert "skip [2]" in t and "[2] cuDNN is not detected" in t and "[1] backward by triton" in t
    header = t.splitlines()[0]
    assert header.index("fa3jax:cuda") < header.index("flash-attn3-jax") < header.index("jax.nn:cudnn")


def test_bench_varlen_small(tmp_path):
    r = _run("bench", "--suite", "varlen", "--small", "--varlen-means", "64", "--varlen-tokens", "256",
             "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| mode | causal | dtype | d | h | mean L |" in r.stdout and "fa3jax:xla varlen/dense" in r.stdout
    files = list(tmp_path.glob("varlen-*.json"))
    assert len(files) == 1, list(tmp_path.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["complete"] and doc["suite"] == "varlen"
    ok = [row for row in doc["results"] if row["status"] == "ok"]
    assert {(row["impl"], row["kind"]) for row in ok} == {("fa3jax:xla", "varlen"), ("dense:fa3jax:xla", "dense")}
    assert {(row["impl"], row["mode"], row["causal"]) for row in ok} == {
        (i, m, c) for i in ("fa3jax:xla", "dense:fa3jax:xla") for m in ("fwd", "fwd+bwd") for c in (False, True)}
    for row in ok:
        assert math.isfinite(row["tflops"]) and row["tflops"] > 0 and row["ms"] > 0
        assert row["max_rel_err"] <= bench.WRONG_TOL  # checked, against the jax.nn reference
        assert sum(row["lengths"]) == row["tokens"] == 256 and row["heads"] == 2 and row["headdim"] == 64
        if row["kind"] == "dense":
            assert (row["batch"], row["seqlen"]) == (4, 64)
        else:
            assert math.isfinite(row["dense_ratio"]) and row["dense_ratio"] > 0
    assert (tmp_path / files[0].with_suffix(".md").name).exists()
    assert _png_title(files[0].with_suffix(".png")).startswith(
        "varlen TFLOPS (dense baseline dashed), bf16, d=64, h=2, 256 tokens, on cpu")


def test_varlen_lengths_and_flops():
    lengths = bench.varlen_lengths(512, 16384)
    assert sum(lengths) == 16384 and lengths == bench.varlen_lengths(512, 16384)
    assert all(256 <= s <= 768 for s in lengths[:-1]) and 1 <= lengths[-1] <= 768
    assert bench.varlen_lengths(512, 16384, seed=1) != lengths and len(set(lengths)) > 1
    cfg = bench.VarlenConfig("fwd", False, "bf16", 128, 16, 16384, 512, lengths)
    assert cfg.flops == sum(4 * s**2 * 16 * 128 for s in lengths)
    assert bench.VarlenConfig("fwd+bwd", True, "bf16", 128, 16, 16384, 512, lengths).flops == 1.75 * cfg.flops
    cu = cfg.cu_seqlens()
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == 16384 and len(cu) == cfg.seqs + 1
    assert cfg.dense() == bench.AttnConfig("fwd", False, "bf16", 128, 16, 512, 32)


def test_varlen_guard_rejects_wrong_and_nan():
    """A kernel that ignores the sequence boundaries, or returns NaN, is reported WRONG and never timed."""
    import fa3jax
    import jax.numpy as jnp

    def fake(name, fn):
        return bench.VarlenImpl(name, bench.Impl(name, lambda cfg: fn), None)

    impls = [bench.VarlenImpl("fa3jax:xla", bench.fa3jax_varlen_impl("xla"), None),
             fake("one-sequence", lambda q, k, v, cu: fa3jax.flash_mha(q[None], k[None], v[None], backend="xla")[0]),
             fake("nan", lambda q, k, v, cu: fa3jax.flash_mha_varlen(q, k, v, cu, backend="xla") * jnp.nan)]
    cfg = bench.VarlenConfig("fwd", False, "bf16", 32, 2, 128, 32, bench.varlen_lengths(32, 128))
    opts = bench.TimingOptions(warmup=1, repeats=1, min_time=0.0, max_calls=2)
    rows = {r["impl"]: r for r in bench.run_varlen([cfg], impls, opts, log=lambda s: None)}
    assert rows["fa3jax:xla"]["status"] == "ok" and rows["fa3jax:xla"]["max_rel_err"] <= bench.WRONG_TOL
    assert "dense_ratio" not in rows["fa3jax:xla"]
    for name in ("one-sequence", "nan"):
        assert rows[name]["status"] == "WRONG" and "ms" not in rows[name], rows[name]
    assert not rows["nan"]["max_rel_err"] <= bench.WRONG_TOL


def test_varlen_table():
    base = dict(mode="fwd", causal=True, dtype="bf16", headdim=128, heads=16, mean=1024, seqs=17, max_seqlen=1500)
    rows = [
        dict(base, impl="dense:fa3jax:triton", kind="dense", status="ok", ms=1.0, tflops=400.0),
        dict(base, impl="fa3jax:triton", kind="varlen", status="ok", ms=1.1, tflops=380.0, dense_ratio=0.95),
        dict(base, impl="dense:fa3jax:cuda", kind="dense", status="ok", ms=1.0, tflops=450.0),
        dict(base, impl="fa3jax:cuda", kind="varlen", status="skipped", reason="cuda: no varlen"),
        dict(base, impl="flash-attn3-jax", kind="varlen", status="WRONG", max_rel_err=0.5),
    ]
    t = bench.varlen_table(rows)
    header = t.splitlines()[0]
    assert header.index("| fa3jax:cuda |") < header.index("dense:fa3jax:cuda") < header.index("| fa3jax:triton |")
    assert "fa3jax:triton varlen/dense" in header and "fa3jax:cuda varlen/dense" in header
    assert "| 380.0 TF / 1.100 ms | 400.0 TF / 1.000 ms | 0.95 |" in t
    assert "skip [1]" in t and "[1] cuda: no varlen" in t and "WRONG err 5.0e-01" in t


def test_varlen_reference_matches_float64():
    """The guard's reference, per sequence, against fa3jax's float64 NumPy reference (a length-1 sequence too)."""
    import jax.numpy as jnp
    from fa3jax import masking, reference

    lengths = (5, 17, 1, 9)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((sum(lengths), 2, 16)).astype(np.float32) for _ in range(3))
    for causal in (False, True):
        out = np.asarray(bench.varlen_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lengths, causal))
        for a, b in zip(np.cumsum((0,) + lengths[:-1]), np.cumsum(lengths)):
            want, _ = reference.attention(q[a:b], k[a:b], v[a:b], scale=16 ** -0.5,
                                          window=masking.normalize_window((-1, -1), causal))
            np.testing.assert_allclose(out[a:b], want, atol=1e-5, rtol=1e-5)


def test_measure_interleaved_rounds():
    """Every function gets `repeats` trials, taken in rotating rounds, and the median is of its own trials."""
    import jax.numpy as jnp

    order = []

    def make(name, n):
        def f(x):
            order.append(name)
            return jnp.tanh(x) * n
        return f

    xs = [(jnp.ones((64, 64)),), (jnp.full((64, 64), 2.0),)]
    opts = bench.TimingOptions(warmup=3, repeats=4, min_time=0.0, max_calls=2)
    res = bench.measure_interleaved({"a": make("a", 1), "b": make("b", 2)}, xs, opts)
    assert set(res) == {"a", "b"}
    for r in res.values():
        assert len(r["trials_s"]) == 4 and r["calls_per_trial"] == 2
        assert r["time_s"] == sorted(r["trials_s"])[1] / 2 + sorted(r["trials_s"])[2] / 2
        assert all(t > 0 for t in r["trials_s"])
    timed = order[6:]  # after 3 warm-up calls each
    rounds = [timed[i:i + 4] for i in range(0, 16, 4)]  # a round = one trial (2 calls) of each
    assert [r[0] for r in rounds] == ["a", "b", "b", "a"], rounds  # rotated, mirrored in odd rounds
    assert all(sorted(r) == ["a", "a", "b", "b"] for r in rounds)


def test_round_order_varies_predecessors():
    """Over rounds every function is preceded by at least two others and takes every position."""
    from fa3jax.bench.timing import round_order

    names = ["a", "b", "c", "d"]
    seq = [n for r in range(8) for n in round_order(names, r)]
    for r in range(8):
        assert sorted(round_order(names, r)) == names
    for n in names:
        before = {seq[i - 1] for i in range(1, len(seq)) if seq[i] == n and seq[i - 1] != n}
        assert len(before) >= 2, (n, before)
        assert {round_order(names, r).index(n) for r in range(8)} == {0, 1, 2, 3}


def test_bench_modules_documented_and_acyclic():
    """Every module of the fa3jax.bench package says its responsibility in its docstring's first line, and the
    package's own imports between its modules form no cycle."""
    import ast

    pkg = ROOT / "fa3jax" / "bench"
    deps = {}
    for path in sorted(pkg.glob("*.py")):
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        assert doc and doc.splitlines()[0].strip(), f"{path.name}: no docstring"
        deps[path.stem] = {n.module.split(".")[0] for n in ast.walk(tree)
                           if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    assert {"timing", "impls", "cli", "tables", "plot", "record"} <= set(deps)
    done: set = set()
    while len(done) < len(deps):  # peel off modules whose dependencies are all done; a cycle leaves none
        ready = {m for m, d in deps.items() if m not in done and (d - {"__init__"}) <= done}
        assert ready, f"import cycle among {sorted(set(deps) - done)}"
        done |= ready


def test_plot_title_and_missing_matplotlib(tmp_path, monkeypatch):
    """The plots' titles name dtype, head dim, heads and tokens; without matplotlib no plot is written and the
    reason says how to install it."""
    from fa3jax.bench import plot

    base = dict(mode="fwd", causal=False, dtype="bf16", headdim=128, heads=16, status="ok", impl="fa3jax:xla")
    rows = [dict(base, seqlen=s, batch=16384 // s, tflops=1.0) for s in (512, 1024)]
    assert plot.attn_plot_title(rows) == "bf16, d=128, h=16, b*s=16384"
    assert plot.attn_plot_title(rows + [dict(rows[0], dtype="fp16", headdim=64)]) == \
        "bf16/fp16, d=64/128, h=16, b*s=16384"
    vrows = [dict(base, kind="varlen", tokens=16384, mean=m) for m in (512, 1024)]
    assert plot.varlen_plot_title(vrows) == "bf16, d=128, h=16, 16384 tokens"
    drows = [dict(status="ok", impl="fa3jax:xla", layout="paged", batch=b, cache=4096, dtype="bf16", headdim=128,
                  heads_q=32, heads_k=hk, tbps=1.0) for b, hk in ((1, 8), (8, 4))]
    assert plot.decode_plot_title(drows) == "bf16, d=128, hq=32, hk=4/8"
    assert bench.plot_decode([dict(drows[0], status="skipped")], None, tmp_path / "d.png") == \
        "no plot: nothing was timed"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    for name, plot_fn in (("a", lambda p: bench.plot_attn(rows, p)), ("v", lambda p: bench.plot_varlen(vrows, p)),
                          ("d", lambda p: bench.plot_decode(drows, {"tbps": 2.0}, p))):
        why = plot_fn(tmp_path / f"{name}.png")
        assert why.startswith("no plot: matplotlib not importable") and 'pip install "fa3jax[bench]"' in why
        assert not (tmp_path / f"{name}.png").exists()


def test_gqa_rows(tmp_path):
    """--heads-k: k and v get the kv heads, FLOPs count the query heads, the table's h column says hq/hk, and the
    guard compares the GQA rows with the reference."""
    gqa = bench.AttnConfig("fwd", False, "bf16", 64, 4, 256, 2, heads_k=2)
    assert gqa.shape_k == gqa.shape_v == (2, 256, 2, 64) and gqa.shape_out == (2, 256, 4, 64)
    assert gqa.flops == bench.AttnConfig("fwd", False, "bf16", 64, 4, 256, 2).flops and "h4/2" in gqa.label()
    from fa3jax.bench import attn
    assert "heads_k" not in attn._row(bench.AttnConfig("fwd", False, "bf16", 64, 4, 256, 2), "x", "ok")
    from fa3jax.bench.cli import build_parser, resolve
    for bad in ("3", "0"):
        try:
            resolve(build_parser().parse_args(["--heads", "4", "--heads-k", bad]))
        except SystemExit as e:
            assert "--heads-k" in str(e)
        else:
            raise AssertionError(f"--heads-k {bad} accepted with 4 query heads")
    r = _run("bench", "--heads", "4", "--heads-k", "2", "--seqlens", "64", "--tokens", "128", "--headdims", "64",
             "--dtypes", "bf16", "--modes", "fwd,fwd+bwd", "--causal", "yes", "--impls", "fa3jax:xla,jax.nn:xla",
             "--no-plot", "--out-dir", str(tmp_path), timeout=150)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| 4/2 |" in r.stdout, r.stdout
    rows = json.loads(next(tmp_path.glob("attn-*.json")).read_text())["results"]
    assert {(x["impl"], x["mode"], x["status"], x["heads_k"]) for x in rows} == {
        (i, m, "ok", 2) for i in ("fa3jax:xla", "jax.nn:xla") for m in ("fwd", "fwd+bwd")}

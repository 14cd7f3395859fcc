"""The command line (`python -m fa3jax info|demo|bench`) and the benchmark harness's bookkeeping, on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

from fa3jax import bench

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, "-m", "fa3jax", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


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


def test_flops_convention():
    cfg = bench.AttnConfig("fwd", False, "bf16", 128, 16, 1024, 16)
    assert cfg.flops == 4 * 16 * 1024**2 * 16 * 128
    assert bench.AttnConfig("fwd", True, "bf16", 128, 16, 1024, 16).flops == cfg.flops / 2
    assert bench.AttnConfig("fwd+bwd", False, "bf16", 128, 16, 1024, 16).flops == 3.5 * cfg.flops
    assert bench.DecodeConfig("paged", 8, 4096).kv_bytes == 2 * 8 * 4096 * 8 * 128 * 2


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

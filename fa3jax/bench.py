"""Benchmark harness: time attention implementations side by side, in one process, with one timing method.

Suites
  * ``attn`` (default): the flash-attn3-jax README table -- h=16, d=128, b*s=16384 tokens, seqlen 512..16384
    (b = 16384 // s), bf16/fp16, causal or not, modes ``fwd`` and ``fwd+bwd``.
  * ``decode``: one query token against a KV cache (hq=32, hk=8, d=128, bf16), contiguous and paged, reported
    as bandwidth (TB/s of K/V bytes read) next to a device-to-device copy measured in the same run.
  * ``varlen``: packed variable-length training shapes -- 16384 tokens cut into random lengths drawn uniformly in
    [L/2, 3L/2] for a mean L of 512..8192 (h=16, d=128, bf16, causal or not, ``fwd`` and ``fwd+bwd``), each impl
    next to its dense-equal-tokens baseline (``dense:<impl>``: ``flash_mha`` on batch 16384 // L of seqlen L), with
    the ratio varlen TFLOPS / dense TFLOPS.

Implementations ("impls"): ``fa3jax:cuda``, ``fa3jax:triton``, ``fa3jax:xla`` (each only where available and
where ``fa3jax.supports`` says yes), ``flash-attn3-jax`` (when importable), ``jax.nn:cudnn`` and ``jax.nn:xla``
(``jax.nn.dot_product_attention``). Anything that cannot run is recorded as skipped, with the reason.

Timing method (see :func:`measure`): compile once (ahead of time), warm up (>= 3 synchronized calls), then
``repeats`` trials; each trial issues N calls back to back, rotating over >= 2 freshly drawn random-normal
input sets, and synchronizes once at the end; a trial's time per call is its wall time / N; the reported time is
the median over trials. N is chosen from the warm-up time so that a trial lasts ``min_time`` seconds (capped by
``max_calls``). In the attn suite all implementations of a config are compiled first and their trials taken in
interleaved rounds (:func:`measure_interleaved`), so that clock drift under the GPU's power limit hits each alike.

FLOPs (the FlashAttention convention): forward = 4 * b * s^2 * h * d (matmuls only), halved when causal; for
varlen the sum over sequences of 4 * s_i^2 * h * d; ``fwd+bwd`` counts 3.5x that (forward 1x + backward 2.5x),
timed as one jitted ``grad`` of ``sum(out * cotangent)`` w.r.t. q, k, v (which runs the forward too).

Correctness guard: before timing, each impl's forward output is compared with fa3jax's xla backend on the same
inputs at the benchmark shape; ``max_rel_err = max|o - o_ref| / max|o_ref|``. An impl above ``WRONG_TOL`` is
reported as WRONG and not timed. The varlen suite compares with a reference that shares no code with fa3jax
(see :func:`padded_reference`), so that fa3jax's own xla varlen path is checked too.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import fa3jax

WRONG_TOL = 5e-2
FA3_NAME = "flash-attn3-jax"
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
REPO_ROOT = Path(__file__).resolve().parent.parent


def default_results_md() -> Path:
    """benchmarks/RESULTS.md of the checkout we run in (cwd), else of the tree this module lives in."""
    here = Path.cwd() / "benchmarks"
    return (here if here.is_dir() else REPO_ROOT / "benchmarks") / "RESULTS.md"

# --------------------------------------------------------------------------------------------------- environment


def platform_name() -> str:
    return jax.devices()[0].platform


def on_gpu() -> bool:
    return platform_name() == "gpu"


def _flash_attn3():
    """The flash_attn3_jax module, or (None, reason)."""
    try:
        import flash_attn3_jax  # noqa: F401

        return flash_attn3_jax, ""
    except Exception as e:  # not installed, or a broken install
        return None, f"flash_attn3_jax not importable: {type(e).__name__}: {e}"


def git_commit() -> Optional[str]:
    """Short commit of the checkout (cwd first, then this module's tree), '-dirty' with uncommitted changes.
    ``FA3JAX_COMMIT`` overrides it: the device machine receives a working tree without git history."""
    if os.environ.get("FA3JAX_COMMIT"):
        return os.environ["FA3JAX_COMMIT"]
    for where in (Path.cwd(), REPO_ROOT):
        try:
            r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True,
                               timeout=10)
            if r.returncode != 0:
                continue
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return r.stdout.strip() + ("-dirty" if dirty else "")
        except Exception:
            continue
    return None


def environment() -> dict:
    dev = jax.devices()[0]
    fa3, _ = _flash_attn3()
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:
        jaxlib_version = None
    return {
        "device_kind": dev.device_kind,
        "platform": dev.platform,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "fa3jax": fa3jax.__version__,
        "flash_attn3_jax": getattr(fa3, "__version__", "?") if fa3 is not None else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "backends": [list(b) for b in fa3jax.backends_info()],
    }


def free_device_bytes() -> int:
    """Free memory on the default device (host RAM on CPU)."""
    try:
        st = jax.devices()[0].memory_stats()
        if st and "bytes_limit" in st:
            return int(st["bytes_limit"] - st.get("bytes_in_use", 0))
    except Exception:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return 8 << 30


def _short(e: BaseException, n: int = 160) -> str:
    msg = f"{type(e).__name__}: {e}".strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg if len(msg) <= n else msg[: n - 3] + "..."


# --------------------------------------------------------------------------------------------------- timing


@dataclasses.dataclass
class TimingOptions:
    warmup: int = 3
    repeats: int = 5  # trials; the median over trials is reported
    min_time: float = 0.05  # seconds per trial
    max_calls: int = 1000  # per trial
    input_sets: int = 2


def _warm(fn: Callable, arg_sets: list, opts: TimingOptions) -> tuple[int, list]:
    """Synchronized warm-up calls; returns (calls per trial, warm-up seconds)."""
    n_sets = len(arg_sets)
    warm = []
    for i in range(max(3, opts.warmup)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[i % n_sets]))
        warm.append(time.perf_counter() - t0)
    est = max(min(warm[1:] or warm), 1e-6)
    calls = int(min(opts.max_calls, max(1, math.ceil(opts.min_time / est))))
    calls = max(calls, min(n_sets, opts.max_calls))  # visit every input set at least once per trial
    return calls, warm


def _trial(fn: Callable, arg_sets: list, calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls, synchronized once at the end."""
    n_sets = len(arg_sets)
    keep_all = not on_gpu()  # CPU executions may overlap; sync on every output (calls are capped there)
    outs = []
    t0 = time.perf_counter()
    for i in range(calls):
        out = fn(*arg_sets[i % n_sets])
        if keep_all:
            outs.append(out)
    jax.block_until_ready(outs if keep_all else out)  # one stream: the last call done => all done
    return (time.perf_counter() - t0) / calls


def measure(fn: Callable, arg_sets: list, opts: TimingOptions) -> dict:
    """Median seconds per call of ``fn`` (already compiled), see the module docstring. Never times compilation."""
    calls, warm = _warm(fn, arg_sets, opts)
    trials = [_trial(fn, arg_sets, calls) for _ in range(max(1, opts.repeats))]
    return {"time_s": statistics.median(trials), "trials_s": trials, "calls_per_trial": calls,
            "warmup_s": warm}


def measure_interleaved(fns: dict, arg_sets: list, opts: TimingOptions) -> dict:
    """:func:`measure` for several functions at once, their trials taken in rounds (one trial of each per round,
    the order rotating) so that clock and thermal drift over the run hit every function alike (the H100 runs these
    kernels at its power limit: one kernel's row moved 5% between two sequential runs, RESULTS.md session 5)."""
    names = list(fns)
    prep = {n: _warm(fns[n], arg_sets, opts) for n in names}
    trials: dict = {n: [] for n in names}
    for r in range(max(1, opts.repeats)):
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            trials[n].append(_trial(fns[n], arg_sets, prep[n][0]))
    return {n: {"time_s": statistics.median(trials[n]), "trials_s": trials[n], "calls_per_trial": prep[n][0],
                "warmup_s": prep[n][1]} for n in names}


def compile_fn(f: Callable, args) -> tuple[Callable, Optional[int]]:
    """AOT-compile ``jax.jit(f)`` for ``args``; returns (compiled, scratch bytes XLA reports or None)."""
    compiled = jax.jit(f).lower(*args).compile()
    scratch = None
    try:
        ma = compiled.memory_analysis()
        if ma is not None:
            scratch = int(ma.temp_size_in_bytes)
    except Exception:
        pass
    return compiled, scratch


def _rel_err(out, ref) -> float:
    out = jnp.asarray(out, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    num = float(jnp.max(jnp.abs(out - ref)))
    den = float(jnp.max(jnp.abs(ref)))
    if not math.isfinite(num):
        return float("inf")
    return num / max(den, 1e-30)


# --------------------------------------------------------------------------------------------------- attn suite


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    mode: str  # "fwd" | "fwd+bwd"
    causal: bool
    dtype: str
    headdim: int
    heads: int
    seqlen: int
    batch: int

    @property
    def flops(self) -> float:
        f = 4.0 * self.batch * self.seqlen ** 2 * self.heads * self.headdim
        if self.causal:
            f /= 2
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)

    @property
    def shape(self):
        return (self.batch, self.seqlen, self.heads, self.headdim)

    def label(self) -> str:
        return (f"{self.mode} {'causal' if self.causal else 'full'} {self.dtype} d{self.headdim} "
                f"b{self.batch} s{self.seqlen}")


@dataclasses.dataclass
class Impl:
    """One implementation. ``check(cfg)`` returns '' when it can run ``cfg`` else why not; ``forward(cfg)``
    returns ``f(q, k, v) -> out``; ``note(cfg)`` says anything worth recording (e.g. a composed backward)."""

    name: str
    forward: Callable
    check: Callable = lambda cfg: ""
    note: Callable = lambda cfg: ""


def _fa3jax_impl(backend: str) -> Impl:
    def forward(cfg):
        return lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=cfg.causal, backend=backend)

    def support(cfg):
        sds = jax.ShapeDtypeStruct(cfg.shape, DTYPES[cfg.dtype])
        return fa3jax.supports(fa3jax.flash_mha, sds, sds, sds, backend=backend, is_causal=cfg.causal)

    return Impl(f"fa3jax:{backend}", forward, *_support_checks(support, backend))


def _support_checks(support: Callable, backend: str) -> tuple[Callable, Callable]:
    """``check`` and ``note`` of an fa3jax impl from ``support(cfg) -> fa3jax.Support``."""

    def check(cfg):
        s = support(cfg)
        if not s.supported:
            return s.reason
        if cfg.mode == "fwd+bwd" and s.backward is None:
            return f"no backward: {s.reason}"
        return ""

    def note(cfg):
        if cfg.mode != "fwd+bwd":
            return ""
        s = support(cfg)
        return f"backward by {s.backward}" if s.backward and s.backward != backend else ""

    return check, note


def _fa3_impl(mod) -> Impl:
    def forward(cfg):
        return lambda q, k, v: mod.flash_mha(q, k, v, is_causal=cfg.causal)

    def check(cfg):
        if not on_gpu():
            return "flash-attn3-jax needs a GPU"
        if cfg.dtype not in ("bf16", "fp16"):
            return "flash-attn3-jax: bf16/fp16 only"
        return ""

    return Impl(FA3_NAME, forward, check)


def _jax_nn_impl(implementation: str) -> Impl:
    def forward(cfg):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal,
                                                            implementation=implementation)

    def check(cfg):
        if implementation == "cudnn" and not on_gpu():
            return "cudnn needs an NVIDIA GPU"
        return ""

    return Impl(f"jax.nn:{implementation}", forward, check)


def attn_impls() -> tuple[list[Impl], dict]:
    """Every implementation that could run in this process, and {name: reason} for those that cannot at all."""
    impls, skipped = [], {}
    for name, ok, reason in fa3jax.backends_info():
        if ok:
            impls.append(_fa3jax_impl(name))
        else:
            skipped[f"fa3jax:{name}"] = reason or "unavailable"
    mod, reason = _flash_attn3()
    if mod is not None:
        impls.append(_fa3_impl(mod))
    else:
        skipped[FA3_NAME] = reason
    for implementation in ("cudnn", "xla"):
        impls.append(_jax_nn_impl(implementation))
    return impls, skipped


ALL_ATTN_IMPL_NAMES = ("fa3jax:cuda", "fa3jax:triton", "fa3jax:xla", FA3_NAME, "jax.nn:cudnn", "jax.nn:xla")


def _selected(name: str, tokens) -> bool:
    if not tokens:
        return True
    for t in tokens:
        if name == t or name.startswith(t + ":") or name.endswith(":" + t):
            return True
    return False


def _attn_inputs(cfg: AttnConfig, n_sets: int, seed: int):
    dt = DTYPES[cfg.dtype]
    sets = []
    key = jax.random.PRNGKey(seed)
    for _ in range(n_sets):
        key, *ks = jax.random.split(key, 5)
        q, k, v, ct = (jax.random.normal(kk, cfg.shape, dt) for kk in ks)
        sets.append((q, k, v) if cfg.mode == "fwd" else (q, k, v, ct))
    return jax.block_until_ready(sets)


def _timed_fn(fwd: Callable, mode: str) -> Callable:
    """``fwd(q, k, v, *rest)``, or for ``fwd+bwd`` its gradient w.r.t. q, k, v as ``f(q, k, v, ct, *rest)``."""
    if mode == "fwd":
        return fwd

    def loss(q, k, v, ct, *rest):
        return jnp.sum(fwd(q, k, v, *rest).astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def _out_of_time(deadline: Optional[float]) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def run_attn(configs: list[AttnConfig], impls: list[Impl], opts: TimingOptions, check: bool = True,
             log=print, progress: Optional[Callable] = None, deadline: Optional[float] = None) -> list[dict]:
    """Attention suite. ``progress(rows)`` is called after every config (to save partial results);
    configs not started by ``deadline`` (a ``time.perf_counter()`` value) are recorded as skipped."""
    rows = []
    guard_cache: dict = {}  # (shape config in fwd mode) -> {impl: forward error}, shared by both modes
    ref_impl = next((i for i in impls if i.name == "fa3jax:xla"), None) or _fa3jax_impl("xla")
    for cfg in configs:
        if _out_of_time(deadline):
            rows += [_row(cfg, impl.name, "skipped", reason="time budget (--budget-s) spent") for impl in impls]
            continue
        try:
            sets = _attn_inputs(cfg, opts.input_sets, seed=cfg.seqlen * 1009 + cfg.headdim * 7 + len(cfg.dtype))
        except Exception as e:  # e.g. out of memory
            for impl in impls:
                rows.append(_row(cfg, impl.name, "skipped", reason=f"inputs: {_short(e)}"))
            continue
        compiled: dict = {}  # impl name -> (compiled timed fn, scratch bytes), compiled once per config

        def timed(impl):
            if impl.name not in compiled:
                compiled[impl.name] = compile_fn(_timed_fn(impl.forward(cfg), cfg.mode), sets[0])
            return compiled[impl.name]

        def forward_out(impl):
            if cfg.mode == "fwd":  # the timed function is the forward: reuse its compilation
                return timed(impl)[0](*sets[0])
            return jax.jit(impl.forward(cfg))(*sets[0][:3])

        guard_key = dataclasses.replace(cfg, mode="fwd")
        ref_out = None
        if check and guard_key not in guard_cache:
            guard_cache[guard_key] = {}
            try:
                ref_out = jax.block_until_ready(forward_out(ref_impl))
            except Exception as e:
                log(f"  [guard] reference fa3jax:xla failed for {cfg.label()}: {_short(e)}")
        ready = {}  # impl name -> (impl, err, note, compiled fn, scratch): passed the guard, compiled
        for impl in impls:
            reason = ""
            try:
                reason = impl.check(cfg)
            except Exception as e:
                reason = f"check failed: {_short(e)}"
            if reason:
                rows.append(_row(cfg, impl.name, "skipped", reason=reason))
                continue
            note = impl.note(cfg)
            err = guard_cache.get(guard_key, {}).get(impl.name)
            try:
                if check and err is None and ref_out is not None:
                    err = _rel_err(forward_out(impl), ref_out)
                    guard_cache[guard_key][impl.name] = err
                if err is not None and not err <= WRONG_TOL:
                    rows.append(_row(cfg, impl.name, "WRONG", max_rel_err=err, note=note,
                                     reason=f"forward max rel err {err:.2e} > {WRONG_TOL} vs fa3jax:xla"))
                    log(f"  {cfg.label():40s} {impl.name:15s} WRONG (err {err:.2e})")
                    continue
                f, scratch = timed(impl)
                ready[impl.name] = (impl, err, note, f, scratch)
            except Exception as e:
                rows.append(_row(cfg, impl.name, "skipped", reason=_short(e), max_rel_err=err, note=note))
                log(f"  {cfg.label():40s} {impl.name:15s} skipped: {_short(e, 80)}")
        ref_out = None
        results: dict = {}
        try:  # one failing impl must not cost the others their row: then time them one by one
            results = measure_interleaved({n: r[3] for n, r in ready.items()}, sets, opts)
        except Exception:
            for name, (impl, err, note, f, scratch) in ready.items():
                try:
                    results[name] = measure(f, sets, opts)
                except Exception as e:
                    results[name] = e
        for name, (impl, err, note, f, scratch) in ready.items():
            m = results[name]
            if isinstance(m, Exception):
                rows.append(_row(cfg, name, "skipped", reason=_short(m), max_rel_err=err, note=note))
                log(f"  {cfg.label():40s} {name:15s} skipped: {_short(m, 80)}")
                continue
            tflops = cfg.flops / m["time_s"] / 1e12
            rows.append(_row(cfg, name, "ok", ms=m["time_s"] * 1e3, tflops=tflops, max_rel_err=err,
                             note=note, scratch_bytes=scratch, trials_ms=[t * 1e3 for t in m["trials_s"]],
                             calls_per_trial=m["calls_per_trial"]))
            log(f"  {cfg.label():40s} {name:15s} {m['time_s'] * 1e3:9.3f} ms {_fmt_tf(tflops):>8s} TFLOPS"
                + (f"  err {err:.1e}" if err is not None else ""))
        del ready, results
        del sets, ref_out, compiled
        if progress:
            progress(rows)
    return rows


def _fmt_tf(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _row(cfg: AttnConfig, impl: str, status: str, **kw) -> dict:
    row = dataclasses.asdict(cfg)
    row.update(impl=impl, status=status, flops=cfg.flops)
    row.update({k: v for k, v in kw.items() if v not in (None, "")})
    return row


# --------------------------------------------------------------------------------------------------- decode suite


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    layout: str  # "contiguous" | "paged"
    batch: int
    cache: int
    heads_q: int = 32
    heads_k: int = 8
    headdim: int = 128
    dtype: str = "bf16"
    page_size: int = 256

    @property
    def kv_bytes(self) -> int:
        """K and V bytes the kernel must read: 2 * b * cache * hk * d * sizeof(dtype)."""
        return 2 * self.batch * self.cache * self.heads_k * self.headdim * jnp.dtype(DTYPES[self.dtype]).itemsize

    def label(self) -> str:
        return f"{self.layout} b{self.batch} cache{self.cache}"


def _big_normal(key, shape, dtype, chunk_bytes: int = 256 << 20):
    """``jax.random.normal`` for arrays of many GiB: generated in row chunks inside one jit (``lax.map``), so the
    float32 intermediates of the sampler never exceed ``chunk_bytes``."""
    n, row = shape[0], math.prod(shape[1:])
    rows = max(1, min(n, chunk_bytes // max(1, 4 * row)))
    while n % rows:
        rows -= 1
    if rows == n:
        return jax.random.normal(key, shape, dtype)
    keys = jax.random.split(key, n // rows)
    gen = jax.jit(lambda ks: jax.lax.map(lambda k: jax.random.normal(k, (rows, *shape[1:]), dtype), ks))
    return gen(keys).reshape(shape)


def _decode_inputs(cfg: DecodeConfig, n_sets: int, seed: int):
    dt = DTYPES[cfg.dtype]
    key = jax.random.PRNGKey(seed)
    sets = []
    seqlens = jnp.full((cfg.batch,), cfg.cache, jnp.int32)
    for _ in range(n_sets):
        key, kq, kk, kv, kp = jax.random.split(key, 5)
        q = jax.random.normal(kq, (cfg.batch, 1, cfg.heads_q, cfg.headdim), dt)
        if cfg.layout == "paged":
            pages_per_seq = cfg.cache // cfg.page_size
            num_pages = cfg.batch * pages_per_seq
            cshape = (num_pages, cfg.page_size, cfg.heads_k, cfg.headdim)
            # pages scattered over the pool, as after a while of serving
            page_table = jax.random.permutation(kp, num_pages).astype(jnp.int32).reshape(cfg.batch, pages_per_seq)
        else:
            cshape = (cfg.batch, cfg.cache, cfg.heads_k, cfg.headdim)
            page_table = None
        kc = _big_normal(kk, cshape, dt)
        vc = _big_normal(kv, cshape, dt)
        sets.append((q, kc, vc, seqlens, page_table))
    return jax.block_until_ready(sets)


@dataclasses.dataclass
class DecodeImpl:
    name: str
    fn: Callable  # f(q, kc, vc, seqlens, page_table) -> out
    check: Callable = lambda cfg: ""
    group: str = ""  # rows with the same group are variants of one impl ("best" is taken over them)


def decode_impls() -> tuple[list[DecodeImpl], dict]:
    impls, skipped = [], {}
    for name, ok, reason in fa3jax.backends_info():
        if not ok:
            skipped[f"fa3jax:{name}"] = reason or "unavailable"
            continue

        def fn(q, kc, vc, sl, pt, _b=name):
            return fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=sl, page_table=pt, num_splits=0,
                                                 backend=_b)

        def check(cfg, _b=name):
            dt = DTYPES[cfg.dtype]
            q = jax.ShapeDtypeStruct((cfg.batch, 1, cfg.heads_q, cfg.headdim), dt)
            if cfg.layout == "paged":
                npg = cfg.batch * (cfg.cache // cfg.page_size)
                c = jax.ShapeDtypeStruct((npg, cfg.page_size, cfg.heads_k, cfg.headdim), dt)
                pt = jax.ShapeDtypeStruct((cfg.batch, cfg.cache // cfg.page_size), jnp.int32)
            else:
                c = jax.ShapeDtypeStruct((cfg.batch, cfg.cache, cfg.heads_k, cfg.headdim), dt)
                pt = None
            sl = jax.ShapeDtypeStruct((cfg.batch,), jnp.int32)
            s = fa3jax.supports(fa3jax.flash_mha_with_kvcache, q, c, c, cache_seqlens=sl, page_table=pt,
                                num_splits=0, backend=_b)
            return "" if s.supported else s.reason

        impls.append(DecodeImpl(f"fa3jax:{name}", fn, check))
    mod, reason = _flash_attn3()
    if mod is None:
        skipped[FA3_NAME] = reason
    else:
        for splits in (1, 4, 16):
            def fn(q, kc, vc, sl, pt, _s=splits):
                return mod.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=sl, page_table=pt, num_splits=_s)

            impls.append(DecodeImpl(f"{FA3_NAME}:s{splits}", fn,
                                    lambda cfg: "" if on_gpu() else "flash-attn3-jax needs a GPU", group=FA3_NAME))
    return impls, skipped


def measure_copy(nbytes: int, opts: TimingOptions) -> dict:
    """Device-to-device copy bandwidth: ``x * s`` with ``s`` a runtime scalar (XLA cannot fold it away), counting
    bytes read + written."""
    n = nbytes // 2
    xs = [(jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.bfloat16), jnp.asarray(1.0, jnp.bfloat16))
          for i in range(2)]
    f, _ = compile_fn(lambda x, s: x * s, xs[0])
    m = measure(f, xs, opts)
    moved = 2 * n * 2
    return {"bytes_moved": moved, "ms": m["time_s"] * 1e3, "tbps": moved / m["time_s"] / 1e12}


def decode_set_count(cfg: DecodeConfig, free: int) -> int:
    """How many cache sets a decode row cycles through: 4 for small caches (which would otherwise sit in L2), 2
    for large ones, 1 when two do not fit in ``free`` bytes."""
    n_sets = 4 if cfg.kv_bytes < (64 << 20) else 2
    return 1 if cfg.kv_bytes * n_sets * 1.3 > free else n_sets


def decode_chain_sets(sets: list) -> list:
    """Argument sets of :func:`_chained` from :func:`_decode_inputs`' sets: q varies per call, and every call walks
    through all cache sets (at least two query sets, so that consecutive calls differ)."""
    seqlens, kcs, vcs, pts = sets[0][3], tuple(x[1] for x in sets), tuple(x[2] for x in sets), \
        tuple(x[4] for x in sets)
    chain_sets = [(x[0], seqlens, pts, kcs, vcs) for x in sets]
    if len(chain_sets) < 2:
        chain_sets.append((jax.random.normal(jax.random.PRNGKey(1), sets[0][0].shape, sets[0][0].dtype),
                           seqlens, pts, kcs, vcs))
    return chain_sets


def _chained(fn: Callable, unroll: int) -> Callable:
    """``unroll`` decode steps in one jitted call, each step's output being the next step's query (same shape and
    dtype), cycling through the cache sets. A decode kernel can take a few microseconds, less than a Python
    dispatch; chaining inside one executable keeps launch overhead out of the measurement, the data dependency
    keeps XLA from merging or hoisting steps, and cycling the caches keeps small ones from living in L2."""

    def chained(q, seqlens, pts, kcs, vcs):
        for i in range(unroll):
            j = i % len(kcs)
            q = fn(q, kcs[j], vcs[j], seqlens, pts[j])
        return q

    return chained


def run_decode(configs: list[DecodeConfig], impls: list[DecodeImpl], opts: TimingOptions, copy_bytes: int,
               check: bool = True, log=print, unroll: int = 16, progress: Optional[Callable] = None,
               deadline: Optional[float] = None) -> tuple[list[dict], dict]:
    """Decode suite; times are per decode step (one jitted call runs ``unroll`` chained steps)."""
    copy = {}
    try:
        copy = measure_copy(copy_bytes, opts)
        log(f"  device copy: {copy['bytes_moved'] / 2**30:.2f} GiB moved in {copy['ms']:.3f} ms = "
            f"{copy['tbps']:.3g} TB/s")
    except Exception as e:
        copy = {"error": _short(e)}
        log(f"  device copy failed: {_short(e)}")
    rows = []
    for cfg in configs:
        if _out_of_time(deadline):
            rows += [_drow(cfg, impl.name, "skipped", reason="time budget (--budget-s) spent") for impl in impls]
            continue
        free = free_device_bytes()
        n_sets = decode_set_count(cfg, free)
        if cfg.kv_bytes * 1.3 > free:
            for impl in impls:
                rows.append(_drow(cfg, impl.name, "skipped",
                                  reason=f"cache {cfg.kv_bytes / 2**30:.1f} GiB does not fit in "
                                         f"{free / 2**30:.1f} GiB free"))
            continue
        try:
            sets = _decode_inputs(cfg, n_sets, seed=cfg.batch * 7 + cfg.cache)
        except Exception as e:
            for impl in impls:
                rows.append(_drow(cfg, impl.name, "skipped", reason=f"inputs: {_short(e)}"))
            continue
        chain_sets = decode_chain_sets(sets)
        seqlens, pts, kcs, vcs = chain_sets[0][1:]
        ref = None
        if check:
            try:
                ref = jax.block_until_ready(jax.jit(
                    lambda q, kc, vc, sl, pt: fa3jax.flash_mha_with_kvcache(
                        q, kc, vc, cache_seqlens=sl, page_table=pt, num_splits=0, backend="xla"))(*sets[0]))
            except Exception as e:
                log(f"  [guard] reference failed for {cfg.label()}: {_short(e)}")
        for impl in impls:
            try:
                reason = impl.check(cfg)
            except Exception as e:
                reason = f"check failed: {_short(e)}"
            if reason:
                rows.append(_drow(cfg, impl.name, "skipped", reason=reason, group=impl.group))
                continue
            err = None
            try:
                if ref is not None:
                    err = _rel_err(jax.jit(impl.fn)(*sets[0]), ref)
                if err is not None and not err <= WRONG_TOL:
                    rows.append(_drow(cfg, impl.name, "WRONG", max_rel_err=err, group=impl.group,
                                      reason=f"max rel err {err:.2e} > {WRONG_TOL} vs fa3jax:xla"))
                    log(f"  {cfg.label():32s} {impl.name:22s} WRONG (err {err:.2e})")
                    continue
                f, _ = compile_fn(_chained(impl.fn, unroll), chain_sets[0])
                m = measure(f, chain_sets, opts)
                m["time_s"] /= unroll
                m["trials_s"] = [t / unroll for t in m["trials_s"]]
            except Exception as e:
                rows.append(_drow(cfg, impl.name, "skipped", reason=_short(e), max_rel_err=err, group=impl.group))
                log(f"  {cfg.label():32s} {impl.name:22s} skipped: {_short(e, 80)}")
                continue
            tbps = cfg.kv_bytes / m["time_s"] / 1e12
            rows.append(_drow(cfg, impl.name, "ok", ms=m["time_s"] * 1e3, tbps=tbps, max_rel_err=err,
                              group=impl.group, trials_ms=[t * 1e3 for t in m["trials_s"]],
                              calls_per_trial=m["calls_per_trial"],
                              copy_ratio=tbps / copy["tbps"] if copy.get("tbps") else None))
            log(f"  {cfg.label():32s} {impl.name:22s} {m['time_s'] * 1e6:10.1f} us {tbps:8.3g} TB/s")
        del sets, ref, chain_sets, kcs, vcs, pts, seqlens  # free the caches before the next config
        if progress:
            progress(rows, copy)
    rows += _best_rows(rows)
    return rows, copy


def _drow(cfg: DecodeConfig, impl: str, status: str, **kw) -> dict:
    row = dataclasses.asdict(cfg)
    row.update(impl=impl, status=status, kv_bytes=cfg.kv_bytes)
    row.update({k: v for k, v in kw.items() if v not in (None, "")})
    return row


def _best_rows(rows: list[dict]) -> list[dict]:
    """For grouped variants (flash-attn3-jax num_splits), add a ``<group>:best`` row per config."""
    best = {}
    for r in rows:
        if r.get("group") and r["status"] == "ok":
            key = (r["group"], r["layout"], r["batch"], r["cache"])
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    out = []
    for (group, *_), r in best.items():
        b = dict(r)
        b.update(impl=f"{group}:best", best_of=r["impl"])
        b.pop("group")
        out.append(b)
    return out


# --------------------------------------------------------------------------------------------------- varlen suite

DENSE = "dense:"  # prefix of an impl's dense-equal-tokens baseline


def varlen_lengths(mean: int, tokens: int, seed: int = 0) -> tuple[int, ...]:
    """Lengths drawn uniformly in [mean/2, 3*mean/2] (rounded, >= 1) until they reach ``tokens``, the last one cut
    so that they sum to exactly ``tokens``. Seeded by (seed, mean): every impl, mode and rerun packs the same."""
    rng = np.random.default_rng([seed, mean])
    lengths, total = [], 0
    while total < tokens:
        s = min(max(1, int(round(rng.uniform(mean / 2, 3 * mean / 2)))), tokens - total)
        lengths.append(s)
        total += s
    return tuple(lengths)


@dataclasses.dataclass(frozen=True)
class VarlenConfig:
    mode: str  # "fwd" | "fwd+bwd"
    causal: bool
    dtype: str
    headdim: int
    heads: int
    tokens: int
    mean: int
    lengths: tuple  # varlen_lengths(mean, tokens, seed), kept so that the JSON says exactly what ran
    seed: int = 0

    @property
    def seqs(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths)

    @property
    def flops(self) -> float:
        f = sum(4.0 * s ** 2 * self.heads * self.headdim for s in self.lengths)
        if self.causal:
            f /= 2
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)

    @property
    def shape(self):
        return (self.tokens, self.heads, self.headdim)

    def cu_seqlens(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)

    def dense(self) -> AttnConfig:
        """The dense-equal-tokens baseline: batch tokens // mean of seqlen mean, as in the attn suite."""
        return AttnConfig(self.mode, self.causal, self.dtype, self.headdim, self.heads, self.mean,
                          max(1, self.tokens // self.mean))

    def label(self) -> str:
        return (f"{self.mode} {'causal' if self.causal else 'full'} {self.dtype} d{self.headdim} "
                f"L{self.mean} n{self.seqs} max{self.max_seqlen}")


def varlen_configs(o: dict) -> list[VarlenConfig]:
    cfgs = []
    for mode in o["modes"]:
        for causal in o["causal"]:
            for dtype in o["dtypes"]:
                for d in o["headdims"]:
                    for mean in o["varlen_means"]:
                        lengths = varlen_lengths(mean, o["varlen_tokens"], o["varlen_seed"])
                        cfgs.append(VarlenConfig(mode, causal, dtype, d, o["heads"], o["varlen_tokens"], mean,
                                                 lengths, o["varlen_seed"]))
    return cfgs


@dataclasses.dataclass
class VarlenImpl:
    """A varlen impl (``forward(cfg)`` returns ``f(q, k, v, cu_seqlens) -> out`` on packed tokens) and its
    dense-equal-tokens baseline, an attn-suite :class:`Impl` run on ``cfg.dense()`` (None: no baseline)."""

    name: str
    varlen: Impl
    dense: Optional[Impl]


ALL_VARLEN_IMPL_NAMES = ("fa3jax:cuda", "fa3jax:triton", "fa3jax:xla", FA3_NAME)


def _fa3jax_varlen_impl(backend: str) -> Impl:
    def forward(cfg):
        m = cfg.max_seqlen
        return lambda q, k, v, cu: fa3jax.flash_mha_varlen(q, k, v, cu, cu, max_seqlen_q=m, max_seqlen_k=m,
                                                           is_causal=cfg.causal, backend=backend)

    def support(cfg):
        sds = jax.ShapeDtypeStruct(cfg.shape, DTYPES[cfg.dtype])
        cu = jax.ShapeDtypeStruct((cfg.seqs + 1,), jnp.int32)
        return fa3jax.supports(fa3jax.flash_mha_varlen, sds, sds, sds, cu, cu, max_seqlen_q=cfg.max_seqlen,
                               max_seqlen_k=cfg.max_seqlen, is_causal=cfg.causal, backend=backend)

    return Impl(f"fa3jax:{backend}", forward, *_support_checks(support, backend))


def _fa3_varlen_impl(mod) -> Impl:
    def forward(cfg):
        m = cfg.max_seqlen
        # by keyword: 0.2.3 has seqused_k between cu_seqlens_k and max_seqlen_q, which its README omits
        return lambda q, k, v, cu: mod.flash_mha_varlen(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=m,
                                                        max_seqlen_k=m, is_causal=cfg.causal)

    def check(cfg):
        if not hasattr(mod, "flash_mha_varlen"):
            return "flash_attn3_jax has no flash_mha_varlen"
        return _fa3_impl(mod).check(cfg)

    return Impl(FA3_NAME, forward, check)


def varlen_impls() -> tuple[list[VarlenImpl], dict]:
    impls, skipped = [], {}
    for name, ok, reason in fa3jax.backends_info():
        if ok:
            impls.append(VarlenImpl(f"fa3jax:{name}", _fa3jax_varlen_impl(name),
                                    dataclasses.replace(_fa3jax_impl(name), name=f"{DENSE}fa3jax:{name}")))
        else:
            skipped[f"fa3jax:{name}"] = reason or "unavailable"
    mod, reason = _flash_attn3()
    if mod is not None:
        impls.append(VarlenImpl(FA3_NAME, _fa3_varlen_impl(mod),
                                dataclasses.replace(_fa3_impl(mod), name=DENSE + FA3_NAME)))
    else:
        skipped[FA3_NAME] = reason
    return impls, skipped


def padded_reference(q, k, v, lengths, causal: bool):
    """Forward reference for a batch ``(n, m, h, d)`` whose first ``lengths[i]`` rows are sequence ``i``:
    ``jax.nn.dot_product_attention`` (xla) in float32 with the padding masked by the sequence lengths. It shares no
    code with fa3jax, so it also catches a wrong fa3jax:xla. One head at a time keeps the (n, m, m) scores of the
    longest sequences (m up to 1.5x the mean) within a few GiB."""
    lens = jnp.asarray(lengths, jnp.int32)

    def one_head(x):
        qh, kh, vh = (t[:, :, None, :] for t in x)
        return jax.nn.dot_product_attention(qh, kh, vh, is_causal=causal, query_seq_lengths=lens,
                                            key_value_seq_lengths=lens, implementation="xla")[:, :, 0, :]

    out = jax.lax.map(one_head, tuple(jnp.moveaxis(x.astype(jnp.float32), 2, 0) for x in (q, k, v)))
    return jnp.moveaxis(out, 0, 2)


def varlen_reference(q, k, v, lengths, causal: bool):
    """:func:`padded_reference` of packed ``(total, h, d)`` sequences: gathered into a padded batch, computed,
    and packed back, all in one jit at full float32 matmul precision."""
    lengths = np.asarray(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(lengths.max())
    rows = np.where(pos[None] < lengths[:, None], starts[:, None] + pos[None], 0)  # (n, m) packed row of each slot
    seq = np.repeat(np.arange(len(lengths)), lengths)  # packed row -> (sequence, position)
    off = np.arange(int(lengths.sum())) - starts[seq]

    def f(q, k, v):
        return padded_reference(q[rows], k[rows], v[rows], lengths, causal)[seq, off]

    with _highest_precision():
        return jax.jit(f)(q, k, v)


def dense_reference(q, k, v, causal: bool):
    with _highest_precision():
        return jax.jit(lambda q, k, v: padded_reference(q, k, v, [q.shape[1]] * q.shape[0], causal))(q, k, v)


def _highest_precision():
    """True float32 matmuls (no TF32) for the reference; any precision passes the guard, so a jax without the
    context manager just runs at its default."""
    ctx = getattr(jax, "default_matmul_precision", None)
    return ctx("highest") if ctx is not None else contextlib.nullcontext()


def _varlen_inputs(cfg: VarlenConfig, n_sets: int, seed: int):
    """Like the attn suite's, packed, with ``cu_seqlens`` last: a runtime argument, as in training, so that no
    kernel can specialize on the packing."""
    sets = _attn_inputs(cfg, n_sets, seed)
    cu = jnp.asarray(cfg.cu_seqlens())
    return jax.block_until_ready([s + (cu,) for s in sets])


def run_varlen(configs: list[VarlenConfig], impls: list[VarlenImpl], opts: TimingOptions, check: bool = True,
               log=print, progress: Optional[Callable] = None, deadline: Optional[float] = None) -> list[dict]:
    """Varlen suite: per config, each impl's dense-equal-tokens baseline then its varlen call; varlen rows carry
    ``dense_ratio`` = varlen TFLOPS / dense TFLOPS. Same guard, timing and budget as :func:`run_attn`."""
    rows = []
    guard_cache: dict = {}  # fwd-mode config -> {impl: forward error}, shared by both modes
    for cfg in configs:
        dcfg = cfg.dense()
        runs = [r for vi in impls for r in ((vi.dense, "dense"), (vi.varlen, "varlen")) if r[0] is not None]
        if _out_of_time(deadline):
            rows += [_vrow(cfg, impl.name, kind, "skipped", reason="time budget (--budget-s) spent")
                     for impl, kind in runs]
            continue
        seed = cfg.mean * 1009 + cfg.headdim * 7 + len(cfg.dtype)
        try:
            sets = {"varlen": _varlen_inputs(cfg, opts.input_sets, seed),
                    "dense": _attn_inputs(dcfg, opts.input_sets, seed + 1)}
        except Exception as e:  # e.g. out of memory
            rows += [_vrow(cfg, impl.name, kind, "skipped", reason=f"inputs: {_short(e)}") for impl, kind in runs]
            continue
        fwd_args = {"varlen": lambda s: s[:3] + s[-1:], "dense": lambda s: s[:3]}  # drop the cotangent
        run_cfg = {"varlen": cfg, "dense": dcfg}
        guard_key = dataclasses.replace(cfg, mode="fwd")
        refs = {}
        if check and guard_key not in guard_cache:
            guard_cache[guard_key] = {}
            try:
                refs["varlen"] = jax.block_until_ready(
                    varlen_reference(*sets["varlen"][0][:3], cfg.lengths, cfg.causal))
                refs["dense"] = jax.block_until_ready(dense_reference(*sets["dense"][0][:3], cfg.causal))
            except Exception as e:
                log(f"  [guard] reference failed for {cfg.label()}: {_short(e)}")
        dense_tflops: dict = {}  # varlen impl name -> its baseline's TFLOPS in this config
        f = compiled = None
        for impl, kind in runs:
            f = compiled = None  # free the last impl's executable (and its buffers) before compiling the next
            c, s = run_cfg[kind], sets[kind]
            try:
                reason = impl.check(c)
            except Exception as e:
                reason = f"check failed: {_short(e)}"
            if reason:
                rows.append(_vrow(cfg, impl.name, kind, "skipped", reason=reason))
                continue
            note = impl.note(c)
            err = guard_cache.get(guard_key, {}).get(impl.name)
            try:
                if cfg.mode == "fwd" or (check and err is None and kind in refs):
                    compiled = compile_fn(_timed_fn(impl.forward(c), cfg.mode), s[0])
                if check and err is None and kind in refs:
                    fwd = compiled[0] if cfg.mode == "fwd" else jax.jit(impl.forward(c))
                    err = _rel_err(fwd(*fwd_args[kind](s[0])), refs[kind])
                    guard_cache[guard_key][impl.name] = err
                if err is not None and not err <= WRONG_TOL:
                    rows.append(_vrow(cfg, impl.name, kind, "WRONG", max_rel_err=err, note=note,
                                      reason=f"forward max rel err {err:.2e} > {WRONG_TOL} vs jax.nn reference"))
                    log(f"  {cfg.label():44s} {impl.name:22s} WRONG (err {err:.2e})")
                    continue
                f, scratch = compiled or compile_fn(_timed_fn(impl.forward(c), cfg.mode), s[0])
                m = measure(f, s, opts)
            except Exception as e:
                rows.append(_vrow(cfg, impl.name, kind, "skipped", reason=_short(e), max_rel_err=err, note=note))
                log(f"  {cfg.label():44s} {impl.name:22s} skipped: {_short(e, 80)}")
                continue
            tflops = c.flops / m["time_s"] / 1e12
            base = impl.name[len(DENSE):] if kind == "dense" else impl.name
            ratio = None
            if kind == "dense":
                dense_tflops[base] = tflops
            elif base in dense_tflops:
                ratio = tflops / dense_tflops[base]
            rows.append(_vrow(cfg, impl.name, kind, "ok", ms=m["time_s"] * 1e3, tflops=tflops, max_rel_err=err,
                              note=note, scratch_bytes=scratch, trials_ms=[t * 1e3 for t in m["trials_s"]],
                              calls_per_trial=m["calls_per_trial"], dense_ratio=ratio))
            log(f"  {cfg.label():44s} {impl.name:22s} {m['time_s'] * 1e3:9.3f} ms {_fmt_tf(tflops):>8s} TFLOPS"
                + (f"  err {err:.1e}" if err is not None else "")
                + (f"  varlen/dense {ratio:.2f}" if ratio is not None else ""))
        del sets, refs, f, compiled
        if progress:
            progress(rows)
    return rows


def _vrow(cfg: VarlenConfig, impl: str, kind: str, status: str, **kw) -> dict:
    """A varlen-suite row; ``flops`` are those of what ran (the dense baseline's for ``kind == 'dense'``)."""
    row = dataclasses.asdict(cfg)
    row.update(impl=impl, kind=kind, status=status, seqs=cfg.seqs, max_seqlen=cfg.max_seqlen)
    if kind == "dense":
        d = cfg.dense()
        row.update(batch=d.batch, seqlen=d.seqlen, flops=d.flops)
    else:
        row.update(flops=cfg.flops)
    row.update({k: v for k, v in kw.items() if v not in (None, "")})
    return row


# --------------------------------------------------------------------------------------------------- reporting


def _col_order(names, preferred) -> list[str]:
    seen = [n for n in preferred if n in names]
    return seen + sorted(n for n in names if n not in seen)


def _group(rows: list[dict], key) -> tuple[list, dict]:
    """Rows grouped by ``key(row)`` in first-seen order: (keys, {key: {impl: row}})."""
    keys, by = [], {}
    for r in rows:
        k = key(r)
        if k not in by:
            keys.append(k)
            by[k] = {}
        by[k][r["impl"]] = r
    return keys, by


class _Footnotes:
    """Numbered footnotes for table cells, each text once."""

    def __init__(self):
        self.notes: list[str] = []

    def __call__(self, text: str) -> int:
        if text not in self.notes:
            self.notes.append(text)
        return self.notes.index(text) + 1

    def lines(self) -> list[str]:
        return [f"[{i + 1}] {n}" for i, n in enumerate(self.notes)]


def _cell(r: Optional[dict], ok_text: Callable[[dict], str], footnote) -> str:
    """A table cell: '' for no row, ``ok_text(r)`` when it ran, else WRONG / skip with a footnoted reason."""
    if r is None:
        return ""
    if r["status"] == "ok":
        return ok_text(r)
    if r["status"] == "WRONG":
        return f"WRONG err {r['max_rel_err']:.1e}"
    return f"skip [{footnote(r.get('reason', '?'))}]"


def attn_table(rows: list[dict]) -> str:
    """Markdown table: one row per config, one column per impl; cells 'TFLOPS / ms' and the speed ratio vs
    flash-attn3-jax (>1: faster) when it was timed."""
    impls = _col_order({r["impl"] for r in rows}, ALL_ATTN_IMPL_NAMES)
    keys, by = _group(rows, lambda r: (r["mode"], r["causal"], r["dtype"], r["headdim"], r["heads"], r["seqlen"],
                                       r["batch"]))
    footnote = _Footnotes()

    head = ["mode", "causal", "dtype", "d", "h", "seqlen", "batch"] + impls
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = [k[0], "yes" if k[1] else "no", k[2], str(k[3]), str(k[4]), str(k[5]), str(k[6])]
        fa3 = by[k].get(FA3_NAME)
        for name in impls:
            r = by[k].get(name)
            def ok(r, name=name):
                c = f"{_fmt_tf(r['tflops'])} TF / {r['ms']:.3f} ms"
                if fa3 is not None and fa3["status"] == "ok" and name != FA3_NAME:
                    c += f" (x{fa3['ms'] / r['ms']:.2f})"
                return c + (f" [{footnote(r['note'])}]" if r.get("note") else "")

            cells.append(_cell(r, ok, footnote))
        lines.append("| " + " | ".join(cells) + " |")
    fa3_timed = any(r["impl"] == FA3_NAME and r["status"] == "ok" for r in rows)
    if footnote.notes or fa3_timed:
        lines.append("")
    if fa3_timed:
        lines.append("(xR): speed relative to flash-attn3-jax on the same row (>1: faster)")
    lines += footnote.lines()
    return "\n".join(lines)


def decode_table(rows: list[dict], copy: dict) -> str:
    def order(n):  # fa3jax backends first, then flash-attn3-jax best, s1, s4, s16
        tail = n.rsplit(":", 1)[-1]
        return (not n.startswith("fa3jax"), n.split(":")[0], tail != "best",
                int(tail[1:]) if tail[:1] == "s" and tail[1:].isdigit() else 0, n)

    impls = sorted({r["impl"] for r in rows}, key=order)
    keys, by = _group(rows, lambda r: (r["layout"], r["batch"], r["cache"]))
    footnote = _Footnotes()

    head = ["layout", "batch", "cache", "K/V MiB"] + impls
    lines = []
    if copy.get("tbps"):
        lines.append(f"device copy (read+write, {copy['bytes_moved'] / 2**30:.2f} GiB moved): "
                     f"{copy['tbps']:.3g} TB/s; cells: TB/s of K/V read / time per decode step (fraction of copy TB/s)")
        lines.append("")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        any_row = next(iter(by[k].values()))
        cells = [k[0], str(k[1]), str(k[2]), f"{any_row['kv_bytes'] / 2**20:.0f}"]
        for name in impls:
            r = by[k].get(name)
            def ok(r):
                c = f"{r['tbps']:.3g} TB/s / {r['ms'] * 1e3:.1f} us"
                if r.get("copy_ratio"):
                    c += f" ({r['copy_ratio']:.2f})"
                return c + (f" {r['best_of'].rsplit(':', 1)[-1]}" if r.get("best_of") else "")

            cells.append(_cell(r, ok, footnote))
        lines.append("| " + " | ".join(cells) + " |")
    if footnote.notes:
        lines.append("")
        lines += footnote.lines()
    return "\n".join(lines)


def varlen_table(rows: list[dict]) -> str:
    """Markdown table: one row per config; per impl its varlen cell, its dense-equal-tokens cell and the ratio of
    their TFLOPS (varlen / dense)."""
    bases = _col_order({r["impl"][len(DENSE):] if r["kind"] == "dense" else r["impl"] for r in rows},
                       ALL_VARLEN_IMPL_NAMES)
    names = {r["impl"] for r in rows}
    keys, by = _group(rows, lambda r: (r["mode"], r["causal"], r["dtype"], r["headdim"], r["heads"], r["mean"],
                                       r["seqs"], r["max_seqlen"]))
    footnote = _Footnotes()

    cols = []  # (header, impl name or None for the ratio, base)
    for b in bases:
        cols += [(n, n, b) for n in (b, DENSE + b) if n in names]
        if b in names and DENSE + b in names:
            cols.append((f"{b} varlen/dense", None, b))
    head = ["mode", "causal", "dtype", "d", "h", "mean L", "seqs", "max L"] + [c[0] for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        cells = [k[0], "yes" if k[1] else "no", k[2], str(k[3]), str(k[4]), str(k[5]), str(k[6]), str(k[7])]
        for _, name, base in cols:
            r = by[k].get(name) if name else by[k].get(base)
            if name is None:
                cells.append(f"{r['dense_ratio']:.2f}" if r is not None and r.get("dense_ratio") else "")
            else:
                cells.append(_cell(r, lambda r: f"{_fmt_tf(r['tflops'])} TF / {r['ms']:.3f} ms"
                                   + (f" [{footnote(r['note'])}]" if r.get("note") else ""), footnote))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{DENSE}X: X's flash_mha on batch tokens // L of seqlen L (dense at equal tokens); "
                  "X varlen/dense: varlen TFLOPS / dense TFLOPS"]
    lines += footnote.lines()
    return "\n".join(lines)


def plot_attn(rows: list[dict], path: Path, title: Optional[str] = None) -> str:
    """TFLOPS vs seqlen per impl, one panel per (mode, causal). Returns '' or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"no plot: matplotlib not importable ({type(e).__name__})"
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "no plot: nothing was timed"
    panels = sorted({(r["mode"], r["causal"]) for r in ok})
    multi = len({(r["dtype"], r["headdim"]) for r in ok}) > 1
    ncols = 2 if len(panels) > 2 else len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    seqlens = sorted({r["seqlen"] for r in ok})
    for ax, (mode, causal) in zip(axes.flat, panels):
        series = {}
        for r in ok:
            if (r["mode"], r["causal"]) != (mode, causal):
                continue
            label = r["impl"] + (f" {r['dtype']} d{r['headdim']}" if multi else "")
            series.setdefault(label, []).append((r["seqlen"], r["tflops"]))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [str(x) for x in seqlens])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("seqlen (batch = tokens / seqlen)")
        ax.set_ylabel("TFLOPS")
        ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    # ``title``: the run's device when plotting saved results from another machine
    fig.suptitle(title or f"attention TFLOPS on {jax.devices()[0].device_kind} (jax {jax.__version__})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return ""


def markdown_section(table: str, env: dict, suite: str) -> str:
    return (
        f"\n## {suite}: {env['device_kind']} -- {env['date']}\n\n"
        f"- device: {env['device_kind']} ({env['platform']}), jax {env['jax']}, fa3jax {env['fa3jax']}, "
        f"flash-attn3-jax {env['flash_attn3_jax'] or 'not installed'}\n"
        f"- commit: {env['commit'] or 'unknown'}\n"
        f"- command: `{env['command']}`\n\n"
        f"{table}\n"
    )


def record_markdown(table: str, env: dict, suite: str, path: Optional[Path] = None) -> Path:
    """Append a section (device, date, commit, command, table) to ``benchmarks/RESULTS.md``."""
    path = Path(path) if path else default_results_md()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(markdown_section(table, env, suite))
    return path


# --------------------------------------------------------------------------------------------------- CLI


def _csv(s, conv=str):
    return [conv(x) for x in s.split(",") if x.strip()] if s else None


def build_parser(prog: str = "python -m fa3jax bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Time attention implementations side by side.")
    p.add_argument("--suite", choices=("attn", "decode", "varlen"), default="attn")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized preset (the default on CPU unless sizes are given or --full)")
    p.add_argument("--full", action="store_true", help="full sizes even on CPU")
    g = p.add_argument_group("attn suite (--heads, --headdims, --dtypes, --causal, --modes: also varlen)")
    g.add_argument("--seqlens", help="comma list (default 512,...,16384)")
    g.add_argument("--tokens", type=int, help="batch * seqlen (default 16384)")
    g.add_argument("--heads", type=int, help="default 16")
    g.add_argument("--headdims", help="comma list of 64,128,256 (default 128)")
    g.add_argument("--dtypes", help="comma list of bf16,fp16 (default both; varlen: bf16)")
    g.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    g.add_argument("--modes", help="comma list of fwd,fwd+bwd (default both)")
    g = p.add_argument_group("decode suite")
    g.add_argument("--batches", help="comma list (default 1,8,64)")
    g.add_argument("--caches", help="comma list of cache lengths (default 4096,32768,131072)")
    g.add_argument("--layouts", help="comma list of contiguous,paged (default both)")
    g.add_argument("--copy-mib", type=int, help="size of the copy-bandwidth buffer (default 1024 GPU, 32 CPU)")
    g.add_argument("--unroll", type=int, help="decode steps chained in one jitted call (default 16 GPU, 2 CPU)")
    g = p.add_argument_group("varlen suite")
    g.add_argument("--varlen-means", help="comma list of mean sequence lengths L; lengths are drawn uniformly in "
                                          "[L/2, 3L/2] (default 512,1024,2048,4096,8192)")
    g.add_argument("--varlen-tokens", type=int, help="total packed tokens, also the dense baseline's batch * L "
                                                     "(default 16384)")
    g.add_argument("--varlen-seed", type=int, default=0, help="seed of the length draw (default 0)")
    g = p.add_argument_group("common")
    g.add_argument("--impls", help="comma list of impl names or parts (e.g. fa3jax, xla, flash-attn3-jax, "
                                   "jax.nn:cudnn); default all")
    g.add_argument("--repeats", type=int, help="timed trials, median reported (default 5; 3 small)")
    g.add_argument("--min-time", type=float, help="seconds per trial (default 0.05 GPU, 0.01 CPU)")
    g.add_argument("--max-calls", type=int, help="max calls per trial (default 1000 GPU, 4 CPU)")
    g.add_argument("--warmup", type=int, default=3)
    g.add_argument("--input-sets", type=int, default=2, help=">= 2 input sets rotated during timing")
    g.add_argument("--no-check", action="store_true", help="skip the correctness guard")
    g.add_argument("--budget-s", type=float, help="start no new config after this many seconds (the rest is "
                                                  "recorded as skipped); partial JSON is saved after every config")
    g.add_argument("--out-dir", "--out", default="bench_out",
                   help="where JSON, PNG and the markdown section go (default ./bench_out)")
    g.add_argument("--json", help="JSON path (default OUT_DIR/<suite>-<timestamp>.json)")
    g.add_argument("--plot", help="PNG path (default next to the JSON)")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--record", action="store_true", help="append a section to benchmarks/RESULTS.md")
    g.add_argument("--results-md", help="markdown file for --record (default benchmarks/RESULTS.md)")
    return p


SMALL = dict(heads=2, headdims=[64], tokens=1024, seqlens=[256, 512], dtypes=["bf16"], impls=["xla"],
             repeats=3, batches=[1, 2], caches=[256, 1024], varlen_means=[64, 128], varlen_tokens=512)
FULL = dict(heads=16, headdims=[128], tokens=16384, seqlens=[512, 1024, 2048, 4096, 8192, 16384],
            dtypes=["bf16", "fp16"], impls=None, repeats=5, batches=[1, 8, 64], caches=[4096, 32768, 131072],
            varlen_means=[512, 1024, 2048, 4096, 8192], varlen_tokens=16384)


def resolve(args) -> dict:
    """Merge explicit options over the preset (``--small`` on CPU unless sizes were given or ``--full``)."""
    sized = any(getattr(args, a) is not None for a in ("seqlens", "tokens", "heads", "headdims", "batches",
                                                      "caches", "varlen_means", "varlen_tokens"))
    small = args.small or (not args.full and not sized and not on_gpu())
    base = dict(SMALL if small else FULL)
    if args.suite == "varlen":
        base["dtypes"] = ["bf16"]  # the target is bf16 only; fp16 on request
    explicit = dict(seqlens=_csv(args.seqlens, int), tokens=args.tokens, heads=args.heads,
                    headdims=_csv(args.headdims, int), dtypes=_csv(args.dtypes), impls=_csv(args.impls),
                    repeats=args.repeats, batches=_csv(args.batches, int), caches=_csv(args.caches, int),
                    copy_mib=args.copy_mib, unroll=args.unroll, varlen_means=_csv(args.varlen_means, int),
                    varlen_tokens=args.varlen_tokens)
    gpu = on_gpu()
    base.update(copy_mib=1024 if gpu else 32, unroll=16 if gpu else 2)  # platform, not preset, defaults
    base.update({k: v for k, v in explicit.items() if v is not None})
    base["small"] = small
    base["modes"] = _csv(args.modes) or ["fwd", "fwd+bwd"]
    base["causal"] = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    base["layouts"] = _csv(args.layouts) or ["contiguous", "paged"]
    base["varlen_seed"] = args.varlen_seed
    base["timing"] = TimingOptions(
        warmup=args.warmup, repeats=base["repeats"],
        min_time=args.min_time if args.min_time is not None else (0.05 if gpu else 0.01),
        max_calls=args.max_calls if args.max_calls is not None else (1000 if gpu else 4),
        input_sets=max(2, args.input_sets))
    for m in base["modes"]:
        if m not in ("fwd", "fwd+bwd"):
            raise SystemExit(f"unknown mode {m!r} (fwd, fwd+bwd)")
    for d in base["dtypes"]:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r} ({', '.join(DTYPES)})")
    return base


def attn_configs(o: dict) -> list[AttnConfig]:
    cfgs = []
    for mode in o["modes"]:
        for causal in o["causal"]:
            for dtype in o["dtypes"]:
                for d in o["headdims"]:
                    for s in o["seqlens"]:
                        cfgs.append(AttnConfig(mode, causal, dtype, d, o["heads"], s, max(1, o["tokens"] // s)))
    return cfgs


def decode_configs(o: dict) -> list[DecodeConfig]:
    return [DecodeConfig(layout, b, c) for layout in o["layouts"] for b in o["batches"] for c in o["caches"]
            if layout == "contiguous" or c % 256 == 0]


def main(argv=None, prog: str = "python -m fa3jax bench") -> int:
    args = build_parser(prog).parse_args(argv)
    o = resolve(args)
    env = environment()
    t_start = time.perf_counter()
    print(f"fa3jax bench ({args.suite}{', small preset' if o['small'] else ''}) on {env['device_kind']} "
          f"[{env['platform']}], jax {env['jax']}, commit {env['commit']}")
    log = lambda s: print(s, flush=True)  # noqa: E731
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = Path(args.json) if args.json else out_dir / f"{args.suite}-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    options = {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in o.items()}
    print(f"JSON (updated after every config): {json_path}")

    def save(rows, copy=None, table=None, complete=False):
        doc = {"suite": args.suite, "complete": complete, "env": env, "options": options,
               "elapsed_s": time.perf_counter() - t_start, "wrong_tol": WRONG_TOL,
               "flops_convention": "fwd 4*b*s^2*h*d (varlen: sum_i 4*s_i^2*h*d; halved if causal); "
                                   "fwd+bwd 3.5x fwd",
               "results": rows, "copy": copy, "table": table}
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(json_path)

    deadline = t_start + args.budget_s if args.budget_s else None
    impls, unavailable = {"attn": attn_impls, "varlen": varlen_impls, "decode": decode_impls}[args.suite]()
    # decode variants (flash-attn3-jax num_splits) are also selected by their group name
    impls = [i for i in impls if _selected(i.name, o["impls"]) or _selected(getattr(i, "group", ""), o["impls"])]
    unavailable = {k: v for k, v in unavailable.items() if _selected(k, o["impls"])}
    for name, why in unavailable.items():
        print(f"  {name}: unavailable: {why}")
    copy = None
    kw = dict(check=not args.no_check, log=log, progress=save, deadline=deadline)
    if args.suite == "attn":
        rows = run_attn(attn_configs(o), impls, o["timing"], **kw)
    elif args.suite == "varlen":
        rows = run_varlen(varlen_configs(o), impls, o["timing"], **kw)
    else:
        rows, copy = run_decode(decode_configs(o), impls, o["timing"], o["copy_mib"] << 20, unroll=o["unroll"], **kw)
    for name, why in unavailable.items():
        rows.append({"impl": name, "status": "unavailable", "reason": why})
    shown = [r for r in rows if r["status"] != "unavailable"]
    table = decode_table(shown, copy) if args.suite == "decode" else \
        {"attn": attn_table, "varlen": varlen_table}[args.suite](shown)
    elapsed = time.perf_counter() - t_start
    print()
    print(table)
    if unavailable:
        print()
        for name, why in unavailable.items():
            print(f"unavailable: {name}: {why}")

    save(rows, copy, table, complete=True)
    print(f"\nJSON: {json_path}")
    if args.suite == "attn" and not args.no_plot:
        png = Path(args.plot) if args.plot else json_path.with_suffix(".png")
        why = plot_attn(rows, png)
        print(why or f"plot: {png}")
    section = json_path.with_suffix(".md")  # the RESULTS.md section, also kept with the JSON
    section.write_text(markdown_section(table, env, args.suite))
    if args.record:
        md = record_markdown(table, env, args.suite, args.results_md)
        print(f"recorded in {md}")
    print(f"elapsed {elapsed:.1f} s")
    bad = [r for r in rows if r["status"] == "WRONG"]
    timed = [r for r in rows if r["status"] == "ok"]
    if bad:
        print(f"{len(bad)} WRONG result(s)")
    if not timed:
        print("nothing was timed")
    return 1 if (bad or not timed) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The attention suite: dense configs, their inputs, and the run that guards and times every impl on each."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .common import DTYPES, WRONG_TOL, fmt_tflops, out_of_time, short_error
from .guard import rel_err
from .impls import SINKS, Impl, fa3jax_impl, ratio_field, variant_suffix
from .timing import TimingOptions, compile_fn, measure_each, timed_fn

@dataclasses.dataclass(frozen=True)
class AttnConfig:
    mode: str  # "fwd" | "fwd+bwd"
    causal: bool
    dtype: str
    headdim: int
    heads: int
    seqlen: int
    batch: int
    headdim_v: Optional[int] = None  # v's (and out's) head dim when below headdim (MLA); None: headdim
    heads_k: Optional[int] = None  # k's and v's heads when fewer than q's (GQA/MQA); None: heads

    @property
    def dv(self) -> int:
        return self.headdim_v or self.headdim

    @property
    def hk(self) -> int:
        return self.heads_k or self.heads

    @property
    def flops(self) -> float:
        # QK^T and P V: 2·b·s²·h·(d + d_v) (= 4·b·s²·h·d without MLA)
        f = 2.0 * self.batch * self.seqlen ** 2 * self.heads * (self.headdim + self.dv)
        if self.causal:
            f /= 2
        return f * (3.5 if self.mode == "fwd+bwd" else 1.0)

    @property
    def shape(self):
        return (self.batch, self.seqlen, self.heads, self.headdim)

    @property
    def shape_k(self):
        return (self.batch, self.seqlen, self.hk, self.headdim)

    @property
    def shape_v(self):
        """v's shape."""
        return (self.batch, self.seqlen, self.hk, self.dv)

    @property
    def shape_out(self):
        """out's (and the cotangent's) shape."""
        return (self.batch, self.seqlen, self.heads, self.dv)

    def dlabel(self) -> str:
        return f"{self.headdim}" if self.headdim_v is None else f"{self.headdim}x{self.headdim_v}"

    def hlabel(self) -> str:
        return f"{self.heads}" if self.heads_k is None else f"{self.heads}/{self.heads_k}"

    def label(self) -> str:
        return (f"{self.mode} {'causal' if self.causal else 'full'} {self.dtype} d{self.dlabel()} "
                f"h{self.hlabel()} b{self.batch} s{self.seqlen}")


def attn_configs(o: dict) -> list[AttnConfig]:
    cfgs = []
    for mode in o["modes"]:
        for causal in o["causal"]:
            for dtype in o["dtypes"]:
                for d in o["headdims"]:
                    for s in o["seqlens"]:
                        cfgs.append(AttnConfig(mode, causal, dtype, d, o["heads"], s, max(1, o["tokens"] // s),
                                               headdim_v=o.get("headdim_v"), heads_k=o.get("heads_k")))
    return cfgs


def attn_inputs(cfg: AttnConfig, n_sets: int, seed: int):
    """``n_sets`` input sets (q, k, v[, the output's cotangent]) of ``cfg`` (or any config with a ``shape``)."""
    dt = DTYPES[cfg.dtype]
    # the varlen suite's configs have one shape
    shapes = tuple(getattr(cfg, a, cfg.shape) for a in ("shape", "shape_k", "shape_v", "shape_out"))
    sets = []
    key = jax.random.PRNGKey(seed)
    for _ in range(n_sets):
        key, *ks = jax.random.split(key, 5)
        q, k, v, ct = (jax.random.normal(kk, shape, dt) for kk, shape in zip(ks, shapes))
        sets.append((q, k, v) if cfg.mode == "fwd" else (q, k, v, ct))
    return jax.block_until_ready(sets)


def run_attn(configs: list[AttnConfig], impls: list[Impl], opts: TimingOptions, check: bool = True,
             log=print, progress: Optional[Callable] = None, deadline: Optional[float] = None) -> list[dict]:
    """Attention suite. ``progress(rows)`` is called after every config (to save partial results);
    configs not started by ``deadline`` (a ``time.perf_counter()`` value) are recorded as skipped.

    Impls with ``sinks`` (``fa3jax:<b>+sinks``, the CLI's ``--sinks``) get each input set plus a fresh float32
    (hq,) sink array (differentiated too in ``fwd+bwd``), are guarded against fa3jax:xla with the same sinks, and
    their rows carry ``sinks_ratio`` = their time / the time of ``fa3jax:<b>`` without sinks in the same config.
    Impls with ``deterministic`` (``fa3jax:<b>+det``, the CLI's ``--deterministic``) take the plain input sets, are
    guarded against the plain reference, and their rows carry ``det_ratio`` likewise."""
    rows = []
    guard_cache: dict = {}  # (shape config in fwd mode) -> {impl: forward error}, shared by both modes
    ref_impls = {s: next((i for i in impls if i.name == "fa3jax:xla" + (SINKS if s else "")), None)
                 or fa3jax_impl("xla", sinks=s) for s in (False, True)}
    for cfg in configs:
        if out_of_time(deadline):
            rows += [_row(cfg, impl.name, "skipped", reason="time budget (--budget-s) spent") for impl in impls]
            continue
        try:
            sets = attn_inputs(cfg, opts.input_sets, seed=cfg.seqlen * 1009 + cfg.headdim * 7 + len(cfg.dtype))
        except Exception as e:  # e.g. out of memory
            for impl in impls:
                rows.append(_row(cfg, impl.name, "skipped", reason=f"inputs: {short_error(e)}"))
            continue
        use_sinks = any(i.sinks for i in impls)
        sinks_sets = sinks_inputs(cfg, sets) if use_sinks else None
        compiled: dict = {}  # impl name -> (compiled timed fn, scratch bytes), compiled once per config

        def args_of(impl):
            return sinks_sets if impl.sinks else sets

        def timed(impl):
            if impl.name not in compiled:
                compiled[impl.name] = compile_fn(timed_fn(impl.forward(cfg), cfg.mode, grad_rest=int(impl.sinks)),
                                                 args_of(impl)[0])
            return compiled[impl.name]

        def forward_out(impl):
            a = args_of(impl)[0]
            if cfg.mode == "fwd":  # the timed function is the forward: reuse its compilation
                return timed(impl)[0](*a)
            return jax.jit(impl.forward(cfg))(*a[:3], *a[4:])  # without the cotangent

        guard_key = dataclasses.replace(cfg, mode="fwd")
        ref_out = {}  # with sinks? -> the reference output
        if check and guard_key not in guard_cache:
            guard_cache[guard_key] = {}
            for with_sinks in (False, True) if use_sinks else (False,):
                try:
                    ref_out[with_sinks] = jax.block_until_ready(forward_out(ref_impls[with_sinks]))
                except Exception as e:
                    log(f"  [guard] reference {ref_impls[with_sinks].name} failed for {cfg.label()}: "
                        f"{short_error(e)}")
        ready = {}  # impl name -> (impl, err, note, compiled fn, scratch): passed the guard, compiled
        for impl in impls:
            reason = ""
            try:
                reason = impl.check(cfg)
            except Exception as e:
                reason = f"check failed: {short_error(e)}"
            if reason:
                rows.append(_row(cfg, impl.name, "skipped", reason=reason))
                continue
            note = impl.note(cfg)
            err = guard_cache.get(guard_key, {}).get(impl.name)
            try:
                if check and err is None and impl.sinks in ref_out:
                    err = rel_err(forward_out(impl), ref_out[impl.sinks])
                    guard_cache[guard_key][impl.name] = err
                if err is not None and not err <= WRONG_TOL:
                    rows.append(_row(cfg, impl.name, "WRONG", max_rel_err=err, note=note,
                                     reason=f"forward max rel err {err:.2e} > {WRONG_TOL} vs fa3jax:xla"))
                    log(f"  {cfg.label():40s} {impl.name:15s} WRONG (err {err:.2e})")
                    continue
                f, scratch = timed(impl)
                ready[impl.name] = (impl, err, note, f, scratch)
            except Exception as e:
                rows.append(_row(cfg, impl.name, "skipped", reason=short_error(e), max_rel_err=err, note=note))
                log(f"  {cfg.label():40s} {impl.name:15s} skipped: {short_error(e, 80)}")
        ref_out = None
        results = measure_each({n: r[3] for n, r in ready.items()}, sets, opts,
                               own_sets={n: sinks_sets for n, r in ready.items() if r[0].sinks})
        config_rows = len(rows)
        for name, (impl, err, note, f, scratch) in ready.items():
            m = results[name]
            if isinstance(m, Exception):
                rows.append(_row(cfg, name, "skipped", reason=short_error(m), max_rel_err=err, note=note))
                log(f"  {cfg.label():40s} {name:15s} skipped: {short_error(m, 80)}")
                continue
            tflops = cfg.flops / m["time_s"] / 1e12
            rows.append(_row(cfg, name, "ok", ms=m["time_s"] * 1e3, tflops=tflops, max_rel_err=err,
                             note=note, scratch_bytes=scratch, trials_ms=[t * 1e3 for t in m["trials_s"]],
                             calls_per_trial=m["calls_per_trial"]))
            log(f"  {cfg.label():40s} {name:15s} {m['time_s'] * 1e3:9.3f} ms {fmt_tflops(tflops):>8s} TFLOPS"
                + (f"  err {err:.1e}" if err is not None else ""))
        add_variant_ratios(rows[config_rows:])
        del ready, results
        del sets, sinks_sets, ref_out, compiled
        if progress:
            progress(rows)
    return rows


def sinks_inputs(cfg: AttnConfig, sets: list) -> list:
    """``sets`` with a fresh random-normal float32 (hq,) sink array appended to each (one per set, so that the
    rotation over sets changes the sinks too)."""
    key = jax.random.PRNGKey(cfg.seqlen * 31 + cfg.heads)
    return jax.block_until_ready([s + (jax.random.normal(k, (cfg.heads,), jnp.float32),)
                                  for s, k in zip(sets, jax.random.split(key, len(sets)))])


def add_variant_ratios(rows: list[dict]) -> None:
    """On each timed variant row ``<impl><suffix>`` of one config (suffix ``+sinks``, ``+det``): the field
    :func:`~.impls.ratio_field` (``sinks_ratio``, ``det_ratio``) = its time / ``<impl>``'s time, the variant's
    cost measured in the same interleaved rounds."""
    ms = {r["impl"]: r["ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        suffix = variant_suffix(r["impl"])
        base = r["impl"][: -len(suffix)] if suffix else None
        if r["status"] == "ok" and base in ms:
            r[ratio_field(suffix)] = r["ms"] / ms[base]


def _row(cfg: AttnConfig, impl: str, status: str, **kw) -> dict:
    row = dataclasses.asdict(cfg)
    for extra in ("headdim_v", "heads_k"):  # rows without MLA or GQA keep their fields
        if row[extra] is None:
            del row[extra]
    row.update(impl=impl, status=status, flops=cfg.flops)
    row.update({k: v for k, v in kw.items() if v not in (None, "")})
    return row

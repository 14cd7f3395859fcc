"""The varlen suite: packed random-length configs, their inputs, and the run next to dense-equal-tokens baselines."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .attn import AttnConfig, attn_inputs
from .common import DENSE, WRONG_TOL, fmt_tflops, out_of_time, short_error
from .guard import dense_reference, rel_err, varlen_reference
from .impls import VarlenImpl
from .timing import TimingOptions, compile_fn, measure, timed_fn

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


def varlen_inputs(cfg: VarlenConfig, n_sets: int, seed: int):
    """Like the attn suite's, packed, with ``cu_seqlens`` last: a runtime argument, as in training, so that no
    kernel can specialize on the packing."""
    sets = attn_inputs(cfg, n_sets, seed)
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
        if out_of_time(deadline):
            rows += [_vrow(cfg, impl.name, kind, "skipped", reason="time budget (--budget-s) spent")
                     for impl, kind in runs]
            continue
        seed = cfg.mean * 1009 + cfg.headdim * 7 + len(cfg.dtype)
        try:
            sets = {"varlen": varlen_inputs(cfg, opts.input_sets, seed),
                    "dense": attn_inputs(dcfg, opts.input_sets, seed + 1)}
        except Exception as e:  # e.g. out of memory
            rows += [_vrow(cfg, impl.name, kind, "skipped", reason=f"inputs: {short_error(e)}") for impl, kind in runs]
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
                log(f"  [guard] reference failed for {cfg.label()}: {short_error(e)}")
        dense_tflops: dict = {}  # varlen impl name -> its baseline's TFLOPS in this config
        f = compiled = None
        for impl, kind in runs:
            f = compiled = None  # free the last impl's executable (and its buffers) before compiling the next
            c, s = run_cfg[kind], sets[kind]
            try:
                reason = impl.check(c)
            except Exception as e:
                reason = f"check failed: {short_error(e)}"
            if reason:
                rows.append(_vrow(cfg, impl.name, kind, "skipped", reason=reason))
                continue
            note = impl.note(c)
            err = guard_cache.get(guard_key, {}).get(impl.name)
            try:
                if cfg.mode == "fwd" or (check and err is None and kind in refs):
                    compiled = compile_fn(timed_fn(impl.forward(c), cfg.mode), s[0])
                if check and err is None and kind in refs:
                    fwd = compiled[0] if cfg.mode == "fwd" else jax.jit(impl.forward(c))
                    err = rel_err(fwd(*fwd_args[kind](s[0])), refs[kind])
                    guard_cache[guard_key][impl.name] = err
                if err is not None and not err <= WRONG_TOL:
                    rows.append(_vrow(cfg, impl.name, kind, "WRONG", max_rel_err=err, note=note,
                                      reason=f"forward max rel err {err:.2e} > {WRONG_TOL} vs jax.nn reference"))
                    log(f"  {cfg.label():44s} {impl.name:22s} WRONG (err {err:.2e})")
                    continue
                f, scratch = compiled or compile_fn(timed_fn(impl.forward(c), cfg.mode), s[0])
                m = measure(f, s, opts)
            except Exception as e:
                rows.append(_vrow(cfg, impl.name, kind, "skipped", reason=short_error(e), max_rel_err=err, note=note))
                log(f"  {cfg.label():44s} {impl.name:22s} skipped: {short_error(e, 80)}")
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
            log(f"  {cfg.label():44s} {impl.name:22s} {m['time_s'] * 1e3:9.3f} ms {fmt_tflops(tflops):>8s} TFLOPS"
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

"""How a compiled function is timed: warm-up, trials of back-to-back calls, the median, interleaved rounds.

Compile once (ahead of time, :func:`compile_fn`), warm up (>= 3 synchronized calls), then ``repeats`` trials; each
trial issues N calls back to back, rotating over >= 2 freshly drawn random-normal input sets, and synchronizes once
at the end; a trial's time per call is its wall time / N; the reported time is the median over trials. N is chosen
from the warm-up time so that a trial lasts ``min_time`` seconds (capped by ``max_calls``). In the attn suite all
implementations of a config are compiled first and their trials taken in interleaved rounds
(:func:`measure_interleaved`), so that clock drift under the GPU's power limit hits each alike.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .env import on_gpu

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


def round_order(names: list, r: int) -> list:
    """Round ``r``'s order: rotated by r // 2, reversed in odd rounds. In a plain rotation of 3+ functions each is
    nearly always preceded by the same one, and a trial after a cooler one can run faster under the power limit;
    mirrored rounds give each function both neighbours as predecessors, and every position."""
    k = (r // 2) % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if r % 2 else order


def measure_interleaved(fns: dict, arg_sets: list, opts: TimingOptions, own_sets: Optional[dict] = None) -> dict:
    """:func:`measure` for several functions at once, their trials taken in rounds (one trial of each per round,
    in :func:`round_order`) so that clock and thermal drift over the run hit every function alike (the H100 runs these
    kernels at its power limit: one kernel's row moved 5% between two sequential runs, benchmarks/RESULTS.md).
    ``own_sets``: {name: argument sets} for functions that take other arguments than ``arg_sets``."""
    names = list(fns)
    sets = {n: (own_sets or {}).get(n, arg_sets) for n in names}
    prep = {n: _warm(fns[n], sets[n], opts) for n in names}
    trials: dict = {n: [] for n in names}
    for r in range(max(1, opts.repeats)):
        for n in round_order(names, r):
            trials[n].append(_trial(fns[n], sets[n], prep[n][0]))
    return {n: {"time_s": statistics.median(trials[n]), "trials_s": trials[n], "calls_per_trial": prep[n][0],
                "warmup_s": prep[n][1]} for n in names}


def measure_each(fns: dict, arg_sets: list, opts: TimingOptions, own_sets: Optional[dict] = None) -> dict:
    """{name: :func:`measure_interleaved`'s result, or the exception that kept it from a time}: interleaved rounds,
    or, when one function fails there, each timed alone, so that one failing impl does not cost the others their
    row."""
    if not fns:
        return {}
    try:
        return measure_interleaved(fns, arg_sets, opts, own_sets)
    except Exception:  # noqa: BLE001
        results: dict = {}
        for name, f in fns.items():
            try:
                results[name] = measure(f, (own_sets or {}).get(name, arg_sets), opts)
            except Exception as e:  # noqa: BLE001
                results[name] = e
        return results


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


def timed_fn(fwd: Callable, mode: str, grad_rest: int = 0) -> Callable:
    """``fwd(q, k, v, *rest)``, or for ``fwd+bwd`` its gradient w.r.t. q, k, v (and the first ``grad_rest`` of
    ``rest``, e.g. the sinks) as ``f(q, k, v, ct, *rest)``."""
    if mode == "fwd":
        return fwd

    def loss(q, k, v, ct, *rest):
        return jnp.sum(fwd(q, k, v, *rest).astype(jnp.float32) * ct.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2) + tuple(range(4, 4 + grad_rest)))


def chained(fn: Callable, unroll: int) -> Callable:
    """``unroll`` decode steps in one jitted call, each step's output being the next step's query (same shape and
    dtype), cycling through the cache sets. A decode kernel can take a few microseconds, less than a Python
    dispatch; chaining inside one executable keeps launch overhead out of the measurement, the data dependency
    keeps XLA from merging or hoisting steps, and cycling the caches keeps small ones from living in L2."""

    def steps(q, seqlens, pts, kcs, vcs):
        for i in range(unroll):
            j = i % len(kcs)
            q = fn(q, kcs[j], vcs[j], seqlens, pts[j])
        return q

    return steps

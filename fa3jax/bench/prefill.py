"""The chunked-prefill suite: a chunk of new queries against a full KV cache, TFLOPS next to flash-attn3-jax's best.

Issue 20's bar: hq=32, hk=8, d=128, bf16; 512 and 2048 new queries over caches of 8k and 32k, contiguous and paged
(page 256), batch 1 and 8: fa3jax's ``flash_mha_with_kvcache`` (``num_splits=0``) >= 1.00x flash-attn3-jax's best of
``num_splits`` 1/4/16.

Each call is ``flash_mha_with_kvcache(q (b, new, hq, d), k_cache, v_cache, cache_seqlens=cache, page_table=...,
is_causal=True)``: queries only, their keys already written in the cache (the last ``new`` of its ``cache``
positions; a prefill step that appends with ``k=``/``v=`` adds a memory-bound scatter every backend shares), so
``cache_seqlens`` covers them and the causal mask is bottom-right: query ``i`` (0-based) of the chunk sees
``cache - new + i + 1`` keys.

FLOPs (the two matmuls, no softmax): ``4 * b * hq * d * sum_i (cache - new + i + 1)
= 4 * b * hq * d * (new * (cache - new) + new * (new + 1) / 2)``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from .common import FA3_NAME, WRONG_TOL, check_reason, fmt_tflops, out_of_time, short_error
from .decode import DecodeConfig, best_rows, cache_inputs, decode_set_count, xla_reference
from .env import free_device_bytes
from .guard import rel_err
from .impls import DecodeImpl
from .timing import TimingOptions, compile_fn, measure_each

CONFIG_FIELDS = ("layout", "batch", "cache", "new")  # what tells one prefill row's config from another's


@dataclasses.dataclass(frozen=True)
class PrefillConfig(DecodeConfig):
    new: int = 512  # new queries per sequence: the chunk, the last ``new`` positions of the cache

    @property
    def q_len(self) -> int:
        return self.new

    @property
    def keys_seen(self) -> int:
        """Keys the chunk's queries see in all (per sequence and head), causal bottom-right."""
        return self.new * (self.cache - self.new) + self.new * (self.new + 1) // 2

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads_q * self.headdim * self.keys_seen

    def label(self) -> str:
        return f"{self.layout} b{self.batch} cache{self.cache} new{self.new}"


def prefill_configs(o: dict) -> list[PrefillConfig]:
    return [PrefillConfig(layout, b, c, new=n) for layout in o["layouts"] for b in o["batches"] for c in o["caches"]
            for n in o["new_tokens"] if n <= c and (layout == "contiguous" or c % 256 == 0)]


def run_prefill(configs: list[PrefillConfig], impls: list[DecodeImpl], opts: TimingOptions, check: bool = True,
                log=print, progress: Optional[Callable] = None,
                deadline: Optional[float] = None) -> list[dict]:
    """Prefill suite: per config, guard every impl against fa3jax:xla, compile, then time all of them in
    interleaved rounds (compute-bound like the attn suite: clock drift must hit every impl alike). Adds the
    ``flash-attn3-jax:best`` rows and, on every other timed row, ``fa3_ratio`` = best FA3 time / the row's time
    (>= 1: as fast or faster)."""
    rows = []
    for cfg in configs:
        if out_of_time(deadline):
            rows += [_prow(cfg, impl.name, "skipped", reason="time budget (--budget-s) spent", group=impl.group)
                     for impl in impls]
            continue
        free = free_device_bytes()
        if cfg.kv_bytes * 1.3 > free:
            rows += [_prow(cfg, impl.name, "skipped", group=impl.group,
                           reason=f"cache {cfg.kv_bytes / 2**30:.1f} GiB does not fit in {free / 2**30:.1f} GiB free")
                     for impl in impls]
            continue
        try:
            sets = cache_inputs(cfg, decode_set_count(cfg, free), seed=cfg.batch * 7 + cfg.cache + cfg.new)
        except Exception as e:
            rows += [_prow(cfg, impl.name, "skipped", reason=f"inputs: {short_error(e)}", group=impl.group)
                     for impl in impls]
            continue
        ref = xla_reference(sets[0], cfg.label(), log, causal=True) if check else None
        ready = {}  # impl name -> (impl, err, note, compiled fn)
        for impl in impls:
            reason = check_reason(impl, cfg)
            if reason:
                rows.append(_prow(cfg, impl.name, "skipped", reason=reason, group=impl.group))
                continue
            note, err = impl.note(cfg), None
            try:
                f, _ = compile_fn(impl.fn, sets[0])
                if ref is not None:
                    err = rel_err(f(*sets[0]), ref)
                if err is not None and not err <= WRONG_TOL:
                    rows.append(_prow(cfg, impl.name, "WRONG", max_rel_err=err, group=impl.group, note=note,
                                      reason=f"max rel err {err:.2e} > {WRONG_TOL} vs fa3jax:xla"))
                    log(f"  {cfg.label():40s} {impl.name:22s} WRONG (err {err:.2e})")
                    continue
                ready[impl.name] = (impl, err, note, f)
            except Exception as e:
                rows.append(_prow(cfg, impl.name, "skipped", reason=short_error(e), max_rel_err=err,
                                  group=impl.group, note=note))
                log(f"  {cfg.label():40s} {impl.name:22s} skipped: {short_error(e, 80)}")
        ref = None
        results = measure_each({n: r[3] for n, r in ready.items()}, sets, opts)
        for name, (impl, err, note, f) in ready.items():
            m = results[name]
            if isinstance(m, Exception):
                rows.append(_prow(cfg, name, "skipped", reason=short_error(m), max_rel_err=err, group=impl.group,
                                  note=note))
                log(f"  {cfg.label():40s} {name:22s} skipped: {short_error(m, 80)}")
                continue
            tflops = cfg.flops / m["time_s"] / 1e12
            rows.append(_prow(cfg, name, "ok", ms=m["time_s"] * 1e3, tflops=tflops, max_rel_err=err,
                              group=impl.group, note=note, trials_ms=[t * 1e3 for t in m["trials_s"]],
                              calls_per_trial=m["calls_per_trial"]))
            log(f"  {cfg.label():40s} {name:22s} {m['time_s'] * 1e3:9.3f} ms {fmt_tflops(tflops):>8s} TFLOPS"
                + (f"  err {err:.1e}" if err is not None else ""))
        del sets, ready, results
        if progress:
            progress(rows)
    rows += best_rows(rows, CONFIG_FIELDS)
    add_fa3_ratio(rows)
    return rows


def add_fa3_ratio(rows: list[dict]) -> None:
    """``fa3_ratio`` = ``flash-attn3-jax:best`` time / the row's time, on every other timed row of its config."""
    best = {tuple(r[f] for f in CONFIG_FIELDS): r["ms"] for r in rows
            if r["impl"] == f"{FA3_NAME}:best" and r["status"] == "ok"}
    for r in rows:
        key = tuple(r.get(f) for f in CONFIG_FIELDS)
        if r["status"] == "ok" and key in best and not r["impl"].startswith(FA3_NAME):
            r["fa3_ratio"] = best[key] / r["ms"]


def _prow(cfg: PrefillConfig, impl: str, status: str, **kw) -> dict:
    row = dataclasses.asdict(cfg)
    row.update(impl=impl, status=status, kv_bytes=cfg.kv_bytes, flops=cfg.flops)
    row.update({k: v for k, v in kw.items() if v not in (None, "")})
    return row

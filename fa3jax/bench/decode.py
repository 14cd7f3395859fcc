"""The decode suite: KV-cache configs, cache inputs, the copy-bandwidth yardstick and the chained-step run."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

import fa3jax

from .common import DTYPES, WRONG_TOL, check_reason, out_of_time, short_error
from .env import free_device_bytes
from .guard import rel_err
from .impls import DecodeImpl
from .timing import TimingOptions, chained, compile_fn, measure, measure_each

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

    @property
    def q_len(self) -> int:
        """Queries per sequence in one call (one new token)."""
        return 1

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


def cache_inputs(cfg: DecodeConfig, n_sets: int, seed: int):
    """``n_sets`` argument sets ``(q, k_cache, v_cache, cache_seqlens, page_table)`` of a KV-cache config (the
    decode suite's, or any with its fields and ``q_len``): q ``(batch, q_len, hq, d)``, caches full
    (``cache_seqlens = cache``), paged caches spread over the pool by a random permutation page table."""
    dt = DTYPES[cfg.dtype]
    key = jax.random.PRNGKey(seed)
    sets = []
    seqlens = jnp.full((cfg.batch,), cfg.cache, jnp.int32)
    for _ in range(n_sets):
        key, kq, kk, kv, kp = jax.random.split(key, 5)
        q = jax.random.normal(kq, (cfg.batch, cfg.q_len, cfg.heads_q, cfg.headdim), dt)
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


def xla_reference(args, label: str, log=print, causal: bool = False):
    """The guard's reference of a KV-cache call: fa3jax's xla backend on ``args`` = one :func:`cache_inputs` set;
    None (logged) when it fails."""
    try:
        return jax.block_until_ready(jax.jit(
            lambda q, kc, vc, sl, pt: fa3jax.flash_mha_with_kvcache(
                q, kc, vc, cache_seqlens=sl, page_table=pt, is_causal=causal, num_splits=0, backend="xla"))(*args))
    except Exception as e:
        log(f"  [guard] reference failed for {label}: {short_error(e)}")
        return None


def decode_configs(o: dict) -> list[DecodeConfig]:
    return [DecodeConfig(layout, b, c) for layout in o["layouts"] for b in o["batches"] for c in o["caches"]
            if layout == "contiguous" or c % 256 == 0]


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
    """Argument sets of :func:`chained` from :func:`cache_inputs`' sets: q varies per call, and every call walks
    through all cache sets (at least two query sets, so that consecutive calls differ)."""
    seqlens, kcs, vcs, pts = sets[0][3], tuple(x[1] for x in sets), tuple(x[2] for x in sets), \
        tuple(x[4] for x in sets)
    chain_sets = [(x[0], seqlens, pts, kcs, vcs) for x in sets]
    if len(chain_sets) < 2:
        chain_sets.append((jax.random.normal(jax.random.PRNGKey(1), sets[0][0].shape, sets[0][0].dtype),
                           seqlens, pts, kcs, vcs))
    return chain_sets


def run_decode(configs: list[DecodeConfig], impls: list[DecodeImpl], opts: TimingOptions, copy_bytes: int,
               check: bool = True, log=print, unroll: int = 16, progress: Optional[Callable] = None,
               deadline: Optional[float] = None, per_call: bool = False) -> tuple[list[dict], dict]:
    """Decode suite; times are per decode step (one jitted call runs ``unroll`` chained steps), every impl of a
    config timed in interleaved rounds. With ``per_call``, each row also carries ``per_call_ms``: one step per jitted
    call, the calls issued back to back from Python as a generation loop issues them (dispatch included), rotating
    over the cache sets, interleaved the same way."""
    copy = {}
    try:
        copy = measure_copy(copy_bytes, opts)
        log(f"  device copy: {copy['bytes_moved'] / 2**30:.2f} GiB moved in {copy['ms']:.3f} ms = "
            f"{copy['tbps']:.3g} TB/s")
    except Exception as e:
        copy = {"error": short_error(e)}
        log(f"  device copy failed: {short_error(e)}")
    rows = []
    for cfg in configs:
        if out_of_time(deadline):
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
            sets = cache_inputs(cfg, n_sets, seed=cfg.batch * 7 + cfg.cache)
        except Exception as e:
            for impl in impls:
                rows.append(_drow(cfg, impl.name, "skipped", reason=f"inputs: {short_error(e)}"))
            continue
        chain_sets = decode_chain_sets(sets)
        seqlens, pts, kcs, vcs = chain_sets[0][1:]
        ref = xla_reference(sets[0], cfg.label(), log) if check else None
        ready = {}  # impl name -> (impl, err, note, chained steps compiled, one step compiled or None)
        for impl in impls:
            reason = check_reason(impl, cfg)
            if reason:
                rows.append(_drow(cfg, impl.name, "skipped", reason=reason, group=impl.group))
                continue
            note = impl.note(cfg)
            err = None
            try:
                if ref is not None:
                    err = rel_err(jax.jit(impl.fn)(*sets[0]), ref)
                if err is not None and not err <= WRONG_TOL:
                    rows.append(_drow(cfg, impl.name, "WRONG", max_rel_err=err, group=impl.group,
                                      reason=f"max rel err {err:.2e} > {WRONG_TOL} vs fa3jax:xla"))
                    log(f"  {cfg.label():32s} {impl.name:22s} WRONG (err {err:.2e})")
                    continue
                f, _ = compile_fn(chained(impl.fn, unroll), chain_sets[0])
                fc = compile_fn(impl.fn, sets[0])[0] if per_call else None
                ready[impl.name] = (impl, err, note, f, fc)
            except Exception as e:
                rows.append(_drow(cfg, impl.name, "skipped", reason=short_error(e), max_rel_err=err, group=impl.group,
                                  note=note))
                log(f"  {cfg.label():32s} {impl.name:22s} skipped: {short_error(e, 80)}")
        # Every impl of the config in interleaved rounds (drift hits them alike); per call: one step per executable
        # call, issued back to back from Python as a generation loop issues them (dispatch included).
        results = measure_each({n: r[3] for n, r in ready.items()}, chain_sets, opts)
        calls = measure_each({n: r[4] for n, r in ready.items()}, sets, opts) if per_call else {}
        for name, (impl, err, note, _, _) in ready.items():
            m, mc = results[name], calls.get(name)
            failed = m if isinstance(m, Exception) else mc if isinstance(mc, Exception) else None
            if failed is not None:
                rows.append(_drow(cfg, name, "skipped", reason=short_error(failed), max_rel_err=err, group=impl.group,
                                  note=note))
                log(f"  {cfg.label():32s} {name:22s} skipped: {short_error(failed, 80)}")
                continue
            time_s = m["time_s"] / unroll
            pc = {}
            if mc is not None:
                pc = dict(per_call_ms=mc["time_s"] * 1e3, per_call_trials_ms=[t * 1e3 for t in mc["trials_s"]],
                          per_call_calls_per_trial=mc["calls_per_trial"])
            tbps = cfg.kv_bytes / time_s / 1e12
            rows.append(_drow(cfg, name, "ok", ms=time_s * 1e3, tbps=tbps, max_rel_err=err,
                              group=impl.group, note=note, trials_ms=[t / unroll * 1e3 for t in m["trials_s"]],
                              calls_per_trial=m["calls_per_trial"],
                              copy_ratio=tbps / copy["tbps"] if copy.get("tbps") else None, **pc))
            log(f"  {cfg.label():32s} {name:22s} {time_s * 1e6:10.1f} us {tbps:8.3g} TB/s"
                + (f"  per call {pc['per_call_ms'] * 1e3:.1f} us" if pc else ""))
        del sets, ref, chain_sets, kcs, vcs, pts, seqlens, ready  # free the caches before the next config
        if progress:
            progress(rows, copy)
    rows += best_rows(rows)
    return rows, copy


def _drow(cfg: DecodeConfig, impl: str, status: str, **kw) -> dict:
    row = dataclasses.asdict(cfg)
    row.update(impl=impl, status=status, kv_bytes=cfg.kv_bytes)
    row.update({k: v for k, v in kw.items() if v not in (None, "")})
    return row


def best_rows(rows: list[dict], fields: tuple = ("layout", "batch", "cache")) -> list[dict]:
    """For grouped variants (flash-attn3-jax num_splits), add a ``<group>:best`` row per config (the config being
    the row's ``fields``), the fastest by ``ms``."""
    best = {}
    for r in rows:
        if r.get("group") and r["status"] == "ok":
            key = (r["group"],) + tuple(r[f] for f in fields)
            if key not in best or r["ms"] < best[key]["ms"]:
                best[key] = r
    out = []
    for (group, *_), r in best.items():
        b = dict(r)
        b.update(impl=f"{group}:best", best_of=r["impl"])
        b.pop("group")
        out.append(b)
    return out

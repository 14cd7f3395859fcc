"""Measure Triton tile configs on the GPU (fills fa3jax/backends/triton/tuning.py; not used at call time).

    python benchmarks/triton_sweep.py --kernel bwd_dkdv --cands 32,128,8,2 64,128,8,2 ...

For each candidate, the tuning table entry of (head_dim, dtype, causal, arch) is replaced in-process, and the
fwd (or fwd+bwd) of h=16, d, b*s=16384 tokens is timed as in fa3jax.bench (median of trials, events via a sync).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import fa3jax
from fa3jax.backends.triton import tuning


def _time(f, args, trials=5, min_time=0.05):
    jax.block_until_ready(f(*args))
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        if time.perf_counter() - t > min_time or n > 500:
            break
        n *= 2
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def decode_sweep(a):
    """--kernel decode: cands are BLOCK_N,warps,stages,num_splits (0 = the automatic count with tuning.DECODE's
    programs_per_sm/min_keys_per_split) for the layout. Timed as the bench's decode suite (16 chained steps in
    one executable, caches cycled so that small ones leave L2), all candidates and flash-attn3-jax's
    num_splits 1/4/16 in interleaved rounds (fa3jax.bench.measure_interleaved)."""
    from fa3jax import bench

    opts = bench.TimingOptions(repeats=a.repeats)
    fa3 = [i for i in bench.decode_impls()[0] if i.name.startswith(bench.FA3_NAME)]
    for layout in a.layouts.split(","):
        for batch in (int(x) for x in a.batches.split(",")):
            for cache in (int(x) for x in a.caches.split(",")):
                cfg = bench.DecodeConfig(layout, batch, cache)
                sets = bench._decode_inputs(cfg, 4 if cfg.kv_bytes < (64 << 20) else 2, seed=batch * 7 + cache)
                chain = bench.decode_chain_sets(sets)
                fns = {}
                saved = tuning.DECODE[layout]
                try:
                    for cand in a.cands:
                        bn, w, st, splits = (int(x) for x in cand.split(","))
                        tuning.DECODE[layout] = saved._replace(block_n=bn, num_warps=w, stages_split=st,
                                                               stages_nosplit=st)

                        def fn(q, kc, vc, sl, pt, _s=splits):
                            return fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=sl, page_table=pt,
                                                                 num_splits=_s, backend="triton")

                        fns[cand] = bench.compile_fn(bench._chained(fn, 16), chain[0])[0]  # traced now
                finally:
                    tuning.DECODE[layout] = saved
                for impl in fa3:
                    fns[impl.name] = bench.compile_fn(bench._chained(impl.fn, 16), chain[0])[0]
                res = bench.measure_interleaved(fns, chain, opts)
                for name, r in sorted(res.items(), key=lambda kv: kv[1]["time_s"]):
                    t = r["time_s"] / 16
                    print(f"decode {layout} b={batch} cache={cache} {name}: {t * 1e6:.1f} us "
                          f"{cfg.kv_bytes / t / 1e12:.3f} TB/s", flush=True)
                del sets, chain, fns


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", choices=["fwd", "bwd_dkdv", "bwd_dq", "decode"], required=True)
    p.add_argument("--cands", nargs="+", required=True, help="block_m,block_n,warps,stages")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--seqlens", default="4096,16384")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--causal", default="both", choices=["0", "1", "both"])
    p.add_argument("--layouts", default="contiguous,paged", help="decode only")
    p.add_argument("--batches", default="1,8,64", help="decode only")
    p.add_argument("--caches", default="32768", help="decode only")
    p.add_argument("--repeats", type=int, default=7, help="decode only: interleaved rounds")
    a = p.parse_args()
    if a.kernel == "decode":
        return decode_sweep(a)
    arch = "sm" + "".join(str(jax.devices()[0].compute_capability).split("."))
    causals = {"0": (False,), "1": (True,), "both": (False, True)}[a.causal]
    dt = jnp.dtype(a.dtype)
    for causal in causals:
        key = (tuning.head_dim_bucket(a.d), a.dtype, causal, tuning.arch_family(arch))
        base = tuning._TABLE[key]
        for s in (int(x) for x in a.seqlens.split(",")):
            b, h = 16384 // s, 16
            ks = jax.random.split(jax.random.key(s), 4)
            q, k, v, do = (jax.random.normal(x, (b, s, h, a.d), dt) for x in ks)
            flops = 4 * b * s * s * h * a.d / (2 if causal else 1) * (1 if a.kernel == "fwd" else 3.5)
            for cand in a.cands:
                cfg = tuning.TileConfig(*(int(x) for x in cand.split(",")))
                tuning._TABLE[key] = base._replace(**{a.kernel: cfg})
                if a.kernel == "fwd":
                    f = jax.jit(lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=causal, backend="triton"))
                    args = (q, k, v)
                else:
                    f = jax.jit(lambda q, k, v, do: jax.vjp(
                        lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=causal, backend="triton"), q, k, v)[1](do))
                    args = (q, k, v, do)
                try:
                    t = _time(f, args)
                    print(f"{a.kernel} d={a.d} {a.dtype} causal={causal} s={s} cfg={cand}: {t * 1e3:.3f} ms "
                          f"{flops / t / 1e12:.1f} TFLOPS", flush=True)
                except Exception as e:  # a config that fails to compile/launch is reported, not fatal
                    print(f"{a.kernel} d={a.d} {a.dtype} causal={causal} s={s} cfg={cand}: FAILED {type(e).__name__}: "
                          f"{str(e)[:200]}", flush=True)
        tuning._TABLE[key] = base


if __name__ == "__main__":
    main()

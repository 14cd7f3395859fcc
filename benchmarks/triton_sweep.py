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
    """--kernel decode: cands are BLOCK_N,warps,stages,programs_per_sm[,min_keys_per_split] (tuning.DECODE of
    the layout; stages used split or not); num_splits=0."""
    for layout in a.layouts.split(","):
        for batch in (int(x) for x in a.batches.split(",")):
            for cache in (int(x) for x in a.caches.split(",")):
                ks = jax.random.split(jax.random.key(batch * 7 + cache), 4)
                hq, hk, d, page = 32, 8, 128, 256
                q = jax.random.normal(ks[0], (batch, 1, hq, d), jnp.bfloat16)
                if layout == "paged":
                    npg = batch * cache // page
                    shape = (npg, page, hk, d)
                    pt = jax.random.permutation(ks[3], npg).astype(jnp.int32).reshape(batch, cache // page)
                else:
                    shape, pt = (batch, cache, hk, d), None
                kc = jax.random.normal(ks[1], shape, jnp.bfloat16)
                vc = jax.random.normal(ks[2], shape, jnp.bfloat16)
                lens = jnp.full((batch,), cache, jnp.int32)
                nbytes = 2 * kc.size * kc.dtype.itemsize
                for cand in a.cands:
                    bn, w, st, pps, *mk = (int(x) for x in cand.split(","))
                    tuning.DECODE[layout] = tuning.DecodeConfig(bn, w, st, st, pps, mk[0] if mk else 256, 64)
                    f = jax.jit(lambda q, kc, vc: fa3jax.flash_mha_with_kvcache(
                        q, kc, vc, cache_seqlens=lens, page_table=pt, num_splits=0, backend="triton"))
                    try:
                        t = _time(f, (q, kc, vc))
                        print(f"decode {layout} b={batch} cache={cache} cfg={cand}: {t * 1e6:.1f} us "
                              f"{nbytes / t / 1e12:.2f} TB/s", flush=True)
                    except Exception as e:  # noqa: BLE001
                        print(f"decode {layout} b={batch} cache={cache} cfg={cand}: FAILED {type(e).__name__}: "
                              f"{str(e)[:200]}", flush=True)
                del kc, vc


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

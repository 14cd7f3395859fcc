"""Measure Triton tile configs on the GPU (fills fa3jax/backends/triton/tables.py; not used at call time).

    python benchmarks/triton_sweep.py --kernel bwd_dkdv --cands 32,128,8,2 64,128,8,2 ...

For each candidate, the fwd (or fwd+bwd) of h=16, d, b*s=16384 tokens is compiled with the candidate's tile forced
through ``fa3jax.tuning.override``; all candidates and flash-attn3-jax (when importable) are
then timed in interleaved rounds (fa3jax.bench.measure_interleaved), each row with its ratio to flash-attn3-jax.
"""
from __future__ import annotations

import argparse
import gc

import jax

import fa3jax
from fa3jax.tuning import Tuning, override


def _compiled(label: str, fn, args):
    """``fn`` compiled and run once on ``args``, or None (reported) when it fails: a candidate can fail to compile
    or, with too much shared memory, only at launch, and flash-attn3-jax rejects some shapes (head_dim > 128) only
    when it runs."""
    from fa3jax import bench

    try:
        f = bench.compile_fn(fn, args)[0]
        jax.block_until_ready(f(*args))
        return f
    except Exception as e:  # reported, not fatal: the other candidates are still timed
        print(f"{label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def decode_sweep(a):
    """--kernel decode: cands are BLOCK_N,warps,stages,num_splits (0 = the automatic count with tables.DECODE's
    programs_per_sm/min_keys_per_split) or ``policy`` (the table entry), either with an optional schedule for
    num_splits 0 (``,k`` stream-K, ``,a`` plan_decode.choose_schedule); each is forced through
    ``fa3jax.tuning.override`` while its function is compiled.
    Timed as the bench's decode suite (16 chained steps in one executable, caches cycled so that small ones
    leave L2), all candidates and flash-attn3-jax's num_splits 1/4/16 in interleaved rounds
    (fa3jax.bench.measure_interleaved)."""
    from fa3jax import bench
    from fa3jax.backends.triton import tables

    opts = bench.TimingOptions(repeats=a.repeats)
    fa3 = [i for i in bench.decode_impls()[0] if i.name.startswith(bench.FA3_NAME)]
    for layout in a.layouts.split(","):
        for batch in (int(x) for x in a.batches.split(",")):
            for cache in (int(x) for x in a.caches.split(",")):
                cfg = bench.DecodeConfig(layout, batch, cache)
                n_sets = bench.decode_set_count(cfg, bench.free_device_bytes())
                sets = bench.cache_inputs(cfg, n_sets, seed=batch * 7 + cache)
                chain = bench.decode_chain_sets(sets)
                fns = {}
                table = tables.DECODE[layout]
                for cand in a.cands:
                    parts = cand.split(",")
                    schedule = {"k": "streamk", "a": "auto"}.get(parts[-1], table.schedule)
                    if parts[-1] in ("k", "a"):
                        parts = parts[:-1]
                    if parts == ["policy"]:  # the table entry as it is
                        pol, splits = table, 0
                    else:
                        bn, w, st, splits = (int(x) for x in parts)
                        pol = table._replace(block_n=bn, num_warps=w, stages_split=st, stages_nosplit=st)

                    def fn(q, kc, vc, sl, pt, _s=splits):
                        return fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=sl, page_table=pt,
                                                             num_splits=_s, backend="triton")

                    with override(Tuning(decode=pol._replace(schedule=schedule))):  # the plan is taken at tracing
                        fns[cand] = bench.compile_fn(bench.chained(fn, 16), chain[0])[0]
                for impl in fa3:
                    fns[impl.name] = bench.compile_fn(bench.chained(impl.fn, 16), chain[0])[0]
                res = bench.measure_interleaved(fns, chain, opts)
                for name, r in sorted(res.items(), key=lambda kv: kv[1]["time_s"]):
                    t = r["time_s"] / 16
                    print(f"decode {layout} b={batch} cache={cache} {name}: {t * 1e6:.1f} us "
                          f"{cfg.kv_bytes / t / 1e12:.3f} TB/s", flush=True)
                del sets, chain, fns, res
                # the next row's caches may need most of the GPU (b=64 at 128k: two sets of 34 GB)
                jax.clear_caches()
                gc.collect()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kernel", choices=["fwd", "bwd_dkdv", "bwd_dq", "decode"], required=True)
    p.add_argument("--cands", nargs="+", required=True,
                   help="block_m,block_n,warps,stages[,overlap]; decode: BLOCK_N,warps,stages,num_splits[,k|a] "
                        "or policy[,k|a]")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--seqlens", default="4096,16384")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--causal", default="both", choices=["0", "1", "both"])
    p.add_argument("--layouts", default="contiguous,paged", help="decode only")
    p.add_argument("--batches", default="1,8,64", help="decode only")
    p.add_argument("--caches", default="32768", help="decode only")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    a = p.parse_args()
    if a.kernel == "decode":
        return decode_sweep(a)
    causals = {"0": (False,), "1": (True,), "both": (False, True)}[a.causal]
    from fa3jax import bench

    opts = bench.TimingOptions(repeats=a.repeats)
    mode = "fwd" if a.kernel == "fwd" else "fwd+bwd"
    dt = {"bfloat16": "bf16", "float16": "fp16"}[a.dtype]
    fa3 = [i for i in bench.attn_impls()[0] if i.name == bench.FA3_NAME]
    for causal in causals:
        for s in (int(x) for x in a.seqlens.split(",")):
            cfg = bench.AttnConfig(mode, causal, dt, a.d, 16, s, 16384 // s)
            sets = bench.attn_inputs(cfg, 2, seed=s)
            fns = {}
            for cand in a.cands:
                fields = [int(x) for x in cand.split(",")]
                tile = (*fields[:4], *map(bool, fields[4:]))  # block_m, block_n, warps, stages[, overlap]
                f = bench.timed_fn(lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=causal, backend="triton"),
                                   mode)
                with override(Tuning(**{a.kernel: tile})):  # the plan is taken at tracing
                    fns[cand] = _compiled(f"{cfg.label()} cfg={cand}", f, sets[0])
            for impl in fa3:
                fns[impl.name] = _compiled(f"{cfg.label()} {impl.name}", bench.timed_fn(impl.forward(cfg), mode),
                                           sets[0])
            fns = {name: f for name, f in fns.items() if f is not None}
            res = bench.measure_interleaved(fns, sets, opts)
            ref = res.get(bench.FA3_NAME, {}).get("time_s")
            for name, r in sorted(res.items(), key=lambda kv: kv[1]["time_s"]):
                t = r["time_s"]
                ratio = f" ({ref / t:.2f}x {bench.FA3_NAME})" if ref else ""
                print(f"{cfg.label()} cfg={name}: {t * 1e3:.3f} ms {cfg.flops / t / 1e12:.1f} TFLOPS{ratio}",
                      flush=True)
            del sets, fns


if __name__ == "__main__":
    main()

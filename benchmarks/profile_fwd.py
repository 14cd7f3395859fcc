"""One forward call per implementation, for Nsight Compute (the timing itself lives in fa3jax.bench):

    ncu -k regex:"fwd_kernel|FlashAttn" -c 2 --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/profile_fwd.py [--seqlen 16384] [--causal] [--impl fa3jax:cuda|fa3jax:triton|flash-attn3-jax]

Runs fa3jax's cuda and triton forwards, then flash-attn3-jax's (when importable), each once after a warm-up, on
h=16, d=128, bf16, batch = 16384 // seqlen.

Also, without ncu: ``--hlo`` prints the instructions of each compiled forward (what runs besides the kernel),
``--time`` times the implementations in interleaved rounds (fa3jax.bench) on random-normal inputs and on
uniform [-1, 1) inputs (the C++ bench's), to separate input-dependent clocks from the kernels.
"""
import argparse

import jax
import jax.numpy as jnp

import fa3jax

p = argparse.ArgumentParser()
p.add_argument("--seqlen", type=int, default=16384)
p.add_argument("--causal", action="store_true")
p.add_argument("--impl", default="all", help="fa3jax:cuda | fa3jax:triton | flash-attn3-jax | all")
p.add_argument("--hlo", action="store_true")
p.add_argument("--time", action="store_true")
p.add_argument("--variants", default="", help="with --hlo/--time: also fa3jax:cuda forced to these kernel variants "
               "(comma list of plain, wide; fa3jax.tuning.CUDA_KERNELS)")
a = p.parse_args()
b = max(1, 16384 // a.seqlen)
q, k, v = (jax.random.normal(jax.random.key(i), (b, a.seqlen, 16, 128), jnp.bfloat16) for i in range(3))
impls = [(f"fa3jax:{bk}", lambda q, k, v, _b=bk: fa3jax.flash_mha(q, k, v, is_causal=a.causal, backend=_b))
         for bk in ("cuda", "triton")]
try:
    import flash_attn3_jax

    impls.append(("flash-attn3-jax", lambda q, k, v: flash_attn3_jax.flash_mha(q, k, v, is_causal=a.causal)))
except ImportError as e:
    print(f"flash-attn3-jax not importable: {e}")
impls = [(name, f) for name, f in impls if a.impl in ("all", name)]
if a.hlo or a.time:
    from fa3jax import bench
    from fa3jax.tuning import Tuning, override

    compiled = {}
    cuda = dict(impls).get("fa3jax:cuda")
    for name, f, variant in [(n, f, None) for n, f in impls] + [
            (f"cuda[{vn}]", cuda, vn) for vn in filter(None, a.variants.split(",")) if cuda is not None]:
        with override(Tuning(cuda_kernel=variant or "auto")):  # "auto": the dispatch policy's own choice
            compiled[name] = jax.jit(f).lower(q, k, v).compile()
    if a.hlo:
        for name, c in compiled.items():
            entry = c.as_text().split("\nENTRY", 1)[-1].split("\n}", 1)[0]  # the top-level computation only
            body = [ln.strip() for ln in entry.splitlines()[1:] if " = " in ln]
            print(f"== {name}: {len(body)} instructions")
            print("\n".join(ln[:200] for ln in body))
    if a.time:
        shape = q.shape
        keys = jax.random.split(jax.random.key(7), 6)
        normal = [tuple(jax.random.normal(keys[3 * j + i], shape, jnp.bfloat16) for i in range(3)) for j in range(2)]
        uniform = [tuple(jax.random.uniform(keys[3 * j + i], shape, jnp.bfloat16, -1.0, 1.0) for i in range(3))
                   for j in range(2)]
        flops = 4 * b * a.seqlen ** 2 * 16 * 128 * (0.5 if a.causal else 1.0)
        opts = bench.TimingOptions(repeats=7)
        for label, sets in (("normal", normal), ("uniform", uniform)):
            res = bench.measure_interleaved(compiled, sets, opts)
            print(f"time b={b} s={a.seqlen} causal={a.causal} inputs={label}: " + "  ".join(
                f"{n} {r['time_s'] * 1e3:.3f} ms {flops / r['time_s'] * 1e-12:.1f} TF" for n, r in res.items()))
    raise SystemExit(0)
for name, f in impls:
    f = jax.jit(f)
    jax.block_until_ready(f(q, k, v))  # compile + warm-up (outside ncu's -c budget only if -k filters it)
    jax.block_until_ready(f(q, k, v))
    print(name, "done", flush=True)

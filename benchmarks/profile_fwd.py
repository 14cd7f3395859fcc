"""One forward call per implementation, for Nsight Compute (the timing itself lives in fa3jax.bench):

    ncu -k regex:"fwd_kernel|FlashAttn" -c 2 --section SpeedOfLight --section WarpStateStats \
        python3 benchmarks/profile_fwd.py [--seqlen 16384] [--causal] [--impl fa3jax:cuda|flash-attn3-jax]

Runs fa3jax's cuda forward, then flash-attn3-jax's (when importable), each once after a warm-up, on
h=16, d=128, bf16, batch = 16384 // seqlen.
"""
import argparse

import jax
import jax.numpy as jnp

import fa3jax

p = argparse.ArgumentParser()
p.add_argument("--seqlen", type=int, default=16384)
p.add_argument("--causal", action="store_true")
p.add_argument("--impl", default="all", help="fa3jax:cuda | flash-attn3-jax | all")
a = p.parse_args()
b = max(1, 16384 // a.seqlen)
q, k, v = (jax.random.normal(jax.random.key(i), (b, a.seqlen, 16, 128), jnp.bfloat16) for i in range(3))
impls = [("fa3jax:cuda", lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=a.causal, backend="cuda"))]
try:
    import flash_attn3_jax

    impls.append(("flash-attn3-jax", lambda q, k, v: flash_attn3_jax.flash_mha(q, k, v, is_causal=a.causal)))
except ImportError as e:
    print(f"flash-attn3-jax not importable: {e}")
for name, f in impls:
    if a.impl not in ("all", name):
        continue
    f = jax.jit(f)
    jax.block_until_ready(f(q, k, v))  # compile + warm-up (outside ncu's -c budget only if -k filters it)
    jax.block_until_ready(f(q, k, v))
    print(name, "done", flush=True)

"""Training steps (jax.vjp of flash_mha) of one implementation, for Nsight Compute:

    ncu --kernel-name-base demangled -k regex:"bwd_kernel|FlashAttnBwdSm90" -c 1 --section SpeedOfLight \
        python3 benchmarks/profile_bwd.py [--shape B,S,H[,causal]]... [--impl fa3jax:cuda|flash-attn3-jax]

d=128 bf16. Each shape (default 16384//S x S x 16 at --seqlen) runs two steps, one after the other, so that
`ncu --metrics gpu__time_duration.sum` over every kernel gives the second step's per-kernel durations, and
`--launch-skip 1 -c 1` with a regex that only the main kernel matches profiles the second step's one.
"""
import argparse

import jax
import jax.numpy as jnp

import fa3jax

p = argparse.ArgumentParser()
p.add_argument("--seqlen", type=int, default=16384)
p.add_argument("--causal", action="store_true")
p.add_argument("--shape", action="append", default=[], help="B,S,H or B,S,H,causal (repeatable)")
p.add_argument("--impl", default="fa3jax:cuda", help="fa3jax:<backend> | flash-attn3-jax")
a = p.parse_args()
shapes = [tuple(int(x) for x in s.split(",")[:3]) + (s.endswith(",causal"),) for s in a.shape]
if not shapes:
    shapes = [(max(1, 16384 // a.seqlen), a.seqlen, 16, a.causal)]

for b, s, h, causal in shapes:
    q, k, v, do = (jax.random.normal(jax.random.key(i), (b, s, h, 128), jnp.bfloat16) for i in range(4))
    if a.impl == "flash-attn3-jax":
        import flash_attn3_jax

        f = lambda q, k, v, c=causal: flash_attn3_jax.flash_mha(q, k, v, is_causal=c)  # noqa: E731
    else:
        backend = a.impl.split(":", 1)[1]
        f = lambda q, k, v, c=causal: fa3jax.flash_mha(q, k, v, is_causal=c, backend=backend)  # noqa: E731

    @jax.jit
    def step(q, k, v, do, f=f):
        _, pull = jax.vjp(f, q, k, v)
        return pull(do)

    for _ in range(2):
        jax.block_until_ready(step(q, k, v, do))
    print(f"{a.impl}: b={b} s={s} h={h} causal={causal}: 2 steps done", flush=True)

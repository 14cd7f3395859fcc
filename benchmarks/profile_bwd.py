"""One backward (jax.vjp of flash_mha) per implementation, for Nsight Compute:

    ncu --kernel-name-base demangled -k regex:"bwd_kernel|FlashAttnBwdSm90" -c 1 --section SpeedOfLight \
        python3 benchmarks/profile_bwd.py [--seqlen 16384] [--causal] [--impl fa3jax:cuda|flash-attn3-jax]

h=16, d=128, bf16, batch = 16384 // seqlen; one warm-up step, then one profiled step (ncu -c 1 with
--launch-skip to pass the warm-up's kernels, or a regex that only the main kernel matches).
"""
import argparse

import jax
import jax.numpy as jnp

import fa3jax

p = argparse.ArgumentParser()
p.add_argument("--seqlen", type=int, default=16384)
p.add_argument("--causal", action="store_true")
p.add_argument("--impl", default="fa3jax:cuda", help="fa3jax:<backend> | flash-attn3-jax")
a = p.parse_args()
b = max(1, 16384 // a.seqlen)
q, k, v, do = (jax.random.normal(jax.random.key(i), (b, a.seqlen, 16, 128), jnp.bfloat16) for i in range(4))
if a.impl == "flash-attn3-jax":
    import flash_attn3_jax

    f = lambda q, k, v: flash_attn3_jax.flash_mha(q, k, v, is_causal=a.causal)  # noqa: E731
else:
    backend = a.impl.split(":", 1)[1]
    f = lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=a.causal, backend=backend)  # noqa: E731


@jax.jit
def step(q, k, v, do):
    _, pull = jax.vjp(f, q, k, v)
    return pull(do)


for _ in range(2):
    jax.block_until_ready(step(q, k, v, do))
print(f"{a.impl}: 2 steps done")

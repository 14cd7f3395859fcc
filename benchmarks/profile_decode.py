"""One decode step of one implementation, for Nsight Compute (the timing itself lives in fa3jax.bench):

    ncu -k regex:"_decode_fwd|device_kernel" --launch-skip 2 -c 1 --section SpeedOfLight \
        python3 benchmarks/profile_decode.py --layout paged --batch 64 --cache 32768 --impl fa3jax:triton

hq=32, hk=8, d=128, bf16, the inputs of the bench's decode suite (fa3jax.bench.cache_inputs: pages scattered
over the pool), the implementations of the bench's decode suite (fa3jax.bench.decode_impls: num_splits automatic
for fa3jax, fixed for flash-attn3-jax:s1/s4/s16). The implementation runs three times
(two warm-ups: compile, then the launch ncu skips), so --launch-skip 2 -c 1 profiles the third.
"""
import argparse

import jax

from fa3jax import bench

p = argparse.ArgumentParser()
p.add_argument("--layout", default="paged", choices=["paged", "contiguous"])
p.add_argument("--batch", type=int, default=64)
p.add_argument("--cache", type=int, default=32768)
p.add_argument("--impl", default="fa3jax:triton",
               help="a name of fa3jax.bench.decode_impls(): fa3jax:triton, flash-attn3-jax:s1, ...")
a = p.parse_args()
impls = {i.name: i for i in bench.decode_impls()[0]}
if a.impl not in impls:
    raise SystemExit(f"--impl must be one of {sorted(impls)}; got {a.impl!r}")
cfg = bench.DecodeConfig(a.layout, a.batch, a.cache)
q, kc, vc, seqlens, pt = bench.cache_inputs(cfg, 1, seed=a.batch * 7 + a.cache)[0]
f = jax.jit(impls[a.impl].fn)
for _ in range(3):
    jax.block_until_ready(f(q, kc, vc, seqlens, pt))
print(f"{a.impl} {a.layout} b={a.batch} cache={a.cache}: done")

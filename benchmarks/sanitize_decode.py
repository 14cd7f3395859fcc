"""Triton decode kernels under compute-sanitizer with hostile indices (run on the GPU machine):

    XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck --error-exitcode 3 \\
        python3 benchmarks/sanitize_decode.py

The platform allocator gives every buffer its own allocation, so memcheck sees an access past any input or
output (with XLA's default pool, one large allocation, it would not). Every decode schedule (split, stream-K),
forced through ``fa3jax.tuning.override``, runs on paged and contiguous caches whose page_table / cache_batch_idx
/ cache_seqlens / cache_leftpad hold out-of-range values; the outputs must be finite and agree across schedules.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import fa3jax
from fa3jax.backends.triton import tables
from fa3jax.tuning import Tuning, override


def _cases(rng):
    b, hq, hk, d, page, num_pages = 5, 8, 2, 64, 16, 9
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.bfloat16)
    kp = jnp.asarray(rng.standard_normal((num_pages, page, hk, d)), jnp.bfloat16)
    # rows: in range, negative, past num_pages, huge, and a short row; pages_per_seq = 4 (capacity 64)
    pt = jnp.asarray([[0, 1, 2, 3], [-1, 4, -7, 5], [9, 6, 10, 7], [2 ** 30, 8, 0, -2 ** 31], [3, 3, 3, 3]], jnp.int32)
    seqlens = jnp.asarray([64, 50, 1000, 33, -4], jnp.int32)  # 1000 and -4 are clamped to [0, capacity]
    yield "paged", dict(q=q, k_cache=kp, v_cache=kp, cache_seqlens=seqlens, page_table=pt)
    kc = jnp.asarray(rng.standard_normal((3, 64, hk, d)), jnp.bfloat16)
    yield "contiguous", dict(q=q, k_cache=kc, v_cache=kc, cache_seqlens=seqlens,
                             cache_batch_idx=jnp.asarray([0, 2, 3, -1, 1], jnp.int32),
                             cache_leftpad=jnp.asarray([0, 70, -3, 5, 2], jnp.int32))
    kn = jnp.asarray(rng.standard_normal((b, 2, hk, d)), jnp.bfloat16)
    yield "paged+new", dict(q=q, k_cache=kp, v_cache=kp, k=kn, v=kn, cache_seqlens=seqlens, page_table=pt)


def main():
    checked, first = 0, {}
    for schedule in ("split", "streamk"):
        for name, kw in _cases(np.random.default_rng(0)):
            policy = tables.DECODE["paged" if "page_table" in kw else "contiguous"]._replace(schedule=schedule)
            for splits in ((0, 3) if schedule == "split" else (0,)):
                with override(Tuning(decode=policy)):  # eager call: planned (and traced) inside the block
                    out = fa3jax.flash_mha_with_kvcache(**kw, num_splits=splits, backend="triton")
                out = np.asarray(jax.block_until_ready(out), np.float32)
                if not np.all(np.isfinite(out)):
                    raise SystemExit(f"non-finite output: {schedule} {name} num_splits={splits}")
                diff = float(np.max(np.abs(out - first.setdefault(name, out))))
                if diff > 2e-2:  # bf16 outputs of differently merged pieces
                    raise SystemExit(f"{schedule} {name} num_splits={splits}: differs from split by {diff}")
                checked += 1
                print(f"{schedule:8s} {name:11s} num_splits={splits}: finite, max diff to split {diff:.2e}")
    print(f"sanitize_decode: {checked} calls, all outputs finite and in agreement")


if __name__ == "__main__":
    main()

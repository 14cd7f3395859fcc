"""Command line: ``python -m fa3jax {info,demo,bench}`` (also installed as the ``fa3jax`` script).

* ``info``  -- every backend with available yes/no and the reason, versions, the default device.
* ``demo``  -- a tiny forward + backward on the current device, checked against the float64 NumPy reference.
* ``bench`` -- the benchmark harness (:mod:`fa3jax.bench`; ``python -m fa3jax bench --help``). On CPU it runs
  the ``--small`` preset unless sizes are given.

Exit status is nonzero on failure.
"""
from __future__ import annotations

import argparse
import sys


def cmd_info(args) -> int:
    import jax

    import fa3jax

    print(f"fa3jax {fa3jax.__version__}, jax {jax.__version__}, python {sys.version.split()[0]}")
    try:
        devs = jax.devices()
        d = devs[0]
        print(f"default device: {d} (platform {d.platform}, kind {d.device_kind}), {len(devs)} device(s)")
    except Exception as e:
        print(f"default device: none ({type(e).__name__}: {e})")
        return 1
    try:
        import flash_attn3_jax

        print(f"flash_attn3_jax: {getattr(flash_attn3_jax, '__version__', 'installed')}")
    except Exception:
        print("flash_attn3_jax: not installed")
    print("backends (auto order):")
    width = max(len(n) for n, _, _ in fa3jax.backends_info())
    any_ok = False
    for name, ok, reason in fa3jax.backends_info():
        any_ok |= ok
        print(f"  {name:{width}s}  available: {'yes' if ok else 'no '}" + (f"  ({reason})" if reason else ""))
    return 0 if any_ok else 1


def cmd_demo(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fa3jax
    from fa3jax import masking, reference

    b, l, hq, hk, d = 2, args.seqlen, 4, 2, 64
    dtype = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}[args.dtype]
    causal = not args.no_causal
    window = (-1, -1)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(keys[0], (b, l, hq, d), dtype)
    k = jax.random.normal(keys[1], (b, l, hk, d), dtype)
    v = jax.random.normal(keys[2], (b, l, hk, d), dtype)
    do = jax.random.normal(keys[3], (b, l, hq, d), dtype)
    scale = 1.0 / np.sqrt(d)
    sup = fa3jax.supports(fa3jax.flash_mha, q, k, v, is_causal=causal, backend=args.backend)
    print(f"device: {jax.devices()[0].device_kind} [{jax.devices()[0].platform}]")
    print(f"demo: b={b} seqlen={l} hq={hq} hk={hk} d={d} {args.dtype} causal={causal} backend={args.backend}")
    print(f"  plan: forward by {sup.forward}, backward by {sup.backward}"
          + (f" ({sup.reason})" if sup.reason else ""))
    if not sup.supported:
        print(f"FAIL: not supported: {sup.reason}")
        return 1

    def loss(q, k, v, do):
        out = fa3jax.flash_mha(q, k, v, softmax_scale=scale, is_causal=causal, window_size=window,
                               backend=args.backend)
        return jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, do)
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    ref_out, _, dq, dk, dv = reference.dense(f64(q), f64(k), f64(v), scale=scale,
                                             window=masking.normalize_window(window, causal), dout=f64(do))
    tol = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}[args.dtype]
    ok = True
    for name, got, want in (("out", out, ref_out), ("dq", grads[0], dq), ("dk", grads[1], dk),
                            ("dv", grads[2], dv)):
        got = f64(got)
        err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
        if not np.isfinite(got).all():
            err = float("inf")
        good = err <= tol
        ok &= good
        print(f"  {name}: max |err| / max |ref| = {err:.2e}  ({'ok' if good else 'FAIL'}, tol {tol:.0e})")
    print("demo: OK" if ok else "demo: FAILED")
    return 0 if ok else 1


def cmd_bench(rest) -> int:
    from . import bench

    return bench.main(rest)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .registry import ORDER

    p = argparse.ArgumentParser(prog="fa3jax", description="FlashAttention for JAX: info, demo, benchmarks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="backends available here and why not, versions, default device")
    d = sub.add_parser("demo", help="tiny forward+backward checked against the float64 reference")
    d.add_argument("--backend", default="auto", choices=("auto",) + ORDER)
    d.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    d.add_argument("--seqlen", type=int, default=128)
    d.add_argument("--no-causal", action="store_true")
    sub.add_parser("bench", help="benchmark harness (see `python -m fa3jax bench --help`)", add_help=False)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the harness's own parser
        return cmd_bench(argv[1:])
    args = p.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""JAX-level smoke test of the CUDA backend (run on the H100 after installing with FA3JAX_BUILD_CUDA=1).

    python csrc/tests/smoke_jax.py

Compares CudaBackend.forward (out, lse) with a float64 numpy reference built on fa3jax.masking; exits nonzero
on failure. Does not need the rest of the package's test-suite.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fa3jax.backends.cuda import CudaBackend, build_info
from fa3jax.masking import Window, allowed, softcap_scores
from fa3jax.spec import AttentionSpec


def reference(q, k, v, scale, window, softcap):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hk, axis=2)
    v = np.repeat(v, hq // hk, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = softcap_scores(s, softcap, np)
    ok = allowed(np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk, window, np)
    s = np.where(ok, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p / np.where(l > 0, l, 1.0), v)
    lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m_safe[..., 0], -np.inf)
    return out, lse


def main():
    be = CudaBackend()
    ok, why = be.availability()
    print("availability:", ok, why, "| build:", build_info())
    if not ok:
        return 2
    cases = [
        # b, sq, sk, hq, hk, d, dtype, window, softcap
        (2, 256, 256, 4, 4, 128, "bfloat16", Window(-1, -1), 0.0),
        (1, 300, 500, 4, 2, 128, "bfloat16", Window(-1, 0), 0.0),
        (1, 500, 300, 2, 1, 128, "float16", Window(-1, 0), 0.0),
        (1, 333, 333, 2, 2, 128, "bfloat16", Window(64, 16), 0.0),
        (1, 200, 200, 2, 2, 128, "bfloat16", Window(-1, 0), 20.0),
        (2, 1, 777, 8, 1, 128, "float16", Window(-1, -1), 0.0),
        (1, 257, 257, 2, 2, 64, "bfloat16", Window(-1, 0), 0.0),
        (1, 257, 257, 2, 2, 256, "bfloat16", Window(-1, 0), 0.0),
        # MLA (v's head dim below q/k's): the last field is d_v
        (1, 300, 500, 4, 2, 192, "bfloat16", Window(-1, 0), 0.0, 128),
        (2, 200, 333, 4, 2, 128, "float16", Window(-1, -1), 0.0, 64),
    ]
    failures = 0
    rng = np.random.default_rng(0)
    for b, sq, sk, hq, hk, d, dt, win, cap, *dv in cases:
        dv = dv[0] if dv else d
        spec = AttentionSpec(mode="dense", batch=b, seqlen_q=sq, seqlen_k=sk, num_heads_q=hq, num_heads_k=hk,
                             head_dim=d, dtype=dt, softmax_scale=d ** -0.5, window=win, softcap=cap, head_dim_v=dv)
        try:
            be.check_forward(spec)
        except NotImplementedError as e:
            print("skip:", e)
            continue
        q = jnp.asarray(rng.standard_normal((b, sq, hq, d)), dt)
        k = jnp.asarray(rng.standard_normal((b, sk, hk, d)), dt)
        v = jnp.asarray(rng.standard_normal((b, sk, hk, dv)), dt)
        out, lse = jax.jit(lambda q, k, v: be.forward(spec, q, k, v, None))(q, k, v)
        ro, rl = reference(q, k, v, spec.softmax_scale, win, cap)
        out = np.asarray(out, np.float64)
        lse = np.asarray(lse, np.float64)
        err = np.abs(out - ro).max()
        inf_ok = np.array_equal(np.isneginf(lse), np.isneginf(rl))
        lerr = np.abs(np.where(np.isfinite(rl), lse - rl, 0)).max()
        good = np.isfinite(out).all() and inf_ok and err < (3e-2 if dt == "bfloat16" else 5e-3) and lerr < 2e-2
        failures += not good
        print(f"{'ok  ' if good else 'FAIL'} {dt} d={d}{'' if dv == d else f'x{dv}'} b={b} sq={sq} sk={sk} hq={hq} hk={hk} win={tuple(win)} "
              f"cap={cap}: max|dO|={err:.3g} max|dLSE|={lerr:.3g} -inf rows match={inf_ok}")
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

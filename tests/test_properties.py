"""Hypothesis: random shapes and masks, the xla backend against the float64 reference (forward and grads)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fa3jax
from fa3jax import masking, reference

from .helpers import check, naive_lowp, rand

window_side = st.one_of(st.just(-1), st.integers(0, 40))


@st.composite
def problems(draw):
    hk = draw(st.integers(1, 2))
    return dict(
        b=draw(st.integers(1, 2)), lq=draw(st.integers(1, 48)), lk=draw(st.integers(1, 48)),
        hk=hk, hq=hk * draw(st.integers(1, 3)), d=draw(st.sampled_from([8, 16, 24])),
        causal=draw(st.booleans()), window=(draw(window_side), draw(window_side)),
        softcap=draw(st.sampled_from([0.0, 2.5])), seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_xla_matches_reference(p):
    rng = np.random.default_rng(p["seed"])
    dt = "float32"
    q, q64 = rand(rng, (p["b"], p["lq"], p["hq"], p["d"]), dt)
    k, k64 = rand(rng, (p["b"], p["lk"], p["hk"], p["d"]), dt)
    v, v64 = rand(rng, (p["b"], p["lk"], p["hk"], p["d"]), dt)
    do, do64 = rand(rng, q.shape, dt)
    win = masking.normalize_window(p["window"], p["causal"])
    kw = dict(scale=1 / np.sqrt(p["d"]), window=win, softcap=p["softcap"], dout=do64)
    ref = reference.dense(q64, k64, v64, **kw)
    low = reference.dense(q64, k64, v64, impl=functools.partial(naive_lowp, dtype=dt), **kw)
    f = lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=p["causal"], window_size=p["window"],
                                         softcap=p["softcap"], return_softmax_lse=True, backend="xla")
    (out, lse), pull = jax.vjp(f, q, k, v)
    check("out", out, ref[0], low[0], dt)
    check("lse", lse, ref[1], low[1], dt)
    for name, g, r, lo in zip(("dq", "dk", "dv"), pull((do, jnp.zeros_like(lse))), ref[2:], low[2:]):
        check(name, g, r, lo, dt)


@settings(max_examples=60, deadline=None)
@given(lq=st.integers(1, 64), lk=st.integers(1, 64), left=window_side, right=window_side,
       q_lo=st.integers(0, 63), n=st.integers(1, 32))
def test_key_range_covers_every_allowed_key(lq, lk, left, right, q_lo, n):
    """Block skipping relies on key_range: no allowed key may fall outside it."""
    win = masking.Window(left, right)
    q_hi = min(q_lo + n, lq)
    if q_lo >= q_hi:
        return
    lo, hi = masking.key_range(q_lo, q_hi, lq, lk, win)
    qs = np.arange(q_lo, q_hi)[:, None]
    ks = np.arange(lk)[None, :]
    ok = masking.allowed(qs, ks, lq, lk, win, np)
    cols = np.nonzero(ok.any(0))[0]
    if cols.size:
        assert cols.min() >= lo and cols.max() < hi

"""fa3jax.dot_product_attention against jax.nn.dot_product_attention(implementation="xla"), forward and
gradients, and the Flax attention_fn against Flax's default attention."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax

CASES = [
    # (b, t, s, n, k, causal, window, q_lengths, kv_lengths)
    (2, 12, 12, 4, 2, False, None, None, None),
    (2, 12, 12, 4, 2, True, None, None, None),
    (2, 7, 19, 4, 1, True, None, None, None),  # T < S: top-left causal ignores the last keys
    (2, 19, 7, 2, 2, True, None, None, None),  # T > S
    (1, 16, 16, 2, 2, False, (3, 2), None, None),
    (2, 9, 23, 4, 2, False, (4, 1), None, None),
    (2, 23, 9, 4, 2, False, (2, 5), None, None),  # rows past S + left see nothing: jax.nn's mean of values
    (2, 20, 11, 2, 1, True, (3, 3), None, None),
    (2, 15, 15, 2, 2, False, 4, None, None),
    (3, 13, 17, 4, 2, False, None, [13, 5, 0], [17, 2, 9]),
    (3, 13, 17, 4, 2, True, None, [10, 13, 1], [3, 17, 0]),
    (3, 17, 11, 2, 2, True, None, [17, 6, 12], None),
    (3, 11, 17, 4, 4, False, (2, 3), None, [4, 17, 11]),
    (3, 18, 14, 4, 2, False, (5, 0), [18, 3, 9], [2, 14, 7]),
    (2, 14, 18, 2, 1, True, (6, 2), [14, 8], [18, 5]),
]


def _id(c):
    b, t, s, n, k, causal, window, ql, kl = c
    return f"b{b}-t{t}-s{s}-h{n}x{k}-{'causal' if causal else 'full'}-w{window}-ql{ql is not None}-kl{kl is not None}"


def _inputs(b, t, s, n, k, dtype, seed):
    rng = np.random.default_rng(seed)
    mk = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return mk(b, t, n, 16), mk(b, s, k, 16), mk(b, s, k, 16), mk(b, t, n, 16)


def _run(fn, q, k, v, do, **kw):
    out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, **kw), q, k, v)
    return (out,) + pull(do)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_jax_nn_forward_and_grads(case):
    b, t, s, n, k, causal, window, ql, kl = case
    q, kk, v, do = _inputs(b, t, s, n, k, jnp.float32, hash(_id(case)) % 2**32)
    kw = dict(scale=0.4, is_causal=causal, local_window_size=window,
              query_seq_lengths=None if ql is None else jnp.asarray(ql, jnp.int32),
              key_value_seq_lengths=None if kl is None else jnp.asarray(kl, jnp.int32))
    want = jax.jit(functools.partial(_run, jax.nn.dot_product_attention, implementation="xla", **kw))(q, kk, v, do)
    got = jax.jit(functools.partial(_run, fa3jax.dot_product_attention, implementation="xla", **kw))(q, kk, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5, err_msg=name)


def test_residual_rank3_and_bfloat16():
    q, k, v, _ = _inputs(1, 21, 9, 4, 2, jnp.bfloat16, 5)
    kw = dict(is_causal=True, local_window_size=(2, 1), return_residual=True)
    out, res = fa3jax.dot_product_attention(q[0], k[0], v[0], implementation="xla", **kw)
    want_out, want_res = jax.nn.dot_product_attention(q[0], k[0], v[0], implementation="xla", **kw)
    assert out.shape == want_out.shape == (21, 4, 16) and res.shape == want_res.shape == (21, 4)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), atol=2e-2)
    np.testing.assert_allclose(np.asarray(res, np.float32), np.asarray(want_res, np.float32), rtol=1e-2)


@pytest.mark.parametrize("kwargs,words", [
    (dict(bias=jnp.zeros((1, 1, 8, 8))), "does not take bias"),
    (dict(mask=jnp.ones((1, 1, 8, 8), bool)), "does not take mask"),
    (dict(implementation="pallas"), "implementation must be one of"),
    (dict(local_window_size=(-1, 2)), "local_window_size must be"),
    (dict(query_seq_lengths=jnp.asarray([3, 4], jnp.int32)), r"query_seq_lengths must have shape \(batch,\)=\(1,\)"),
])
def test_refusals_name_the_argument(kwargs, words):
    x = jnp.zeros((1, 8, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match=words):
        fa3jax.dot_product_attention(x, x, x, **kwargs)


def test_flax_multihead_attention_matches_default():
    nnx = pytest.importorskip("flax.nnx")
    x = jax.random.normal(jax.random.key(0), (2, 3, 10, 32), jnp.float32)  # two batch dims

    def layer(**kw):
        return nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32, num_kv_heads=2, decode=False,
                                      rngs=nnx.Rngs(7), **kw)

    ours = layer(attention_fn=functools.partial(fa3jax.flax_attention_fn, implementation="xla"))
    default = layer()
    for causal in (False, True):
        np.testing.assert_allclose(np.asarray(ours(x, is_causal=causal)), np.asarray(default(x, is_causal=causal)),
                                   atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="no mask"):
        ours(x, mask=jnp.ones((10, 10), bool))
    with pytest.raises(ValueError, match="no dropout"):
        layer(attention_fn=fa3jax.flax_attention_fn, dropout_rate=0.1)(x, deterministic=False, rngs=nnx.Rngs(1))
    eval_out = layer(attention_fn=fa3jax.flax_attention_fn, dropout_rate=0.1)(x, deterministic=True)
    np.testing.assert_allclose(np.asarray(eval_out), np.asarray(default(x)), atol=2e-5, rtol=2e-5)


def test_importing_fa3jax_does_not_import_flax():
    import subprocess
    import sys

    code = "import sys, fa3jax; sys.exit('flax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=fa3jax.__path__[0] + "/..").returncode == 0

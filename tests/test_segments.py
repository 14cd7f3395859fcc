"""Packed sequences by segment ids (flash_mha's q_segment_ids / kv_segment_ids): a packed row equals the
separate sequences, forward and gradients; backends without segment ids refuse, so ``auto`` falls back (to triton
on a GPU, tests/test_triton_interpret_segments.py and tests/test_triton_gpu.py::test_segment_ids; here to xla)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax

LENS = [[5, 9, 3, 7], [12, 12]]  # two packed rows of 24 tokens


def _ids(lens):
    return np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lens)])


def _inputs(seed, l=24, hq=4, hk=2, d=16):
    rng = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    return mk(2, l, hq, d), mk(2, l, hk, d), mk(2, l, hk, d), mk(2, l, hq, d)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (2, 3)), (True, (4, 0))])
def test_packed_rows_equal_separate_sequences(causal, window):
    q, k, v, do = _inputs(0)
    ids = jnp.asarray(np.stack([_ids(x) for x in LENS]))
    kw = dict(is_causal=causal, window_size=window, backend="xla")

    def packed(q, k, v):
        return fa3jax.flash_mha(q, k, v, q_segment_ids=ids, kv_segment_ids=ids, **kw)

    out, pull = jax.vjp(jax.jit(packed), q, k, v)
    grads = pull(do)
    for row, lens in enumerate(LENS):
        start = 0
        for n in lens:
            sl = (slice(row, row + 1), slice(start, start + n))
            want, pull1 = jax.vjp(lambda q, k, v: fa3jax.flash_mha(q, k, v, **kw), q[sl], k[sl], v[sl])
            np.testing.assert_allclose(np.asarray(out[sl]), np.asarray(want), atol=1e-5, rtol=1e-5)
            for g, w in zip(grads, pull1(do[sl])):
                np.testing.assert_allclose(np.asarray(g[sl]), np.asarray(w), atol=1e-5, rtol=1e-5)
            start += n


def test_cross_attention_segments_and_vmap():
    q, k, v, _ = _inputs(1)
    qids = jnp.asarray(np.stack([_ids([10, 14]), _ids([24])]))
    kids = jnp.asarray(np.stack([_ids([20, 4]), _ids([24])]), jnp.int16)  # any integer dtype
    out = fa3jax.flash_mha(q, k, v, q_segment_ids=qids, kv_segment_ids=kids, backend="xla")
    # row 0: queries 0..9 see keys 0..19, queries 10..23 keys 20..23; row 1: one segment, plain attention
    np.testing.assert_allclose(np.asarray(out[0, :10]), np.asarray(fa3jax.flash_mha(
        q[:1, :10], k[:1, :20], v[:1, :20], backend="xla")[0]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out[0, 10:]), np.asarray(fa3jax.flash_mha(
        q[:1, 10:], k[:1, 20:], v[:1, 20:], backend="xla")[0]), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(fa3jax.flash_mha(q, k, v, backend="xla")[1]),
                               atol=1e-5, rtol=1e-5)
    vm = jax.vmap(lambda q, k, v, a, b: fa3jax.flash_mha(q, k, v, q_segment_ids=a, kv_segment_ids=b,
                                                         backend="xla"))(q[:, None], k[:, None], v[:, None],
                                                                         qids[:, None], kids[:, None])
    np.testing.assert_allclose(np.asarray(vm[:, 0]), np.asarray(out), atol=1e-6, rtol=1e-6)


def test_segment_ids_validation_and_fallback():
    q, k, v, _ = _inputs(2)
    ids = jnp.zeros((2, 24), jnp.int32)
    with pytest.raises(ValueError, match="must be given together"):
        fa3jax.flash_mha(q, k, v, q_segment_ids=ids)
    with pytest.raises(ValueError, match=r"kv_segment_ids must have shape \(batch, seqlen\)=\(2, 24\)"):
        fa3jax.flash_mha(q, k, v, q_segment_ids=ids, kv_segment_ids=ids[:, :5])
    with pytest.raises(TypeError, match="q_segment_ids must be an int or an integer array-like"):
        fa3jax.flash_mha(q, k, v, q_segment_ids=ids.astype(jnp.float32), kv_segment_ids=ids)
    s = fa3jax.supports(fa3jax.flash_mha, q, k, v, q_segment_ids=ids, kv_segment_ids=ids)
    assert s.supported and s.forward == "xla" and s.backward == "xla", s
    for name in ("triton", "cuda"):  # triton: no float32 (and no GPU on CPU-only machines); cuda: no segment ids
        assert not fa3jax.supports(fa3jax.flash_mha, q, k, v, q_segment_ids=ids, kv_segment_ids=ids,
                                   backend=name).supported
    # triton serves segment ids in its dense kernels wherever it is available
    from fa3jax.backends.triton import TritonBackend

    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    t = fa3jax.supports(fa3jax.flash_mha, qb, kb, vb, q_segment_ids=ids, kv_segment_ids=ids, backend="triton")
    assert t.supported == TritonBackend().availability()[0], t

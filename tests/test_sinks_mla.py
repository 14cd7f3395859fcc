"""Attention sinks and a value head dim below the q/k one (MLA), against the float64 reference.

:class:`SinksMlaSuite` is backend-parametrized like :mod:`tests.suite`: a backend that cannot serve a case is
skipped through ``fa3jax.supports`` (with its reason), never silently passed. The sinks' gradient formula of the
reference (and of :func:`fa3jax.vjp.sink_grad`) is itself checked against ``jax.grad`` of a plain-jnp definition.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import masking, reference, validation
from fa3jax.spec import KVCacheSpec
from fa3jax.backends.cuda import CudaBackend
from fa3jax.backends.triton import TritonBackend

from .helpers import check, naive_lowp, rand, seeded_rng

# (b, lq, lk, hq, hk, d, dv, causal, window, softcap)
DENSE_CASES = [
    (2, 33, 33, 2, 2, 32, 32, False, (-1, -1), 0.0),
    (1, 40, 24, 4, 2, 16, 16, True, (-1, -1), 0.0),  # lq > lk under causal: rows that see no key
    (2, 50, 50, 2, 1, 16, 16, False, (8, 4), 0.0),
    (1, 30, 30, 4, 1, 24, 24, False, (-1, -1), 5.0),  # GQA + softcap
    (1, 20, 28, 2, 1, 192, 128, True, (-1, -1), 0.0),  # MLA shapes
    (1, 20, 20, 4, 2, 128, 64, False, (6, -1), 3.0),
]


def _case_id(c):
    b, lq, lk, hq, hk, d, dv, causal, window, cap = c
    return (f"b{b}-q{lq}-k{lk}-h{hq}x{hk}-d{d}v{dv}-{'causal' if causal else 'full'}-w{window[0]}_{window[1]}"
            f"-cap{cap:g}")


def _sinks(rng, hq):
    return jnp.asarray(rng.standard_normal(hq) * 2.0, jnp.float32)


def _jnp_attention(q, k, v, sinks, *, scale, causal, softcap):
    """Plain jnp, dense (b, l, h, d), full score matrix, the sink as an extra column with no value."""
    g = q.shape[2] // k.shape[2]
    kh, vh = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    lq, lk = q.shape[1], k.shape[1]
    ok = masking.allowed(jnp.arange(lq)[:, None], jnp.arange(lk)[None], lq, lk,
                         masking.normalize_window((-1, -1), causal), jnp)
    s = jnp.where(ok, s, -jnp.inf)
    col = jnp.broadcast_to(sinks[None, :, None, None], s.shape[:3] + (1,))
    lse = jax.nn.logsumexp(jnp.concatenate([s, col], -1), axis=-1)
    p = jnp.exp(s - lse[..., None])
    return jnp.einsum("bhqk,bkhd->bqhd", p, vh), lse


class SinksMlaSuite:
    backend = "xla"
    dtypes = ("bfloat16", "float32")

    def _rng(self, *salt):
        return seeded_rng(self.backend, "sinks", *salt)

    def _require(self, fn, *args, grad=False, **kwargs):
        s = fa3jax.supports(fn, *args, backend=self.backend, **kwargs)
        if not s.supported:
            pytest.skip(s.reason)
        if grad and s.backward is None:
            pytest.skip(s.reason)

    # ------------------------------------------------------------------------------------------ dense
    @pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
    @pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
    @pytest.mark.parametrize("with_sinks", [True, False])
    def test_dense_forward_and_grads(self, case, dtype, with_sinks):
        b, lq, lk, hq, hk, d, dv, causal, window, cap = case
        if not with_sinks and d == dv:
            pytest.skip("plain attention: tests/suite.py")
        rng = self._rng("dense", case, dtype, with_sinks)
        q, q64 = rand(rng, (b, lq, hq, d), dtype)
        k, k64 = rand(rng, (b, lk, hk, d), dtype)
        v, v64 = rand(rng, (b, lk, hk, dv), dtype)
        do, do64 = rand(rng, (b, lq, hq, dv), dtype)
        dl64 = rng.standard_normal((b, hq, lq))
        sinks = _sinks(rng, hq) if with_sinks else None
        scale = 0.7 / np.sqrt(d)
        kw = dict(softmax_scale=scale, is_causal=causal, window_size=window, softcap=cap, return_softmax_lse=True)
        self._require(fa3jax.flash_mha, q, k, v, sinks=sinks, grad=True, **kw)
        rkw = dict(scale=scale, window=masking.normalize_window(window, causal), softcap=cap, dout=do64, dlse=dl64,
                   sinks=None if sinks is None else np.asarray(sinks, np.float64))
        ref = reference.dense(q64, k64, v64, **rkw)
        low = reference.dense(q64, k64, v64, impl=functools.partial(naive_lowp, dtype=dtype), **rkw)

        def f(q, k, v, sinks):
            return fa3jax.flash_mha(q, k, v, sinks=sinks, backend=self.backend, **kw)

        (out, lse), pull = jax.vjp(jax.jit(f), q, k, v, sinks)
        assert out.shape == (b, lq, hq, dv)
        check("out", out, ref[0], low[0], dtype)
        check("lse", lse, ref[1], low[1], dtype)
        grads = pull((do, jnp.asarray(dl64, jnp.float32)))
        names = ("dq", "dk", "dv", "dsinks")[:len(ref) - 2]
        for name, got, r, lo in zip(names, grads, ref[2:], low[2:]):
            check(name, got, r, lo, dtype)
        if sinks is None:
            assert grads[3] is None

    def test_sink_gradient_formula_matches_jax_grad(self):
        """The reference's closed-form d sinks (and the backend's) equal jax.grad of a plain-jnp definition,
        with an LSE cotangent, causal rows that see no key, GQA and softcap."""
        rng = self._rng("jaxgrad")
        b, lq, lk, hq, hk, d, dv = 2, 12, 7, 4, 2, 8, 6
        q, q64 = rand(rng, (b, lq, hq, d), "float32")
        k, k64 = rand(rng, (b, lk, hk, d), "float32")
        v, v64 = rand(rng, (b, lk, hk, dv), "float32")
        sinks = _sinks(rng, hq)
        do = jnp.asarray(rng.standard_normal((b, lq, hq, dv)), jnp.float32)
        dl = jnp.asarray(rng.standard_normal((b, hq, lq)), jnp.float32)
        kw = dict(scale=0.5, causal=True, softcap=2.0)

        def loss(fn):
            def f(q, k, v, s):
                out, lse = fn(q, k, v, s)
                return jnp.sum(out * do) + jnp.sum(lse * dl)
            return jax.grad(f, argnums=(0, 1, 2, 3))(q, k, v, sinks)

        want = loss(functools.partial(_jnp_attention, **kw))
        ref = reference.dense(q64, k64, v64, scale=0.5, window=masking.normalize_window((-1, -1), True), softcap=2.0,
                              dout=np.asarray(do, np.float64), dlse=np.asarray(dl, np.float64),
                              sinks=np.asarray(sinks, np.float64))
        for name, w, r in zip(("dq", "dk", "dv", "dsinks"), want, ref[2:]):
            np.testing.assert_allclose(r, np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)
        self._require(fa3jax.flash_mha, q, k, v, sinks=sinks, grad=True)
        got = loss(lambda q, k, v, s: fa3jax.flash_mha(q, k, v, softmax_scale=0.5, is_causal=True, softcap=2.0,
                                                       sinks=s, return_softmax_lse=True, backend=self.backend))
        for name, w, g in zip(("dq", "dk", "dv", "dsinks"), want, got):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5, err_msg=name)

    def test_rows_that_see_no_key(self):
        """out 0, lse = sink, finite gradients; such a row hands its LSE cotangent to the sink whole."""
        rng = self._rng("masked")
        dt = self.dtypes[0]
        q, _ = rand(rng, (1, 20, 2, 16), dt)
        k, _ = rand(rng, (1, 8, 2, 16), dt)
        v, _ = rand(rng, (1, 8, 2, 16), dt)
        sinks = jnp.asarray([0.5, -3.0], jnp.float32)
        self._require(fa3jax.flash_mha, q, k, v, is_causal=True, sinks=sinks, grad=True)

        def f(q, k, v, s):
            return fa3jax.flash_mha(q, k, v, is_causal=True, sinks=s, return_softmax_lse=True, backend=self.backend)

        out, lse = f(q, k, v, sinks)
        # causal, lq=20 > lk=8: rows 0..11 see nothing
        assert np.all(np.asarray(out[:, :12], np.float32) == 0)
        np.testing.assert_array_equal(np.asarray(lse[0, :, :12]), np.broadcast_to(np.asarray(sinks)[:, None], (2, 12)))
        mask = jnp.zeros((1, 2, 20), jnp.float32).at[:, :, :12].set(1.0)
        g = jax.grad(lambda *a: jnp.sum(f(*a)[1] * mask), argnums=(0, 1, 2, 3))(q, k, v, sinks)
        for x in g:
            assert np.all(np.isfinite(np.asarray(x, np.float32)))
        np.testing.assert_allclose(np.asarray(g[3]), [12.0, 12.0])
        assert np.all(np.asarray(g[0], np.float32) == 0)

    # ------------------------------------------------------------------------------------------ varlen
    @pytest.mark.parametrize("causal,window,softcap,hq,hk,d,dv,sinks_on", [
        (False, (-1, -1), 0.0, 2, 2, 16, 16, True), (True, (-1, -1), 0.0, 4, 2, 16, 16, True),
        (False, (6, 3), 4.0, 2, 1, 16, 16, True), (True, (-1, -1), 0.0, 2, 1, 192, 128, True),
        (False, (-1, -1), 0.0, 4, 2, 128, 64, False)])
    @pytest.mark.parametrize("seqused", [False, True])
    def test_varlen(self, causal, window, softcap, hq, hk, d, dv, sinks_on, seqused):
        dt = self.dtypes[0]
        rng = self._rng("varlen", causal, window, softcap, hq, hk, d, dv, sinks_on, seqused)
        lens_q, lens_k = [5, 0, 17, 1, 9], [7, 3, 12, 0, 9]
        cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
        tq, tk = int(cu_q[-1]) + 3, int(cu_k[-1])  # 3 trailing q rows belong to no sequence
        q, q64 = rand(rng, (tq, hq, d), dt)
        k, k64 = rand(rng, (tk, hk, d), dt)
        v, v64 = rand(rng, (tk, hk, dv), dt)
        do, do64 = rand(rng, (tq, hq, dv), dt)
        dl64 = rng.standard_normal((hq, tq))
        sinks = _sinks(rng, hq) if sinks_on else None
        used = np.array([4, 3, 12, 0, 2], np.int32) if seqused else None
        kw = dict(is_causal=causal, window_size=window, softcap=softcap, return_softmax_lse=True)
        pos = (jnp.asarray(cu_q), jnp.asarray(cu_k), None if used is None else jnp.asarray(used),
               max(lens_q), max(lens_k))
        self._require(fa3jax.flash_mha_varlen, q, k, v, *pos, sinks=sinks, grad=True, **kw)
        rkw = dict(scale=1 / np.sqrt(d), window=masking.normalize_window(window, causal), softcap=softcap,
                   dout=do64, dlse=dl64, sinks=None if sinks is None else np.asarray(sinks, np.float64))
        ref = reference.varlen(q64, k64, v64, cu_q, cu_k, used, **rkw)
        low = reference.varlen(q64, k64, v64, cu_q, cu_k, used, impl=functools.partial(naive_lowp, dtype=dt), **rkw)

        def f(q, k, v, sinks):
            return fa3jax.flash_mha_varlen(q, k, v, *pos, sinks=sinks, backend=self.backend, **kw)

        (out, lse), pull = jax.vjp(jax.jit(f), q, k, v, sinks)
        check("out", out, ref[0], low[0], dt)
        check("lse", lse, ref[1], low[1], dt)
        grads = pull((do, jnp.asarray(dl64, jnp.float32)))
        for name, got, r, lo in zip(("dq", "dk", "dv", "dsinks"), grads, ref[2:], low[2:]):
            check(name, got, r, lo, dt)

    # ------------------------------------------------------------------------------------------ kvcache
    @pytest.mark.parametrize("num_splits", [1, 3, 0])
    @pytest.mark.parametrize("causal,window,softcap", [(True, (-1, -1), 0.0), (False, (5, -1), 3.0)])
    def test_kvcache(self, num_splits, causal, window, softcap):
        dt = self.dtypes[0]
        rng = self._rng("kv", num_splits, causal, window, softcap)
        b, lq, hq, hk, d, cap, new = 3, 2, 4, 2, 32, 64, 2
        q, q64 = rand(rng, (b, lq, hq, d), dt)
        kc, kc64 = rand(rng, (b, cap, hk, d), dt)
        vc, vc64 = rand(rng, (b, cap, hk, d), dt)
        kn, kn64 = rand(rng, (b, new, hk, d), dt)
        vn, vn64 = rand(rng, (b, new, hk, d), dt)
        seqlens = np.array([40, 0, 61], np.int32)  # row 1: only the new keys
        sinks = _sinks(rng, hq)
        args = (q, kc, vc, kn, vn, jnp.asarray(seqlens))
        kw = dict(is_causal=causal, window_size=window, softcap=softcap, num_splits=num_splits, sinks=sinks,
                  return_softmax_lse=True)
        self._require(fa3jax.flash_mha_with_kvcache, *args, **kw)
        keys, vals = kc64.copy(), vc64.copy()
        for i in range(b):
            keys[i, seqlens[i]:seqlens[i] + new] = kn64[i]
            vals[i, seqlens[i]:seqlens[i] + new] = vn64[i]
        rkw = dict(scale=1 / np.sqrt(d), window=masking.normalize_window(window, causal), softcap=softcap,
                   sinks=np.asarray(sinks, np.float64))
        ref = reference.kvcache(q64, keys, vals, seqlens + new, **rkw)
        low = reference.kvcache(q64, keys, vals, seqlens + new, impl=functools.partial(naive_lowp, dtype=dt), **rkw)
        out, lse = fa3jax.flash_mha_with_kvcache(*args, backend=self.backend, **kw)
        check("out", out, ref[0], low[0], dt)
        check("lse", lse, ref[1], low[1], dt)

    # ------------------------------------------------------------------------------------------ vmap
    def test_vmap_with_sinks(self):
        """Unbatched sinks fold into one launch (dense: batch axis; varlen: heads axis, sinks tiled); batched
        sinks run per example. Every way equals the loop."""
        dt = "float32"
        rng = self._rng("vmap")
        V, b, l, hq, hk, d = 3, 2, 11, 4, 2, 16
        q, _ = rand(rng, (V, b, l, hq, d), dt)
        k, _ = rand(rng, (V, b, l, hk, d), dt)
        v, _ = rand(rng, (V, b, l, hk, d), dt)
        sinks = jnp.asarray(rng.standard_normal((V, hq)), jnp.float32)
        self._require(fa3jax.flash_mha, q[0], k[0], v[0], sinks=sinks[0], grad=True)
        dense = lambda q, k, v, s: fa3jax.flash_mha(q, k, v, is_causal=True, sinks=s, backend=self.backend)
        cu = jnp.asarray([0, 4, 11], jnp.int32)
        var = lambda q, k, v, s: fa3jax.flash_mha_varlen(q, k, v, cu, is_causal=True, sinks=s, backend=self.backend)
        for fn, flat in ((dense, False), (var, True)):
            qq, kk, vv = (x[:, 0] if flat else x for x in (q, k, v))
            for s_axis in (None, 0):
                s = sinks[0] if s_axis is None else sinks
                loss = lambda q, k, v, s: jnp.sum(jax.vmap(fn, in_axes=(0, 0, 0, s_axis))(q, k, v, s) ** 2)
                got = jax.grad(loss, argnums=(0, 3))(qq, kk, vv, s)
                for i in range(V):
                    si = s if s_axis is None else s[i]
                    gi = jax.grad(lambda q, s: jnp.sum(fn(q, kk[i], vv[i], s) ** 2), argnums=(0, 1))(qq[i], si)
                    np.testing.assert_allclose(np.asarray(got[0][i]), np.asarray(gi[0]), rtol=1e-5, atol=1e-5)
                    if s_axis == 0:
                        np.testing.assert_allclose(np.asarray(got[1][i]), np.asarray(gi[1]), rtol=1e-5, atol=1e-5)
                if s_axis is None:  # the unbatched sinks' cotangent sums the examples'
                    want = sum(jax.grad(lambda s: jnp.sum(fn(qq[i], kk[i], vv[i], s) ** 2))(s) for i in range(V))
                    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want), rtol=1e-4, atol=1e-5)


class TestSinksMlaXla(SinksMlaSuite):
    backend = "xla"


class TestSinksMlaTriton(SinksMlaSuite):
    """The Triton kernels (sinks everywhere, MLA dense/varlen); on a GPU machine. Where the backend is unavailable
    (no GPU) every case skips through supports(), as do the float32 cases (Triton serves fp16/bf16 only). CPU
    coverage of the same kernels: tests/test_triton_interpret_sinks_mla.py."""
    backend = "triton"


# ---------------------------------------------------------------------------------------------- validation
def _qkv(d=16, dv=16, hq=4, hk=2, dtype=jnp.float32):
    return (jnp.zeros((1, 8, hq, d), dtype), jnp.zeros((1, 8, hk, d), dtype), jnp.zeros((1, 8, hk, dv), dtype))


@pytest.mark.parametrize("sinks,exc,match", [
    ([0.0] * 4, TypeError, "sinks must be a float32 array"),
    (np.zeros(4, np.float64), TypeError, "sinks.dtype=float64"),
    (jnp.zeros(4, jnp.bfloat16), TypeError, "sinks.dtype=bfloat16"),
    (jnp.zeros(3, jnp.float32), ValueError, r"sinks.shape=\(3,\)"),
    (jnp.zeros((1, 4), jnp.float32), ValueError, r"sinks.shape=\(1, 4\)"),
])
def test_sinks_validation(sinks, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        fa3jax.flash_mha(q, k, v, sinks=sinks)
    with pytest.raises(exc, match=match):
        fa3jax.flash_mha_varlen(q[0], k[0], v[0], jnp.asarray([0, 8], jnp.int32), sinks=sinks)
    with pytest.raises(exc, match=match):
        fa3jax.flash_mha_with_kvcache(q, k, v, sinks=sinks)


def test_value_head_dim_validation():
    q, k, v = _qkv(d=64, dv=128)
    with pytest.raises(ValueError, match=r"d_v <= d_qk.*v.shape=\(1, 8, 2, 128\)"):
        fa3jax.flash_mha(q, k, v)
    q, k, v = _qkv(d=64, dv=32)
    with pytest.raises(ValueError, match="v_cache's head dim"):
        fa3jax.flash_mha_with_kvcache(q, k, v)
    with pytest.raises(ValueError, match="same shape but for the head dim"):
        fa3jax.flash_mha(q, k, v[:, :4])
    assert validation.validate_dense(q, k, v, softmax_scale=None, is_causal=False, window_size=(-1, -1),
                                     softcap=0.0, return_softmax_lse=False, deterministic=False).head_dim_v == 32


def _fake_cuda_build(monkeypatch, features, mla=()):
    """The cuda backend's checks as if an extension with bf16 d=16 kernels, the MLA forwards ``mla`` ((dtype, d,
    dv) triples) and ``features`` were loaded."""
    import fa3jax.backends.cuda as cuda_mod

    monkeypatch.setattr(cuda_mod, "_load_extension", lambda: (object(), None))
    monkeypatch.setattr(cuda_mod, "build_info", lambda: {"instances": [("bf16", 16)], "bwd_instances": [("bf16", 16)],
                                                         "mla_instances": list(mla), "features": list(features)})


_MLA_KW = dict(softmax_scale=None, is_causal=True, window_size=(-1, -1), softcap=0.0, return_softmax_lse=False)


def _mla_specs(d=192, dv=128, dtype=jnp.bfloat16, **kw):
    """A dense and a varlen spec with v's head dim below q/k's."""
    q, k, v = _qkv(d=d, dv=dv, dtype=dtype)
    kw = {**_MLA_KW, "deterministic": False, **kw}
    return (validation.validate_dense(q, k, v, **kw),
            validation.validate_varlen(q[0], k[0], v[0], jnp.asarray([0, 3, 8], jnp.int32), None, None, -1, -1,
                                       **kw))


def test_cuda_mla_forward_where_built_backward_refused():
    """The cuda forward serves MLA (dense, varlen, with sinks) where the build has that (dtype, d, dv) kernel; other
    pairs, other dtypes and builds that predate MLA are refused naming MLA; the backward always refuses MLA with
    its reason (the registry composes another backend's). Checked without a GPU: the extension is faked."""
    spec, vspec = _mla_specs()
    sspec, _ = _mla_specs(sinks=jnp.zeros(4, jnp.float32))
    with pytest.MonkeyPatch.context() as mp:
        _fake_cuda_build(mp, ["sinks", "varlen", "mla"], mla=[("bf16", 192, 128)])
        for s in (spec, vspec, sspec):
            CudaBackend().check_forward(s)
            with pytest.raises(NotImplementedError, match="backward kernel|no MLA variant"):
                CudaBackend().check_backward(s)
        with pytest.raises(NotImplementedError, match="no MLA variant"):
            CudaBackend().check_backward(spec)
        with pytest.raises(NotImplementedError, match=r"no MLA forward kernel.*head_dim=128, head_dim_v=64.*192"):
            CudaBackend().check_forward(_mla_specs(128, 64)[0])
        with pytest.raises(NotImplementedError, match=r"no MLA forward kernel.*float16"):
            CudaBackend().check_forward(_mla_specs(dtype=jnp.float16)[0])
    with pytest.MonkeyPatch.context() as mp:  # an extension built before MLA (no "mla" feature, no mla_instances)
        _fake_cuda_build(mp, ["sinks", "varlen"])
        with pytest.raises(NotImplementedError, match=r"predates MLA .*; rebuild"):
            CudaBackend().check_forward(spec)


def test_cuda_mla_forward_composes_another_backward(monkeypatch):
    """An MLA call planned as if a Hopper GPU with the MLA kernels were here: the forward is cuda's, the backward
    the next backend's that serves MLA (triton where usable, else xla; cudnn refuses MLA) on the cuda forward's
    LSE, with backend='cuda' and 'auto', dense and varlen, deterministic or not."""
    from fa3jax import registry

    real = registry.availability
    monkeypatch.setattr(registry, "availability", lambda n: (True, "") if n == "cuda" else real(n))
    _fake_cuda_build(monkeypatch, ["sinks", "varlen", "mla"], mla=[("bf16", 192, 128)])
    want = "triton" if real("triton")[0] else "xla"
    for det in (False, True):
        for spec in _mla_specs(deterministic=det):
            for requested in ("cuda", "auto"):
                plan = registry.plan(spec, requested)
                assert (plan.forward, plan.backward) == ("cuda", want), plan
                assert any(f"backward by {want} on the cuda forward's LSE" in n for n in plan.notes), plan.notes


def test_cuda_serves_dense_sinks():
    """The cuda forward folds the sinks in and its backward needs only the sink-inclusive LSE: both checks accept a
    dense call with sinks (here without a GPU: the extension is faked); the varlen forward and backward with sinks
    are served too, and an extension built before either refuses it with the fix."""
    kw = dict(softmax_scale=None, is_causal=True, window_size=(-1, -1), softcap=0.0, return_softmax_lse=False,
              deterministic=False)
    q, k, v = _qkv(dtype=jnp.bfloat16)
    spec = validation.validate_dense(q, k, v, sinks=jnp.zeros(4, jnp.float32), **kw)
    vspec = validation.validate_varlen(q[0], k[0], v[0], jnp.asarray([0, 8], jnp.int32), None, None, -1, -1,
                                       sinks=jnp.zeros(4, jnp.float32), **kw)
    with pytest.MonkeyPatch.context() as mp:
        _fake_cuda_build(mp, ["sinks", "varlen", "varlen_bwd"])
        CudaBackend().check_forward(spec)
        CudaBackend().check_backward(spec)
        CudaBackend().check_forward(vspec)
        CudaBackend().check_backward(vspec)
    with pytest.MonkeyPatch.context() as mp:  # an extension built before the varlen backward target
        _fake_cuda_build(mp, ["sinks", "varlen"])
        CudaBackend().check_forward(vspec)
        with pytest.raises(NotImplementedError, match="predates the varlen backward; rebuild"):
            CudaBackend().check_backward(vspec)
    with pytest.MonkeyPatch.context() as mp:  # an extension built before the varlen target
        _fake_cuda_build(mp, ["sinks"])
        with pytest.raises(NotImplementedError, match="predates the varlen forward; rebuild"):
            CudaBackend().check_forward(vspec)
    with pytest.MonkeyPatch.context() as mp:  # an extension built before the sinks target: refused, with the fix
        _fake_cuda_build(mp, [])
        with pytest.raises(NotImplementedError, match="predates attention sinks; rebuild"):
            CudaBackend().check_forward(spec)
        CudaBackend().check_forward(spec.replace(has_sinks=False))
        CudaBackend().check_backward(spec)


def test_cuda_varlen_plans(monkeypatch):
    """A varlen call planned as if a Hopper GPU with the varlen extension were here: the forward is cuda's; with the
    varlen backward built, the backward is cuda's too (under 'auto' with deterministic=True triton's, as for dense
    calls); on an extension built before it, the next backend's that serves varlen (triton where usable, else xla)
    on the cuda forward's LSE. The FFI attributes are typed and the max lengths capped at the totals."""
    from fa3jax import registry
    from fa3jax.backends.cuda import targets

    real = registry.availability
    monkeypatch.setattr(registry, "availability", lambda n: (True, "") if n == "cuda" else real(n))
    _fake_cuda_build(monkeypatch, ["sinks", "varlen"])
    q, k, v = _qkv(dtype=jnp.bfloat16)
    cu = jnp.asarray([0, 3, 8], jnp.int32)
    kw = dict(softmax_scale=None, is_causal=True, window_size=(-1, -1), softcap=0.0, return_softmax_lse=False)
    want = "triton" if real("triton")[0] else "xla"
    for det in (False, True):
        spec = validation.validate_varlen(q[0], k[0], v[0], cu, None, None, 1000, -1, deterministic=det, **kw)
        for requested in ("cuda", "auto"):
            plan = registry.plan(spec, requested)
            assert (plan.forward, plan.backward) == ("cuda", want), plan
            assert any(f"backward by {want} on the cuda forward's LSE" in n and "predates the varlen backward" in n
                       for n in plan.notes), plan.notes
    _fake_cuda_build(monkeypatch, ["sinks", "varlen", "varlen_bwd"])
    for det in (False, True):
        spec = validation.validate_varlen(q[0], k[0], v[0], cu, None, None, 1000, -1, deterministic=det, **kw)
        assert registry.plan(spec, "cuda").backward == "cuda"
        assert registry.plan(spec, "auto").backward == ("triton" if det and want == "triton" else "cuda")
    battrs = targets.varlen_bwd_attributes(spec)
    assert battrs[targets.ATTR_DETERMINISTIC] == 1
    assert battrs[targets.ATTR_MAX_SEQLEN_K] == min(spec.varlen.max_seqlen_k, spec.seqlen_k)
    assert battrs[targets.ATTR_HAS_SEQUSED_K] == 0 and targets.ATTR_HAS_SINKS not in battrs
    attrs = targets.varlen_fwd_attributes(spec)
    assert attrs[targets.ATTR_MAX_SEQLEN_Q] == np.int32(8) and attrs[targets.ATTR_MAX_SEQLEN_Q].dtype == np.int32
    assert attrs[targets.ATTR_HAS_SEQUSED_K] == 0 and attrs[targets.ATTR_HAS_SINKS] == 0


def test_triton_serves_sinks_and_mla_but_not_mla_kvcache():
    """Triton's capability checks accept sinks (dense, varlen, KV cache) and MLA (dense, varlen, fwd and bwd), and
    refuse MLA on the KV cache with a reason (validation refuses it before any backend anyway)."""
    kw = dict(softmax_scale=None, is_causal=True, window_size=(-1, -1), softcap=0.0, return_softmax_lse=False,
              deterministic=False)
    be = TritonBackend()
    q, k, v = _qkv(d=192, dv=128, dtype=jnp.bfloat16)
    spec = validation.validate_dense(q, k, v, sinks=jnp.zeros(4, jnp.float32), **kw)
    assert spec.has_sinks and spec.head_dim_v == 128
    be.check_forward(spec)
    be.check_backward(spec)
    vspec = validation.validate_varlen(q[0], k[0], v[0], jnp.asarray([0, 8], jnp.int32), None, None, -1, -1,
                                       sinks=jnp.zeros(4, jnp.float32), **kw)
    be.check_forward(vspec)
    be.check_backward(vspec)
    kv = KVCacheSpec(capacity=64, cache_batch=2, paged=False, page_size=0, pages_per_seq=0, seqlen_new=0,
                     rotary_dim=0, rotary_interleaved=False, has_cache_batch_idx=False, has_cache_leftpad=False,
                     num_splits=0, return_updated_cache=False)
    kspec = spec.replace(mode="kvcache", batch=2, seqlen_q=1, seqlen_k=64, head_dim=128, head_dim_v=128, kvcache=kv)
    be.check_forward(kspec)
    with pytest.raises(NotImplementedError, match="MLA"):
        be.check_forward(kspec.replace(head_dim_v=8))


def test_auto_falls_back_to_xla_for_sinks_and_mla():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    s = fa3jax.supports(fa3jax.flash_mha, q, k, v, sinks=jnp.zeros(4, jnp.float32))
    assert s.supported and s.forward == "xla" and s.backward == "xla"
    q, k, v = _qkv(d=192, dv=128, dtype=jnp.bfloat16)
    assert fa3jax.supports(fa3jax.flash_mha, q, k, v).forward == "xla"

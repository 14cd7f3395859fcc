"""The one backend-parametrized test suite. A backend's test file subclasses :class:`AttentionSuite`, sets
``backend`` and the ``supports_*`` flags, and inherits every test; unsupported features are skipped, not
silently passed."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import masking, reference

from .helpers import check, naive_lowp, rand, seeded_rng

DENSE_CASES = [
    # (b, lq, lk, hq, hk, d, causal, window, softcap)
    (2, 33, 33, 2, 2, 32, False, (-1, -1), 0.0),
    (2, 33, 33, 4, 2, 32, True, (-1, -1), 0.0),
    (1, 40, 24, 2, 1, 16, True, (-1, -1), 0.0),  # lq > lk under causal: fully masked rows
    (1, 24, 70, 3, 1, 16, True, (-1, -1), 0.0),  # lq < lk: bottom-right alignment
    (2, 50, 50, 2, 2, 32, False, (8, 4), 0.0),
    (1, 45, 60, 2, 2, 16, False, (5, -1), 0.0),
    (1, 45, 30, 2, 2, 16, True, (3, -1), 0.0),
    (2, 30, 30, 4, 1, 24, False, (-1, -1), 5.0),
    (1, 64, 64, 2, 2, 64, True, (-1, -1), 3.0),
]


def _case_id(c):
    b, lq, lk, hq, hk, d, causal, window, cap = c
    return f"b{b}-q{lq}-k{lk}-h{hq}x{hk}-d{d}-{'causal' if causal else 'full'}-w{window[0]}_{window[1]}-cap{cap:g}"


class AttentionSuite:
    backend = "xla"
    dtypes = ("bfloat16", "float16", "float32")
    head_dims = None  # None: the cases' own head dims; else a list to substitute
    supports_grad = True
    supports_varlen = True
    supports_kvcache = True
    supports_paged = True
    supports_vmap = True

    # --------------------------------------------------------------------------------------- helpers
    def _skip_unless(self, flag, what):
        if not flag:
            pytest.skip(f"{self.backend} does not support {what}")

    def _d(self, d):
        """The case's head dim, or the smallest supported one above it for backends built for a fixed list."""
        if self.head_dims is None:
            return d
        return min((h for h in self.head_dims if h >= d), default=max(self.head_dims))

    def _rng(self, *salt):
        return seeded_rng(self.backend, *salt)

    # --------------------------------------------------------------------------------------- dense
    @pytest.mark.parametrize("case", DENSE_CASES, ids=_case_id)
    @pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
    def test_dense_forward_and_grads(self, case, dtype):
        if dtype not in self.dtypes:
            pytest.skip(f"{self.backend} does not support {dtype}")
        b, lq, lk, hq, hk, d, causal, window, cap = case
        self._check_dense(b, lq, lk, hq, hk, self._d(d), causal, window, cap, dtype)

    def _check_dense(self, b, lq, lk, hq, hk, d, causal, window, cap, dtype):
        """flash_mha forward, LSE and (when supported) grads against the float64 reference."""
        rng = self._rng("dense", b, lq, lk, hq, hk, d, causal, window, cap, dtype)
        q, q64 = rand(rng, (b, lq, hq, d), dtype)
        k, k64 = rand(rng, (b, lk, hk, d), dtype)
        v, v64 = rand(rng, (b, lk, hk, d), dtype)
        do, do64 = rand(rng, (b, lq, hq, d), dtype)
        dl64 = rng.standard_normal((b, hq, lq))
        scale = 0.7 / np.sqrt(d)
        win = masking.normalize_window(window, causal)
        kw = dict(scale=scale, window=win, softcap=cap, dout=do64, dlse=dl64)
        ref = reference.dense(q64, k64, v64, **kw)
        low = reference.dense(q64, k64, v64, impl=functools.partial(naive_lowp, dtype=dtype), **kw)

        def f(q, k, v):
            return fa3jax.flash_mha(q, k, v, softmax_scale=scale, is_causal=causal, window_size=window, softcap=cap,
                                    return_softmax_lse=True, backend=self.backend)

        (out, lse), pull = jax.vjp(jax.jit(f), q, k, v)
        check("out", out, ref[0], low[0], dtype)
        check("lse", lse, ref[1], low[1], dtype)
        if not self.supports_grad:
            return
        dq, dk, dv = pull((do, jnp.asarray(dl64, jnp.float32)))
        for name, got, r, lo in zip(("dq", "dk", "dv"), (dq, dk, dv), ref[2:], low[2:]):
            check(name, got, r, lo, dtype)

    def test_fully_masked_rows_are_zero_with_finite_grads(self):
        rng = self._rng("masked")
        d = self._d(16)
        q, _ = rand(rng, (1, 20, 2, d), self.dtypes[0])
        k, _ = rand(rng, (1, 8, 2, d), self.dtypes[0])
        v, _ = rand(rng, (1, 8, 2, d), self.dtypes[0])
        out, lse = fa3jax.flash_mha(q, k, v, is_causal=True, return_softmax_lse=True, backend=self.backend)
        # causal, lq=20 > lk=8, bottom-right: query i sees keys j <= i - 12, so rows 0..11 see nothing
        assert np.all(np.asarray(out[:, :12], np.float32) == 0)
        assert np.all(np.isneginf(np.asarray(lse[:, :, :12])))
        assert np.all(np.isfinite(np.asarray(lse[:, :, 12:])))
        if self.supports_grad:
            g = jax.grad(lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=True, backend=self.backend)
                         .astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)
            for x in g:
                assert np.all(np.isfinite(np.asarray(x, np.float32)))
            assert np.all(np.asarray(g[0][:, :12], np.float32) == 0)

    def test_deterministic_grads_are_bitwise_repeatable(self):
        self._skip_unless(self.supports_grad, "gradients")
        rng = self._rng("det")
        dt = self.dtypes[0]
        d = self._d(32)
        q, _ = rand(rng, (2, 70, 4, d), dt)
        k, _ = rand(rng, (2, 70, 2, d), dt)
        v, _ = rand(rng, (2, 70, 2, d), dt)
        f = jax.jit(jax.grad(lambda q, k, v: fa3jax.flash_mha(q, k, v, is_causal=True, deterministic=True,
                                                              backend=self.backend).astype(jnp.float32).sum(),
                             argnums=(0, 1, 2)))
        a, b = f(q, k, v), f(q, k, v)
        for x, y in zip(a, b):
            assert np.array_equal(np.asarray(x), np.asarray(y))

    def test_softmax_scale_numpy_scalar(self):
        rng = self._rng("scale")
        dt = self.dtypes[0]
        d = self._d(16)
        q, q64 = rand(rng, (1, 17, 2, d), dt)
        k, k64 = rand(rng, (1, 17, 2, d), dt)
        v, v64 = rand(rng, (1, 17, 2, d), dt)
        out = fa3jax.flash_mha(q, k, v, softmax_scale=np.float32(0.3), backend=self.backend)
        win = masking.normalize_window((-1, -1), False)
        ref = reference.dense(q64, k64, v64, scale=0.3, window=win)
        low = reference.dense(q64, k64, v64, scale=0.3, window=win, impl=functools.partial(naive_lowp, dtype=dt))
        check("out", out, ref[0], low[0], dt)

    # --------------------------------------------------------------------------------------- varlen
    @pytest.mark.parametrize("causal,window,softcap,hq,hk", [
        (False, (-1, -1), 0.0, 2, 2), (True, (-1, -1), 0.0, 4, 2), (False, (6, 3), 4.0, 2, 1), (True, (10, -1), 0.0, 2, 2)])
    @pytest.mark.parametrize("seqused", [False, True])
    def test_varlen(self, causal, window, softcap, hq, hk, seqused):
        self._skip_unless(self.supports_varlen, "varlen")
        dt = self.dtypes[0]
        rng = self._rng("varlen", causal, window, softcap, hq, hk, seqused)
        lens_q = [5, 0, 17, 1, 9]  # an empty sequence in the middle
        lens_k = [7, 3, 12, 0, 9]
        cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
        tq, tk, d = int(cu_q[-1]) + 3, int(cu_k[-1]), self._d(16)  # 3 trailing q rows belong to no sequence
        q, q64 = rand(rng, (tq, hq, d), dt)
        k, k64 = rand(rng, (tk, hk, d), dt)
        v, v64 = rand(rng, (tk, hk, d), dt)
        do, do64 = rand(rng, (tq, hq, d), dt)
        used = np.array([4, 3, 12, 0, 2], np.int32) if seqused else None
        win = masking.normalize_window(window, causal)
        kw = dict(scale=1 / np.sqrt(d), window=win, softcap=softcap, dout=do64)
        ref = reference.varlen(q64, k64, v64, cu_q, cu_k, used, **kw)
        low = reference.varlen(q64, k64, v64, cu_q, cu_k, used, impl=functools.partial(naive_lowp, dtype=dt), **kw)

        def f(q, k, v):
            return fa3jax.flash_mha_varlen(q, k, v, jnp.asarray(cu_q), jnp.asarray(cu_k),
                                           None if used is None else jnp.asarray(used), max(lens_q), max(lens_k),
                                           is_causal=causal, window_size=window, softcap=softcap,
                                           return_softmax_lse=True, backend=self.backend)

        (out, lse), pull = jax.vjp(jax.jit(f), q, k, v)
        check("out", out, ref[0], low[0], dt)
        check("lse", lse, ref[1], low[1], dt)
        if self.supports_grad:
            grads = pull((do, jnp.zeros_like(lse)))
            for name, got, r, lo in zip(("dq", "dk", "dv"), grads, ref[2:], low[2:]):
                check(name, got, r, lo, dt)

    # --------------------------------------------------------------------------------------- kvcache
    def _kvcache_case(self, *, paged, new, leftpad, batch_idx, rotary, interleaved=True, causal=True,
                      window=(-1, -1), num_splits=1, lq=3):
        self._skip_unless(self.supports_kvcache, "kvcache")
        if paged:
            self._skip_unless(self.supports_paged, "paged kvcache")
        dt = self.dtypes[0]
        rng = self._rng("kv", paged, new, leftpad, batch_idx, rotary, interleaved, causal, window, lq)
        b, hq, hk, d, cap = 3, 4, 2, 32, 64
        page = 16
        q, _ = rand(rng, (b, lq, hq, d), dt)
        cache_rows = 5 if batch_idx else b
        bidx = np.array([4, 0, 2], np.int32) if batch_idx else None
        if paged:  # with batch_idx: one page-table row per cache slot, sequence i reads row bidx[i]
            npages = cache_rows * cap // page + 2
            kc, _ = rand(rng, (npages, page, hk, d), dt)
            vc, _ = rand(rng, (npages, page, hk, d), dt)
            pt = rng.permutation(npages)[: cache_rows * (cap // page)].reshape(cache_rows, cap // page).astype(np.int32)
            pt_used = pt if bidx is None else pt[bidx]
        else:
            kc, _ = rand(rng, (cache_rows, cap, hk, d), dt)
            vc, _ = rand(rng, (cache_rows, cap, hk, d), dt)
            pt = None
        snew = 4 if new else 0
        kn = vn = None
        if new:
            kn, _ = rand(rng, (b, snew, hk, d), dt)
            vn, _ = rand(rng, (b, snew, hk, d), dt)
        seqlens = np.array([20, 0, 45], np.int32)
        lp = np.array([3, 0, 10], np.int32) if leftpad else None
        cos = sin = None
        if rotary:
            rd = 16
            ang = rng.uniform(0, 2 * np.pi, (cap, rd // 2))
            cos, sin = jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)
        scale = 1 / np.sqrt(d)
        win = masking.normalize_window(window, causal)

        res = jax.jit(lambda q, kc, vc, kn, vn: fa3jax.flash_mha_with_kvcache(
            q, kc, vc, kn, vn, cache_seqlens=jnp.asarray(seqlens), cache_batch_idx=None if bidx is None else jnp.asarray(bidx),
            cache_leftpad=None if lp is None else jnp.asarray(lp), page_table=None if pt is None else jnp.asarray(pt),
            rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved, softmax_scale=scale, is_causal=causal,
            window_size=window, num_splits=num_splits, return_softmax_lse=True, return_updated_cache=True,
            backend=self.backend))(q, kc, vc, kn, vn)
        out, lse, (kc2, vc2) = res

        # expected: materialize each sequence's cache in float64, apply rotary, write new keys
        f64 = lambda x: np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
        q64, kc64, vc64 = f64(q), f64(kc), f64(vc)
        if paged:
            keys, vals = kc64[pt_used].reshape(b, cap, hk, d), vc64[pt_used].reshape(b, cap, hk, d)
        else:
            rows = np.arange(b) if bidx is None else bidx
            keys, vals = kc64[rows].copy(), vc64[rows].copy()
        if rotary:
            from fa3jax.kvcache import apply_rotary
            qpos = seqlens[:, None] + (np.arange(lq)[None] if (causal or window != (-1, -1)) else 0 * np.arange(lq)[None])
            q64 = f64(apply_rotary(q, cos, sin, jnp.asarray(qpos, jnp.int32), interleaved))
        if new:
            kn_r = kn
            if rotary:
                kn_r = apply_rotary(kn, cos, sin, jnp.asarray(seqlens[:, None] + np.arange(snew)[None], jnp.int32), interleaved)
            for i in range(b):
                keys[i, seqlens[i]:seqlens[i] + snew] = f64(kn_r)[i]
                vals[i, seqlens[i]:seqlens[i] + snew] = f64(vn)[i]
        total = seqlens + snew
        ref = reference.kvcache(q64, keys, vals, total, lp, scale=scale, window=win)
        low = reference.kvcache(q64, keys, vals, total, lp, scale=scale, window=win,
                                impl=functools.partial(naive_lowp, dtype=dt))
        check("out", out, ref[0], low[0], dt)
        check("lse", lse, ref[1], low[1], dt)
        # updated caches: new keys written, everything else untouched
        if paged:
            got = np.asarray(kc2.astype(jnp.float32))[pt_used].reshape(b, cap, hk, d)
        else:
            rows = np.arange(b) if bidx is None else bidx
            got = np.asarray(kc2.astype(jnp.float32))[rows]
        if rotary:  # rotated new keys: our eager apply_rotary vs the jitted call's fused one may differ by 1 ulp
            np.testing.assert_allclose(got, keys.astype(np.float32), rtol=float(jnp.finfo(dt).eps), atol=0)
        else:
            np.testing.assert_array_equal(got, keys.astype(np.float32))
        return out

    @pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
    @pytest.mark.parametrize("new", [False, True], ids=["no-new", "new-kv"])
    def test_kvcache_basic(self, paged, new):
        self._kvcache_case(paged=paged, new=new, leftpad=False, batch_idx=False, rotary=False)

    @pytest.mark.parametrize("interleaved", [True, False])
    @pytest.mark.parametrize("causal", [True, False])
    def test_kvcache_rotary(self, interleaved, causal):
        self._kvcache_case(paged=False, new=True, leftpad=False, batch_idx=False, rotary=True,
                           interleaved=interleaved, causal=causal)

    def test_kvcache_leftpad_and_batch_idx(self):
        self._kvcache_case(paged=False, new=True, leftpad=True, batch_idx=True, rotary=False)

    def test_kvcache_paged_with_batch_idx(self):
        self._kvcache_case(paged=True, new=True, leftpad=False, batch_idx=True, rotary=False)

    def test_kvcache_window_decode(self):
        self._kvcache_case(paged=True, new=True, leftpad=False, batch_idx=False, rotary=False, causal=False,
                           window=(7, 0), lq=1)

    def test_kvcache_num_splits_agree(self):
        outs = [self._kvcache_case(paged=False, new=True, leftpad=False, batch_idx=False, rotary=False,
                                   num_splits=s) for s in (0, 1, 3, 8)]
        for o in outs[1:]:
            np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(outs[0], np.float32), atol=2e-2, rtol=0)

    def test_kvcache_inputs_not_modified(self):
        self._skip_unless(self.supports_kvcache, "kvcache")
        dt = self.dtypes[0]
        rng = self._rng("nomod")
        kc, _ = rand(rng, (2, 32, 1, 16), dt)
        vc, _ = rand(rng, (2, 32, 1, 16), dt)
        before = np.asarray(kc.astype(jnp.float32)).copy()
        q, _ = rand(rng, (2, 1, 2, 16), dt)
        kn, _ = rand(rng, (2, 1, 1, 16), dt)
        fa3jax.flash_mha_with_kvcache(q, kc, vc, kn, kn, cache_seqlens=5, return_updated_cache=True,
                                      backend=self.backend)
        np.testing.assert_array_equal(np.asarray(kc.astype(jnp.float32)), before)

    def test_kvcache_hostile_indices_stay_in_bounds(self):
        """Out-of-range page entries, batch indices and lengths: documented clamping, finite outputs."""
        self._skip_unless(self.supports_paged, "paged kvcache")
        dt = self.dtypes[0]
        rng = self._rng("hostile")
        kc, kc64 = rand(rng, (4, 16, 1, 16), dt)
        vc, vc64 = rand(rng, (4, 16, 1, 16), dt)
        q, q64 = rand(rng, (2, 1, 1, 16), dt)
        pt = jnp.asarray([[1, 99], [-5, 2]], jnp.int32)  # 99 and -5 are out of range: those pages are masked
        # num_splits=0: the automatic schedule, which subclasses may switch (e.g. the Triton stream-K tests)
        out, lse = fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=jnp.asarray([1000, 20], jnp.int32),
                                                 page_table=pt, return_softmax_lse=True, num_splits=0,
                                                 backend=self.backend)
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        # row 0: cache_seqlens clamps to capacity 32; only page 1 (positions 0..15) is valid
        win = masking.normalize_window((-1, -1), False)
        r0 = reference.attention(q64[0], kc64[1], vc64[1], scale=0.25, window=win)
        np.testing.assert_allclose(np.asarray(out[0], np.float32), r0[0], atol=2e-2)
        # row 1: first page invalid, second page (positions 16..19 visible) valid
        r1 = reference.attention(q64[1], kc64[2, :4], vc64[2, :4], scale=0.25, window=win)
        np.testing.assert_allclose(np.asarray(out[1], np.float32), r1[0], atol=2e-2)
        # contiguous: a batch index out of range sees an empty cache
        kc2, _ = rand(rng, (2, 16, 1, 16), dt)
        out2, lse2 = fa3jax.flash_mha_with_kvcache(q, kc2, kc2, cache_seqlens=5,
                                                   cache_batch_idx=jnp.asarray([7, -1], jnp.int32),
                                                   return_softmax_lse=True, num_splits=0, backend=self.backend)
        assert np.all(np.asarray(out2, np.float32) == 0) and np.all(np.isneginf(np.asarray(lse2)))
        # paged: an out-of-range batch index sees an empty cache too, and writes nothing
        kn = jnp.ones((2, 1, 1, 16), kc.dtype)
        out3, lse3, (kc3, _) = fa3jax.flash_mha_with_kvcache(
            q, kc, vc, kn, kn, cache_seqlens=3, page_table=jnp.asarray([[1, 2], [0, 3]], jnp.int32),
            cache_batch_idx=jnp.asarray([9, 1], jnp.int32), return_softmax_lse=True, return_updated_cache=True,
            num_splits=0, backend=self.backend)
        r = reference.attention(q64[0], np.ones((1, 1, 16)), np.ones((1, 1, 16)), scale=0.25, window=win)
        np.testing.assert_allclose(np.asarray(out3[0], np.float32), r[0], atol=2e-2)  # only its own new key
        np.testing.assert_allclose(np.asarray(lse3[0]), r[1], atol=2e-2)
        changed = np.any(np.asarray(kc3.astype(jnp.float32)) != np.asarray(kc.astype(jnp.float32)), axis=(1, 2, 3))
        assert changed.tolist() == [True, False, False, False]  # row 1 (slot 1 -> pages 0, 3) writes page 0 only

    # --------------------------------------------------------------------------------------- vmap
    @pytest.mark.parametrize("in_axes", [(0, 0, 0), (1, None, None), (0, None, 2)])
    def test_vmap_dense_forward_and_grads(self, in_axes):
        self._skip_unless(self.supports_vmap, "vmap")
        dt = self.dtypes[0]
        rng = self._rng("vmap", in_axes)
        V, b, l, h, d = 3, 2, 19, 2, self._d(16)
        shapes = []
        for ax in in_axes:
            s = [b, l, h, d]
            if ax is not None:
                s.insert(ax, V)
            shapes.append(tuple(s))
        q, _ = rand(rng, shapes[0], dt)
        k, _ = rand(rng, shapes[1], dt)
        v, _ = rand(rng, shapes[2], dt)

        def f(q, k, v):
            return fa3jax.flash_mha(q, k, v, is_causal=True, backend=self.backend)

        got = jax.jit(jax.vmap(f, in_axes=in_axes))(q, k, v)
        take = lambda x, ax, i: x if ax is None else jnp.take(x, i, axis=ax)
        for i in range(V):
            want = f(take(q, in_axes[0], i), take(k, in_axes[1], i), take(v, in_axes[2], i))
            np.testing.assert_allclose(np.asarray(got[i], np.float32), np.asarray(want, np.float32), atol=1e-2)
        if self.supports_grad:
            loss = lambda q, k, v: jax.vmap(f, in_axes=in_axes)(q, k, v).astype(jnp.float32).sum()
            g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
            for i in range(V):
                gi = jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))(
                    take(q, in_axes[0], i), take(k, in_axes[1], i), take(v, in_axes[2], i))
                np.testing.assert_allclose(np.asarray(take(g[0], in_axes[0], i), np.float32),
                                           np.asarray(gi[0], np.float32), atol=2e-2)

    def test_vmap_varlen_and_kvcache(self):
        self._skip_unless(self.supports_vmap and self.supports_varlen and self.supports_kvcache, "vmap")
        dt = self.dtypes[0]
        rng = self._rng("vmap-var")
        cu = jnp.asarray([0, 5, 12], jnp.int32)
        q, _ = rand(rng, (2, 12, 2, 16), dt)
        f = lambda q: fa3jax.flash_mha_varlen(q, q, q, cu, cu, max_seqlen_q=7, max_seqlen_k=7, is_causal=True,
                                              backend=self.backend)
        got = jax.vmap(f)(q)
        for i in range(2):
            np.testing.assert_allclose(np.asarray(got[i], np.float32), np.asarray(f(q[i]), np.float32), atol=1e-2)
        gv = jax.grad(lambda q: jax.vmap(f)(q).astype(jnp.float32).sum())(q)
        g0 = jax.grad(lambda q: f(q).astype(jnp.float32).sum())(q[0])
        np.testing.assert_allclose(np.asarray(gv[0], np.float32), np.asarray(g0, np.float32), atol=2e-2)
        kc, _ = rand(rng, (2, 2, 32, 1, 16), dt)
        qd, _ = rand(rng, (2, 2, 1, 2, 16), dt)
        lens = jnp.asarray([[3, 9], [31, 0]], jnp.int32)
        g = lambda q, kc, n: fa3jax.flash_mha_with_kvcache(q, kc, kc, cache_seqlens=n, backend=self.backend)
        got = jax.vmap(g)(qd, kc, lens)
        for i in range(2):
            np.testing.assert_allclose(np.asarray(got[i], np.float32), np.asarray(g(qd[i], kc[i], lens[i]), np.float32),
                                       atol=1e-2)

    def test_kvcache_traced_cache_seqlens_under_jit(self):
        """cache_seqlens as a traced jit argument: one compilation serves every length."""
        self._skip_unless(self.supports_kvcache, "kvcache")
        dt = self.dtypes[0]
        rng = self._rng("traced-len")
        d = self._d(16)
        kc, kc64 = rand(rng, (2, 32, 1, d), dt)
        vc, vc64 = rand(rng, (2, 32, 1, d), dt)
        q, q64 = rand(rng, (2, 1, 2, d), dt)
        f = jax.jit(lambda q, n: fa3jax.flash_mha_with_kvcache(q, kc, vc, cache_seqlens=n, backend=self.backend))
        win = masking.normalize_window((-1, -1), False)
        for lens in ([3, 17], [32, 1]):
            out = f(q, jnp.asarray(lens, jnp.int32))
            ref = reference.kvcache(q64, kc64, vc64, lens, scale=1 / np.sqrt(d), window=win)
            low = reference.kvcache(q64, kc64, vc64, lens, scale=1 / np.sqrt(d), window=win,
                                    impl=functools.partial(naive_lowp, dtype=dt))
            check("out", out, ref[0], low[0], dt)
        assert f._cache_size() == 1

    def test_kvcache_updated_cache_aliases_donated_input(self):
        """return_updated_cache under jit with donated caches: XLA writes in place (outputs alias the inputs)."""
        self._skip_unless(self.supports_kvcache, "kvcache")
        dt = jnp.dtype(self.dtypes[0])
        d = self._d(32)
        q = jax.ShapeDtypeStruct((2, 1, 4, d), dt)
        kc = jax.ShapeDtypeStruct((2, 256, 2, d), dt)
        kn = jax.ShapeDtypeStruct((2, 1, 2, d), dt)
        n = jax.ShapeDtypeStruct((2,), jnp.int32)
        f = jax.jit(lambda q, kc, vc, kn, n: fa3jax.flash_mha_with_kvcache(
            q, kc, vc, kn, kn, cache_seqlens=n, return_updated_cache=True, backend=self.backend),
            donate_argnums=(1, 2))
        mem = f.lower(q, kc, kc, kn, n).compile().memory_analysis()
        assert mem.alias_size_in_bytes == 2 * kc.size * dt.itemsize

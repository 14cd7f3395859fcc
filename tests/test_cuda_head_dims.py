"""The cuda backend's head-dim policy, checked without a GPU (the extension is faked): any head dim up to the largest
built kernel is accepted by an extension with the any_head_dim feature (the C++ dispatch serves it by the smallest
kernel that holds it), older extensions serve only their instances' own, MLA stays exact-match; and head dims that
are not multiples of 8 reach the kernels zero-padded, with outputs and gradients sliced back (the padding layer is
run with the kernels replaced by the xla backend and compared against xla on the unpadded inputs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax
from fa3jax import registry, validation
from fa3jax.backends import cuda as cuda_mod
from fa3jax.backends.cuda import CudaBackend, targets
from fa3jax.backends.xla import XlaBackend

from .helpers import relerr, seeded_rng

_KW = dict(softmax_scale=None, is_causal=True, window_size=(-1, -1), softcap=0.0, return_softmax_lse=False,
           deterministic=False)


def _fake_build(monkeypatch, features=("sinks", "varlen", "varlen_bwd", "mla", "mla_bwd", "any_head_dim"),
                instances=(("bf16", 64), ("bf16", 128)), bwd_instances=(("bf16", 64), ("bf16", 128)),
                mla=(("bf16", 128, 64),), bwd_mla=(("bf16", 128, 64),)):
    monkeypatch.setattr(cuda_mod, "_load_extension", lambda: (object(), None))
    monkeypatch.setattr(cuda_mod, "build_info", lambda: {
        "instances": list(instances), "bwd_instances": list(bwd_instances), "mla_instances": list(mla),
        "bwd_mla_instances": list(bwd_mla), "features": list(features)})


def _specs(d, dv=None, dtype=jnp.bfloat16):
    """A dense and a varlen spec with q/k head dim d and v head dim dv (default d)."""
    dv = d if dv is None else dv
    q = jnp.zeros((1, 8, 4, d), dtype)
    k = jnp.zeros((1, 8, 2, d), dtype)
    v = jnp.zeros((1, 8, 2, dv), dtype)
    return (validation.validate_dense(q, k, v, **_KW),
            validation.validate_varlen(q[0], k[0], v[0], jnp.asarray([0, 3, 8], jnp.int32), None, None, -1, -1,
                                       **_KW))


def test_kernel_head_dim_rounds_up_to_multiples_of_8():
    for d, want in [(1, 8), (8, 8), (32, 32), (40, 40), (59, 64), (63, 64), (64, 64), (65, 72), (100, 104),
                    (200, 200), (255, 256), (256, 256)]:
        assert cuda_mod._kernel_head_dim(_specs(d)[0]) == want, d


@pytest.mark.parametrize("d", [1, 8, 32, 40, 59, 64, 72, 96, 100, 112, 121, 128])
def test_any_head_dim_up_to_the_largest_kernel_is_accepted(monkeypatch, d):
    _fake_build(monkeypatch)
    for spec in _specs(d):
        CudaBackend().check_forward(spec)
        CudaBackend().check_backward(spec)


@pytest.mark.parametrize("d", [129, 136, 200, 256])
def test_head_dims_above_the_largest_kernel_are_refused(monkeypatch, d):
    _fake_build(monkeypatch)
    want = cuda_mod._kernel_head_dim(_specs(d)[0])
    for spec in _specs(d):
        with pytest.raises(NotImplementedError, match=rf"head_dim={d}\) in this build: none with a head dim >= {want}"):
            CudaBackend().check_forward(spec)
        with pytest.raises(NotImplementedError, match=rf"no backward kernel .*head_dim={d}\)"):
            CudaBackend().check_backward(spec)


def test_backward_follows_its_own_instances(monkeypatch):
    """A build whose backward stops at 64 serves d=96 forward only (the registry composes another backward)."""
    _fake_build(monkeypatch, bwd_instances=(("bf16", 64),))
    for spec in _specs(96):
        CudaBackend().check_forward(spec)
        with pytest.raises(NotImplementedError, match="none with a head dim >= 96"):
            CudaBackend().check_backward(spec)
    for spec in _specs(40):
        CudaBackend().check_backward(spec)


def test_dtype_without_kernels_is_refused(monkeypatch):
    _fake_build(monkeypatch)
    for spec in _specs(40, dtype=jnp.float16):
        with pytest.raises(NotImplementedError, match="dtype=float16, head_dim=40"):
            CudaBackend().check_forward(spec)


def test_extension_before_any_head_dim_serves_its_instances_only(monkeypatch):
    _fake_build(monkeypatch, features=("sinks", "varlen", "varlen_bwd", "mla"))
    for spec in _specs(64):
        CudaBackend().check_forward(spec)
        CudaBackend().check_backward(spec)
    for spec in _specs(40):
        with pytest.raises(NotImplementedError, match="built before any-head-dim support"):
            CudaBackend().check_forward(spec)
        with pytest.raises(NotImplementedError, match="built before any-head-dim support"):
            CudaBackend().check_backward(spec)


def test_mla_stays_exact_match(monkeypatch):
    """MLA pairs are served by their own compiled pair only, never by a wider one, forward and backward (the
    backward's MLA instances beside any_head_dim: the narrower-d rule is for d_v == d only)."""
    _fake_build(monkeypatch)
    for spec in _specs(128, 64):
        CudaBackend().check_forward(spec)
        CudaBackend().check_backward(spec)
    for d, dv in [(120, 64), (128, 56), (64, 32)]:
        for spec in _specs(d, dv):
            with pytest.raises(NotImplementedError, match=rf"no MLA forward kernel .*head_dim={d}, head_dim_v={dv}"):
                CudaBackend().check_forward(spec)
            with pytest.raises(NotImplementedError, match=rf"no MLA backward kernel .*head_dim={d}, head_dim_v={dv}"):
                CudaBackend().check_backward(spec)


# ---------------------------------------------------------------------------------- the padding layer
def _kernels_as_xla(monkeypatch, seen):
    """CudaBackend's kernel calls (_forward / _backward) replaced by the xla backend on the same operands, after
    checking that they get head dims the TMA can read (multiples of 8); ``seen`` collects (pass, head dims)."""

    def at(spec, d):
        return spec.replace(head_dim=d, head_dim_v=d)

    def fwd(self, spec, q, k, v, args):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] == cuda_mod._kernel_head_dim(spec), (q.shape, spec)
        seen.append(("fwd", q.shape[-1]))
        return XlaBackend().forward(at(spec, q.shape[-1]), q, k, v, args)

    def bwd(self, spec, q, k, v, out, lse, dout, dlse, args):
        d = cuda_mod._kernel_head_dim(spec)
        # (Padded columns of out and dout other than zeros would change rowsum(dO * O), hence dq and dk: the
        # comparison with xla below would see it.)
        assert {x.shape[-1] for x in (q, k, v, out, dout)} == {d}, spec
        seen.append(("bwd", d))
        return XlaBackend().backward(at(spec, d), q, k, v, out, lse, dout, dlse, args)

    monkeypatch.setattr(CudaBackend, "_forward", fwd)
    monkeypatch.setattr(CudaBackend, "_backward", bwd)
    monkeypatch.setattr(cuda_mod, "_register_targets", lambda ext: None)
    real = registry.availability
    monkeypatch.setattr(registry, "availability", lambda n: (True, "") if n == "cuda" else real(n))


@pytest.mark.parametrize("d", [59, 40, 3])
@pytest.mark.parametrize("mode", ["dense", "varlen"])
def test_padded_head_dims_match_xla(monkeypatch, d, mode):
    """d % 8 != 0 reaches the kernels padded to the next multiple of 8 and the results come back at d; a multiple of
    8 (d=40) reaches them unpadded. Outputs, LSE and gradients equal the xla backend's on the unpadded inputs (the
    user's softmax_scale, not one of the padded width)."""
    seen = []
    _fake_build(monkeypatch)
    _kernels_as_xla(monkeypatch, seen)
    rng = seeded_rng("cuda-head-dims", d, mode)
    b, lq, lk, hq, hk = (2, 37, 45, 4, 2) if mode == "dense" else (1, 80, 90, 4, 2)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
                   ((b, lq, hq, d), (b, lk, hk, d), (b, lk, hk, d), (b, lq, hq, d)))
    q, k, v, do = (x.astype(jnp.bfloat16) for x in (q, k, v, do))
    scale = 0.3  # not 1/sqrt of either width

    if mode == "dense":
        def f(backend):
            return lambda q, k, v: fa3jax.flash_mha(q, k, v, softmax_scale=scale, is_causal=True,
                                                    return_softmax_lse=True, backend=backend)
        args = (q, k, v)
        cot = (do, jnp.asarray(rng.standard_normal((b, hq, lq)), jnp.float32))
    else:
        cu_q = jnp.asarray([0, 30, 30, 80], jnp.int32)
        cu_k = jnp.asarray([0, 20, 50, 90], jnp.int32)

        def f(backend):
            return lambda q, k, v: fa3jax.flash_mha_varlen(q, k, v, cu_q, cu_k, None, 50, 40, softmax_scale=scale,
                                                           is_causal=True, return_softmax_lse=True,
                                                           backend=backend)
        args = (q[0], k[0], v[0])
        cot = (do[0], jnp.asarray(rng.standard_normal((hq, lq)), jnp.float32))

    got_out, pull = jax.vjp(f("cuda"), *args)
    want_out, want_pull = jax.vjp(f("xla"), *args)
    got = list(got_out) + list(pull(cot))
    want = list(want_out) + list(want_pull(cot))
    kd = -(-d // 8) * 8
    assert ("fwd", kd) in seen and ("bwd", kd) in seen, seen
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        # The same xla computation on zero-padded operands: equal up to the order of float32 sums.
        assert relerr(g, np.asarray(w.astype(jnp.float32), np.float64)) < 1e-2, name


def test_attributes_carry_the_users_scale():
    """The kernels get the spec's softmax_scale (the user's, or 1/sqrt of the call's own head dim), never one
    derived from a padded or kernel head dim."""
    spec = _specs(40)[0]
    assert np.isclose(float(targets.fwd_attributes(spec)[targets.ATTR_SOFTMAX_SCALE]), 1 / np.sqrt(40))
    assert np.isclose(float(targets.bwd_attributes(spec)[targets.ATTR_SOFTMAX_SCALE]), 1 / np.sqrt(40))

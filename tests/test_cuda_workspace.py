"""CPU tests of the cuda backend's workspace results, with a stand-in for the compiled extension: every FFI call of an
extension with FEATURE_WORKSPACE_RESULT gets one more result, a 1-D uint8 buffer of the size the extension's own
functions give for the scalars its handler reads (shapes, dtype, mask attributes, the resolved split count), last,
and the backend returns the call's outputs without it; an older extension gets none. The sizes themselves are the C++
functions' (csrc/ffi, checked by the handlers on the GPU: tests/test_export.py, tests/test_cuda_backend.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fa3jax import validation
from fa3jax.backends import cuda
from fa3jax.backends.cuda import targets

BF = jnp.bfloat16
_FEATURES = ["sinks", "varlen", "varlen_bwd", "mla", "mla_bwd", "any_head_dim", "kvcache", "kvcache_splits",
             "kvcache_any_page"]
_FWD_BYTES = 16


class _Ext:
    """The extension's size functions, recording their keyword arguments; each returns a size of its own so that a
    test sees which one sized the buffer."""

    def __init__(self):
        self.calls = []

    def handlers(self):
        return {}

    def fwd_workspace_bytes(self):
        self.calls.append(("fwd", {}))
        return _FWD_BYTES

    def kvcache_workspace(self, **kw):
        self.calls.append(("kvcache", kw))
        return 2, 4096 + kw["batch"]  # (resolved splits, bytes)

    def bwd_workspace_bytes(self, **kw):
        self.calls.append(("bwd", kw))
        return 1000 + kw["seqlen_q"]


@pytest.fixture(params=[True, False], ids=["workspace-build", "older-build"])
def built(request, monkeypatch):
    """(extension, whether it takes workspace results, the FFI calls made: (target, out_types, operands, attrs))."""
    ext = _Ext()
    features = _FEATURES + [targets.FEATURE_WORKSPACE_RESULT] * request.param
    info = {"features": features, "instances": [("bf16", 128)], "bwd_instances": [("bf16", 128)],
            "mla_instances": [("bf16", 128, 64)], "bwd_mla_instances": [("bf16", 128, 64)],
            "kvcache_instances": [("bf16", 128, 128)], "kvcache_head_dims": [("bf16", 128, 128, 1)]}
    monkeypatch.setattr(cuda, "_load_extension", lambda: (ext, None))
    monkeypatch.setattr(cuda, "build_info", lambda: info)
    monkeypatch.setattr(cuda, "_register_targets", lambda e: None)
    calls = []

    def fake_ffi_call(target, out_types, vmap_method=None):
        def run(*operands, **attrs):
            calls.append((target, tuple(out_types), operands, attrs))
            return tuple(jnp.zeros(t.shape, t.dtype) for t in out_types)
        return run

    monkeypatch.setattr(jax.ffi, "ffi_call", fake_ffi_call)
    return ext, request.param, calls


def _check_workspace(out_types, n_outputs, with_ws, nbytes):
    """The call's result types: the outputs, then (with_ws) the (nbytes,) uint8 workspace."""
    assert len(out_types) == n_outputs + with_ws, out_types
    if with_ws:
        assert out_types[-1].shape == (nbytes,) and out_types[-1].dtype == jnp.uint8, out_types[-1]


def _rand(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(BF)


_KW = dict(softmax_scale=None, window_size=(-1, -1), softcap=0.0, return_softmax_lse=True)


@pytest.mark.parametrize("sinks", [False, True])
def test_dense_forward(built, sinks):
    ext, with_ws, calls = built
    rng = np.random.default_rng(0)
    q, k, v = _rand(rng, (2, 40, 4, 128)), _rand(rng, (2, 56, 2, 128)), _rand(rng, (2, 56, 2, 64))
    s = jnp.asarray(rng.standard_normal(4), jnp.float32) if sinks else None
    spec = validation.validate_dense(q, k, v, is_causal=True, deterministic=False, sinks=s, **_KW)
    args = validation.sanitize_dense(spec, None, None, s)
    out, lse = cuda.CudaBackend().forward(spec, q, k, v, args)
    assert out.shape == (2, 40, 4, 64) and out.dtype == BF and lse.shape == (2, 4, 40) and lse.dtype == jnp.float32
    (target, out_types, ops, _), = calls
    assert target == (targets.FWD_SINKS_TARGET if sinks else targets.FWD_TARGET) and len(ops) == 3 + sinks
    _check_workspace(out_types, 2, with_ws, _FWD_BYTES)
    assert [c[0] for c in ext.calls] == (["fwd"] if with_ws else [])


def test_varlen_forward(built):
    ext, with_ws, calls = built
    rng = np.random.default_rng(1)
    q, k, v = _rand(rng, (70, 4, 128)), _rand(rng, (90, 2, 128)), _rand(rng, (90, 2, 128))
    cu_q, cu_k = jnp.asarray([0, 30, 70], jnp.int32), jnp.asarray([0, 50, 90], jnp.int32)
    spec = validation.validate_varlen(q, k, v, cu_q, cu_k, None, 40, 50, is_causal=False, deterministic=False, **_KW)
    args = validation.sanitize_varlen(spec, cu_q, cu_k, None)
    out, lse = cuda.CudaBackend().forward(spec, q, k, v, args)
    assert out.shape == (70, 4, 128) and lse.shape == (4, 70)
    (target, out_types, _, _), = calls
    assert target == targets.FWD_VARLEN_TARGET
    _check_workspace(out_types, 2, with_ws, _FWD_BYTES)
    assert [c[0] for c in ext.calls] == (["fwd"] if with_ws else [])


@pytest.mark.parametrize("mode", ["dense", "varlen"])
@pytest.mark.parametrize("dv", [128, 64], ids=["d=dv", "mla"])
def test_backward(built, mode, dv):
    """The backward's size comes from the operands and attributes its handler reads: dense (b, sq) or varlen
    (sequences, total_q), heads_q, the head dims of q and v, the window, softcap and deterministic."""
    ext, with_ws, calls = built
    rng = np.random.default_rng(2)
    if mode == "dense":
        q, k, v = _rand(rng, (2, 40, 4, 128)), _rand(rng, (2, 56, 2, 128)), _rand(rng, (2, 56, 2, dv))
        spec = validation.validate_dense(q, k, v, is_causal=False, deterministic=True,
                                         **{**_KW, "window_size": (16, 3), "softcap": 7.5})
        args = validation.sanitize_dense(spec, None, None, None)
        out, lse = _rand(rng, (2, 40, 4, dv)), jnp.zeros((2, 4, 40), jnp.float32)
        batch, rows = 2, 40
    else:
        q, k, v = _rand(rng, (70, 4, 128)), _rand(rng, (90, 2, 128)), _rand(rng, (90, 2, dv))
        cu_q, cu_k = jnp.asarray([0, 30, 30, 70], jnp.int32), jnp.asarray([0, 50, 60, 90], jnp.int32)
        spec = validation.validate_varlen(q, k, v, cu_q, cu_k, None, 40, 50, is_causal=True, deterministic=False,
                                          **_KW)
        args = validation.sanitize_varlen(spec, cu_q, cu_k, None)
        out, lse = _rand(rng, (70, 4, dv)), jnp.zeros((4, 70), jnp.float32)
        batch, rows = 3, 70
    dq, dk, dv_ = cuda.CudaBackend().backward(spec, q, k, v, out, lse, out, jnp.zeros_like(lse), args)
    assert (dq.shape, dk.shape, dv_.shape) == (q.shape, k.shape, v.shape)
    (target, out_types, _, attrs), = calls
    assert target == (targets.BWD_TARGET if mode == "dense" else targets.BWD_VARLEN_TARGET)
    _check_workspace(out_types, 3, with_ws, 1000 + rows)
    if not with_ws:
        assert not ext.calls
        return
    (name, kw), = ext.calls
    assert name == "bwd"
    want = dict(dtype="bf16", batch=batch, seqlen_q=rows, heads_q=4, head_dim=128, head_dim_v=dv,
                window_left=16 if mode == "dense" else -1, window_right=3 if mode == "dense" else 0,
                softcap=7.5 if mode == "dense" else 0.0, deterministic=mode == "dense", varlen=mode == "varlen")
    assert kw == want
    # Plain Python scalars (the nanobind signature is strict about bool) equal to the attributes the handler gets.
    assert type(kw["deterministic"]) is bool and type(kw["softcap"]) is float and type(kw["window_left"]) is int
    assert kw["window_left"] == attrs[targets.ATTR_WINDOW_LEFT] and kw["softcap"] == attrs[targets.ATTR_SOFTCAP]


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_forward(built, paged):
    """The KV-cache size comes from the operands its handler reads (the capacity of a paged cache is pages per
    sequence times the page size), the caller's num_splits as the request; the split count the extension resolved
    replaces the attribute, so that the handler lays out the buffer that was sized."""
    ext, with_ws, calls = built
    rng = np.random.default_rng(3)
    b, lq, hq, hk, d = 2, 1, 8, 2, 128
    q = _rand(rng, (b, lq, hq, d))
    cache = _rand(rng, (6, 64, hk, d) if paged else (b, 300, hk, d))
    kn = _rand(rng, (b, 3, hk, d))
    lens = jnp.asarray([40, 7], jnp.int32)
    pt = jnp.asarray([[5, 1, 0, 2], [3, 4, 0, 1]], jnp.int32) if paged else None
    spec = validation.validate_kvcache(q, cache, cache, kn, kn, lens, None, None, pt, None, None, True,
                                       softmax_scale=None, is_causal=True, window_size=(-1, -1), softcap=0.0,
                                       num_splits=5, return_softmax_lse=True, return_updated_cache=False)
    args, _ = validation.sanitize_kvcache(spec, lens, None, None, pt, kn, kn, None)
    out, lse = cuda.CudaBackend().kvcache_forward(spec, q, cache, cache, args)
    assert out.shape == (b, lq, hq, d) and lse.shape == (b, hq, lq)
    (target, out_types, _, attrs), = calls
    assert target == targets.FWD_KVCACHE_TARGET
    _check_workspace(out_types, 2, with_ws, 4096 + b)
    assert isinstance(attrs[targets.ATTR_NUM_SPLITS], np.int32)
    if not with_ws:
        assert not ext.calls and attrs[targets.ATTR_NUM_SPLITS] == 5  # the handler resolves it (XLA scratch)
        return
    (name, kw), = ext.calls
    assert name == "kvcache"
    assert kw == dict(dtype="bf16", batch=b, seqlen_q=lq, heads_q=hq, heads_k=hk, head_dim=d,
                      capacity=4 * 64 if paged else 300, seqlen_new=3, requested=5)
    assert attrs[targets.ATTR_NUM_SPLITS] == 2

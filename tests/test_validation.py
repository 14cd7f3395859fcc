"""Every malformed call raises ValueError/TypeError naming the argument, before any kernel runs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax

S = jax.ShapeDtypeStruct
BF = jnp.bfloat16


def arr(shape, dtype=BF):
    return jnp.zeros(shape, dtype)  # values irrelevant: validation must fail before anything computes


Q, K, V = arr((2, 8, 4, 32)), arr((2, 8, 2, 32)), arr((2, 8, 2, 32))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(q=arr((8, 4, 32))), ValueError, "q must have rank 4"),
    (dict(k=arr((2, 8, 3, 32)), v=arr((2, 8, 3, 32))), ValueError, "num_heads_q must be a positive multiple"),
    (dict(k=arr((2, 8, 2, 16)), v=arr((2, 8, 2, 16))), ValueError, "same head_dim"),
    (dict(v=arr((2, 9, 2, 32))), ValueError, "k and v must have the same shape"),
    (dict(k=arr((3, 8, 2, 32)), v=arr((3, 8, 2, 32))), ValueError, "same batch"),
    (dict(q=arr((2, 8, 4, 32), jnp.int32)), TypeError, "q must be float16, bfloat16 or float32"),
    (dict(k=arr((2, 8, 2, 32), jnp.float16), v=arr((2, 8, 2, 32), jnp.float16)), TypeError, "share a dtype"),
    (dict(q=arr((2, 8, 4, 320)), k=arr((2, 8, 2, 320)), v=arr((2, 8, 2, 320))), ValueError, "head_dim must be in"),
    (dict(window_size=(3,)), ValueError, "window_size must be a pair"),
    (dict(window_size=(-5, 2)), ValueError, "window_size entries must be >= -1"),
    (dict(window_size=(1.5, 2)), TypeError, "window_size must hold ints"),
    (dict(window_size="ab"), ValueError, "window_size must be a pair"),
    (dict(softcap=-1.0), ValueError, "softcap must be >= 0"),
    (dict(softmax_scale="x"), TypeError, "softmax_scale must be a real number"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
    (dict(is_causal=1), TypeError, "is_causal must be a bool"),
    (dict(backend="pallas"), ValueError, "backend must be one of"),
    (dict(q=[[1.0]]), TypeError, "q must be an array"),
])
def test_dense_bad_input(kwargs, exc, words):
    args = dict(q=Q, k=K, v=V)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fa3jax.flash_mha(**args)


def test_traced_softmax_scale_is_refused():
    with pytest.raises(TypeError, match="softmax_scale must be a static"):
        jax.jit(lambda s: fa3jax.flash_mha(Q, K, V, softmax_scale=s))(0.5)


CU = jnp.asarray([0, 3, 8], jnp.int32)
VQ, VK = arr((8, 4, 32)), arr((8, 2, 32))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(cu_seqlens_q=jnp.asarray([0, 3, 8], jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32)), TypeError,
     "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_q=jnp.asarray([[0, 3, 8]], jnp.int32)), ValueError, r"cu_seqlens_q must be an int32 array of shape \(batch \+ 1,\)"),
    (dict(cu_seqlens_q=[0, 3, 8]), ValueError, "cu_seqlens_q must be an int32 array"),
    (dict(cu_seqlens_k=jnp.asarray([0, 8], jnp.int32)), ValueError, r"cu_seqlens_k must have shape \(3,\)"),
    (dict(seqused_k=jnp.asarray([1, 2, 3], jnp.int32)), ValueError, r"seqused_k must have shape \(2,\)"),
    (dict(max_seqlen_q=-3), ValueError, "max_seqlen_q must be >= 0"),
    (dict(max_seqlen_q=2.5), TypeError, "max_seqlen_q must be an integer"),
    (dict(q=arr((2, 8, 4, 32))), ValueError, "q must have rank 3"),
    (dict(k=arr((9, 2, 32)), v=arr((9, 2, 32)), cu_seqlens_k=None), ValueError, "cu_seqlens_k is required"),
])
def test_varlen_bad_input(kwargs, exc, words):
    args = dict(q=VQ, k=VK, v=VK, cu_seqlens_q=CU, cu_seqlens_k=CU)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fa3jax.flash_mha_varlen(**args)


KC = arr((2, 64, 2, 32))
DQ = arr((2, 1, 4, 32))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(page_table=jnp.zeros((3, 4), jnp.int32)), ValueError, r"page_table must be an int32 array of shape \(batch, max_pages_per_seq\)"),
    (dict(page_table=jnp.zeros((2, 4), jnp.float32)), TypeError, "page_table must be int32"),
    (dict(page_table=jnp.zeros((2, 4), jnp.int32), cache_batch_idx=jnp.zeros((3,), jnp.int32)), ValueError,
     r"cache_batch_idx must have shape \(2,\)"),
    (dict(page_table=jnp.zeros((2, 4), jnp.int32), cache_leftpad=jnp.zeros((2,), jnp.int32)), ValueError,
     "cache_leftpad cannot be combined with page_table"),
    (dict(k_cache=arr((2, 64, 2, 16)), v_cache=arr((2, 64, 2, 16))), ValueError,
     r"q and k_cache must have the same head_dim; got q.shape=\(2, 1, 4, 32\), k_cache.shape=\(2, 64, 2, 16\)"),
    (dict(v_cache=arr((2, 63, 2, 32))), ValueError, "k_cache and v_cache must have the same shape"),
    (dict(k_cache=arr((2, 64, 2, 32), jnp.float16)), TypeError, "q, k_cache and v_cache must share a dtype"),
    (dict(cache_seqlens=[1.0, 2.0]), TypeError, "cache_seqlens must be an int or an integer array-like"),
    (dict(cache_seqlens=np.array([True, False])), TypeError, "cache_seqlens must be an int or an integer array-like"),
    (dict(cache_seqlens=[[1, 2]]), ValueError, "cache_seqlens must be a scalar or have shape"),
    (dict(cache_batch_idx=jnp.zeros((3,), jnp.int32)), ValueError, r"cache_batch_idx must have shape \(2,\)"),
    (dict(k_cache=arr((3, 64, 2, 32)), v_cache=arr((3, 64, 2, 32))), ValueError, "k_cache batch must equal q batch"),
    (dict(k=arr((2, 1, 2, 32))), ValueError, "k and v .* must be given together"),
    (dict(k=arr((2, 1, 4, 32)), v=arr((2, 1, 4, 32)), cache_seqlens=3), ValueError, r"k \(new\) must have shape"),
    (dict(k=arr((2, 1, 2, 32)), v=arr((2, 1, 2, 32))), ValueError, "cache_seqlens is required"),
    (dict(cache_seqlens=65), ValueError, "cache_seqlens must be in"),
    (dict(cache_seqlens=jnp.zeros((2,), jnp.float32)), TypeError, "cache_seqlens must be an int or an integer array"),
    (dict(cache_seqlens=jnp.zeros((3,), jnp.int32)), ValueError, "cache_seqlens must be a scalar or have shape"),
    (dict(rotary_cos=arr((64, 8), jnp.float32)), ValueError, "rotary_cos and rotary_sin must be given together"),
    (dict(rotary_cos=arr((64, 20), jnp.float32), rotary_sin=arr((64, 20), jnp.float32)), ValueError, "rotary_dim"),
    (dict(rotary_cos=arr((10, 8), jnp.float32), rotary_sin=arr((10, 8), jnp.float32)), ValueError, "must cover every cache position"),
    (dict(num_splits=-1), ValueError, "num_splits must be >= 0"),
    (dict(cache_leftpad=jnp.zeros((2,), jnp.float32)), TypeError, "cache_leftpad must be int32"),
])
def test_kvcache_bad_input(kwargs, exc, words):
    args = dict(q=DQ, k_cache=KC, v_cache=KC)
    args.update(kwargs)
    with pytest.raises(exc, match=words):
        fa3jax.flash_mha_with_kvcache(**args)


def test_explicit_backend_that_cannot_serve_names_backend_and_reason():
    if fa3jax.supports(fa3jax.flash_mha, Q, K, V, backend="cuda").supported:
        pytest.skip("cuda serves this call here")
    with pytest.raises(fa3jax.BackendUnavailableError, match="backend=.cuda. cannot serve this call: .+"):
        fa3jax.flash_mha(Q, K, V, backend="cuda")


def test_supports_query_before_tracing():
    s = fa3jax.supports(fa3jax.flash_mha, S((2, 8, 4, 32), BF), S((2, 8, 2, 32), BF), S((2, 8, 2, 32), BF),
                        is_causal=True)
    assert s.supported and s.forward in ("cuda", "cudnn", "triton", "xla") and s.backward is not None
    kv = fa3jax.supports(fa3jax.flash_mha_with_kvcache, S((2, 1, 4, 32), BF), S((2, 64, 2, 32), BF),
                         S((2, 64, 2, 32), BF), cache_seqlens=3)
    assert kv.supported and kv.backward is None and "inference" in kv.reason
    with pytest.raises(ValueError, match="window_size"):
        fa3jax.supports(fa3jax.flash_mha, Q, K, V, window_size=(1, 2, 3))


def test_backends_info_reports_every_backend_with_reason():
    info = {name: (ok, why) for name, ok, why in fa3jax.backends_info()}
    assert set(info) == {"cuda", "cudnn", "triton", "xla"}
    assert info["xla"][0]
    for name in ("cuda", "cudnn", "triton"):
        ok, why = info[name]
        assert ok or why, f"{name} unavailable without a reason"


def test_no_assert_statements_in_library_code():
    import pathlib
    import re

    root = pathlib.Path(fa3jax.__file__).parent
    offenders = [f"{p}:{i}" for p in root.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.match(r"\s*assert\s", line)]
    assert not offenders, offenders


def test_cuda_kernel_variant_attribute():
    """The tuning seam's CUDA kernel choice: typed as the FFI handler binds it, scoped to override(), checked."""
    import types

    import numpy as np

    from fa3jax import tuning
    from fa3jax.backends.cuda import targets

    spec = types.SimpleNamespace(softmax_scale=0.1, window=types.SimpleNamespace(left=-1, right=0), softcap=0.0)
    assert targets.fwd_attributes(spec, tuning.current())[targets.ATTR_KERNEL_VARIANT] == np.int32(0)
    with tuning.override(tuning.Tuning(cuda_kernel="wide")):
        attrs = targets.fwd_attributes(spec, tuning.current())
        assert attrs[targets.ATTR_KERNEL_VARIANT] == np.int32(3)
        assert attrs[targets.ATTR_KERNEL_VARIANT].dtype == np.int32
    assert targets.fwd_attributes(spec, tuning.current())[targets.ATTR_KERNEL_VARIANT] == np.int32(0)
    with pytest.raises(ValueError, match="cuda_kernel"):
        tuning.Tuning(cuda_kernel="fast")
    with pytest.raises(ValueError, match="fwd"):
        tuning.Tuning(fwd=(128, 64))
    with pytest.raises(TypeError, match="Tuning"):
        with tuning.override({"fwd": (128, 64, 8, 3)}):
            pass


def test_sanitize_kvcache_keeps_the_raw_seqlens_only_where_the_clamp_is_the_only_rule():
    """raw_cache_seqlens: the user's values before the clamp (for kernels that clamp alike), absent where
    cache_batch_idx adds a rule (out-of-range rows see an empty cache) or no cache_seqlens were given."""
    from fa3jax import validation
    spec = validation.validate_kvcache(DQ, KC, KC, None, None, None, None, None, None, None, None, False,
                                       softmax_scale=None, is_causal=False, window_size=(-1, -1), softcap=0.0,
                                       num_splits=0, return_softmax_lse=False, return_updated_cache=False)
    cap = KC.shape[1]
    hostile = jnp.asarray([-5, cap + 9], jnp.int32)
    args, _ = validation.sanitize_kvcache(spec, hostile, None, None, None, None, None)
    assert args.raw_cache_seqlens.tolist() == [-5, cap + 9]
    assert args.cache_seqlens.tolist() == [0, cap] and args.seqlens_k.tolist() == [0, cap]
    args, _ = validation.sanitize_kvcache(spec, hostile, jnp.asarray([0, 7], jnp.int32), None, None, None, None)
    assert args.raw_cache_seqlens is None and args.cache_seqlens.tolist() == [0, 0]
    args, _ = validation.sanitize_kvcache(spec, None, None, None, None, None, None)
    assert args.raw_cache_seqlens is None and args.cache_seqlens.tolist() == [cap, cap]

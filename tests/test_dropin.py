"""Drop-in compatibility with flash-attn3-jax 0.2.3, and eager calls that reuse their compilation."""
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fa3jax

# flash-attn3-jax 0.2.3's parameters, in order, as its code defines them (its README's varlen block omits
# seqused_k, which the code takes right after cu_seqlens_k)
FA3JAX_023 = {
    "flash_mha": ["q", "k", "v", "softmax_scale", "is_causal", "window_size"],
    "flash_mha_varlen": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "max_seqlen_q",
                         "max_seqlen_k", "softmax_scale", "is_causal", "window_size"],
    "flash_mha_with_kvcache": ["q", "k_cache", "v_cache", "k", "v", "cache_seqlens", "cache_batch_idx",
                               "cache_leftpad", "page_table", "rotary_cos", "rotary_sin", "softmax_scale",
                               "is_causal", "window_size", "num_splits", "return_softmax_lse"],
}
DEFAULTS_023 = {"softmax_scale": None, "is_causal": False, "window_size": (-1, -1),
                "cache_seqlens": None, "cache_batch_idx": None, "cache_leftpad": None, "page_table": None,
                "rotary_cos": None, "rotary_sin": None, "num_splits": 1, "return_softmax_lse": False}


@pytest.mark.parametrize("name", sorted(FA3JAX_023))
def test_signature_is_023s_then_keyword_only(name):
    params = list(inspect.signature(getattr(fa3jax, name)).parameters.values())
    positional = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional] == FA3JAX_023[name]
    extras = [p for p in params if p.name not in FA3JAX_023[name]]
    assert extras and all(p.kind == p.KEYWORD_ONLY for p in extras), extras
    assert "backend" in {p.name for p in extras}
    for p in positional:  # the same defaults where 0.2.3 has one (we add defaults, never change them)
        if p.name in DEFAULTS_023:
            assert p.default == DEFAULTS_023[p.name], p


def test_kvcache_positional_call_as_in_023():
    """All 16 of 0.2.3's arguments passed positionally land where 0.2.3 puts them."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 3, 4, 16)), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((2, 32, 2, 16)), jnp.float32)
    lens = jnp.asarray([7, 20], jnp.int32)
    args = (q, kc, kc, None, None, lens, None, None, None, None, None, 0.3, True, (4, -1), 1, True)
    out, lse = fa3jax.flash_mha_with_kvcache(*args, backend="xla")
    want = fa3jax.flash_mha_with_kvcache(q, kc, kc, cache_seqlens=lens, softmax_scale=0.3, is_causal=True,
                                         window_size=(4, -1), return_softmax_lse=True, backend="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want[1]))
    with pytest.raises(TypeError):  # our extras cannot be reached positionally
        fa3jax.flash_mha_with_kvcache(*args, False)


def test_varlen_positional_call_as_in_023():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((12, 2, 16)), jnp.float32)
    cu = jnp.asarray([0, 5, 12], jnp.int32)
    out = fa3jax.flash_mha_varlen(q, q, q, cu, cu, None, 7, 7, 0.5, True, (-1, -1), backend="xla")
    want = fa3jax.flash_mha_varlen(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=7, max_seqlen_k=7,
                                   softmax_scale=0.5, is_causal=True, backend="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    assert fa3jax.supports(fa3jax.flash_mha_varlen, q, q, q, cu, cu, None, 7, 7, 0.5, True, backend="xla").supported


@pytest.mark.parametrize("lens", [np.array([7, 20], np.int64), [7, 20], np.int64(9), np.array(9, np.int16)],
                         ids=["int64-numpy", "list", "numpy-scalar", "int16-0d"])
def test_cache_seqlens_any_integer_array_like(lens):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    kc = jnp.asarray(rng.standard_normal((2, 32, 2, 16)), jnp.float32)
    out = fa3jax.flash_mha_with_kvcache(q, kc, kc, cache_seqlens=lens, backend="xla")
    want = fa3jax.flash_mha_with_kvcache(q, kc, kc, cache_seqlens=jnp.broadcast_to(
        jnp.asarray(np.asarray(lens), jnp.int32), (2,)), backend="xla")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


class _Compiles:
    """Counts XLA backend compilations while active."""

    def __init__(self):
        self.n = 0
        self.on = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.on and event == "/jax/core/compile/backend_compile_duration":
            self.n += 1

    def count(self, fn):
        self.on, self.n = True, 0
        try:
            jax.block_until_ready(fn())
        finally:
            self.on = False
        return self.n


_COMPILES = _Compiles()


def test_repeated_eager_calls_do_not_recompile():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((2, 24, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 24, 2, 16)), jnp.float32)
    cu = jnp.asarray([0, 9, 24], jnp.int32)
    calls = {
        "flash_mha": lambda: fa3jax.flash_mha(q, k, k, is_causal=True, backend="xla"),
        "flash_mha_varlen": lambda: fa3jax.flash_mha_varlen(q[0], k[0], k[0], cu, cu, backend="xla"),
        "flash_mha grad": lambda: jax.grad(lambda q: fa3jax.flash_mha(q, k, k, backend="xla").sum())(q),
    }
    for name, fn in calls.items():
        first = _COMPILES.count(fn)
        again = [_COMPILES.count(fn) for _ in range(2)]
        assert first > 0, name  # the counter sees compilations at all
        assert again == [0, 0], (name, first, again)


def test_tuning_override_retraces_cached_calls(monkeypatch):
    """Backend calls are cached per spec for eager reuse, but a call made under another fa3jax.tuning override
    traces again, so the plans see the Tuning in force (the benchmarks' sweeps rely on it)."""
    import types

    from fa3jax import calls, registry, tuning
    from fa3jax.masking import Window
    from fa3jax.spec import AttentionSpec

    seen = []

    def forward(spec, q, k, v, args):
        seen.append(tuning.current())
        return jnp.zeros_like(q), jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)

    monkeypatch.setattr(registry, "get", lambda name: types.SimpleNamespace(forward=forward))
    spec = AttentionSpec(mode="dense", batch=1, seqlen_q=8, seqlen_k=8, num_heads_q=2, num_heads_k=2, head_dim=16,
                         dtype="float32", softmax_scale=0.25, window=Window(-1, -1))
    q = jnp.ones((1, 8, 2, 16), jnp.float32)
    forced = tuning.Tuning(fwd=(16, 16, 4, 1))
    calls.forward("fake", spec, q, q, q, None)
    calls.forward("fake", spec, q, q, q, None)  # same statics: the cached trace, no second trace
    with tuning.override(forced):
        calls.forward("fake", spec, q, q, q, None)
    assert seen == [tuning.DEFAULT, forced]

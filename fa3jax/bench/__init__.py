"""Benchmark harness: time attention implementations side by side, in one process, with one timing method.

Suites
  * ``attn`` (default): the flash-attn3-jax README table -- h=16, d=128, b*s=16384 tokens, seqlen 512..16384
    (b = 16384 // s), bf16/fp16, causal or not, modes ``fwd`` and ``fwd+bwd``; ``--sinks`` adds each fa3jax impl
    called with ``sinks=`` and the ratio of its time to the call without; ``--deterministic`` likewise adds each
    fa3jax impl called with ``deterministic=True`` (column ``<impl>+det``, ratio ``det_ratio``).
  * ``decode``: one query token against a KV cache (hq=32, hk=8, d=128, bf16), contiguous and paged, reported
    as bandwidth (TB/s of K/V bytes read) next to a device-to-device copy measured in the same run; ``--per-call``
    also times one step per jitted call issued from Python (dispatch included).
  * ``prefill``: a chunk of new queries (512, 2048) against a full KV cache (8k, 32k; hq=32, hk=8, d=128, bf16,
    batch 1 and 8), contiguous and paged, causal bottom-right, in TFLOPS next to flash-attn3-jax's best num_splits.
  * ``varlen``: packed variable-length training shapes -- 16384 tokens cut into random lengths drawn uniformly in
    [L/2, 3L/2] for a mean L of 512..8192 (h=16, d=128, bf16, causal or not, ``fwd`` and ``fwd+bwd``), each impl
    next to its dense-equal-tokens baseline (``dense:<impl>``: ``flash_mha`` on batch 16384 // L of seqlen L), with
    the ratio varlen TFLOPS / dense TFLOPS.

Implementations ("impls", :mod:`.impls`): ``fa3jax:cuda``, ``fa3jax:cudnn``, ``fa3jax:triton``, ``fa3jax:xla``
(each only where available and where ``fa3jax.supports`` says yes), ``flash-attn3-jax`` (when importable),
``jax.nn:cudnn`` and ``jax.nn:xla`` (``jax.nn.dot_product_attention``). Anything that cannot run is recorded as
skipped, with the reason.

Timing method: :mod:`.timing`. Correctness guard: :mod:`.guard`.

FLOPs (the FlashAttention convention): forward = 4 * b * s^2 * h * d (matmuls only), halved when causal; for
varlen the sum over sequences of 4 * s_i^2 * h * d; ``fwd+bwd`` counts 3.5x that (forward 1x + backward 2.5x),
timed as one jitted ``grad`` of ``sum(out * cotangent)`` w.r.t. q, k, v (which runs the forward too); prefill
counts ``4 * b * hq * d * sum_i (cache - new + i + 1)`` (:mod:`.prefill`).

Modules: ``common`` (shared names), ``env`` (where it runs), ``timing``, ``guard``, ``impls``, one per suite
(``attn``, ``decode``, ``prefill``, ``varlen``), ``tables`` (markdown), ``plot`` (one PNG per
run, every suite), ``record`` (RESULTS.md), ``cli``.
"""
from .attn import AttnConfig, attn_configs, attn_inputs, run_attn
from .cli import build_parser, main, resolve
from .common import DENSE, DTYPES, FA3_NAME, WRONG_TOL
from .decode import (DecodeConfig, best_rows, cache_inputs, decode_chain_sets, decode_configs,
                     decode_set_count, measure_copy, run_decode, xla_reference)
from .env import environment, free_device_bytes, git_commit, on_gpu, platform_name
from .guard import dense_reference, padded_reference, rel_err, varlen_reference
from .impls import (ALL_ATTN_IMPL_NAMES, ALL_VARLEN_IMPL_NAMES, DET, SINKS, VARIANTS, DecodeImpl, Impl, VarlenImpl,
                    attn_impls, decode_impls, fa3jax_impl, fa3jax_kvcache_impl, fa3jax_varlen_impl, kvcache_impls,
                    prefill_impls, ratio_field, varlen_impls, variant_suffix, with_variants)
from .plot import plot_attn, plot_decode, plot_prefill, plot_varlen
from .prefill import PrefillConfig, prefill_configs, run_prefill
from .record import default_results_md, markdown_section, record_markdown
from .tables import attn_table, decode_table, prefill_table, varlen_table
from .timing import TimingOptions, chained, compile_fn, measure, measure_each, measure_interleaved, timed_fn
from .varlen import VarlenConfig, run_varlen, varlen_configs, varlen_inputs, varlen_lengths

__all__ = [
    "ALL_ATTN_IMPL_NAMES", "ALL_VARLEN_IMPL_NAMES", "AttnConfig", "DENSE", "DET", "DTYPES", "DecodeConfig",
    "DecodeImpl", "FA3_NAME", "Impl", "PrefillConfig", "SINKS", "TimingOptions", "VARIANTS", "VarlenConfig",
    "VarlenImpl", "WRONG_TOL",
    "attn_configs", "attn_impls", "attn_inputs", "attn_table", "best_rows", "build_parser", "cache_inputs",
    "chained", "compile_fn", "decode_chain_sets", "decode_configs", "decode_impls",
    "decode_set_count", "decode_table", "default_results_md", "dense_reference", "environment", "fa3jax_impl",
    "fa3jax_kvcache_impl", "fa3jax_varlen_impl", "free_device_bytes", "git_commit", "kvcache_impls", "main",
    "markdown_section", "measure", "measure_copy", "measure_each", "measure_interleaved", "on_gpu", "padded_reference",
    "platform_name", "plot_attn", "plot_decode", "plot_prefill", "plot_varlen", "prefill_configs", "prefill_impls",
    "prefill_table", "ratio_field", "record_markdown", "rel_err", "resolve", "run_attn", "run_decode", "run_prefill",
    "run_varlen", "timed_fn", "variant_suffix", "varlen_configs", "varlen_impls", "varlen_inputs", "varlen_lengths",
    "varlen_reference", "varlen_table", "with_variants", "xla_reference",
]

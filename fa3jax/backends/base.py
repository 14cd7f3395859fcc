"""The contract between the shared layers and a backend.

A backend receives an :class:`~fa3jax.spec.AttentionSpec` that validation has already checked, plus arrays
(q/k/v and the runtime metadata below). It never re-parses user arguments. When it cannot serve a valid request
it raises ``NotImplementedError`` with the reason from :meth:`Backend.check`, before tracing any kernel; the
registry uses that to fall back.

Array conventions (all backends):
  * dense   q (b, lq, hq, d), k/v (b, lk, hk, d); out like q; lse float32 (b, hq, lq)
  * varlen  q (total_q, hq, d), k/v (total_k, hk, d); out like q; lse float32 (hq, total_q)
  * kvcache q (b, lq, hq, d); out like q; lse float32 (b, hq, lq)
Rows that see no key: out 0, lse -inf (with sinks: lse = the head's sink). v and out may have a smaller head
dim than q/k (``spec.head_dim_v``, MLA). The backward takes ``dlse`` (cotangent of the LSE, zeros when unused)
and folds it into the softmax gradient: ``ds = p * (dp - (rowsum(dO * O) - dlse))``.

Attention sinks (``spec.has_sinks``): the args' ``sinks`` (float32 (hq,)) is one logit per query head, compared
with the scaled (and soft-capped) scores, that joins every row's denominator and carries no value. The forward
returns the sink-inclusive out and LSE; the backward's formula above is then unchanged (p = exp(s - lse) with
that LSE), and the sinks' own gradient is taken by :func:`fa3jax.vjp.sink_grad` from out/lse alone.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax

from ..spec import AttentionSpec


class DenseArgs(NamedTuple):
    """Runtime metadata of a dense call. ``q_offset``/``k_offset`` are int32 scalars (traced under ring
    attention) giving the global position of row 0 of q and k; ``None`` when the block is the whole sequence
    (``spec.has_offsets`` is then False)."""

    q_offset: Optional[jax.Array] = None
    k_offset: Optional[jax.Array] = None
    # int32 (b, seqlen_q) / (b, seqlen_k) when ``spec.has_segment_ids``: query i sees key j only if the ids match
    q_segment_ids: Optional[jax.Array] = None
    k_segment_ids: Optional[jax.Array] = None
    sinks: Optional[jax.Array] = None  # float32 (hq,) when ``spec.has_sinks``


class VarlenArgs(NamedTuple):
    """Already sanitized by :func:`fa3jax.validation.sanitize_varlen`: cu_seqlens are int32, non-decreasing,
    within ``[0, total]``; ``seqused_k`` (or None) is int32 (b,) within ``[0, cu_k[b+1] - cu_k[b]]``."""

    cu_seqlens_q: jax.Array
    cu_seqlens_k: jax.Array
    seqused_k: Optional[jax.Array] = None
    sinks: Optional[jax.Array] = None  # float32 (hq,) when ``spec.has_sinks``


class KVCacheArgs(NamedTuple):
    """Already sanitized by :func:`fa3jax.validation.sanitize_kvcache`.

    * ``seqlens_k`` int32 (b,): exclusive end of the visible keys, i.e. cache_seqlens + seqlen_new, clamped so
      that it never exceeds the capacity.
    * ``cache_seqlens`` int32 (b,): where the new keys start (positions ``cache_seqlens + t``).
    * ``leftpad`` int32 (b,) or None: first visible key position, ``0 <= leftpad <= cache_seqlens``.
      Masks see key position ``j - leftpad`` and key length ``seqlens_k - leftpad``.
    * ``batch_idx`` int32 (b,) or None: cache row of each query batch, always in range (rows whose user index
      was out of range see an empty cache: their ``cache_seqlens`` was set to 0).
    * ``page_table`` int32 (b, pages_per_seq) or None: entries outside ``[0, num_pages)`` are never
      dereferenced; the keys of such a page are masked out.
    * ``k_new``/``v_new`` (b, seqlen_new, hk, d) or None: new keys/values (rotary already applied to k_new),
      logically at positions ``cache_seqlens + t``. Backends attend to them whether or not the cache arrays they
      receive contain them.
    * ``raw_cache_seqlens`` int32 (b,) or None: the user's cache_seqlens before the clamp, where the clamp is the
      only rule applied to them (no cache_batch_idx). A kernel that applies the same clamp itself (cuda's
      ``KVCacheSeq``) may read these instead of ``cache_seqlens``, so that the clamp is no XLA op of its own (one
      launch less per decode call); XLA drops the clamp when nothing else reads it.
    """

    seqlens_k: jax.Array
    cache_seqlens: jax.Array
    leftpad: Optional[jax.Array] = None
    batch_idx: Optional[jax.Array] = None
    page_table: Optional[jax.Array] = None
    k_new: Optional[jax.Array] = None
    v_new: Optional[jax.Array] = None
    sinks: Optional[jax.Array] = None  # float32 (hq,) when ``spec.has_sinks``
    raw_cache_seqlens: Optional[jax.Array] = None


class Backend:
    """Base class; subclasses override what they support. Every method that cannot serve raises
    ``NotImplementedError(reason)``."""

    name: str = "?"

    def availability(self) -> tuple[bool, str]:
        """Whether this backend can run on the current default device at all, and why not."""
        raise NotImplementedError

    # --- capability checks: raise NotImplementedError(reason) for a valid spec this backend cannot serve
    def check_forward(self, spec: AttentionSpec) -> None:
        raise NotImplementedError(f"{self.name}: no forward for mode {spec.mode!r}")

    def check_backward(self, spec: AttentionSpec) -> None:
        raise NotImplementedError(f"{self.name}: no backward for mode {spec.mode!r}")

    # --- kernels
    def forward(self, spec: AttentionSpec, q, k, v, args):
        """dense/varlen: returns (out, lse)."""
        raise NotImplementedError(f"{self.name}: forward not implemented")

    def backward(self, spec: AttentionSpec, q, k, v, out, lse, dout, dlse, args):
        """dense/varlen: returns (dq, dk, dv) in the dtypes of q, k, v."""
        raise NotImplementedError(f"{self.name}: backward not implemented")

    def kvcache_forward(self, spec: AttentionSpec, q, k_cache, v_cache, args: KVCacheArgs):
        """kvcache: returns (out, lse). ``q`` and ``args.k_new`` already carry rotary embeddings."""
        raise NotImplementedError(f"{self.name}: kvcache not implemented")

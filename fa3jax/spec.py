"""Frozen, hashable descriptions of one attention call.

:mod:`fa3jax.validation` is the only producer of these objects; backends only read them. They are hashable so
they can be static arguments of ``jax.jit`` / ``custom_vjp`` and keys of tuning tables.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .masking import Window


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Fields common to every mode.

    Shapes, by mode:
      * ``dense``:   q (batch, seqlen_q, hq, d), k/v (batch, seqlen_k, hk, d)
      * ``varlen``:  q (seqlen_q=total_q, hq, d), k/v (seqlen_k=total_k, hk, d), ``batch`` sequences
      * ``kvcache``: q (batch, seqlen_q, hq, d), caches described by :class:`KVCacheSpec`

    v (and out) have head dim ``head_dim_v`` (<= ``head_dim``; MLA), equal to ``head_dim`` unless given.
    """

    mode: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    num_heads_q: int
    num_heads_k: int
    head_dim: int
    dtype: str  # "float16" | "bfloat16" | "float32"
    softmax_scale: float
    window: Window
    softcap: float = 0.0
    deterministic: bool = False
    varlen: Optional["VarlenSpec"] = None
    kvcache: Optional["KVCacheSpec"] = None
    # One block of a longer sequence (ring attention): masks then use the whole sequence's lengths and the
    # runtime offsets passed next to the arrays. Without offsets the globals equal the call's own lengths.
    has_offsets: bool = False
    global_seqlen_q: Optional[int] = None
    global_seqlen_k: Optional[int] = None
    # dense only: packed sequences; a query sees only keys of its own segment id (DenseArgs carries the ids)
    has_segment_ids: bool = False
    # attention sinks: one float32 logit per query head joins every row's softmax denominator (the args carry it)
    has_sinks: bool = False
    head_dim_v: Optional[int] = None  # None: head_dim

    def __post_init__(self):
        if self.head_dim_v is None:
            object.__setattr__(self, "head_dim_v", self.head_dim)
        if not self.has_offsets:  # the call is the whole sequence, whatever replace() carried over
            object.__setattr__(self, "global_seqlen_q", self.seqlen_q)
            object.__setattr__(self, "global_seqlen_k", self.seqlen_k)
        elif self.global_seqlen_q is None or self.global_seqlen_k is None:
            raise ValueError(f"a block spec needs its global lengths; got {self.global_seqlen_q=}, "
                             f"{self.global_seqlen_k=}")

    @property
    def has_dense_args(self) -> bool:
        """Whether a dense call carries runtime arrays beside q/k/v (DenseArgs: ring offsets, segment ids, sinks)."""
        return self.has_offsets or self.has_segment_ids or self.has_sinks

    @property
    def group_size(self) -> int:
        return self.num_heads_q // self.num_heads_k

    @property
    def causal(self) -> bool:
        return self.window.right == 0

    def replace(self, **changes) -> "AttentionSpec":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class VarlenSpec:
    """Packed variable-length batch: sequence ``b`` owns rows ``[cu_q[b], cu_q[b+1])`` of q and
    ``[cu_k[b], cu_k[b] + len_k[b])`` of k/v, where ``len_k`` is ``seqused_k`` when given, else ``cu_k`` diff."""

    max_seqlen_q: int
    max_seqlen_k: int
    has_seqused_k: bool


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """Decode / chunked-prefill against a cache.

    Contiguous cache: (cache_batch, capacity, hk, d). Paged cache: (num_pages, page_size, hk, d) with a page table
    (batch, pages_per_seq), capacity = pages_per_seq * page_size. Sequence ``b`` sees keys at cache positions
    ``[leftpad[b], cache_seqlens[b] + seqlen_new)``; the new keys (if any) are written at ``cache_seqlens[b]``.
    """

    capacity: int
    cache_batch: int  # contiguous: leading dim of the cache; paged: num_pages
    paged: bool
    page_size: int  # paged only, else 0
    pages_per_seq: int  # paged only, else 0
    seqlen_new: int  # 0 when no new k/v
    rotary_dim: int  # 0 when no rotary
    rotary_interleaved: bool
    has_cache_batch_idx: bool
    has_cache_leftpad: bool
    num_splits: int  # 0 = automatic
    return_updated_cache: bool


RING_LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class RingConfig:
    """Sequence-parallel execution inside ``shard_map`` over mesh axis ``axis_name`` of size ``axis_size``:
    "contiguous" (device i holds chunk i) or "zigzag" (device i holds chunks i and 2n-1-i of 2n, which balances
    causal work)."""

    axis_name: str
    axis_size: int
    layout: str = "contiguous"

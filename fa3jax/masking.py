"""Masking semantics: the single definition every backend and kernel mirrors.

A query at position ``i`` of a sequence with ``seqlen_q`` queries may attend to a key at position ``j`` of a
sequence with ``seqlen_k`` keys iff

    0 <= i < seqlen_q and 0 <= j < seqlen_k
    and (left  < 0 or j >= i + (seqlen_k - seqlen_q) - left)
    and (right < 0 or j <= i + (seqlen_k - seqlen_q) + right)

This is FlashAttention's convention: windows are aligned to the bottom-right corner of the score matrix, so the
last query always sees the last key, and ``causal`` is the window ``(left, 0)``. A query row that can see no key
(possible when ``seqlen_q > seqlen_k`` under causal, or with a narrow window) produces output 0 and LSE -inf
(with attention sinks: LSE = the head's sink, which joins every row's denominator).

Everything here is written against an array namespace ``xp`` (numpy or jax.numpy) so that the float64 test
reference, the XLA backend and the kernel tests evaluate literally the same expression.

A new mask kind (top-left causal, segment ids, ...) touches these files, plus tests: this module (the
definition: ``allowed`` and ``key_range``); ``backends/triton/plan_common.py``, whose ``mask_group`` alone turns
the spec's mask into the Triton kernels' ``MASK`` constexpr tuple and runtime mask arguments;
``triton_kernels/flash_common.py``, whose mask functions (``_allowed``, ``_key_bound``, ``_key_blocks``,
``_query_blocks``, ``_mask_pos``) are the only kernel code that reads them (every other kernel function passes
``MASK`` and the runtime group ``pos`` along whole); and ``backends/xla.py`` where it builds the mask other than
through ``allowed``. A kind that needs runtime data puts it in the dense kernels' one int32 mask array (ring
offsets, or segment ids: ``mask_group`` names it, the backend builds it), which ``_mask_pos`` reads into ``pos``.
"""
from __future__ import annotations

from typing import NamedTuple

UNBOUNDED = -1


class Window(NamedTuple):
    """A normalized attention window. ``-1`` means unbounded on that side."""

    left: int
    right: int

    @property
    def is_full(self) -> bool:
        return self.left < 0 and self.right < 0


def normalize_window(window_size, is_causal: bool) -> Window:
    """Fold ``is_causal`` into the window, as FlashAttention does: causal is a window with ``right = 0``.

    Negative sizes are all read as unbounded. Validation of the user's value happens in
    :mod:`fa3jax.validation`; this only normalizes.
    """
    left, right = (int(w) for w in window_size)
    left = UNBOUNDED if left < 0 else left
    right = UNBOUNDED if right < 0 else right
    if is_causal:
        right = 0
    return Window(left, right)


def allowed(q_pos, k_pos, seqlen_q, seqlen_k, window: Window, xp):
    """Boolean mask, broadcasting its arguments: may query ``q_pos`` attend to key ``k_pos``?

    ``seqlen_q``/``seqlen_k`` are the lengths of the sequence the positions belong to (scalars or arrays that
    broadcast against the positions). Positions outside ``[0, seqlen)`` are never allowed, so padding rows and
    columns come out masked by the same rule.
    """
    ok = (q_pos >= 0) & (q_pos < seqlen_q) & (k_pos >= 0) & (k_pos < seqlen_k)
    diag = q_pos + (seqlen_k - seqlen_q)
    if window.left >= 0:
        ok = ok & (k_pos >= diag - window.left)
    if window.right >= 0:
        ok = ok & (k_pos <= diag + window.right)
    return ok


def key_range(q_lo, q_hi, seqlen_q, seqlen_k, window: Window):
    """Half-open range of key positions that queries ``[q_lo, q_hi)`` may touch (for block skipping).

    Pure integer arithmetic on Python ints or arrays; callers clip to ``[0, seqlen_k)`` themselves.
    """
    shift = seqlen_k - seqlen_q
    lo = q_lo + shift - window.left if window.left >= 0 else 0 * q_lo
    hi = (q_hi - 1) + shift + window.right + 1 if window.right >= 0 else 0 * q_hi + seqlen_k
    return lo, hi


def softcap_scores(s, softcap: float, xp):
    """FlashAttention's logit soft-capping, applied to already-scaled scores: ``c * tanh(s / c)``."""
    if softcap > 0.0:
        return softcap * xp.tanh(s / softcap)
    return s

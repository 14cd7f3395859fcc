"""Variable-length (packed) FlashAttention forward.

Layouts: q/out (TOTAL_Q, HQ, D), k/v (TOTAL_K, HK, D), lse float32 (HQ, TOTAL_Q) in natural log. Sequence ``b``
owns q rows ``[cu_q[b], cu_q[b+1])`` and k rows ``[cu_k[b], cu_k[b] + len_k[b])`` with ``len_k`` = ``seqused_k[b]``
(HAS_SEQUSED) or the cu_k difference. Index arrays are sanitized on the host side (non-decreasing, in range).

Two grids, chosen by the constexpr SEQ_PAD:

* Compact (SEQ_PAD > 0, a power of two >= batch): grid (n_progs, HQ, 1) with
  n_progs = batch + (TOTAL_Q - batch) // BLOCK_M + 1, a static bound on the real query tiles plus at least one
  spare. Program (t, h) maps t to a tile of the enumeration "sequence 0's tiles, then sequence 1's, ..." from the
  per-sequence tile counts cdiv(len_q[b], BLOCK_M), recomputed in every program from cu_q (cu_seqlens are device
  values, the host cannot do it). The programs past the last real tile own the q rows that belong to no sequence.
  The spare count is n_progs - n_tiles >= floor(U / BLOCK_M) + 1 >= cdiv(U, BLOCK_M) for U uncovered rows,
  because sum_b cdiv(len_b, BLOCK_M) <= floor((sum_b len_b + batch * (BLOCK_M - 1)) / BLOCK_M), so each of them
  fills at most one tile of rows.
* Per sequence (SEQ_PAD == 0, batches too large to scan in one program): grid (cdiv(max_seqlen_q, BLOCK_M), HQ,
  batch + 1). Program (m, h, b < batch) computes query tile m of sequence b (tiles past the sequence's end do
  nothing); the extra slice b == batch owns the uncovered q rows.

Uncovered rows (``[0, cu_q[0])`` and ``[cu_q[batch], TOTAL_Q)``) get out 0 / lse -inf, so every element of
out/lse is written by exactly one program and no output needs a pre-fill.

Masks are evaluated per sequence with local positions, as ``fa3jax.masking.allowed`` with the sequence lengths.
The query tile itself is the dense kernel's (``flash_fwd._fwd_tile``).
"""
import triton
import triton.language as tl

from .flash_common import _cdiv, _seq_bounds
from .flash_fwd import _fwd_tile


@triton.jit
def _varlen_fill_uncovered(OUT, LSE, CU_Q, total_q, batch, off_h, pid_m, n_progs,
                           NUM_HEADS_Q: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    first = tl.load(CU_Q)
    last = tl.load(CU_Q + batch)
    n_head = first
    n_unc = first + (total_q - last)  # uncovered rows, enumerated as [0, first) then [last, total_q)
    offs_t = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    zero = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    ninf = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start in range(pid_m * BLOCK_M, n_unc, n_progs * BLOCK_M):
        idx = start + offs_t
        rows = tl.where(idx < n_head, idx, idx - n_head + last)
        ok = idx < n_unc
        rows = tl.where(ok, rows, 0)
        ptrs = OUT + rows.to(tl.int64)[:, None] * STRIDE_QM + off_h * HEAD_DIM + offs_d[None, :]
        if HEAD_DIM == HEAD_DIM_PAD:
            tl.store(ptrs, zero.to(OUT.dtype.element_ty), mask=ok[:, None])
        else:
            tl.store(ptrs, zero.to(OUT.dtype.element_ty), mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM))
        tl.store(LSE + off_h.to(tl.int64) * total_q + rows, ninf, mask=ok)


@triton.jit
def _varlen_tile_of(CU_Q, t, batch, BLOCK_M: tl.constexpr, SEQ_PAD: tl.constexpr):
    """Compact grid: (b, j, n_tiles) for program t, with tile j of sequence b if t < n_tiles (the number of real
    tiles), else b = batch and j = t - n_tiles, this program's index among the spare ones."""
    offs = tl.arange(0, SEQ_PAD)
    in_batch = offs < batch
    lo = tl.load(CU_Q + offs, mask=in_batch, other=0)
    hi = tl.load(CU_Q + offs + 1, mask=in_batch, other=0)
    # The max only guards _cdiv's x >= 0; sanitized cu_seqlens are already non-decreasing. An empty sequence
    # gets 0 tiles, so no t maps to it.
    tiles = _cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    ends = tl.cumsum(tiles, 0)
    # Sequences whose tiles all come before t: a prefix, since ends is non-decreasing. The padding lanes have
    # ends == n_tiles and must not count when t >= n_tiles.
    before = (ends <= t) & in_batch
    b = tl.sum(before.to(tl.int32), 0)
    first = tl.sum(tl.where(before, tiles, 0), 0)
    n_tiles = tl.sum(tiles, 0)
    return b, t - first, n_tiles


@triton.jit
def _varlen_attn_fwd(Q, K, V, CU_Q, CU_K, SEQUSED_K,
                     total_q, batch, scale_in, scale_out,
                     OUT, LSE,
                     NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                     SOFTCAP: tl.constexpr, HAS_SEQUSED: tl.constexpr, REVERSE_M: tl.constexpr,
                     SCALE_POS: tl.constexpr, SEQ_PAD: tl.constexpr):
    """scale_in/scale_out as in ``flash_fwd._attn_fwd`` (log2 domain, optional softcap). SEQ_PAD selects the
    grid (module docstring): 0 = one grid slice per sequence, else the compact grid, scanning cu_q in vectors
    of SEQ_PAD lanes."""
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    off_h = tl.program_id(1)
    off_hk = off_h // GROUP
    if SEQ_PAD > 0:
        off_b, j, n_tiles = _varlen_tile_of(CU_Q, tl.program_id(0), batch, BLOCK_M, SEQ_PAD)
        fill_pid = j
        fill_progs = tl.num_programs(0) - n_tiles
    else:
        off_b = tl.program_id(2)
        j = tl.program_id(0)
        fill_pid = tl.program_id(0)
        fill_progs = tl.num_programs(0)

    if off_b == batch:
        _varlen_fill_uncovered(OUT, LSE, CU_Q, total_q, batch, off_h, fill_pid, fill_progs,
                               NUM_HEADS_Q, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    else:
        q_start, seqlen_q, k_start, seqlen_k, _ = _seq_bounds(CU_Q, CU_K, SEQUSED_K, off_b, HAS_SEQUSED)
        # REVERSE_M (the window has a right bound, so a sequence's last tiles see the most keys): heavy tiles
        # start first and light ones fill the tail, as in the dense kernel. The compact grid reverses within each
        # sequence, whose tiles are consecutive programs; sequences keep their order (ordering them by length would
        # take a sort of cu_q in every program).
        if REVERSE_M:
            if SEQ_PAD > 0:
                pid_m = _cdiv(seqlen_q, BLOCK_M) - 1 - j
            else:
                pid_m = tl.num_programs(0) - 1 - j
        else:
            pid_m = j
        start_m = pid_m * BLOCK_M
        # Always true on the compact grid; the per-sequence grid has tiles past the sequence's end.
        if start_m < seqlen_q:
            # Local positions: no offsets, mask lengths = this sequence's lengths.
            _fwd_tile(Q, K, V, OUT, LSE,
                      (q_start + start_m).to(tl.int64) * STRIDE_QM + off_h * HEAD_DIM,
                      k_start.to(tl.int64) * STRIDE_KN + off_hk * HEAD_DIM,
                      off_h.to(tl.int64) * total_q + q_start,
                      start_m, seqlen_q, seqlen_k, 0, 0, seqlen_q, seqlen_k, scale_in, scale_out,
                      STRIDE_QM, STRIDE_KN, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT,
                      SOFTCAP, SCALE_POS)

"""Variable-length (packed) FlashAttention backward: the varlen twin of ``flash_bwd.py``.

Layouts as in ``flash_varlen.py``: q/dq (TOTAL_Q, HQ, D), out/dout (TOTAL_Q, HQ, DV), k/dk (TOTAL_K, HK, D), v/dv
(TOTAL_K, HK, DV) with DV = HEAD_DIM_V <= D (MLA), lse and delta float32 (HQ, TOTAL_Q). Sequence ``b`` owns q rows ``[cu_q[b], cu_q[b+1])`` and k rows ``[cu_k[b], cu_k[b] +
len_k[b])``, ``len_k`` = ``seqused_k[b]`` (HAS_SEQUSED) or the cu_k difference; index arrays are sanitized on the
host (non-decreasing, in range, seqused_k <= the cu_k difference).

The preprocess (delta = rowsum(dO * O) - dLSE) is the dense ``flash_bwd._bwd_preprocess`` launched with batch 1 and
seqlen_q = TOTAL_Q: its (B, HQ, Lq) delta layout is exactly (HQ, TOTAL_Q) then.

``_varlen_bwd_dkdv``: grid (cdiv(max_seqlen_k, BLOCK_N), HK, batch + 1). Program (n, hk, b < batch) computes key
tile n of sequence b for kv head hk, walking every query head of the GQA group and every visible query tile of
the sequence in a fixed order (no atomics). The programs of (hk, b) also zero, with a grid-stride loop, the k rows
``[cu_k[b] + len_k[b], cu_k[b+1])`` that seqused_k leaves out (and, defensively, rows past the tiles the grid
covers). The extra slice b == batch zeroes the k rows outside every sequence (``[0, cu_k[0])`` and
``[cu_k[batch], TOTAL_K)``). So every dK/dV element is written by exactly one program.

``_varlen_bwd_dq``: grid (cdiv(max_seqlen_q, BLOCK_M), HQ, batch + 1), the mirror of the forward; the extra slice
writes dQ = 0 on the q rows outside every sequence.

Masks use per-sequence local positions and lengths, as ``fa3jax.masking.allowed``; the tiles are the dense
kernel's ``_dkdv_tile`` / ``_dq_tile`` with zero offsets.
"""
import triton
import triton.language as tl

from .flash_bwd import _dkdv_tile, _dq_tile
from .flash_common import _seq_bounds


@triton.jit
def _zero_ranges(PTR, a_lo, a_n, b_lo, b_n, off_h, pid, n_progs,
                 ROW_STRIDE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Write 0 to head ``off_h`` of rows [a_lo, a_lo + a_n) then [b_lo, b_lo + b_n), enumerated as one list and
    split over ``n_progs`` programs (this one is ``pid``) with a grid-stride loop."""
    n_all = a_n + b_n
    offs_t = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    zero = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32).to(PTR.dtype.element_ty)
    for start in range(pid * BLOCK, n_all, n_progs * BLOCK):
        idx = start + offs_t
        ok = idx < n_all
        rows = tl.where(idx < a_n, a_lo + idx, b_lo + (idx - a_n))
        rows = tl.where(ok, rows, 0)
        ptrs = PTR + rows.to(tl.int64)[:, None] * ROW_STRIDE + off_h * HEAD_DIM + offs_d[None, :]
        if HEAD_DIM == HEAD_DIM_PAD:
            tl.store(ptrs, zero, mask=ok[:, None])
        else:
            tl.store(ptrs, zero, mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _varlen_bwd_dkdv(Q, K, V, DO, LSE, DELTA, CU_Q, CU_K, SEQUSED_K,
                     total_q, total_k, batch, scale_in, scale_out, sm_scale,
                     DK, DV,
                     NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     MASK: tl.constexpr, HAS_SEQUSED: tl.constexpr, REVERSE_N: tl.constexpr,
                     OVERLAP: tl.constexpr):
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    STRIDE_OM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM_V
    STRIDE_VN: tl.constexpr = NUM_HEADS_K * HEAD_DIM_V
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    pid_n = pid
    if REVERSE_N:
        pid_n = n_progs - 1 - pid
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)

    if off_b == batch:
        first = tl.load(CU_K)
        last = tl.load(CU_K + batch)
        _zero_ranges(DK, 0, first, last, total_k - last, off_hk, pid, n_progs,
                     STRIDE_KN, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
        _zero_ranges(DV, 0, first, last, total_k - last, off_hk, pid, n_progs,
                     STRIDE_VN, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N)
    else:
        q_start, seqlen_q, k_start, seqlen_k, k_span = _seq_bounds(CU_Q, CU_K, SEQUSED_K, off_b, HAS_SEQUSED)
        # Rows of this sequence's cu_k span that no key tile computes: past seqused_k (or past the grid).
        gap_lo = tl.minimum(seqlen_k, n_progs * BLOCK_N)
        _zero_ranges(DK, k_start + gap_lo, k_span - gap_lo, 0, 0, off_hk, pid, n_progs,
                     STRIDE_KN, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N)
        _zero_ranges(DV, k_start + gap_lo, k_span - gap_lo, 0, 0, off_hk, pid, n_progs,
                     STRIDE_VN, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N)
        start_n = pid_n * BLOCK_N
        if start_n < seqlen_k:
            # Local positions: no offsets; key rows past the sequence's end are pushed past seqlen_k.
            _dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV,
                       (k_start + start_n).to(tl.int64) * STRIDE_KN + off_hk * HEAD_DIM,
                       (k_start + start_n).to(tl.int64) * STRIDE_VN + off_hk * HEAD_DIM_V,
                       q_start.to(tl.int64) * STRIDE_QM, q_start.to(tl.int64) * STRIDE_OM, q_start.to(tl.int64),
                       total_q, off_hk, start_n, seqlen_q, seqlen_k, (0, 0, seqlen_q, seqlen_k),
                       (scale_in, scale_out), sm_scale, STRIDE_QM, STRIDE_KN, STRIDE_OM, STRIDE_VN, GROUP, HEAD_DIM,
                       HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, MASK, OVERLAP)


@triton.jit
def _varlen_bwd_dq(Q, K, V, DO, LSE, DELTA, CU_Q, CU_K, SEQUSED_K,
                   total_q, batch, scale_in, scale_out, sm_scale,
                   DQ,
                   NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASK: tl.constexpr, HAS_SEQUSED: tl.constexpr, REVERSE_M: tl.constexpr):
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    STRIDE_OM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM_V
    STRIDE_VN: tl.constexpr = NUM_HEADS_K * HEAD_DIM_V
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    pid_m = tl.program_id(0)
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // GROUP

    if off_b == batch:
        first = tl.load(CU_Q)
        last = tl.load(CU_Q + batch)
        _zero_ranges(DQ, 0, first, last, total_q - last, off_h, tl.program_id(0), tl.num_programs(0),
                     STRIDE_QM, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    else:
        q_start, seqlen_q, k_start, seqlen_k, k_span = _seq_bounds(CU_Q, CU_K, SEQUSED_K, off_b, HAS_SEQUSED)
        start_m = pid_m * BLOCK_M
        if start_m < seqlen_q:
            _dq_tile(Q, K, V, DO, LSE, DELTA, DQ,
                     (q_start + start_m).to(tl.int64) * STRIDE_QM + off_h * HEAD_DIM,
                     k_start.to(tl.int64) * STRIDE_KN + off_hk * HEAD_DIM,
                     (q_start + start_m).to(tl.int64) * STRIDE_OM + off_h * HEAD_DIM_V,
                     k_start.to(tl.int64) * STRIDE_VN + off_hk * HEAD_DIM_V,
                     off_h.to(tl.int64) * total_q + q_start,
                     start_m, seqlen_q, seqlen_k, (0, 0, seqlen_q, seqlen_k), (scale_in, scale_out), sm_scale,
                     STRIDE_QM, STRIDE_KN, STRIDE_OM, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
                     BLOCK_M, BLOCK_N, MASK)

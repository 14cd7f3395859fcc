"""Variable-length (packed) FlashAttention forward.

Layouts: q (TOTAL_Q, HQ, D), k (TOTAL_K, HK, D), v (TOTAL_K, HK, DV), out (TOTAL_Q, HQ, DV), lse float32
(HQ, TOTAL_Q) in natural log (DV = HEAD_DIM_V <= D, MLA). Sequence ``b``
owns q rows ``[cu_q[b], cu_q[b+1])`` and k rows ``[cu_k[b], cu_k[b] + len_k[b])`` with ``len_k`` = ``seqused_k[b]``
(HAS_SEQUSED) or the cu_k difference. Index arrays are sanitized on the host side (non-decreasing, in range).

Grid: (cdiv(max_seqlen_q, BLOCK_M), HQ, batch + 1). Program (m, h, b < batch) computes query tile m of sequence b
for head h (tiles past the sequence's end do nothing). The extra slice b == batch owns the q rows that belong to no
sequence (``[0, cu_q[0])`` and ``[cu_q[batch], TOTAL_Q)``) and writes out 0 / lse -inf there with a grid-stride
loop, so every element of out/lse is written by exactly one program and no output needs a pre-fill. With
HAS_SINKS (SINKS float32 (HQ,)) those rows, like every row that sees no key, get lse = the head's sink.

Masks are evaluated per sequence with local positions, as ``fa3jax.masking.allowed`` with the sequence lengths.
The query tile itself is the dense kernel's (``flash_fwd._fwd_tile``).
"""
import triton
import triton.language as tl

from .flash_common import _seq_bounds
from .flash_fwd import _fwd_tile


@triton.jit
def _varlen_fill_uncovered(OUT, LSE, CU_Q, total_q, batch, off_h, pid_m, n_progs, sink,
                           NUM_HEADS_Q: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           BLOCK_M: tl.constexpr, HAS_SINKS: tl.constexpr):
    """OUT rows of head dim HEAD_DIM (the value head dim): 0; LSE: -inf, or the sink (HAS_SINKS)."""
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    first = tl.load(CU_Q)
    last = tl.load(CU_Q + batch)
    n_head = first
    n_unc = first + (total_q - last)  # uncovered rows, enumerated as [0, first) then [last, total_q)
    offs_t = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    zero = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    if HAS_SINKS:
        ninf = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
    else:
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
def _varlen_attn_fwd(Q, K, V, SINKS, CU_Q, CU_K, SEQUSED_K,
                     total_q, batch, scale_in, scale_out,
                     OUT, LSE,
                     NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     MASK: tl.constexpr, HAS_SEQUSED: tl.constexpr, REVERSE_M: tl.constexpr,
                     SCALE_POS: tl.constexpr, OVERLAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    """scale_in/scale_out and SINKS/HAS_SINKS as in ``flash_fwd._attn_fwd`` (log2 domain, optional softcap)."""
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
    if HAS_SINKS:
        sink = tl.load(SINKS + off_h)
    else:
        sink = 0.0

    if off_b == batch:
        _varlen_fill_uncovered(OUT, LSE, CU_Q, total_q, batch, off_h, tl.program_id(0), tl.num_programs(0), sink,
                               NUM_HEADS_Q, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, HAS_SINKS)
    else:
        q_start, seqlen_q, k_start, seqlen_k, _ = _seq_bounds(CU_Q, CU_K, SEQUSED_K, off_b, HAS_SEQUSED)
        start_m = pid_m * BLOCK_M
        if start_m < seqlen_q:
            # Local positions: no offsets, mask lengths = this sequence's lengths.
            _fwd_tile(Q, K, V, OUT, LSE,
                      (q_start + start_m).to(tl.int64) * STRIDE_QM + off_h * HEAD_DIM,
                      k_start.to(tl.int64) * STRIDE_KN + off_hk * HEAD_DIM,
                      (q_start + start_m).to(tl.int64) * STRIDE_OM + off_h * HEAD_DIM_V,
                      k_start.to(tl.int64) * STRIDE_VN + off_hk * HEAD_DIM_V,
                      off_h.to(tl.int64) * total_q + q_start,
                      start_m, seqlen_q, seqlen_k, (0, 0, seqlen_q, seqlen_k), (scale_in, scale_out), sink,
                      STRIDE_QM, STRIDE_KN, STRIDE_OM, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V,
                      HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, MASK, SCALE_POS, OVERLAP, HAS_SINKS)

"""Variable-length (packed) FlashAttention forward.

Layouts: q/out (TOTAL_Q, HQ, D), k/v (TOTAL_K, HK, D), lse float32 (HQ, TOTAL_Q) in natural log. Sequence ``b``
owns q rows ``[cu_q[b], cu_q[b+1])`` and k rows ``[cu_k[b], cu_k[b] + len_k[b])`` with ``len_k`` = ``seqused_k[b]``
(HAS_SEQUSED) or the cu_k difference. Index arrays are sanitized on the host side (non-decreasing, in range).

Grid: (cdiv(max_seqlen_q, BLOCK_M), HQ, batch + 1). Program (m, h, b < batch) computes query tile m of sequence b
for head h (tiles past the sequence's end do nothing). The extra slice b == batch owns the q rows that belong to no
sequence (``[0, cu_q[0])`` and ``[cu_q[batch], TOTAL_Q)``) and writes out 0 / lse -inf there with a grid-stride
loop, so every element of out/lse is written by exactly one program and no output needs a pre-fill.

Masks are evaluated per sequence with local positions, as ``fa3jax.masking.allowed`` with the sequence lengths.
The tile loop itself is the dense kernel's (``_fwd_ranges``).
"""
import triton
import triton.language as tl

from .flash_common import _key_blocks, _load_rows, _store_rows
from .flash_fwd import _fwd_ranges


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
def _varlen_attn_fwd(Q, K, V, CU_Q, CU_K, SEQUSED_K,
                     total_q, batch, scale_in, scale_out,
                     OUT, LSE,
                     NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                     SOFTCAP: tl.constexpr, HAS_SEQUSED: tl.constexpr, REVERSE_M: tl.constexpr,
                     SCALE_POS: tl.constexpr):
    """scale_in/scale_out as in ``flash_fwd._attn_fwd`` (log2 domain, optional softcap)."""
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    pid_m = tl.program_id(0)
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // GROUP

    if off_b == batch:
        _varlen_fill_uncovered(OUT, LSE, CU_Q, total_q, batch, off_h, tl.program_id(0), tl.num_programs(0),
                               NUM_HEADS_Q, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M)
    else:
        q_start = tl.load(CU_Q + off_b)
        seqlen_q = tl.load(CU_Q + off_b + 1) - q_start
        k_start = tl.load(CU_K + off_b)
        if HAS_SEQUSED:
            seqlen_k = tl.load(SEQUSED_K + off_b)
        else:
            seqlen_k = tl.load(CU_K + off_b + 1) - k_start
        start_m = pid_m * BLOCK_M
        if start_m < seqlen_q:
            offs_t = tl.arange(0, BLOCK_M)
            offs_m = start_m + offs_t
            offs_n = tl.arange(0, BLOCK_N)
            offs_d = tl.arange(0, HEAD_DIM_PAD)

            q_row0 = (q_start + start_m).to(tl.int64) * STRIDE_QM + off_h * HEAD_DIM
            k_base = K + k_start.to(tl.int64) * STRIDE_KN + off_hk * HEAD_DIM
            v_base = V + k_start.to(tl.int64) * STRIDE_KN + off_hk * HEAD_DIM
            tile_q = offs_t[:, None] * STRIDE_QM + offs_d[None, :]
            q = _load_rows(Q + q_row0 + tile_q, offs_m, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
            k_ptrs = k_base + offs_n[:, None] * STRIDE_KN + offs_d[None, :]
            v_ptrs = v_base + offs_n[:, None] * STRIDE_KN + offs_d[None, :]

            m_last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
            # Local positions: no offsets, mask lengths = this sequence's lengths.
            n_lo, f_lo, f_hi, n_hi = _key_blocks(start_m, m_last, seqlen_k, 0, 0, seqlen_q, seqlen_k,
                                                 BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
            rows_g = offs_m
            out, lse = _fwd_ranges(q, k_ptrs, v_ptrs, n_lo, f_lo, f_hi, n_hi, rows_g, offs_n, offs_d,
                                   seqlen_k, 0, seqlen_q, seqlen_k, scale_in, scale_out, STRIDE_KN, HEAD_DIM,
                                   HEAD_DIM_PAD, BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, SCALE_POS)
            _store_rows(OUT + q_row0 + tile_q, out.to(OUT.dtype.element_ty), offs_m, seqlen_q, offs_d,
                        HEAD_DIM, HEAD_DIM_PAD)
            lse_ptrs = LSE + off_h.to(tl.int64) * total_q + q_start + offs_m
            tl.store(lse_ptrs, lse, mask=offs_m < seqlen_q)

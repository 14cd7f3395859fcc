"""FlashAttention backward in three launches, none of which uses atomics, so gradients are bitwise repeatable
whatever ``deterministic`` says:

1. ``_bwd_preprocess``: delta = rowsum(dO * O) - dLSE (float32, (B, HQ, Lq)).
2. ``_bwd_dkdv``: one program per (key tile, kv head, batch); it walks every query head of its GQA group and
   every query tile that can see the key tile, in a fixed order, and owns its dK/dV rows outright.
3. ``_bwd_dq``: one program per (query tile, query head, batch) walking the visible key tiles; owns its dQ rows.

Scores are recomputed from the saved LSE in the log2 domain: p = exp2(s * log2 e - lse * log2 e). With attention
sinks that LSE already holds the sink (flash_fwd), so nothing here changes: the sink's own gradient is taken on the
host (``fa3jax.vjp.sink_grad``).

Head dims: q/k/dq/dk have HEAD_DIM (tiles of HEAD_DIM_PAD lanes), v/out/dout/dv have HEAD_DIM_V <= HEAD_DIM (MLA;
tiles of HEAD_DIM_V_PAD). The preprocess only reads out/dout and is launched with HEAD_DIM = the value head dim.
"""
import triton
import triton.language as tl

from .flash_common import (_LOG2E, _SOFTCAP, _allowed, _key_blocks, _load_rows, _mask_pos, _query_blocks,
                           _same_segment, _segment_ids, _store_rows, _tanh)


@triton.jit
def _bwd_preprocess(O, DO, DLSE, seqlen_q, DELTA,
                    NUM_HEADS_Q: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr):
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_t = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_t
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row0 = (off_b * seqlen_q + start_m) * STRIDE_QM + off_h * HEAD_DIM
    tile = offs_t[:, None] * STRIDE_QM + offs_d[None, :]
    o = _load_rows(O + row0 + tile, offs_m, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True).to(tl.float32)
    do = _load_rows(DO + row0 + tile, offs_m, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    stat = (off_b * NUM_HEADS_Q + off_h) * seqlen_q + offs_m
    if HAS_DLSE:
        delta = delta - tl.load(DLSE + stat, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + stat, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, m_begin, m_end, rows, cols_g, pos, scales,
                STRIDE_QM: tl.constexpr, STRIDE_OM: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, MASK: tl.constexpr, MASKED: tl.constexpr, OVERLAP: tl.constexpr):
    """Accumulate query tiles [m_begin, m_end) into dK (unscaled) and dV, working on transposed scores (N, M)
    so that both products reduce over the query axis without a transpose of the accumulators. rows = (q_ptrs,
    do_ptrs, lse_ptrs, delta_ptrs, offs_t, seqlen_q), scales = (scale_in, scale_out)."""
    q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs_t, seqlen_q = rows
    scale_in, scale_out = scales
    q_off, k_off, global_seqlen_q, global_seqlen_k = pos[0], pos[1], pos[2], pos[3]
    if MASKED:
        k_ids = _segment_ids(cols_g, pos, True, MASK)  # segment ids of the key tile, once per run
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)
    q_ptrs += m_begin.to(tl.int64) * STRIDE_QM
    do_ptrs += m_begin.to(tl.int64) * STRIDE_OM
    lse_ptrs += m_begin
    delta_ptrs += m_begin
    for start_m in range(m_begin, m_end, BLOCK_M):
        m_rows = start_m + offs_t
        q = _load_rows(q_ptrs, m_rows, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
        do = _load_rows(do_ptrs, m_rows, seqlen_q, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, MASKED)
        if MASKED:
            lse = tl.load(lse_ptrs, mask=m_rows < seqlen_q, other=0.0)
            delta = tl.load(delta_ptrs, mask=m_rows < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_ptrs)
            delta = tl.load(delta_ptrs)
        st = tl.dot(k, tl.trans(q))
        if OVERLAP:
            # Both score products first: the dV product is then in flight while dS is computed (a dot whose
            # result the loop reads is waited for at once, so only dV/dK can overlap the elementwise work).
            dpt = tl.dot(v, tl.trans(do))
        if MASK[_SOFTCAP]:
            t = _tanh(st * scale_in)
            s = t * scale_out
        else:
            s = st * scale_in
        pt = tl.exp2(s - (lse * _LOG2E)[None, :])
        if MASKED:
            # Select after exp2: a row with lse = -inf makes the exponent +inf, never NaN, and is dropped here.
            ok = _allowed((q_off + m_rows)[None, :], cols_g[:, None], global_seqlen_q, global_seqlen_k, MASK)
            ok = ok & (m_rows[None, :] < seqlen_q)
            ok = _same_segment(ok, k_ids, q_off + m_rows, pos, False, MASK)
            pt = tl.where(ok, pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        if not OVERLAP:
            dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        if MASK[_SOFTCAP]:
            dst = dst * (1.0 - t * t)
        dk = tl.dot(dst.to(q.dtype), q, dk)
        q_ptrs += BLOCK_M * STRIDE_QM
        do_ptrs += BLOCK_M * STRIDE_OM
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    return dk, dv


@triton.jit
def _dkdv_ranges(dk, dv, k, v, m_lo, f_lo, f_hi, m_hi, rows, cols_g, pos, scales,
                 STRIDE_QM: tl.constexpr, STRIDE_OM: tl.constexpr, HEAD_DIM: tl.constexpr,
                 HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, MASK: tl.constexpr, OVERLAP: tl.constexpr):
    """One query head's visible query tiles, as _query_blocks' three runs (masked edges, unmasked middle)."""
    dk, dv = _dkdv_tiles(dk, dv, k, v, m_lo, f_lo, rows, cols_g, pos, scales,
                         STRIDE_QM, STRIDE_OM, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, MASK,
                         True, OVERLAP)
    dk, dv = _dkdv_tiles(dk, dv, k, v, f_lo, f_hi, rows, cols_g, pos, scales,
                         STRIDE_QM, STRIDE_OM, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, MASK,
                         False, OVERLAP)
    dk, dv = _dkdv_tiles(dk, dv, k, v, f_hi, m_hi, rows, cols_g, pos, scales,
                         STRIDE_QM, STRIDE_OM, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M, MASK,
                         True, OVERLAP)
    return dk, dv


@triton.jit
def _dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV, kv_row0, v_row0, q_base0, o_base0, stat_base, stat_head_stride,
               off_hk, start_n, seqlen_q, seqlen_k, pos, scales, sm_scale,
               STRIDE_QM: tl.constexpr, STRIDE_KN: tl.constexpr, STRIDE_OM: tl.constexpr, STRIDE_VN: tl.constexpr,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
               HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
               OVERLAP: tl.constexpr):
    """dK/dV of one key tile, shared by the dense and varlen kernels: kv_row0 = element offset of the tile's first
    row (this kv head) in K/DK, v_row0 = in V/DV, q_base0 = of the sequence's query row 0 (head 0) in Q, o_base0 =
    in DO; query head h's LSE/delta row 0 sits at stat_base + h * stat_head_stride."""
    offs_tn = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_tn
    offs_t = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)

    tile_k = offs_tn[:, None] * STRIDE_KN + offs_d[None, :]
    tile_v = offs_tn[:, None] * STRIDE_VN + offs_dv[None, :]
    k = _load_rows(K + kv_row0 + tile_k, offs_n, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    v = _load_rows(V + v_row0 + tile_v, offs_n, seqlen_k, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True)

    n_last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    m_lo, f_lo, f_hi, m_hi = _query_blocks(start_n, n_last, start_n + BLOCK_N <= seqlen_k, seqlen_q, pos,
                                           BLOCK_M, MASK)
    cols_g = pos[1] + offs_n
    # Out-of-range key rows of a partial tile must see nothing; pushing them past global_seqlen_k does it with no
    # extra predicate in _allowed.
    cols_g = tl.where(offs_n < seqlen_k, cols_g, pos[3])

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V_PAD], dtype=tl.float32)
    tile_q = offs_t[:, None] * STRIDE_QM + offs_d[None, :]
    tile_o = offs_t[:, None] * STRIDE_OM + offs_dv[None, :]
    # The GQA group is reduced here, in a fixed head order: no atomics and no (B, Lk, HQ, D) scratch buffer.
    for g in range(GROUP):
        off_h = off_hk * GROUP + g
        q_base = q_base0 + off_h * HEAD_DIM
        q_ptrs = Q + q_base + tile_q
        do_ptrs = DO + (o_base0 + off_h * HEAD_DIM_V) + tile_o
        stat0 = stat_base + off_h.to(tl.int64) * stat_head_stride
        lse_ptrs = LSE + stat0 + offs_t
        delta_ptrs = DELTA + stat0 + offs_t
        dk, dv = _dkdv_ranges(dk, dv, k, v, m_lo, f_lo, f_hi, m_hi,
                              (q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs_t, seqlen_q), cols_g, pos, scales,
                              STRIDE_QM, STRIDE_OM, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_M,
                              MASK, OVERLAP)
    dk = dk * sm_scale
    _store_rows(DK + kv_row0 + tile_k, dk.to(DK.dtype.element_ty), offs_n, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD)
    _store_rows(DV + v_row0 + tile_v, dv.to(DV.dtype.element_ty), offs_n, seqlen_k, offs_dv, HEAD_DIM_V,
                HEAD_DIM_V_PAD)


@triton.jit
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, OFFS, global_seqlen_q, global_seqlen_k,
              seqlen_q, seqlen_k, scale_in, scale_out, sm_scale,
              DK, DV,
              NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, REVERSE_N: tl.constexpr, OVERLAP: tl.constexpr):
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    STRIDE_OM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM_V
    STRIDE_VN: tl.constexpr = NUM_HEADS_K * HEAD_DIM_V
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    pid_n = tl.program_id(0)
    if REVERSE_N:
        # Only a left bound: the last key tiles are seen by the most query rows, so they go first.
        pid_n = tl.num_programs(0) - 1 - pid_n
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    pos = _mask_pos(OFFS, global_seqlen_q, global_seqlen_k, MASK)

    start_n = pid_n * BLOCK_N
    _dkdv_tile(Q, K, V, DO, LSE, DELTA, DK, DV,
               (off_b * seqlen_k + start_n) * STRIDE_KN + off_hk * HEAD_DIM,
               (off_b * seqlen_k + start_n) * STRIDE_VN + off_hk * HEAD_DIM_V,
               off_b * seqlen_q * STRIDE_QM, off_b * seqlen_q * STRIDE_OM, off_b * NUM_HEADS_Q * seqlen_q, seqlen_q,
               off_hk, start_n, seqlen_q, seqlen_k, pos, (scale_in, scale_out), sm_scale,
               STRIDE_QM, STRIDE_KN, STRIDE_OM, STRIDE_VN, GROUP, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
               BLOCK_M, BLOCK_N, MASK, OVERLAP)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, n_begin, n_end, keys, rows_g, pos, scales,
              STRIDE_KN: tl.constexpr, STRIDE_VN: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
              BLOCK_N: tl.constexpr, MASK: tl.constexpr, MASKED: tl.constexpr):
    """Accumulate key tiles [n_begin, n_end) into dQ (unscaled); keys and scales as in flash_fwd._fwd_tiles."""
    k_ptrs, v_ptrs, offs_n, offs_d, offs_dv, seqlen_k = keys
    scale_in, scale_out = scales
    q_off, k_off, global_seqlen_q, global_seqlen_k = pos[0], pos[1], pos[2], pos[3]
    if MASKED:
        q_ids = _segment_ids(rows_g, pos, False, MASK)  # segment ids of the tile's rows, once per run
    k_ptrs += n_begin.to(tl.int64) * STRIDE_KN
    v_ptrs += n_begin.to(tl.int64) * STRIDE_VN
    for start_n in range(n_begin, n_end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
        v = _load_rows(v_ptrs, cols, seqlen_k, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, MASKED)
        qk = tl.dot(q, tl.trans(k))
        if MASK[_SOFTCAP]:
            t = _tanh(qk * scale_in)
            s = t * scale_out
        else:
            s = qk * scale_in
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            ok = _allowed(rows_g[:, None], (k_off + cols)[None, :], global_seqlen_q, global_seqlen_k, MASK)
            ok = ok & (cols[None, :] < seqlen_k)
            ok = _same_segment(ok, q_ids, k_off + cols, pos, True, MASK)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if MASK[_SOFTCAP]:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq)
        k_ptrs += BLOCK_N * STRIDE_KN
        v_ptrs += BLOCK_N * STRIDE_VN
    return dq


@triton.jit
def _dq_ranges(q, do, lse2, delta, n_lo, f_lo, f_hi, n_hi, keys, rows_g, pos, scales,
               STRIDE_KN: tl.constexpr, STRIDE_VN: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """dQ (unscaled) of a query tile over _key_blocks' three runs (masked edges, unmasked middle)."""
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse2, delta, n_lo, f_lo, keys, rows_g, pos, scales,
                   STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, MASK, True)
    dq = _dq_tiles(dq, q, do, lse2, delta, f_lo, f_hi, keys, rows_g, pos, scales,
                   STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, MASK, False)
    dq = _dq_tiles(dq, q, do, lse2, delta, f_hi, n_hi, keys, rows_g, pos, scales,
                   STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N, MASK, True)
    return dq


@triton.jit
def _dq_tile(Q, K, V, DO, LSE, DELTA, DQ, q_row0, kv_base, o_row0, v_base, stat0, start_m, seqlen_q, seqlen_k,
             pos, scales, sm_scale,
             STRIDE_QM: tl.constexpr, STRIDE_KN: tl.constexpr, STRIDE_OM: tl.constexpr, STRIDE_VN: tl.constexpr,
             HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
             HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """dQ of one query tile, shared by the dense and varlen kernels: q_row0 = element offset of the tile's first
    row (this head) in Q/DQ, o_row0 = in DO, kv_base = of key row 0 (this kv head) in K, v_base = in V, stat0 = of
    the sequence's row 0 (this head) in LSE/DELTA."""
    offs_t = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_t
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)

    tile_q = offs_t[:, None] * STRIDE_QM + offs_d[None, :]
    tile_o = offs_t[:, None] * STRIDE_OM + offs_dv[None, :]
    q = _load_rows(Q + q_row0 + tile_q, offs_m, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    do = _load_rows(DO + o_row0 + tile_o, offs_m, seqlen_q, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, True)
    stat = stat0 + offs_m
    # Padding rows read lse = 0 and delta = 0: finite values, and their dQ is never stored.
    lse2 = tl.load(LSE + stat, mask=offs_m < seqlen_q, other=0.0) * _LOG2E
    delta = tl.load(DELTA + stat, mask=offs_m < seqlen_q, other=0.0)

    k_ptrs = K + kv_base + offs_n[:, None] * STRIDE_KN + offs_d[None, :]
    v_ptrs = V + v_base + offs_n[:, None] * STRIDE_VN + offs_dv[None, :]

    m_last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    n_lo, f_lo, f_hi, n_hi = _key_blocks(start_m, m_last, seqlen_k, pos, BLOCK_N, MASK)
    rows_g = pos[0] + offs_m

    dq = _dq_ranges(q, do, lse2, delta, n_lo, f_lo, f_hi, n_hi, (k_ptrs, v_ptrs, offs_n, offs_d, offs_dv, seqlen_k),
                    rows_g, pos, scales, STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
                    BLOCK_M, BLOCK_N, MASK)
    dq = dq * sm_scale
    _store_rows(DQ + q_row0 + tile_q, dq.to(DQ.dtype.element_ty), offs_m, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD)


@triton.jit
def _bwd_dq(Q, K, V, DO, LSE, DELTA, OFFS, global_seqlen_q, global_seqlen_k,
            seqlen_q, seqlen_k, scale_in, scale_out, sm_scale,
            DQ,
            NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
            HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            MASK: tl.constexpr, REVERSE_M: tl.constexpr):
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    STRIDE_OM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM_V
    STRIDE_VN: tl.constexpr = NUM_HEADS_K * HEAD_DIM_V
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    pid_m = tl.program_id(0)
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // GROUP
    pos = _mask_pos(OFFS, global_seqlen_q, global_seqlen_k, MASK)

    start_m = pid_m * BLOCK_M
    _dq_tile(Q, K, V, DO, LSE, DELTA, DQ,
             (off_b * seqlen_q + start_m) * STRIDE_QM + off_h * HEAD_DIM,
             off_b * seqlen_k * STRIDE_KN + off_hk * HEAD_DIM,
             (off_b * seqlen_q + start_m) * STRIDE_OM + off_h * HEAD_DIM_V,
             off_b * seqlen_k * STRIDE_VN + off_hk * HEAD_DIM_V,
             (off_b * NUM_HEADS_Q + off_h) * seqlen_q,
             start_m, seqlen_q, seqlen_k, pos, (scale_in, scale_out), sm_scale,
             STRIDE_QM, STRIDE_KN, STRIDE_OM, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
             BLOCK_M, BLOCK_N, MASK)

"""FlashAttention forward: one program per (query tile, head, batch), online softmax over the visible key tiles.

Layouts (contiguous, strides derived from constexpr head counts so the compiler can prove 16-byte alignment of
every row): q (B, Lq, HQ, D), k (B, Lk, HK, D), v (B, Lk, HK, DV), out (B, Lq, HQ, DV), lse float32 (B, HQ, Lq) in
natural log. DV = HEAD_DIM_V <= HEAD_DIM (MLA; equal otherwise): Q/K tiles use HEAD_DIM_PAD lanes, V/O tiles
HEAD_DIM_V_PAD.

Attention sinks (HAS_SINKS): SINKS float32 (HQ,) holds one natural-log logit per query head. The key loop is the
sink-free one; the sink joins each row's denominator once, when the tile is normalized
(``flash_common._finish_with_sink``), so rows that see no key get out 0 and lse = sink. Without HAS_SINKS the
SINKS pointer is never read (a stand-in array is passed) and the kernel is the sink-free one.
"""
import triton
import triton.language as tl

from .flash_common import (_LN2, _SOFTCAP, _allowed, _finish_with_sink, _key_blocks, _load_rows, _mask_pos,
                           _same_segment, _segment_ids, _store_rows, _tanh)


@triton.jit
def _online_softmax(s, l_i, m_i, scale_in, SCALE_IN_EXP: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over a tile of scores: returns (p, alpha, l_i, m_new), alpha being the factor
    for the accumulator. ``s`` is in the log2 domain, or (SCALE_IN_EXP) raw products whose scale_in > 0 is
    applied inside the exponent."""
    if SCALE_IN_EXP:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_in)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead avoids inf - inf = NaN and
        # still yields p = 0 / alpha = 0 for it.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if SCALE_IN_EXP:
        p = tl.exp2(s * scale_in - m_use[:, None])
    else:
        p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, n_begin, n_end, keys, rows_g, pos, scales,
               STRIDE_KN: tl.constexpr, STRIDE_VN: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, MASKED: tl.constexpr, SCALE_POS: tl.constexpr):
    """Accumulate key tiles [n_begin, n_end); keys = (k_ptrs, v_ptrs, offs_n, offs_d, offs_dv, seqlen_k), scales =
    (scale_in, scale_out). Scores live in the log2 domain (log2(e) folded into the scale) so the exponentials are
    bare exp2. MASKED=False is the hot path: no predicates, no -inf handling.

    SCALE_POS (scale_in > 0, no softcap): the row max is taken on the raw products and the scale is applied
    inside the exponent, so scale and subtraction are one FMA per score (the softmax, not the MMA, is the
    bottleneck on Hopper: FA3 paper, section 3). Conditional rescaling (FA4) measured slower: its branch stops
    Triton from pipelining the loop (benchmarks/RESULTS.md)."""
    k_ptrs, v_ptrs, offs_n, offs_d, offs_dv, seqlen_k = keys
    scale_in, scale_out = scales
    q_off, k_off, global_seqlen_q, global_seqlen_k = pos[0], pos[1], pos[2], pos[3]
    if MASKED:
        q_ids = _segment_ids(rows_g, pos, False, MASK)  # segment ids of the tile's rows, once per run
    # 64-bit start: n_begin * HK * D can pass 2^31 for long sequences; then plain pointer increments.
    k_ptrs += n_begin.to(tl.int64) * STRIDE_KN
    v_ptrs += n_begin.to(tl.int64) * STRIDE_VN
    for start_n in range(n_begin, n_end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED)
        qk = tl.dot(q, tl.trans(k))
        if MASK[_SOFTCAP]:
            s = _tanh(qk * scale_in) * scale_out
        elif SCALE_POS:
            s = qk
        else:
            # Scaled before the mask: -inf times a negative scale would be +inf.
            s = qk * scale_in
        if MASKED:
            ok = _allowed(rows_g[:, None], (k_off + cols)[None, :], global_seqlen_q, global_seqlen_k, MASK)
            ok = ok & (cols[None, :] < seqlen_k)
            ok = _same_segment(ok, q_ids, k_off + cols, pos, True, MASK)
            s = tl.where(ok, s, float("-inf"))
        p, alpha, l_i, m_i = _online_softmax(s, l_i, m_i, scale_in, SCALE_POS and not MASK[_SOFTCAP], MASKED)
        acc = acc * alpha[:, None]
        v = _load_rows(v_ptrs, cols, seqlen_k, offs_dv, HEAD_DIM_V, HEAD_DIM_V_PAD, MASKED)
        acc = tl.dot(p.to(v.dtype), v, acc)
        k_ptrs += BLOCK_N * STRIDE_KN
        v_ptrs += BLOCK_N * STRIDE_VN
    return acc, l_i, m_i


@triton.jit
def _fwd_tiles_overlap(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_begin, n_end, scale_in,
                       STRIDE_KN: tl.constexpr, STRIDE_VN: tl.constexpr, BLOCK_N: tl.constexpr):
    """The unmasked run [n_begin, n_end) (no softcap, scale_in > 0) with QK^T of the next tile issued before the
    PV product of this one (after FA3 paper, section 3.2, intra-warpgroup overlap): PV of tile j then runs while the
    warpgroup computes the softmax of tile j+1. QK^T itself is still waited for at once, since Triton keeps only
    accumulating products in flight (benchmarks/RESULTS.md)."""
    if n_begin < n_end:
        k_ptrs += n_begin.to(tl.int64) * STRIDE_KN
        v_ptrs += n_begin.to(tl.int64) * STRIDE_VN
        qk = tl.dot(q, tl.trans(tl.load(k_ptrs)))
        for _ in range(n_begin + BLOCK_N, n_end, BLOCK_N):
            p, alpha, l_i, m_i = _online_softmax(qk, l_i, m_i, scale_in, True, False)
            k_ptrs += BLOCK_N * STRIDE_KN
            qk = tl.dot(q, tl.trans(tl.load(k_ptrs)))
            acc = acc * alpha[:, None]
            v = tl.load(v_ptrs)
            acc = tl.dot(p.to(v.dtype), v, acc)
            v_ptrs += BLOCK_N * STRIDE_VN
        p, alpha, l_i, m_i = _online_softmax(qk, l_i, m_i, scale_in, True, False)
        acc = acc * alpha[:, None]
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _fwd_ranges(q, n_lo, f_lo, f_hi, n_hi, keys, rows_g, pos, scales, sink,
                STRIDE_KN: tl.constexpr, STRIDE_VN: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, SCALE_POS: tl.constexpr,
                OVERLAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    """A query tile against its visible keys, given as _key_blocks' three runs (masked edge tiles around the
    fully visible middle). Returns (out, lse): rows that saw no key get out 0 and LSE -inf (HAS_SINKS: the
    head's sink ``sink``, natural log, which joins every row's denominator here, once), as the contract
    requires."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V_PAD], dtype=tl.float32)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, n_lo, f_lo, keys, rows_g, pos, scales,
                               STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N,
                               MASK, True, SCALE_POS)
    if OVERLAP and SCALE_POS and not MASK[_SOFTCAP] and HEAD_DIM == HEAD_DIM_PAD and HEAD_DIM_V == HEAD_DIM_V_PAD:
        acc, l_i, m_i = _fwd_tiles_overlap(acc, l_i, m_i, q, keys[0], keys[1], f_lo, f_hi, scales[0],
                                           STRIDE_KN, STRIDE_VN, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, f_lo, f_hi, keys, rows_g, pos, scales,
                                   STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
                                   BLOCK_N, MASK, False, SCALE_POS)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, f_hi, n_hi, keys, rows_g, pos, scales,
                               STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD, BLOCK_N,
                               MASK, True, SCALE_POS)
    if HAS_SINKS:
        out, lse = _finish_with_sink(acc, l_i, m_i, sink)
    else:
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    return out, lse


@triton.jit
def _fwd_tile(Q, K, V, OUT, LSE, q_row0, kv_base, o_row0, v_base, lse_row0, start_m, seqlen_q, seqlen_k, pos,
              scales, sink,
              STRIDE_QM: tl.constexpr, STRIDE_KN: tl.constexpr, STRIDE_OM: tl.constexpr, STRIDE_VN: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              HEAD_DIM_V_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
              SCALE_POS: tl.constexpr, OVERLAP: tl.constexpr, HAS_SINKS: tl.constexpr):
    """One query tile, shared by the dense and varlen kernels, which differ only in where a sequence starts:
    q_row0 = element offset of the tile's first row (this head) in Q, o_row0 = in OUT, kv_base = of key row 0
    (this kv head) in K, v_base = in V, lse_row0 = of the sequence's row 0 (this head) in LSE. Offsets in 64 bits;
    per-tile ones 32-bit. ``sink``: this head's sink (read only with HAS_SINKS)."""
    offs_t = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_t
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_dv = tl.arange(0, HEAD_DIM_V_PAD)

    tile_q = offs_t[:, None] * STRIDE_QM + offs_d[None, :]
    q = _load_rows(Q + q_row0 + tile_q, offs_m, seqlen_q, offs_d, HEAD_DIM, HEAD_DIM_PAD, True)
    k_ptrs = K + kv_base + offs_n[:, None] * STRIDE_KN + offs_d[None, :]
    v_ptrs = V + v_base + offs_n[:, None] * STRIDE_VN + offs_dv[None, :]

    m_last = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    n_lo, f_lo, f_hi, n_hi = _key_blocks(start_m, m_last, seqlen_k, pos, BLOCK_N, MASK)
    rows_g = pos[0] + offs_m

    out, lse = _fwd_ranges(q, n_lo, f_lo, f_hi, n_hi, (k_ptrs, v_ptrs, offs_n, offs_d, offs_dv, seqlen_k), rows_g,
                           pos, scales, sink, STRIDE_KN, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V,
                           HEAD_DIM_V_PAD, BLOCK_M, BLOCK_N, MASK, SCALE_POS, OVERLAP, HAS_SINKS)
    tile_o = offs_t[:, None] * STRIDE_OM + offs_dv[None, :]
    _store_rows(OUT + o_row0 + tile_o, out.to(OUT.dtype.element_ty), offs_m, seqlen_q, offs_dv, HEAD_DIM_V,
                HEAD_DIM_V_PAD)
    tl.store(LSE + lse_row0 + offs_m, lse, mask=offs_m < seqlen_q)


@triton.jit
def _attn_fwd(Q, K, V, SINKS, OFFS, global_seqlen_q, global_seqlen_k,
              seqlen_q, seqlen_k, scale_in, scale_out,
              OUT, LSE,
              NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              HEAD_DIM_V: tl.constexpr, HEAD_DIM_V_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK: tl.constexpr, REVERSE_M: tl.constexpr, SCALE_POS: tl.constexpr, OVERLAP: tl.constexpr,
              HAS_SINKS: tl.constexpr):
    """scale_in/scale_out: without softcap s2 = qk * scale_in (scale_in = softmax_scale * log2 e); with softcap
    s2 = tanh(qk * scale_in) * scale_out (scale_in = softmax_scale / c, scale_out = c * log2 e). OFFS and the
    global lengths are the runtime half of the mask group (flash_common._mask_pos). SINKS: float32 (HQ,), read
    only with HAS_SINKS."""
    STRIDE_QM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    STRIDE_OM: tl.constexpr = NUM_HEADS_Q * HEAD_DIM_V
    STRIDE_VN: tl.constexpr = NUM_HEADS_K * HEAD_DIM_V
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    pid_m = tl.program_id(0)
    if REVERSE_M:
        # Causal-like masks give the last query tiles the most keys: launch them first so the short tiles fill
        # the tail of the wave instead of the long ones.
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // GROUP

    pos = _mask_pos(OFFS, global_seqlen_q, global_seqlen_k, MASK)
    if HAS_SINKS:
        sink = tl.load(SINKS + off_h)
    else:
        sink = 0.0
    start_m = pid_m * BLOCK_M
    _fwd_tile(Q, K, V, OUT, LSE,
              (off_b * seqlen_q + start_m) * STRIDE_QM + off_h * HEAD_DIM,
              off_b * seqlen_k * STRIDE_KN + off_hk * HEAD_DIM,
              (off_b * seqlen_q + start_m) * STRIDE_OM + off_h * HEAD_DIM_V,
              off_b * seqlen_k * STRIDE_VN + off_hk * HEAD_DIM_V,
              (off_b * NUM_HEADS_Q + off_h) * seqlen_q,
              start_m, seqlen_q, seqlen_k, pos, (scale_in, scale_out), sink,
              STRIDE_QM, STRIDE_KN, STRIDE_OM, STRIDE_VN, HEAD_DIM, HEAD_DIM_PAD, HEAD_DIM_V, HEAD_DIM_V_PAD,
              BLOCK_M, BLOCK_N, MASK, SCALE_POS, OVERLAP, HAS_SINKS)

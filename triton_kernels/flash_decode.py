"""KV-cache (decode / chunked prefill) forward with split-KV or stream-K, and the kernels that merge the pieces.

Layouts: q (B, LQ, HQ, D); contiguous cache (CACHE_B, capacity, HK, D) read at row ``batch_idx[b]`` (or ``b``);
paged cache (num_pages, PAGE_SIZE, HK, D) read through ``page_table`` (B, pages_per_seq); k_new/v_new
(B, seqlen_new, HK, D). Index arrays are sanitized on the host (see ``fa3jax.backends.base.KVCacheArgs``), except
page-table entries, which may be anything: an entry outside ``[0, num_pages)`` is never dereferenced and the
keys of that page are masked out.

Key positions are absolute cache positions ``p``: ``p < cache_seqlens[b]`` comes from the cache, ``p >=
cache_seqlens[b]`` is new key ``p - cache_seqlens[b]`` read from k_new/v_new (never from the cache). Visible
keys are ``[leftpad, seqlens_k)``; the mask (``fa3jax.masking.allowed``) sees key position ``p - leftpad`` and key
length ``seqlens_k - leftpad``, with query position ``t`` in ``[0, LQ)``.

GQA packing: one program owns the GROUP query heads of one kv head, as rows ``r = t * GROUP + g`` (query
position t, head ``hk * GROUP + g``), so K/V tiles are loaded once per group. Split-KV: grid
(m_tiles * NUM_SPLITS, HK, B); split ``s`` takes a contiguous run of the key tiles that the query tile can see
and writes a normalized partial (out fp32, lse); with NUM_SPLITS == 1 the kernel writes the final out/lse
directly. ``_decode_fwd_persistent`` (stream-K): a one-wave grid whose programs take the same number of key
tiles across sequence boundaries, then ``_decode_combine_streamk``. Every output element is written (rows that
see nothing: out 0, lse -inf).

Attention sinks (HAS_SINKS, SINKS float32 (HQ,)): the partials are sink-free and the sink joins each row's
denominator exactly once, where the pieces become the final out/lse: in ``_decode_fwd`` itself when NUM_SPLITS == 1,
else in ``_decode_combine`` / ``_decode_combine_streamk`` as one more LSE term with no value. Rows that see no key
then get out 0 and lse = the sink.

Argument groups passed whole through the helpers: ``cache`` = (K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS_K,
CACHE_SEQLENS, LEFTPAD, BATCH_IDX, PAGE_TABLE), ``dims`` = (seqlen_q, capacity, seqlen_new, num_pages,
pages_per_seq), ``scales`` = (scale_in, scale_out), the constexpr ``LAYOUT`` = (PAGED, PAGE_SIZE, HAS_NEW,
HAS_LEFTPAD, HAS_BATCH_IDX) and the mask group ``MASK`` (``flash_common``).
"""
import triton
import triton.language as tl

from .flash_common import _LN2, _SOFTCAP, _allowed, _cdiv, _finish_with_sink, _key_tiles, _tanh

# Fields of the LAYOUT constexpr tuple (plan_decode builds it in this order).
_PAGED = tl.constexpr(0)
_PAGE_SIZE = tl.constexpr(1)
_HAS_NEW = tl.constexpr(2)
_HAS_LEFTPAD = tl.constexpr(3)
_HAS_BATCH_IDX = tl.constexpr(4)


@triton.jit
def _decode_update(acc, l_i, m_i, q, k, v, t_pos, pos, key_ok, row_ok, leftpad, seqlen_q, sk, scales,
                   MASK: tl.constexpr):
    """Online-softmax step of one key tile (every score masked: decode tiles are few and memory-bound)."""
    scale_in, scale_out = scales
    qk = tl.dot(q, tl.trans(k.to(q.dtype)))
    if MASK[_SOFTCAP]:
        s = _tanh(qk * scale_in) * scale_out
    else:
        s = qk * scale_in
    ok = _allowed(t_pos[:, None], (pos - leftpad)[None, :], seqlen_q, sk, MASK)
    ok = ok & key_ok[None, :] & row_ok[:, None]
    s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _decode_keys(acc, l_i, m_i, q, t_pos, row_ok, n_begin, n_end, off_b, off_hk, cache, dims, scales,
                 NUM_HEADS_K: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, LAYOUT: tl.constexpr, MASK: tl.constexpr):
    """Online softmax of the rows of (off_b, off_hk) over the key tiles [n_begin, n_end) (absolute positions)."""
    K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS_K, CACHE_SEQLENS, LEFTPAD, BATCH_IDX, PAGE_TABLE = cache
    seqlen_q, capacity, seqlen_new, num_pages, pages_per_seq = dims
    PAGED: tl.constexpr = LAYOUT[_PAGED]
    PAGE_SIZE: tl.constexpr = LAYOUT[_PAGE_SIZE]
    HAS_NEW: tl.constexpr = LAYOUT[_HAS_NEW]
    HAS_LEFTPAD: tl.constexpr = LAYOUT[_HAS_LEFTPAD]
    HAS_BATCH_IDX: tl.constexpr = LAYOUT[_HAS_BATCH_IDX]
    STRIDE_KN: tl.constexpr = NUM_HEADS_K * HEAD_DIM
    seqlens_k = tl.load(SEQLENS_K + off_b)
    cache_len = tl.load(CACHE_SEQLENS + off_b)
    if HAS_LEFTPAD:
        leftpad = tl.load(LEFTPAD + off_b)
    else:
        leftpad = 0
    sk = seqlens_k - leftpad  # key length the mask sees
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    if PAGED:
        pt_row = PAGE_TABLE + off_b.to(tl.int64) * pages_per_seq
    else:
        if HAS_BATCH_IDX:
            cache_row = tl.load(BATCH_IDX + off_b).to(tl.int64)
        else:
            cache_row = off_b.to(tl.int64)
    head_off = off_hk * HEAD_DIM

    # Decode is bandwidth-bound: the hot loop covers the tiles that lie wholly inside the cache and has no
    # branch, so Triton's software pipeliner keeps several K/V tiles in flight (a load under an `if` is not
    # pipelined). The few tiles that reach past cache_seqlens (the partial one and the new keys) take the
    # general loop after it.
    n_mid = tl.maximum(tl.minimum(n_end, (cache_len // BLOCK_N) * BLOCK_N), n_begin)
    for start_n in range(n_begin, n_mid, BLOCK_N):
        pos = start_n + offs_n
        key_ok = (pos >= leftpad) & (pos < seqlens_k)
        if PAGED:
            # start_n < cache_len <= capacity, so this page-table index is in range; the entry may not be.
            page = tl.load(pt_row + start_n // PAGE_SIZE)
            page_ok = (page >= 0) & (page < num_pages)
            rows = tl.where(page_ok, page, 0).to(tl.int64) * PAGE_SIZE + (start_n % PAGE_SIZE) + offs_n
            key_ok = key_ok & page_ok
            ld2 = page_ok & d_ok[None, :]
        else:
            rows = cache_row * capacity + pos
            ld2 = d_ok[None, :]
        kv_off = rows[:, None] * STRIDE_KN + head_off + offs_d[None, :]
        if PAGED or HEAD_DIM != HEAD_DIM_PAD:
            k = tl.load(K_CACHE + kv_off, mask=ld2, other=0.0)
            v = tl.load(V_CACHE + kv_off, mask=ld2, other=0.0)
        else:
            k = tl.load(K_CACHE + kv_off)
            v = tl.load(V_CACHE + kv_off)
        acc, l_i, m_i = _decode_update(acc, l_i, m_i, q, k, v, t_pos, pos, key_ok, row_ok, leftpad, seqlen_q, sk,
                                       scales, MASK)
    for start_n in range(n_mid, n_end, BLOCK_N):
        pos = start_n + offs_n
        in_cache = pos < cache_len
        key_ok = (pos >= leftpad) & (pos < seqlens_k)
        k = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=K_CACHE.dtype.element_ty)
        v = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=V_CACHE.dtype.element_ty)
        if start_n < cache_len:
            if PAGED:
                page = tl.load(pt_row + start_n // PAGE_SIZE)
                page_ok = (page >= 0) & (page < num_pages)
                safe = tl.where(page_ok, page, 0).to(tl.int64)
                rows = safe * PAGE_SIZE + (start_n % PAGE_SIZE) + offs_n
                ld = in_cache & page_ok
                key_ok = key_ok & (~in_cache | page_ok)
            else:
                rows = cache_row * capacity + pos
                ld = in_cache
            kv_off = rows[:, None] * STRIDE_KN + head_off + offs_d[None, :]
            ld2 = ld[:, None] & d_ok[None, :]
            k = tl.load(K_CACHE + kv_off, mask=ld2, other=0.0)
            v = tl.load(V_CACHE + kv_off, mask=ld2, other=0.0)
        if HAS_NEW:
            if start_n + BLOCK_N > cache_len:
                tn = pos - cache_len
                nld = (tn >= 0) & (tn < seqlen_new)
                nrows = off_b.to(tl.int64) * seqlen_new + tl.where(nld, tn, 0)
                n_off = nrows[:, None] * STRIDE_KN + head_off + offs_d[None, :]
                nld2 = nld[:, None] & d_ok[None, :]
                k_n = tl.load(K_NEW + n_off, mask=nld2, other=0.0)
                v_n = tl.load(V_NEW + n_off, mask=nld2, other=0.0)
                k = tl.where(in_cache[:, None], k, k_n.to(k.dtype))
                v = tl.where(in_cache[:, None], v, v_n.to(v.dtype))
        acc, l_i, m_i = _decode_update(acc, l_i, m_i, q, k, v, t_pos, pos, key_ok, row_ok, leftpad, seqlen_q, sk,
                                       scales, MASK)
    return acc, l_i, m_i


@triton.jit
def _finish(acc, l_i, m_i):
    """Normalized output and natural-log LSE of one online softmax (rows that saw nothing: 0 and -inf)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    return out, lse


@triton.jit
def _group_rows(off_hk, start_m, seqlen_q, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr):
    """The query tile from row start_m of kv head off_hk (GQA packing: rows r = t * GROUP + g): rows, their
    validity, query positions t and query heads, and the head-dim lanes with their validity."""
    offs_r = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_r < seqlen_q * GROUP
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    return offs_r, row_ok, offs_r // GROUP, off_hk * GROUP + offs_r % GROUP, offs_d, offs_d < HEAD_DIM


@triton.jit
def _decode_fwd(Q, K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS_K, CACHE_SEQLENS, LEFTPAD, BATCH_IDX, PAGE_TABLE,
                seqlen_q, capacity, seqlen_new, num_pages, pages_per_seq, scale_in, scale_out, SINKS,
                OUT, LSE,
                NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                LAYOUT: tl.constexpr, MASK: tl.constexpr, HAS_SINKS: tl.constexpr):
    """OUT/LSE: (B, LQ, HQ, D) in q's dtype / (B, HQ, LQ) when NUM_SPLITS == 1, else fp32 partials
    (NUM_SPLITS, B, LQ, HQ, D) / (NUM_SPLITS, B, HQ, LQ). Paged: BLOCK_N divides PAGE_SIZE (a tile never
    straddles a page). SINKS is read only with HAS_SINKS and NUM_SPLITS == 1 (split partials stay sink-free: the
    combine adds the sink once)."""
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K

    pid0 = tl.program_id(0)
    split = pid0 % NUM_SPLITS
    start_m = (pid0 // NUM_SPLITS) * BLOCK_M
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    n_batch = tl.num_programs(2)

    seqlens_k = tl.load(SEQLENS_K + off_b)
    if LAYOUT[_HAS_LEFTPAD]:
        leftpad = tl.load(LEFTPAD + off_b)
    else:
        leftpad = 0

    n_rows = seqlen_q * GROUP
    offs_r, row_ok, t_pos, head, offs_d, d_ok = _group_rows(off_hk, start_m, seqlen_q, GROUP, BLOCK_M, HEAD_DIM,
                                                            HEAD_DIM_PAD)

    q_rows = ((off_b.to(tl.int64) * seqlen_q + t_pos) * NUM_HEADS_Q + head) * HEAD_DIM
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Union of the key positions the rows of this tile may see (absolute positions), then tile-aligned.
    m_last = tl.minimum(start_m + BLOCK_M, n_rows) - 1
    n_lo, n_hi = _key_tiles(seqlens_k - leftpad, leftpad, seqlen_q, start_m // GROUP, m_last // GROUP, BLOCK_N,
                            MASK)
    per_split = _cdiv((n_hi - n_lo) // BLOCK_N, NUM_SPLITS) * BLOCK_N
    n_begin = tl.minimum(n_lo + split * per_split, n_hi)
    n_end = tl.minimum(n_begin + per_split, n_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    acc, l_i, m_i = _decode_keys(acc, l_i, m_i, q, t_pos, row_ok, n_begin, n_end, off_b, off_hk,
                                 (K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS_K, CACHE_SEQLENS, LEFTPAD, BATCH_IDX,
                                  PAGE_TABLE), (seqlen_q, capacity, seqlen_new, num_pages, pages_per_seq),
                                 (scale_in, scale_out), NUM_HEADS_K, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT, MASK)
    if HAS_SINKS and NUM_SPLITS == 1:
        out, lse = _finish_with_sink(acc, l_i, m_i, tl.load(SINKS + head, mask=row_ok, other=0.0))
    else:
        out, lse = _finish(acc, l_i, m_i)
    if NUM_SPLITS == 1:
        o_rows = q_rows
        lse_off = (off_b.to(tl.int64) * NUM_HEADS_Q + head) * seqlen_q + t_pos
    else:
        sb = split.to(tl.int64) * n_batch + off_b
        o_rows = ((sb * seqlen_q + t_pos) * NUM_HEADS_Q + head) * HEAD_DIM
        lse_off = (sb * NUM_HEADS_Q + head) * seqlen_q + t_pos
    tl.store(OUT + o_rows[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + lse_off, lse, mask=row_ok)


@triton.jit
def _streamk_layout(SEQLENS_K, LEFTPAD, n_batch, seqlen_q, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                    MASK: tl.constexpr, HAS_LEFTPAD: tl.constexpr):
    """Per sequence (vectors over BLOCK_B >= n_batch): first key position n_lo, key-tile count, and the index of
    its first tile in the concatenation of every sequence's tiles (the stream one kv head's programs share)."""
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < n_batch
    seqlens = tl.load(SEQLENS_K + offs_b, mask=b_ok, other=0)
    if HAS_LEFTPAD:
        leftpad = tl.load(LEFTPAD + offs_b, mask=b_ok, other=0)
    else:
        leftpad = tl.zeros([BLOCK_B], dtype=tl.int32)
    # One query tile holds every row (the host only picks stream-K then), so it spans positions [0, seqlen_q).
    n_lo, n_hi = _key_tiles(seqlens - leftpad, leftpad, seqlen_q, 0, seqlen_q - 1, BLOCK_N, MASK)
    tiles = tl.where(b_ok, (n_hi - n_lo) // BLOCK_N, 0).to(tl.int64)
    first = tl.cumsum(tiles, 0) - tiles
    return offs_b, n_lo, tiles, first


@triton.jit
def _pick(offs, vec, i):
    """vec[i] as a scalar (vectors here are a few hundred elements, read once per sequence switch)."""
    return tl.sum(tl.where(offs == i, vec, 0), 0)


@triton.jit
def _decode_fwd_persistent(Q, K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS_K, CACHE_SEQLENS, LEFTPAD, BATCH_IDX,
                           PAGE_TABLE, seqlen_q, capacity, seqlen_new, num_pages, pages_per_seq, scale_in,
                           scale_out, n_batch, OUT, LSE,
                           NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                           LAYOUT: tl.constexpr, MASK: tl.constexpr):
    """Stream-K decode with a one-wave grid (HK, G): all programs start together and none waits in a second,
    partly filled wave (a split grid of b * hk programs over two programs per SM leaves one). The HK programs of
    one g read the same sequence at the same key positions at the same time, as the split grid's neighbours do.
    Needs seqlen_q * GROUP <= BLOCK_M.

    For kv head hk the key tiles of all sequences are laid end to end and program g takes tiles
    [g * T // G, (g + 1) * T // G) (T in all), so every program streams the same number of bytes whatever the
    lengths. Each (program, sequence) piece writes a normalized partial to slot g + b of OUT (HK, G + B, BLOCK_M,
    D) fp32 / LSE (HK, G + B, BLOCK_M) for ``_decode_combine_streamk``: the pieces of one program are consecutive
    sequences, and consecutive programs share at most one sequence, so g + b is unique."""
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K
    off_hk = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    n_prog = tl.num_programs(1)
    offs_b, n_lo_b, tiles_b, first_b = _streamk_layout(SEQLENS_K, LEFTPAD, n_batch, seqlen_q, BLOCK_B, BLOCK_N,
                                                       MASK, LAYOUT[_HAS_LEFTPAD])
    total = tl.sum(tiles_b, 0)
    begin = g * total // n_prog
    end = (g + 1) * total // n_prog
    # Sequences holding this program's first and last tile (sequences without tiles in between are visited and
    # write an empty partial the combine never reads).
    b_first = tl.sum(((first_b + tiles_b <= begin) & (offs_b < n_batch)).to(tl.int32), 0)
    b_last = tl.sum(((first_b + tiles_b <= end - 1) & (offs_b < n_batch)).to(tl.int32), 0)
    b_stop = tl.where(begin < end, b_last + 1, b_first)

    offs_r, row_ok, t_pos, head, offs_d, d_ok = _group_rows(off_hk, 0, seqlen_q, GROUP, BLOCK_M, HEAD_DIM,
                                                            HEAD_DIM_PAD)
    slot_base = off_hk.to(tl.int64) * (n_prog + n_batch) + g
    for i in range(0, b_stop - b_first):
        off_b = b_first + i
        t0 = _pick(offs_b, first_b, off_b)
        n_lo = _pick(offs_b, n_lo_b, off_b)
        lo = tl.maximum(begin, t0) - t0
        hi = tl.minimum(end, t0 + _pick(offs_b, tiles_b, off_b)) - t0
        n_begin = (n_lo + lo * BLOCK_N).to(tl.int32)
        n_end = (n_lo + hi * BLOCK_N).to(tl.int32)
        q_rows = ((off_b.to(tl.int64) * seqlen_q + t_pos) * NUM_HEADS_Q + head) * HEAD_DIM
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        acc, l_i, m_i = _decode_keys(acc, l_i, m_i, q, t_pos, row_ok, n_begin, n_end, off_b, off_hk,
                                     (K_CACHE, V_CACHE, K_NEW, V_NEW, SEQLENS_K, CACHE_SEQLENS, LEFTPAD, BATCH_IDX,
                                      PAGE_TABLE), (seqlen_q, capacity, seqlen_new, num_pages, pages_per_seq),
                                     (scale_in, scale_out), NUM_HEADS_K, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT,
                                     MASK)
        out, lse = _finish(acc, l_i, m_i)
        slot = slot_base + off_b
        o_off = (slot * BLOCK_M + offs_r[:, None]) * HEAD_DIM + offs_d[None, :]
        lse_off = slot * BLOCK_M + offs_r
        tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + lse_off, lse, mask=row_ok)


@triton.jit
def _decode_combine_streamk(OUT_ACC, LSE_ACC, SEQLENS_K, LEFTPAD, SINKS, seqlen_q, OUT, LSE,
                            NUM_HEADS_Q: tl.constexpr, NUM_HEADS_K: tl.constexpr,
                            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                            NUM_PROGRAMS: tl.constexpr, PROGRAMS_PAD: tl.constexpr,
                            LAYOUT: tl.constexpr, MASK: tl.constexpr, HAS_SINKS: tl.constexpr):
    """Merge the stream-K partials of (kv head, sequence) by LSE into OUT (B, LQ, HQ, D) / LSE (B, HQ, LQ).
    Grid (HK, B). Recomputes the decode kernel's layout, so it reads exactly the slots that were written: the
    programs g whose tile range meets the sequence (programs with an empty range carry weight 0). HAS_SINKS: each
    row's sink (SINKS[head]) is one more LSE term with no value, added here once."""
    GROUP: tl.constexpr = NUM_HEADS_Q // NUM_HEADS_K
    off_hk = tl.program_id(0)
    off_b = tl.program_id(1)
    n_batch = tl.num_programs(1)
    offs_b, n_lo_b, tiles_b, first_b = _streamk_layout(SEQLENS_K, LEFTPAD, n_batch, seqlen_q, BLOCK_B, BLOCK_N,
                                                       MASK, LAYOUT[_HAS_LEFTPAD])
    total = tl.sum(tiles_b, 0)
    t0 = _pick(offs_b, first_b, off_b)
    t1 = t0 + _pick(offs_b, tiles_b, off_b)
    # Program g starts at tile g * total // G: the first program whose range meets [t0, t1) is the last one
    # starting at or before t0, i.e. ((t0 + 1) * G - 1) // total; likewise for tile t1 - 1.
    tot_safe = tl.maximum(total, 1)
    g_first = tl.where(t1 > t0, ((t0 + 1) * NUM_PROGRAMS - 1) // tot_safe, 0)
    g_stop = tl.where(t1 > t0, (t1 * NUM_PROGRAMS - 1) // tot_safe + 1, 0)

    offs_r, row_ok, t_pos, head, offs_d, d_ok = _group_rows(off_hk, 0, seqlen_q, GROUP, BLOCK_M, HEAD_DIM,
                                                            HEAD_DIM_PAD)
    # All pieces' LSEs at once (a sequence has at most G pieces), then the weighted sum of their outputs with
    # loads that do not depend on each other.
    gs = g_first + tl.arange(0, PROGRAMS_PAD).to(tl.int64)
    has = (gs < g_stop) & (gs * total // NUM_PROGRAMS < (gs + 1) * total // NUM_PROGRAMS)
    slots = off_hk.to(tl.int64) * (NUM_PROGRAMS + n_batch) + gs + off_b
    lse_all = tl.load(LSE_ACC + slots[:, None] * BLOCK_M + offs_r[None, :], mask=has[:, None] & row_ok[None, :],
                      other=float("-inf"))
    mx = tl.max(lse_all, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + head, mask=row_ok, other=0.0)
        mx = tl.maximum(mx, sink)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    total_w = tl.sum(tl.exp(lse_all - mx_safe[None, :]), 0)
    if HAS_SINKS:
        total_w += tl.exp(sink - mx_safe)
    # One piece per step; the automatic schedule gives a sequence at most a few pieces (a 3-D load of several
    # pieces per step measured slower; benchmarks/RESULTS.md).
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for j in range(0, (g_stop - g_first).to(tl.int32)):
        g = g_first + j
        ok = g * total // NUM_PROGRAMS < (g + 1) * total // NUM_PROGRAMS
        slot = off_hk.to(tl.int64) * (NUM_PROGRAMS + n_batch) + g + off_b
        lse_g = tl.load(LSE_ACC + slot * BLOCK_M + offs_r, mask=row_ok & ok, other=float("-inf"))
        o_g = tl.load(OUT_ACC + (slot * BLOCK_M + offs_r[:, None]) * HEAD_DIM + offs_d[None, :],
                      mask=(row_ok[:, None] & d_ok[None, :]) & ok, other=0.0)
        acc += tl.exp(lse_g - mx_safe)[:, None] * o_g
    empty = total_w == 0.0
    t_safe = tl.where(empty, 1.0, total_w)
    out = acc / t_safe[:, None]
    lse = tl.where(empty, float("-inf"), mx_safe + tl.log(t_safe))
    o_rows = ((off_b.to(tl.int64) * seqlen_q + t_pos) * NUM_HEADS_Q + head) * HEAD_DIM
    tl.store(OUT + o_rows[:, None] + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (off_b.to(tl.int64) * NUM_HEADS_Q + head) * seqlen_q + t_pos, lse, mask=row_ok)


@triton.jit
def _decode_combine(OUT_ACC, LSE_ACC, SINKS, seqlen_q, OUT, LSE,
                    NUM_HEADS_Q: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                    HAS_SINKS: tl.constexpr):
    """Merge NUM_SPLITS normalized partials by their LSE. Grid (cdiv(LQ, BLOCK_M), HQ, B). Splits with lse -inf
    carry weight 0; a row empty in every split gets out 0 / lse -inf. HAS_SINKS: the head's sink SINKS[h] is one
    more LSE term with no value, added here once (so an empty row gets lse = sink)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_h = tl.program_id(1)
    off_b = tl.program_id(2).to(tl.int64)
    n_batch = tl.num_programs(2)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen_q
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM

    lse_all = tl.load(LSE_ACC + ((offs_s[:, None].to(tl.int64) * n_batch + off_b) * NUM_HEADS_Q + off_h) * seqlen_q
                      + offs_m[None, :], mask=(offs_s[:, None] < NUM_SPLITS) & m_ok[None, :], other=float("-inf"))
    mx = tl.max(lse_all, 0)
    if HAS_SINKS:
        sink = tl.load(SINKS + off_h)
        mx = tl.maximum(mx, sink)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(lse_all - mx_safe[None, :]), 0)
    if HAS_SINKS:
        total += tl.exp(sink - mx_safe)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        sb = s * n_batch + off_b
        lse_s = tl.load(LSE_ACC + (sb * NUM_HEADS_Q + off_h) * seqlen_q + offs_m, mask=m_ok, other=float("-inf"))
        o_s = tl.load(OUT_ACC + ((sb * seqlen_q + offs_m[:, None]) * NUM_HEADS_Q + off_h) * HEAD_DIM
                      + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.exp(lse_s - mx_safe)[:, None] * o_s
    empty = total == 0.0
    t_safe = tl.where(empty, 1.0, total)
    out = acc / t_safe[:, None]
    lse = tl.where(empty, float("-inf"), mx_safe + tl.log(t_safe))
    o_off = ((off_b * seqlen_q + offs_m[:, None]) * NUM_HEADS_Q + off_h) * HEAD_DIM + offs_d[None, :]
    tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + (off_b * NUM_HEADS_Q + off_h) * seqlen_q + offs_m, lse, mask=m_ok)

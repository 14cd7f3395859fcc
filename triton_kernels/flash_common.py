"""Device helpers shared by the forward and backward kernels (pure ``@triton.jit`` code, no host logic).

Every mask decision mirrors ``fa3jax.masking.allowed`` evaluated on *global* positions (row/column index plus
the runtime q/k offsets of ring attention) against the *global* lengths. The mask reaches every kernel as two
groups, passed whole through the helpers:

* ``MASK``, a constexpr tuple built on the host by ``plan_common.mask_group``: ``MASK[_LEFT]``/``MASK[_RIGHT]``
  the window sides (-1 = unbounded), ``MASK[_SOFTCAP]`` tanh soft-capping of the scores, ``MASK[_OFFSETS]`` ring
  offsets read from device memory, ``MASK[_SEGMENTS]`` packed-sequence segment ids read from device memory;
* ``pos``, the runtime tuple ``(q_off, k_off, global_seqlen_q, global_seqlen_k)`` (:func:`_mask_pos`), with
  ``MASK[_SEGMENTS]`` followed by this batch row's query and key segment-id pointers.

Block ranges come from the same inequalities (:func:`_key_bound`) so that fully masked tiles are never visited and
fully visible tiles skip the elementwise mask. Segment ids only remove pairs: with them every visited tile takes
the elementwise path (:func:`_key_blocks`/:func:`_query_blocks` report no fully visible tile), where
:func:`_same_segment` joins the position mask. Without ``MASK[_SEGMENTS]`` none of that code is generated.
"""
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# tanh(x) = 1 - 2 / (exp(2x) + 1); exp(2x) = exp2(x * 2 * log2(e)).
_TWO_LOG2E = tl.constexpr(2.8853900817779268)
# Fields of the MASK constexpr tuple (plan_common.mask_group builds it in this order).
_LEFT = tl.constexpr(0)
_RIGHT = tl.constexpr(1)
_SOFTCAP = tl.constexpr(2)
_OFFSETS = tl.constexpr(3)
_SEGMENTS = tl.constexpr(4)


@triton.jit
def _tanh(x):
    # Written with exp2 so the interpreter and every GPU arch evaluate the same formula; it saturates to +-1
    # (exp2 -> inf or 0) instead of producing NaN for large |x|.
    e = tl.exp2(x * _TWO_LOG2E)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _finish_with_sink(acc, l_i, m_i, sink):
    """Normalized output and natural-log LSE of one online softmax (``m_i`` in the log2 domain) whose denominator
    also holds the attention sink (natural-log logit, a scalar or one per row): l + 2^(sink * log2 e - m). The
    sink carries no value, so it only rescales. Rows that saw no key: out 0 and lse = sink exactly."""
    s2 = sink * _LOG2E
    m_f = tl.maximum(m_i, s2)
    m_use = tl.where(m_f == float("-inf"), 0.0, m_f)  # sink -inf and no key: nothing to subtract
    alpha = tl.exp2(m_i - m_use)
    l_f = l_i * alpha + tl.exp2(s2 - m_use)
    l_safe = tl.where(l_f == 0.0, 1.0, l_f)
    out = acc * (alpha / l_safe)[:, None]
    lse = tl.where(l_i == 0.0, sink, (m_use + tl.log2(l_safe)) * _LN2)
    return out, lse


@triton.jit
def _cdiv(x, b: tl.constexpr):
    # Callers guarantee x >= 0, so truncating division is floor division here.
    return (x + (b - 1)) // b


@triton.jit
def _allowed(rows_g, cols_g, global_seqlen_q, global_seqlen_k, MASK: tl.constexpr):
    """Elementwise ``masking.allowed`` on global positions; rows_g is (M, 1) and cols_g (1, N) (or transposed)."""
    ok = (rows_g >= 0) & (rows_g < global_seqlen_q) & (cols_g >= 0) & (cols_g < global_seqlen_k)
    diag = rows_g + (global_seqlen_k - global_seqlen_q)
    if MASK[_LEFT] >= 0:
        ok = ok & (cols_g >= diag - MASK[_LEFT])
    if MASK[_RIGHT] >= 0:
        ok = ok & (cols_g <= diag + MASK[_RIGHT])
    return ok


@triton.jit
def _key_bound(bound, q_pos, shift, k_off, UPPER: tl.constexpr, MASK: tl.constexpr):
    """``masking.key_range``, one side: the lower (UPPER=False) or upper bound ``bound`` on the keys (local index =
    global - k_off) narrowed to those global query row ``q_pos`` may see, shift = global_seqlen_k -
    global_seqlen_q. The one definition of the window arithmetic behind every key range."""
    if UPPER:
        if MASK[_RIGHT] >= 0:
            bound = tl.minimum(bound, q_pos + shift + MASK[_RIGHT] + 1 - k_off)
    else:
        if MASK[_LEFT] >= 0:
            bound = tl.maximum(bound, q_pos + shift - MASK[_LEFT] - k_off)
    return bound


@triton.jit
def _key_blocks(m_first, m_last, seqlen_k, pos, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Key tiles for the valid local query rows [m_first, m_last] (inclusive), as three tile-aligned key ranges.

    Returns (n_lo, f_lo, f_hi, n_hi) in key positions: [n_lo, f_lo) and [f_hi, n_hi) need the elementwise mask,
    [f_lo, f_hi) is visible to every row of the query tile. Tiles outside [n_lo, n_hi) see no allowed pair.
    """
    q_off, k_off, global_seqlen_q, global_seqlen_k = pos[0], pos[1], pos[2], pos[3]
    shift = global_seqlen_k - global_seqlen_q
    g_first = q_off + m_first
    g_last = q_off + m_last
    # Only rows with a valid global position can see anything.
    gu_first = tl.maximum(g_first, 0)
    gu_last = tl.minimum(g_last, global_seqlen_q - 1)
    lo = tl.maximum(0, -k_off)
    hi = tl.minimum(seqlen_k, global_seqlen_k - k_off)
    # Union over the rows [gu_first, gu_last], and intersection (a_*): the keys every row of the tile may see.
    u_lo = _key_bound(lo, gu_first, shift, k_off, False, MASK)
    a_lo = _key_bound(lo, g_last, shift, k_off, False, MASK)
    u_hi = _key_bound(hi, gu_last, shift, k_off, True, MASK)
    a_hi = _key_bound(hi, g_first, shift, k_off, True, MASK)
    rows_valid = (g_first >= 0) & (g_last < global_seqlen_q)
    u_hi = tl.where(gu_first <= gu_last, u_hi, u_lo)
    n_lo = (u_lo // BLOCK_N) * BLOCK_N
    n_hi = tl.maximum(_cdiv(tl.maximum(u_hi, 0), BLOCK_N) * BLOCK_N, n_lo)
    f_lo = _cdiv(tl.maximum(a_lo, 0), BLOCK_N) * BLOCK_N
    f_hi = (tl.maximum(a_hi, 0) // BLOCK_N) * BLOCK_N
    # No full tile: everything goes through the masked path (f_lo = f_hi = n_hi). Segment ids are checked only
    # there, so with them no tile counts as full.
    no_full = (f_hi <= f_lo) | (~rows_valid)
    if MASK[_SEGMENTS]:
        no_full = True
    f_lo = tl.where(no_full, n_hi, tl.minimum(tl.maximum(f_lo, n_lo), n_hi))
    f_hi = tl.where(no_full, n_hi, tl.minimum(tl.maximum(f_hi, f_lo), n_hi))
    return n_lo, f_lo, f_hi, n_hi


@triton.jit
def _key_tiles(seqlen_k, leftpad, seqlen_q, t_first, t_last, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Decode: tile-aligned absolute key positions [n_lo, n_hi) that query positions [t_first, t_last] may see,
    keys [leftpad, leftpad + seqlen_k) (elementwise: scalars for one sequence, or per-sequence vectors)."""
    shift = seqlen_k - seqlen_q
    lo = _key_bound(0, t_first, shift, 0, False, MASK) + leftpad
    hi = _key_bound(seqlen_k, t_last, shift, 0, True, MASK) + leftpad
    n_lo = (lo // BLOCK_N) * BLOCK_N
    n_hi = tl.where(lo < hi, _cdiv(tl.maximum(hi, 0), BLOCK_N) * BLOCK_N, n_lo)
    return n_lo, n_hi


@triton.jit
def _query_blocks(n_first, n_last, n_tile_full, seqlen_q, pos, BLOCK_M: tl.constexpr, MASK: tl.constexpr):
    """Query tiles that can see the valid local keys [n_first, n_last] (inclusive); transpose of _key_blocks.

    ``n_tile_full`` says the key tile has no out-of-range column, a precondition for skipping the mask.
    Returns (m_lo, f_lo, f_hi, m_hi) in query positions, with the same meaning as in _key_blocks. A full query
    tile here also has all its rows inside [0, seqlen_q), because out-of-range rows must not contribute to dK/dV.
    """
    q_off, k_off, global_seqlen_q, global_seqlen_k = pos[0], pos[1], pos[2], pos[3]
    shift = global_seqlen_k - global_seqlen_q
    g_first = k_off + n_first
    g_last = k_off + n_last
    gu_first = tl.maximum(g_first, 0)
    gu_last = tl.minimum(g_last, global_seqlen_k - 1)
    u_lo = tl.maximum(0, -q_off)
    u_hi = tl.minimum(seqlen_q, global_seqlen_q - q_off)
    a_lo = u_lo
    a_hi = u_hi
    # key j visible from row i  <=>  j - shift - right <= i <= j - shift + left (_key_bound solved for i)
    if MASK[_RIGHT] >= 0:
        u_lo = tl.maximum(u_lo, gu_first - shift - MASK[_RIGHT] - q_off)
        a_lo = tl.maximum(a_lo, g_last - shift - MASK[_RIGHT] - q_off)
    if MASK[_LEFT] >= 0:
        u_hi = tl.minimum(u_hi, gu_last - shift + MASK[_LEFT] + 1 - q_off)
        a_hi = tl.minimum(a_hi, g_first - shift + MASK[_LEFT] + 1 - q_off)
    cols_valid = (g_first >= 0) & (g_last < global_seqlen_k) & n_tile_full
    u_hi = tl.where(gu_first <= gu_last, u_hi, u_lo)
    m_lo = (u_lo // BLOCK_M) * BLOCK_M
    m_hi = tl.maximum(_cdiv(tl.maximum(u_hi, 0), BLOCK_M) * BLOCK_M, m_lo)
    f_lo = _cdiv(tl.maximum(a_lo, 0), BLOCK_M) * BLOCK_M
    f_hi = (tl.maximum(a_hi, 0) // BLOCK_M) * BLOCK_M
    no_full = (f_hi <= f_lo) | (~cols_valid)
    if MASK[_SEGMENTS]:
        no_full = True
    f_lo = tl.where(no_full, m_hi, tl.minimum(tl.maximum(f_lo, m_lo), m_hi))
    f_hi = tl.where(no_full, m_hi, tl.minimum(tl.maximum(f_hi, f_lo), m_hi))
    return m_lo, f_lo, f_hi, m_hi


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, HEAD_DIM_PAD) tile; padded columns and (when CHECK_ROWS) rows >= n_rows read as 0.

    The column mask is compiled out when the head dim is already a power of two, the row mask on tiles that
    are known to be in range, so interior tiles issue unpredicated (vectorizable) loads.
    """
    if CHECK_ROWS:
        if HEAD_DIM == HEAD_DIM_PAD:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == HEAD_DIM_PAD:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    if HEAD_DIM == HEAD_DIM_PAD:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _mask_pos(OFFS, global_seqlen_q, global_seqlen_k, MASK: tl.constexpr):
    """The runtime mask group ``pos`` of the dense kernels (batch row ``tl.program_id(2)`` of
    ``tl.num_programs(2)``). OFFS is the mask's int32 device array, named ``offsets`` or ``segment_ids`` by
    ``plan_common.mask_group``: ring attention passes traced offsets (two values), so they live in device memory
    rather than in scalar arguments; segment ids are laid out as all query ids (B, global_seqlen_q) followed by all
    key ids (B, global_seqlen_k), and ``pos`` then also carries this batch row's two id pointers. The host never
    combines offsets with segment ids, so with segments local positions equal global ones."""
    if MASK[_OFFSETS]:
        q_off = tl.load(OFFS)
        k_off = tl.load(OFFS + 1)
    else:
        q_off = 0
        k_off = 0
    if MASK[_SEGMENTS]:
        off_b = tl.program_id(2).to(tl.int64)
        q_ids = OFFS + off_b * global_seqlen_q
        k_ids = OFFS + tl.num_programs(2).to(tl.int64) * global_seqlen_q + off_b * global_seqlen_k
        pos = (q_off, k_off, global_seqlen_q, global_seqlen_k, q_ids, k_ids)
    else:
        pos = (q_off, k_off, global_seqlen_q, global_seqlen_k)
    return pos


@triton.jit
def _segment_ids(idx_g, pos, KEYS: tl.constexpr, MASK: tl.constexpr):
    """Segment ids of global query (KEYS=False) or key (KEYS=True) positions ``idx_g`` (any shape); positions
    outside the sequence read -1 (the position mask drops them anyway). Without ``MASK[_SEGMENTS]``: 0, unused."""
    if MASK[_SEGMENTS]:
        if KEYS:
            ids = tl.load(pos[5] + idx_g, mask=(idx_g >= 0) & (idx_g < pos[3]), other=-1)
        else:
            ids = tl.load(pos[4] + idx_g, mask=(idx_g >= 0) & (idx_g < pos[2]), other=-1)
    else:
        ids = 0
    return ids


@triton.jit
def _same_segment(ok, fixed_ids, other_g, pos, OTHER_KEYS: tl.constexpr, MASK: tl.constexpr):
    """``ok`` (A, B) and "same segment". Axis 0 is the side a program holds fixed (query rows in the forward and
    dQ, key rows of the transposed scores in dK/dV), ``fixed_ids`` (A,) its ids from :func:`_segment_ids`; axis 1
    the side the loop walks, ``other_g`` (B,) its global positions (keys if OTHER_KEYS), whose ids are loaded
    here, per tile. Without ``MASK[_SEGMENTS]``: ``ok`` unchanged."""
    if MASK[_SEGMENTS]:
        ok = ok & (fixed_ids[:, None] == _segment_ids(other_g, pos, OTHER_KEYS, MASK)[None, :])
    return ok


@triton.jit
def _seq_bounds(CU_Q, CU_K, SEQUSED_K, off_b, HAS_SEQUSED: tl.constexpr):
    """Varlen sequence ``off_b``: (q_start, seqlen_q, k_start, seqlen_k, k_span); seqlen_k = seqused_k[b]
    (HAS_SEQUSED) or the cu_k difference k_span."""
    q_start = tl.load(CU_Q + off_b)
    seqlen_q = tl.load(CU_Q + off_b + 1) - q_start
    k_start = tl.load(CU_K + off_b)
    k_span = tl.load(CU_K + off_b + 1) - k_start
    if HAS_SEQUSED:
        seqlen_k = tl.load(SEQUSED_K + off_b)
    else:
        seqlen_k = k_span
    return q_start, seqlen_q, k_start, seqlen_k, k_span

"""Device helpers shared by the forward and backward kernels (pure ``@triton.jit`` code, no host logic).

Every mask decision mirrors ``fa3jax.masking.allowed`` evaluated on *global* positions (row/column index plus
the runtime q/k offsets of ring attention) against the *global* lengths, with the window constexprs
``WINDOW_LEFT``/``WINDOW_RIGHT`` (-1 = unbounded). Block ranges are derived from the same inequalities so that
fully masked tiles are never visited and fully visible tiles skip the elementwise mask.
"""
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# tanh(x) = 1 - 2 / (exp(2x) + 1); exp(2x) = exp2(x * 2 * log2(e)).
_TWO_LOG2E = tl.constexpr(2.8853900817779268)


@triton.jit
def _tanh(x):
    # Written with exp2 so the interpreter and every GPU arch evaluate the same formula; it saturates to +-1
    # (exp2 -> inf or 0) instead of producing NaN for large |x|.
    e = tl.exp2(x * _TWO_LOG2E)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _cdiv(x, b: tl.constexpr):
    # Callers guarantee x >= 0, so truncating division is floor division here.
    return (x + (b - 1)) // b


@triton.jit
def _allowed(rows_g, cols_g, glq, glk, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Elementwise ``masking.allowed`` on global positions; rows_g is (M, 1) and cols_g (1, N) (or transposed)."""
    ok = (rows_g >= 0) & (rows_g < glq) & (cols_g >= 0) & (cols_g < glk)
    diag = rows_g + (glk - glq)
    if WINDOW_LEFT >= 0:
        ok = ok & (cols_g >= diag - WINDOW_LEFT)
    if WINDOW_RIGHT >= 0:
        ok = ok & (cols_g <= diag + WINDOW_RIGHT)
    return ok


@triton.jit
def _key_blocks(m_first, m_last, seqlen_k, q_off, k_off, glq, glk,
                BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Key tiles for the valid local query rows [m_first, m_last] (inclusive), as three tile-aligned key ranges.

    Returns (n_lo, f_lo, f_hi, n_hi) in key positions: [n_lo, f_lo) and [f_hi, n_hi) need the elementwise mask,
    [f_lo, f_hi) is visible to every row of the query tile. Tiles outside [n_lo, n_hi) see no allowed pair.
    """
    shift = glk - glq
    g_first = q_off + m_first
    g_last = q_off + m_last
    # Union over rows: only rows with a valid global position can see anything.
    gu_first = tl.maximum(g_first, 0)
    gu_last = tl.minimum(g_last, glq - 1)
    u_lo = tl.maximum(0, -k_off)
    u_hi = tl.minimum(seqlen_k, glk - k_off)
    # Intersection over rows: the key range every row of the tile may see.
    a_lo = u_lo
    a_hi = u_hi
    if WINDOW_LEFT >= 0:
        u_lo = tl.maximum(u_lo, gu_first + shift - WINDOW_LEFT - k_off)
        a_lo = tl.maximum(a_lo, g_last + shift - WINDOW_LEFT - k_off)
    if WINDOW_RIGHT >= 0:
        u_hi = tl.minimum(u_hi, gu_last + shift + WINDOW_RIGHT + 1 - k_off)
        a_hi = tl.minimum(a_hi, g_first + shift + WINDOW_RIGHT + 1 - k_off)
    rows_valid = (g_first >= 0) & (g_last < glq)
    u_hi = tl.where(gu_first <= gu_last, u_hi, u_lo)
    n_lo = (u_lo // BLOCK_N) * BLOCK_N
    n_hi = tl.maximum(_cdiv(tl.maximum(u_hi, 0), BLOCK_N) * BLOCK_N, n_lo)
    f_lo = _cdiv(tl.maximum(a_lo, 0), BLOCK_N) * BLOCK_N
    f_hi = (tl.maximum(a_hi, 0) // BLOCK_N) * BLOCK_N
    # No full tile: everything goes through the masked path (f_lo = f_hi = n_hi).
    no_full = (f_hi <= f_lo) | (~rows_valid)
    f_lo = tl.where(no_full, n_hi, tl.minimum(tl.maximum(f_lo, n_lo), n_hi))
    f_hi = tl.where(no_full, n_hi, tl.minimum(tl.maximum(f_hi, f_lo), n_hi))
    return n_lo, f_lo, f_hi, n_hi


@triton.jit
def _query_blocks(n_first, n_last, n_tile_full, seqlen_q, q_off, k_off, glq, glk,
                  BLOCK_M: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Query tiles that can see the valid local keys [n_first, n_last] (inclusive); transpose of _key_blocks.

    ``n_tile_full`` says the key tile has no out-of-range column, a precondition for skipping the mask.
    Returns (m_lo, f_lo, f_hi, m_hi) in query positions, with the same meaning as in _key_blocks. A full query
    tile here also has all its rows inside [0, seqlen_q), because out-of-range rows must not contribute to dK/dV.
    """
    shift = glk - glq
    g_first = k_off + n_first
    g_last = k_off + n_last
    gu_first = tl.maximum(g_first, 0)
    gu_last = tl.minimum(g_last, glk - 1)
    u_lo = tl.maximum(0, -q_off)
    u_hi = tl.minimum(seqlen_q, glq - q_off)
    a_lo = u_lo
    a_hi = u_hi
    # key j visible from row i  <=>  j - shift - right <= i <= j - shift + left
    if WINDOW_RIGHT >= 0:
        u_lo = tl.maximum(u_lo, gu_first - shift - WINDOW_RIGHT - q_off)
        a_lo = tl.maximum(a_lo, g_last - shift - WINDOW_RIGHT - q_off)
    if WINDOW_LEFT >= 0:
        u_hi = tl.minimum(u_hi, gu_last - shift + WINDOW_LEFT + 1 - q_off)
        a_hi = tl.minimum(a_hi, g_first - shift + WINDOW_LEFT + 1 - q_off)
    cols_valid = (g_first >= 0) & (g_last < glk) & n_tile_full
    u_hi = tl.where(gu_first <= gu_last, u_hi, u_lo)
    m_lo = (u_lo // BLOCK_M) * BLOCK_M
    m_hi = tl.maximum(_cdiv(tl.maximum(u_hi, 0), BLOCK_M) * BLOCK_M, m_lo)
    f_lo = _cdiv(tl.maximum(a_lo, 0), BLOCK_M) * BLOCK_M
    f_hi = (tl.maximum(a_hi, 0) // BLOCK_M) * BLOCK_M
    no_full = (f_hi <= f_lo) | (~cols_valid)
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
def _load_offsets(OFFS, HAS_OFFSETS: tl.constexpr):
    # Ring attention passes traced offsets, so they live in device memory rather than in scalar arguments.
    if HAS_OFFSETS:
        q_off = tl.load(OFFS)
        k_off = tl.load(OFFS + 1)
    else:
        q_off = 0
        k_off = 0
    return q_off, k_off


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

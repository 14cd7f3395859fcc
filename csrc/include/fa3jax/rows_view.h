// Packed-rows TMA views whose descriptor base stays on the tensor (device side; launch.h encode_rows_view builds
// them): rank 5, (d, row, head, end, wrap). A run of `len` valid rows ending at row `end` (a varlen sequence, a KV
// cache slot) reads view rows kViewRows - len + i: rows past len fall outside the row extent and are zero-filled,
// and the wrap mode, always at coordinate kViewRows with stride 2^34 bytes minus a row, adds -kViewRows rows modulo
// 2^64 (kViewRows x 2^34 = 2^64). Used by the KV-cache forward's loads and by the varlen forward's and backward's.
#pragma once

#include <cstdint>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>

namespace fa3jax {

// The views' row extent and their wrap mode's coordinate.
inline constexpr int kViewRows = 1 << 30;

// One box (box_cols columns from `col`, the descriptor's box rows from view row `row`) into shared memory at dst.
CUTE_DEVICE void copy_rows_box(cute::TmaDescriptor const& desc, uint64_t* bar, void* dst, int col, int row, int head,
                               int end, uint64_t hint = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL)) {
  int const wrap = kViewRows;  // a value: copy() takes its coordinates by reference
  cute::SM90_TMA_LOAD_5D::copy(&desc, bar, hint, dst, col, row, head, end, wrap);
}

// A tile of kCols columns as boxes of kBoxCols (one swizzle row each): dst(c) is the shared address of column c's
// slice, which the tile's swizzled layout keeps as box rows of kBoxCols columns.
template <int kCols, int kBoxCols, class Dst>
CUTE_DEVICE void copy_rows_tile(cute::TmaDescriptor const& desc, uint64_t* bar, Dst const& dst, int row, int head,
                                int end, uint64_t hint = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL)) {
  static_assert(kCols % kBoxCols == 0);
  CUTE_UNROLL
  for (int c = 0; c < kCols; c += kBoxCols) copy_rows_box(desc, bar, dst(c), c, row, head, end, hint);
}

// The descriptor of a Params TMA field: a rows view's own, or a CuTe TMA copy's.
CUTE_HOST_DEVICE cute::TmaDescriptor const* tma_desc_of(cute::TmaDescriptor const& d) { return &d; }
template <class Tma>
CUTE_HOST_DEVICE auto tma_desc_of(Tma const& t) {
  return t.get_tma_descriptor();
}

}  // namespace fa3jax

// Parameter checks shared by the forward and backward dispatch (host only).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "fa3jax/attn_params.h"

namespace fa3jax {

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// TMA: byte strides positive multiples of 16 below 2^40; the inner (d) stride is 1 (implied by Strides).
inline bool tma_strides_ok(Strides const& s) {
  int64_t const elem = 2, lim = int64_t(1) << 40;
  for (int64_t x : {s.row, s.head, s.batch})
    if (x <= 0 || (x * elem) % 16 != 0 || x * elem >= lim) return false;
  return true;
}

}  // namespace fa3jax

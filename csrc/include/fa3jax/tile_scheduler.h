// Static (non-persistent) tile scheduler: one CTA per (m_block, head, batch). Heaviest m blocks first under
// causal masks (the grid's x index runs from the last query block down).
#pragma once

#include <cute/config.hpp>

namespace fa3jax {

struct FwdTile {
  int m_block, head, batch;
};

struct StaticTileScheduler {
  static dim3 grid(int num_m_blocks, int num_heads, int batch) { return dim3(num_m_blocks, num_heads, batch); }
  CUTE_DEVICE static FwdTile get() {
    return {int(gridDim.x) - 1 - int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  }
};

}  // namespace fa3jax

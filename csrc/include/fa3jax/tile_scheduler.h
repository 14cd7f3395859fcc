// Persistent tile scheduler. The grid holds as many CTAs as fit on the GPU at once (one per SM: the tiles fill
// shared memory); after its first unit each CTA takes the next one statically (round robin) or from a global
// counter (dynamic: used for masks whose tiles differ in length, see launch.h). A unit is one (query block,
// head, batch) tile. Persistence lets the producer load the next tile's Q and first K/V blocks while the
// consumers still finish the current tile (their last P V GEMM and the epilogue); with one CTA per tile that
// load latency and the CTA launch are exposed once per tile, which costs most on short rows (causal, s <= 2k).
#pragma once

#include <cute/config.hpp>

namespace fa3jax {

struct FwdTile {
  int m_block, head, batch;
  int split = 0;  // split-KV: which contiguous part of the row's key blocks (SchedulerParams::num_splits)
};

// Host-computed description of the unit order.
struct SchedulerParams {
  int num_m_units;  // query blocks
  int num_heads;    // query heads
  int num_hb;       // num_heads * batch * num_splits
  int num_units;    // num_m_units * num_hb
  // Order of units. reverse_m == false: query blocks fastest, so the CTAs running at one time share few (head,
  // batch) K/V streams in L2. reverse_m == true (masks whose last query blocks see the most keys): heaviest
  // query blocks first, so the short ones fill the tail, over sections of `group` (head, batch) pairs whose K/V
  // fit in L2 together.
  int group;
  bool reverse_m;
  int* counter;  // zeroed before the launch: dynamic unit assignment; nullptr: static (see dynamic_unit)
  // Split-KV (KV-cache forward): each (head, batch) pair is num_splits units, adjacent in the order so that the
  // splits of one row run together (they read disjoint keys, so nothing is lost to L2 by that).
  int num_splits = 1;
};

struct PersistentTileScheduler {
  // Grid size: `max_ctas` = CTAs that fit on the device at once.
  static int num_ctas(SchedulerParams const& p, int max_ctas) {
    int const ctas = p.num_units < max_ctas ? p.num_units : max_ctas;
    return ctas < 1 ? 1 : ctas;
  }

  CUTE_DEVICE static int num_ctas() { return int(gridDim.x); }
  CUTE_DEVICE static int first_unit() { return int(blockIdx.x); }
  // Static assignment: round robin, round k = units [k*C, (k+1)*C). Computed from blockIdx, so the compiler
  // keeps everything derived from it (TMA coordinates, trip counts) in uniform registers.
  CUTE_DEVICE static int static_unit(int k) { return k * num_ctas() + first_unit(); }
  // Dynamic assignment (p.counter set): the next unnumbered unit, so a CTA that drew short tiles takes more of
  // them, as the hardware's block dispatch would. Drawn by lane 0 of the producer warp and handed to the
  // consumers through shared memory.
  CUTE_DEVICE static int dynamic_unit(SchedulerParams const& p) { return num_ctas() + atomicAdd(p.counter, 1); }

  // Host-callable so that the ordering is tested without a GPU (tests/test_layouts.cu).
  CUTE_HOST_DEVICE static FwdTile tile(SchedulerParams const& p, int unit) {
    int m_unit, hb;
    if (!p.reverse_m) {
      hb = unit / p.num_m_units;
      m_unit = unit - hb * p.num_m_units;
    } else {
      int const per_section = p.group * p.num_m_units;
      int const section = unit / per_section;
      int const idx = unit - section * per_section;
      int const hb0 = section * p.group;
      int const width = p.group < p.num_hb - hb0 ? p.group : p.num_hb - hb0;
      int const row = idx / width;
      m_unit = p.num_m_units - 1 - row;
      hb = hb0 + (idx - row * width);
    }
    int split = 0;
    if (p.num_splits > 1) {
      int const hb_only = hb / p.num_splits;
      split = hb - hb_only * p.num_splits;
      hb = hb_only;
    }
    int const batch = hb / p.num_heads;
    return {m_unit, hb - batch * p.num_heads, batch, split};
  }
};

}  // namespace fa3jax

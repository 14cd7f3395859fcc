// Tile-size policy per head dim (forward). kBlockM = 64 * number of consumer warpgroups.
// Register budgets obey: producer*128 + consumer*128*kNumMmaWG <= the registers the CTA launches with (see
// kernel_traits.h), both multiples of 8.
#pragma once

// A/B knobs for experiment builds (benchmarks/device_run.sh ab); the defaults are the measured choices.
#ifndef FA3JAX_D128_TMA_EPILOGUE
#define FA3JAX_D128_TMA_EPILOGUE 1
#endif
#ifndef FA3JAX_D128_BLOCK_N
#define FA3JAX_D128_BLOCK_N 128
#endif
#ifndef FA3JAX_D128_STAGES
#define FA3JAX_D128_STAGES 2
#endif

namespace fa3jax {

template <int kHeadDim> struct FwdPolicy;

template <> struct FwdPolicy<64> {
  static constexpr int kBlockM = 192, kBlockN = 128, kStages = 2;
  // The smem/TMA epilogue spills 200 B at 160 consumer registers (ptxas -v; 24 B without it).
  static constexpr bool kTmaEpilogue = false;
  static constexpr int kProducerRegs = 32, kConsumerRegs = 160;  // 4 warpgroups (512 threads)
};
template <> struct FwdPolicy<128> {
  // Each alternative (kBlockN 176, 3 stages, no TMA epilogue, a second Q buffer) measured slower on the H100
  // somewhere in the d=128 table; numbers in benchmarks/RESULTS.md.
  static constexpr int kBlockM = 128, kBlockN = FA3JAX_D128_BLOCK_N, kStages = FA3JAX_D128_STAGES;
  static constexpr bool kTmaEpilogue = FA3JAX_D128_TMA_EPILOGUE;
  // The persistent multicast producer spills at 24 registers; 32 fits with consumers at 232, within the 168 x 384
  // the CTA launches with (both kernels compile without spills, ptxas -v, 2026-11-25).
  static constexpr int kProducerRegs = 32, kConsumerRegs = 232;  // 3 warpgroups (384 threads)
};
// Wide key tiles for unmasked inputs with long keys (FA3's non-causal d=128 choice), a separate instantiation:
// faster from kMinSeqlenK keys on without a mask, slower below and causal (H100; benchmarks/RESULTS.md).
// 2 x (K + V) of 176 rows leave no room for the O buffer: registers -> global epilogue.
template <int kHeadDim> struct FwdPolicyWide;
template <> struct FwdPolicyWide<128> {
  static constexpr int kBlockM = 128, kBlockN = 176, kStages = 2;
  static constexpr bool kTmaEpilogue = false;
  static constexpr int kProducerRegs = 32, kConsumerRegs = 232;
  static constexpr int kMinSeqlenK = 8192;
};

template <> struct FwdPolicy<256> {
  static constexpr int kBlockM = 128, kBlockN = 80, kStages = 2;
  // No room for a 64 KiB O buffer next to Q (64 KiB) and 2 x (K + V) (160 KiB): registers -> global epilogue.
  static constexpr bool kTmaEpilogue = false;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
};

}  // namespace fa3jax

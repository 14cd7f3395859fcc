// Tile-size policy per head dim (forward). kBlockM = 64 * number of consumer warpgroups.
// Register budgets obey: producer*128 + consumer*128*kNumMmaWG <= 65536 and both multiples of 8.
#pragma once

namespace fa3jax {

template <int kHeadDim> struct FwdPolicy;

template <> struct FwdPolicy<64> {
  static constexpr int kBlockM = 192, kBlockN = 128, kStages = 2;
  static constexpr int kProducerRegs = 32, kConsumerRegs = 160;  // 4 warpgroups (512 threads)
};
template <> struct FwdPolicy<128> {
  // 3 K/V stages (Q 32 KiB + 3 x 64 KiB = 224 KiB of the 227 KiB): with 2, a V slot is only refilled after
  // both consumer warpgroups' PV GEMMs retire, leaving the TMA about half an iteration of slack.
  static constexpr int kBlockM = 128, kBlockN = 128, kStages = 3;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;  // 3 warpgroups (384 threads)
};
template <> struct FwdPolicy<256> {
  static constexpr int kBlockM = 128, kBlockN = 80, kStages = 2;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
};

}  // namespace fa3jax

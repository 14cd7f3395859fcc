// Small device helpers: WGMMA issue, accumulator layout views, named barriers, quad reductions, conversions.
#pragma once

#include <cute/tensor.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/numeric_conversion.h>

namespace fa3jax {

using namespace cute;

// Issue one warpgroup GEMM C (+)= A * B over all k blocks and commit it as one batch. Does not wait.
template <bool kZeroInit, bool kARegs, class TiledMma, class TA, class TB, class TC>
CUTE_DEVICE void wgmma_issue(TiledMma& tiled_mma, TA& tA, TB const& tB, TC& tC) {
  if constexpr (kARegs) warpgroup_fence_operand(tA);
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  tiled_mma.accumulate_ = kZeroInit ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tA); ++k) {
    cute::gemm(tiled_mma, tA(_, _, k), tB(_, _, k), tC);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(tC);
  if constexpr (kARegs) warpgroup_fence_operand(tA);
}

// Ends the values held in fp32 register tensor t: each element is redefined by an empty asm (no instruction), so
// nothing before it stays live into what follows. For accumulators declared once over a loop, whose next zero-init
// GEMM (and its operand fences) would otherwise read, and so keep, the previous iteration's values.
template <class T>
CUTE_DEVICE void forget_values(T& t) {
  CUTE_UNROLL
  for (int i = 0; i < size(t); ++i) asm volatile("" : "=f"(t(i)));
}

// CuTe's GMMA descriptor tensor `t` of an smem operand whose first element sits at shared address 16 * smem16,
// with the 14-bit start-address field (address >> 4) written as a plain add to the other, constant, fields.
// Equal to CuTe's descriptor (which masks address >> 4 to 14 bits) for every address below 256 KiB, i.e. all of
// sm90's shared memory (at most 228 KiB per SM). Given smem16 as (CTA base >> 4) + constant, ptxas forms each
// per-stage, per-k descriptor from one uniform base with adds, instead of rebuilding it with shift + mask + or
// (SASS: the V descriptors were rebuilt in every key block).
template <class DescTensor>
CUTE_DEVICE auto gmma_desc_at(DescTensor const& t, uint32_t smem16) {
  GMMA::DescriptorIterator it = t.data();
  it.desc_.reg32_[0] = (it.desc_.reg32_[0] & ~0x3fffu) + smem16;
  return make_tensor(it, t.layout());
}

// GMMA accumulator fragment ((2, 2, V), M, N) viewed as (rows = (2, M), cols = (2, V, N)).
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_rowcol(L const& l) {
  static_assert(decltype(rank(l))::value == 3);
  static_assert(decltype(rank<0>(l))::value == 3);
  auto v = get<0>(l);
  return make_layout(make_layout(get<1>(v), get<1>(l)), make_layout(get<0>(v), get<2>(v), get<2>(l)));
}

// GMMA accumulator fragment ((2, 2, V), M, 1) of a 64xN tile viewed as the register A operand of a
// 64x?xN GEMM: ((2, 2, 2), M, V / 2). Column groups 2k and 2k+1 form the k-th 16-wide k block.
template <class L>
CUTE_HOST_DEVICE constexpr auto acc_to_a_regs(L const& l) {
  auto v = get<0>(l);
  auto g = logical_divide(get<2>(v), Layout<_2>{});  // (2, V/2)
  return make_layout(make_layout(get<0>(v), get<1>(v), get<0>(g)), get<1>(l), get<1>(g));
}

// Named barriers (id 0 is __syncthreads). Counts are in threads, multiples of 32.
CUTE_DEVICE void named_barrier_sync(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}
CUTE_DEVICE void named_barrier_arrive(int id, int num_threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(num_threads) : "memory");
}

// Waits until the mbarrier's phase `phase` has completed, as cute::wait_barrier, but each try may suspend the
// thread up to kSuspendNs (it wakes when the phase completes): for waiters with nothing else to do, whose spinning
// would take issue slots from the warps on the same scheduler.
template <uint32_t kSuspendNs = 1000000>
CUTE_DEVICE void wait_barrier_suspend(uint64_t& bar, int phase) {
  asm volatile(
      "{\n"
      ".reg .pred P1;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1, %2;\n"
      "@!P1 bra WAIT;\n"
      "}\n" ::"r"(cute::cast_smem_ptr_to_uint(&bar)),
      "r"(phase), "n"(kSuspendNs)
      : "memory");
}

// Reductions over the 4 lanes that share an accumulator row.
CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return x;
}
CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x;
}

CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// dst (Element fragment) = convert(src (float fragment)); both compact with identical layouts.
template <class TD, class TS>
CUTE_DEVICE void convert_fragment(TD& dst, TS const& src) {
  using To = typename TD::value_type;
  constexpr int N = decltype(size(src))::value;
  static_assert(N % 2 == 0);
  cutlass::NumericArrayConverter<To, float, N, cutlass::FloatRoundStyle::round_to_nearest> conv;
  *reinterpret_cast<cutlass::Array<To, N>*>(raw_pointer_cast(dst.data())) =
      conv(*reinterpret_cast<cutlass::Array<float, N> const*>(raw_pointer_cast(src.data())));
}

}  // namespace fa3jax

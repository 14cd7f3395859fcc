// The combine pass of the split-KV KV-cache forward (attn_params.h Splits): merges each row's parts by their LSE,
// lse = log(sum_s exp(lse_s) + exp(sink)), out = sum_s exp(lse_s - lse) out_s, so that the sink (gpt-oss) joins the
// denominator once. A part that saw no key has lse_s = -inf and out_s = 0 and drops out; a row with no part and no
// sink gets out 0 and lse -inf, one with a sink only out 0 and lse = sink exactly (the unsplit kernel's rule).
// Plain CUDA (no CUTLASS): one warp per (batch, head, query) row, each lane 8 of its <= 256 columns.
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fa3jax/attn_params.h"

namespace fa3jax {
namespace {

constexpr int kWarpsPerBlock = 8;

template <DType kDType> struct Store8;
template <> struct Store8<DType::kBF16> {
  static __device__ void run(void* dst, float const (&v)[8]) {
    __nv_bfloat162 h[4];
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4 const*>(h);
  }
};
template <> struct Store8<DType::kFP16> {
  static __device__ void run(void* dst, float const (&v)[8]) {
    __half2 h[4];
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<uint4 const*>(h);
  }
};

// out_accum (splits, b, hq, sq, dv), lse_accum (splits, b, hq, sq): row index (bb hq + h) sq + i is also the lse's.
template <DType kDType>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) combine_kernel(float const* __restrict__ out_accum,
                                                                      float const* __restrict__ lse_accum,
                                                                      float const* __restrict__ sinks,
                                                                      void* __restrict__ out, float* __restrict__ lse,
                                                                      int splits, int64_t rows, int hq, int sq,
                                                                      int dv) {
  int const lane = int(threadIdx.x % 32);
  int64_t const row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  int const h = int((row / sq) % hq);
  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, lse_accum[s * rows + row]);
  for (int o = 16; o > 0; o /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float const sink = sinks != nullptr ? sinks[h] : -INFINITY;
  float const top = fmaxf(m, sink);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int const col = lane * 8;
  bool const active = col < dv;  // dv is a multiple of 8
  float row_lse = sink;          // no part saw a key: the sink (or -inf) exactly, out 0
  if (top != -INFINITY && m != -INFINITY) {
    // exp(-inf - top) = 0: empty parts (out_s = 0) add nothing, without a branch.
    float total = sink != -INFINITY ? __expf(sink - top) : 0.f;
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
      float const w = __expf(lse_accum[s * rows + row] - top);
      total += w;
      if (active) {
        float4 const* src = reinterpret_cast<float4 const*>(out_accum + (s * rows + row) * dv + col);
        float4 const a = src[0], b = src[1];
        acc[0] += w * a.x, acc[1] += w * a.y, acc[2] += w * a.z, acc[3] += w * a.w;
        acc[4] += w * b.x, acc[5] += w * b.y, acc[6] += w * b.z, acc[7] += w * b.w;
      }
    }
    float const inv = 1.f / total;
    for (float& x : acc) x *= inv;
    row_lse = top + __logf(total);
  }
  if (active) {
    int64_t const bh = row / sq;
    int64_t const bb = bh / hq, i = row - bh * sq;
    size_t const elem = 2;  // bf16 / fp16
    char* dst = static_cast<char*>(out) + ((((bb * sq + i) * hq + h) * dv) + col) * elem;
    Store8<kDType>::run(dst, acc);
  }
  if (lane == 0) lse[row] = row_lse;
}

}  // namespace

FwdStatus run_fwd_combine(const FwdParams& p, cudaStream_t stream) {
  AttnCore const& c = p.core;
  int const splits = p.splits.num_splits;
  int const dv = c.value_dim();
  if (splits <= 1 || !p.splits.out_accum || !p.splits.lse_accum || !p.out || !p.lse)
    return {cudaErrorInvalidValue, "combine: needs num_splits > 1 and its buffers"};
  if (dv < 8 || dv > 256 || dv % 8 != 0) return {cudaErrorInvalidValue, "combine: head_dim_v must be 8..256, a multiple of 8"};
  int64_t const rows = int64_t(c.batch) * c.num_heads_q * c.seqlen_q;
  if (rows == 0) return {};
  int64_t const blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > INT32_MAX) return {cudaErrorInvalidValue, "combine: too many rows"};
  dim3 const grid{unsigned(blocks)}, block{unsigned(kWarpsPerBlock * 32)};
  if (c.dtype == DType::kBF16) {
    combine_kernel<DType::kBF16><<<grid, block, 0, stream>>>(p.splits.out_accum, p.splits.lse_accum, p.sinks, p.out,
                                                             p.lse, splits, rows, c.num_heads_q, c.seqlen_q, dv);
  } else {
    combine_kernel<DType::kFP16><<<grid, block, 0, stream>>>(p.splits.out_accum, p.splits.lse_accum, p.sinks, p.out,
                                                             p.lse, splits, rows, c.num_heads_q, c.seqlen_q, dv);
  }
  cudaError_t const err = cudaGetLastError();
  if (err != cudaSuccess) return {err, "combine kernel launch"};
  return {};
}

}  // namespace fa3jax

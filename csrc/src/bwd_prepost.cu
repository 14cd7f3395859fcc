// The passes around the backward's main kernel (FA3's structure: preprocess, main loop, postprocess), plain CUDA:
// they are memory-bound row and element sweeps, so no TMA or WGMMA. Layouts are those of attn_params.h and
// bwd_layout.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fa3jax/attn_params.h"
#include "fa3jax/seq_info.h"

namespace fa3jax {
namespace {

constexpr size_t kAlign = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kRowsPerBlock = 8;  // one warp per row
constexpr int kSwappedTileElems = kBwdBlockMWide * 128;  // the transposed 80-row tile's convert stage (d = 128)

size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
// Varlen rows per sequence, and dense rows per (batch, head) with the call's tile (bwd_tile_m).
int64_t padded_rows(int seqlen_q, int tile_m = kBwdBlockM) { return bwd_padded_rows(seqlen_q, tile_m); }

// The serving kernel's q/k head dim (bwd_kernel_dim): dq_accum's row width, >= the call's head dim.
int kernel_dim(const AttnCore& c) { return bwd_kernel_dim(c.dtype, c.head_dim, c.value_dim()); }

struct Sizes {
  size_t dq_accum, row, sem;
};
Sizes sizes(const BwdParams& p) {
  AttnCore const& c = p.core;
  size_t rows = c.varlen.enabled() ? size_t(c.num_heads_q) * bwd_varlen_stat_rows(c.seqlen_q, c.batch)
                                   : size_t(c.batch) * c.num_heads_q * padded_rows(c.seqlen_q, bwd_tile_m(p));
  size_t sem = p.deterministic ? rows / kBwdBlockM * kBwdNumMmaWG * sizeof(int) : 0;
  // dq_accum rows are the kernel's width (bwd_kernel_dim), which may exceed the call's head dim.
  size_t const width = size_t(kernel_dim(c));
  return {align_up(rows * width * sizeof(float)), align_up(rows * sizeof(float)), align_up(sem)};
}

template <class T> struct Cvt;
template <> struct Cvt<__nv_bfloat16> {
  static __device__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Cvt<__half> {
  static __device__ float load(__half x) { return __half2float(x); }
  static __device__ __half store(float x) { return __float2half_rn(x); }
};

// One warp's share of rowsum(out * dout) over a row of dv elements: 16-byte loads (8 elements a lane; 2-byte loads
// issue eight times the instructions for the same bytes). dv is a multiple of 8 and the rows 16-byte aligned
// (bwd_check).
template <class T>
__device__ float row_dot(const T* __restrict__ out, const T* __restrict__ dout, int dv, int lane) {
  float sum = 0.f;
  for (int t = 8 * lane; t < dv; t += 256) {
    uint4 const a = *reinterpret_cast<uint4 const*>(out + t), g = *reinterpret_cast<uint4 const*>(dout + t);
    T const* x = reinterpret_cast<T const*>(&a);
    T const* y = reinterpret_cast<T const*>(&g);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += Cvt<T>::load(x[e]) * Cvt<T>::load(y[e]);
  }
  return sum;
}

// Zero one dq_accum row of kd floats (a multiple of 64, 16-byte aligned) with a warp's 16-byte stores.
__device__ void zero_row(float* acc, int kd, int lane) {
  for (int t = 4 * lane; t < kd; t += 128) *reinterpret_cast<float4*>(acc + t) = make_float4(0.f, 0.f, 0.f, 0.f);
}

// Grid (padded rows / kRowsPerBlock, hq, b); warp w of a block owns one query row of one head.
// dv: the call's out/dout head dim (MLA: below q's); kd: the kernel's q head dim (dq_accum rows), >= the call's.
template <class T>
__global__ void bwd_preprocess_kernel(const T* __restrict__ out, const T* __restrict__ dout,
                                      const float* __restrict__ lse, const float* __restrict__ dlse,
                                      BwdWorkspace ws, int seqlen_q, int64_t rows_pad, int num_heads_q, int dv,
                                      int kd) {
  int const lane = threadIdx.x % 32;
  int64_t const row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  int const h = blockIdx.y;
  int64_t const b = blockIdx.z;
  int64_t const stat = (b * num_heads_q + h) * rows_pad + row;  // padded (b, hq, sq_pad) index
  zero_row(ws.dq_accum + stat * kd, kd, lane);
  float sum = 0.f;
  bool const valid = row < seqlen_q;
  if (valid) {
    int64_t const base = ((b * seqlen_q + row) * num_heads_q + h) * dv;
    sum = row_dot(out + base, dout + base, dv, lane);
  }
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    int64_t const dense = (b * num_heads_q + h) * seqlen_q + row;  // unpadded (b, hq, sq) index
    float const l = valid ? lse[dense] : -INFINITY;
    ws.delta[stat] = valid ? sum - (dlse ? dlse[dense] : 0.f) : 0.f;
    ws.lse_log2[stat] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

// Varlen (packed rows, lse (hq, total_q)): grid (rows of max_seqlen_q padded to kBwdBlockM / kRowsPerBlock, hq,
// b); warp w of a block owns row `row` of sequence b, whose stat rows start at bwd_varlen_pad_start. Rows past
// the grid (sequences longer than max_seqlen_q) are never read by the main kernel either.
template <class T>
__global__ void bwd_preprocess_varlen_kernel(const T* __restrict__ out, const T* __restrict__ dout,
                                             const float* __restrict__ lse, const float* __restrict__ dlse,
                                             BwdWorkspace ws, VarlenSeqs vs, int total_q, int total_k,
                                             int64_t stat_rows, int num_heads_q, int dv, int kd) {
  int const lane = threadIdx.x % 32;
  int const row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  int const h = blockIdx.y, b = blockIdx.z;
  SeqInfo const seq = SeqInfo::varlen(b, vs.cu_seqlens_q, vs.cu_seqlens_k, vs.seqused_k, total_q, total_k);
  if (row >= (seq.seqlen_q + kBwdBlockM - 1) / kBwdBlockM * kBwdBlockM) return;
  int64_t const stat = h * stat_rows + bwd_varlen_pad_start(int(seq.offset_q), b) + row;
  zero_row(ws.dq_accum + stat * kd, kd, lane);
  float sum = 0.f;
  bool const valid = row < seq.seqlen_q;
  if (valid) {
    int64_t const base = ((seq.offset_q + row) * num_heads_q + h) * dv;
    sum = row_dot(out + base, dout + base, dv, lane);
  }
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    int64_t const li = int64_t(h) * total_q + seq.offset_q + row;
    float const l = valid ? lse[li] : -INFINITY;
    ws.delta[stat] = valid ? sum - (dlse ? dlse[li] : 0.f) : 0.f;
    ws.lse_log2[stat] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

// Eight fp32 values, scaled, as eight T in one 16-byte store (dst 16-byte aligned).
template <class T>
__device__ void store8(T* dst, float const (&v)[8], float scale) {
  uint4 u;
  uint32_t* w = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      __nv_bfloat162 const x = __floats2bfloat162_rn(v[2 * i] * scale, v[2 * i + 1] * scale);
      w[i] = *reinterpret_cast<uint32_t const*>(&x);
    } else {
      __half2 const x = __floats2half2_rn(v[2 * i] * scale, v[2 * i + 1] * scale);
      w[i] = *reinterpret_cast<uint32_t const*>(&x);
    }
  }
  *reinterpret_cast<uint4*>(dst) = u;
}

// One dq_accum tile whose warpgroup slices hold m64 accumulators with queries as rows (tile_m 64 or 128, not the
// transposed 80-row one), scaled into out: its row 0, column 0 (rows row_stride apart, 16-byte aligned), rows
// [0, rows) and columns [0, d) written. In the stored order (bwd_layout.h) a run of 16 consecutive floats of a slice
// is one thread's four 16-byte groups: accumulator rows a and a + 8 (a = 16 W + r, r < 8), columns 8 G .. 8 G + 7,
// at run index 32 G + 8 W + r. A thread converts one run (64 contiguous bytes) into two 16-byte stores; the runs are
// dealt with the 8-column block fastest, so a warp's store covers whole rows (2-byte stores scattered over 32 rows
// per warp instruction ran at a third of a copy's rate).
template <class T>
__device__ void convert_dq_tile(const float* __restrict__ tile, T* __restrict__ out, int64_t row_stride, int rows,
                                int d, int kd, int tile_m, float scale) {
  bool const rows_split = bwd_dq_rows_split(tile_m);
  int const slice = tile_m * kd / kBwdNumMmaWG;  // floats per warpgroup slice (64 accumulator rows)
  int const blocks = kd / 8;                      // 8-column blocks per row
  int const slice_blocks = rows_split ? blocks : blocks / kBwdNumMmaWG;
  for (int o = threadIdx.x; o < tile_m * blocks / 2; o += blockDim.x) {
    int const cb = o % blocks, pair = o / blocks;  // pair: rows (a, a + 8) of a slice (rows_split: slice pair / 32)
    int const w = rows_split ? pair / 32 : cb / slice_blocks;
    int const G = rows_split ? cb : cb - w * slice_blocks, a16 = pair % 32;  // a16 = 8 W + r
    int const a = 16 * (a16 / 8) + a16 % 8;
    int const row = rows_split ? 64 * w + a : a;
    int const col = 8 * cb;
    if (col >= d) continue;  // d is a multiple of 8: a block is wholly inside or outside
    float4 const* src = reinterpret_cast<float4 const*>(tile + w * slice + 16 * (32 * G + a16));
    float4 const v0 = src[0], v1 = src[1], v2 = src[2], v3 = src[3];
    float const lo[8] = {v0.x, v0.y, v1.x, v1.y, v2.x, v2.y, v3.x, v3.y};  // row, columns col .. col + 7
    float const hi[8] = {v0.z, v0.w, v1.z, v1.w, v2.z, v2.w, v3.z, v3.w};  // row + 8
    if (row < rows) store8(out + row * row_stride + col, lo, scale);
    if (row + 8 < rows) store8(out + (row + 8) * row_stride + col, hi, scale);
  }
}

// Varlen dq rows (packed (total_q, hq, d), zeroed beforehand) of sequence b, rows below max_seqlen_q: one CTA per
// 64-row tile (grid (tiles of max_seqlen_q, hq, b)). dq_accum tiles are kd (the kernel's head dim) wide.
template <class T>
__global__ void bwd_convert_dq_varlen_kernel(const float* __restrict__ acc, T* __restrict__ dq, VarlenSeqs vs,
                                             int total_q, int total_k, int64_t stat_rows, int num_heads_q, int d,
                                             int kd, float scale) {
  int const tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  SeqInfo const seq = SeqInfo::varlen(b, vs.cu_seqlens_q, vs.cu_seqlens_k, vs.seqused_k, total_q, total_k);
  int const rows = min(seq.seqlen_q, vs.max_seqlen_q) - tile * kBwdBlockM;
  if (rows <= 0) return;
  int64_t const base = (h * stat_rows + bwd_varlen_pad_start(int(seq.offset_q), b) + int64_t(tile) * kBwdBlockM) * kd;
  int64_t const row_stride = int64_t(num_heads_q) * d;
  convert_dq_tile(acc + base, dq + (seq.offset_q + int64_t(tile) * kBwdBlockM) * row_stride + int64_t(h) * d,
                  row_stride, rows, d, kd, kBwdBlockM, scale);
}

// dq (b, sq, hq, d) from dq_accum (tiles of tile_m rows, bwd_layout.h, kd >= d wide), scaled once here rather
// than in every partial: one CTA per (query tile, head, batch).
template <class T>
__global__ void bwd_convert_dq_kernel(const float* __restrict__ acc, T* __restrict__ dq, int seqlen_q,
                                      int64_t rows_pad, int num_heads_q, int d, int kd, float scale, int tile_m) {
  int const tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  float const* const src = acc + ((int64_t(b) * num_heads_q + h) * rows_pad + int64_t(tile) * tile_m) * kd;
  int64_t const row_stride = int64_t(num_heads_q) * d;
  int const row0 = tile * tile_m;
  T* const out = dq + (int64_t(b) * seqlen_q + row0) * row_stride + int64_t(h) * d;
  convert_dq_tile(src, out, row_stride, seqlen_q - row0, d, kd, tile_m, scale);
}

// The same for the 80-row tile (bwd_dq_swapped), which holds dQ^T, whose stored runs are columns of dQ: read in
// stored order (16-byte loads) into a shared-memory copy of the tile in dq's order, then written as 16-byte row groups
// (a warp's stores cover whole rows, as in convert_dq_tile). The host launches it with tile_m * kd <=
// kSwappedTileElems.
template <class T>
__global__ void bwd_convert_dq_swapped_kernel(const float* __restrict__ acc, T* __restrict__ dq, int seqlen_q,
                                              int64_t rows_pad, int num_heads_q, int d, int kd, float scale,
                                              int tile_m) {
  int const tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  float const* const src = acc + ((int64_t(b) * num_heads_q + h) * rows_pad + int64_t(tile) * tile_m) * kd;
  int64_t const row_stride = int64_t(num_heads_q) * d;
  int const row0 = tile * tile_m;
  T* const out = dq + (int64_t(b) * seqlen_q + row0) * row_stride + int64_t(h) * d;
  __shared__ alignas(16) T stage[kSwappedTileElems];
  float4 const* src4 = reinterpret_cast<float4 const*>(src);
  for (int q = threadIdx.x; q < tile_m * kd / 4; q += blockDim.x) {
    float4 const a = src4[q];
    float const vals[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      int row, col;
      dq_tile_coords(4 * q + e, kd, tile_m, row, col);
      stage[row * kd + col] = Cvt<T>::store(vals[e] * scale);
    }
  }
  __syncthreads();
  int const blocks = kd / 8;
  for (int o = threadIdx.x; o < tile_m * blocks; o += blockDim.x) {
    int const row = o / blocks, col = 8 * (o % blocks);
    if (row0 + row < seqlen_q && col < d)  // d is a multiple of 8: a block is wholly inside or outside
      *reinterpret_cast<uint4*>(out + row * row_stride + col) =
          *reinterpret_cast<uint4 const*>(&stage[row * kd + col]);
  }
}

// Varlen: query rows per sequence that the passes cover (max_seqlen_q, at most the total, as the forward's grid).
int varlen_rows_q(const AttnCore& c) { return std::max(0, std::min(c.varlen.max_seqlen_q, c.seqlen_q)); }

// Zeroes rows [r0, r1) of a packed tensor of rows row_bytes long (a multiple of 16, 16-byte aligned base) in
// 16-byte stores, spread over blockIdx.y.
__device__ void zero_rows(void* base, int64_t row_bytes, int64_t r0, int64_t r1) {
  if (r1 <= r0) return;
  uint4* const p = reinterpret_cast<uint4*>(static_cast<char*>(base) + r0 * row_bytes);
  int64_t const n = (r1 - r0) * (row_bytes / 16);
  int64_t const stride = int64_t(gridDim.y) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; i < n; i += stride) p[i] = make_uint4(0, 0, 0, 0);
}

// Varlen gradient rows that no pass writes, zeroed before the passes run: dq rows outside every sequence or past the
// first rows_q of theirs (the query rows the passes cover), dk/dv rows outside every sequence or past the first
// min(seqused_k, rows_k) of theirs (the keys the main kernel's grid covers). Block x < batch: sequence x's spans;
// x == batch: the rows before the first sequence and after the last. When the sequences cover the tensors (the
// common case) nothing is written, unlike whole-tensor memsets. Later passes overwrite whatever they compute, so the
// result is that of zeroing everything first.
__global__ void bwd_zero_uncovered_varlen_kernel(void* dq, void* dk, void* dv, VarlenSeqs vs, int batch, int total_q,
                                                 int total_k, int rows_q, int rows_k, int64_t bytes_q, int64_t bytes_k,
                                                 int64_t bytes_v) {
  int const b = int(blockIdx.x);
  if (b < batch) {
    SeqInfo const seq = SeqInfo::varlen(b, vs.cu_seqlens_q, vs.cu_seqlens_k, vs.seqused_k, total_q, total_k);
    int k0, k1;
    SeqInfo::rows(b, vs.cu_seqlens_k, total_k, k0, k1);
    zero_rows(dq, bytes_q, seq.offset_q + min(seq.seqlen_q, rows_q), seq.offset_q + seq.seqlen_q);
    int64_t const kz = k0 + min(seq.seqlen_k, rows_k);
    zero_rows(dk, bytes_k, kz, k1);
    zero_rows(dv, bytes_v, kz, k1);
    return;
  }
  int first, last;
  SeqInfo::uncovered(batch, vs.cu_seqlens_q, total_q, first, last);
  zero_rows(dq, bytes_q, 0, first);
  zero_rows(dq, bytes_q, last, total_q);
  SeqInfo::uncovered(batch, vs.cu_seqlens_k, total_k, first, last);
  zero_rows(dk, bytes_k, 0, first);
  zero_rows(dk, bytes_k, last, total_k);
  zero_rows(dv, bytes_v, 0, first);
  zero_rows(dv, bytes_v, last, total_k);
}

template <class T>
FwdStatus preprocess(const BwdParams& p, cudaStream_t stream) {
  AttnCore const& c = p.core;
  BwdWorkspace const ws = bwd_workspace(p);
  if (c.varlen.enabled()) {
    dim3 grid(unsigned(padded_rows(varlen_rows_q(c)) / kRowsPerBlock), unsigned(c.num_heads_q), unsigned(c.batch));
    if (grid.x > 0)
      bwd_preprocess_varlen_kernel<T><<<grid, 32 * kRowsPerBlock, 0, stream>>>(
          static_cast<const T*>(p.out), static_cast<const T*>(p.dout), p.lse, p.dlse, ws, c.varlen, c.seqlen_q,
          c.seqlen_k, bwd_varlen_stat_rows(c.seqlen_q, c.batch), c.num_heads_q, c.value_dim(), kernel_dim(c));
  } else {
    int64_t const rows_pad = padded_rows(c.seqlen_q, ws.tile_m);  // a multiple of kRowsPerBlock (64, 80)
    dim3 grid(unsigned(rows_pad / kRowsPerBlock), unsigned(c.num_heads_q), unsigned(c.batch));
    bwd_preprocess_kernel<T><<<grid, 32 * kRowsPerBlock, 0, stream>>>(
        static_cast<const T*>(p.out), static_cast<const T*>(p.dout), p.lse, p.dlse, ws, c.seqlen_q, rows_pad,
        c.num_heads_q, c.value_dim(), kernel_dim(c));
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return {e, "bwd preprocess launch"};
  if (ws.dq_sem != nullptr) {
    if (cudaError_t e = cudaMemsetAsync(ws.dq_sem, 0, sizes(p).sem, stream); e != cudaSuccess)
      return {e, "cudaMemsetAsync(dq turn counters)"};
  }
  return {};
}

template <class T>
FwdStatus postprocess(const BwdParams& p, cudaStream_t stream) {
  AttnCore const& c = p.core;
  BwdWorkspace const ws = bwd_workspace(p);
  if (c.varlen.enabled()) {
    dim3 grid(unsigned(padded_rows(varlen_rows_q(c)) / kBwdBlockM), unsigned(c.num_heads_q), unsigned(c.batch));
    if (grid.x > 0)
      bwd_convert_dq_varlen_kernel<T><<<grid, 256, 0, stream>>>(
          ws.dq_accum, static_cast<T*>(p.dq), c.varlen, c.seqlen_q, c.seqlen_k,
          bwd_varlen_stat_rows(c.seqlen_q, c.batch), c.num_heads_q, c.head_dim, kernel_dim(c), c.softmax_scale);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return {e, "bwd dq convert launch"};
    return {};
  }
  int64_t const rows_pad = padded_rows(c.seqlen_q, ws.tile_m);
  dim3 const grid(unsigned(rows_pad / ws.tile_m), unsigned(c.num_heads_q), unsigned(c.batch));
  if (bwd_dq_swapped(ws.tile_m)) {
    if (int64_t(ws.tile_m) * kernel_dim(c) > kSwappedTileElems)
      return {cudaErrorInvalidValue, "bwd dq convert: the transposed tile exceeds the convert's stage"};
    bwd_convert_dq_swapped_kernel<T><<<grid, 256, 0, stream>>>(ws.dq_accum, static_cast<T*>(p.dq), c.seqlen_q,
                                                               rows_pad, c.num_heads_q, c.head_dim, kernel_dim(c),
                                                               c.softmax_scale, ws.tile_m);
  } else {
    bwd_convert_dq_kernel<T><<<grid, 256, 0, stream>>>(ws.dq_accum, static_cast<T*>(p.dq), c.seqlen_q, rows_pad,
                                                       c.num_heads_q, c.head_dim, kernel_dim(c), c.softmax_scale,
                                                       ws.tile_m);
  }
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return {e, "bwd dq convert launch"};
  return {};
}

bool empty(const AttnCore& c) { return c.batch == 0 || c.seqlen_q == 0 || c.num_heads_q == 0; }

template <class T>
FwdStatus zero_uncovered(const BwdParams& p, cudaStream_t stream) {
  AttnCore const& c = p.core;
  // The rows the passes cover (bwd_dispatch.cc run_bwd: none for an empty call, no keys without keys).
  bool const passes = !empty(c), main = passes && c.seqlen_k > 0;
  int const rows_q = passes ? varlen_rows_q(c) : 0;
  int const rows_k = !main ? 0 : c.varlen.max_seqlen_k > 0 ? std::min(c.varlen.max_seqlen_k, c.seqlen_k) : c.seqlen_k;
  int64_t const e = sizeof(T);
  int64_t const bytes_q = int64_t(c.num_heads_q) * c.head_dim * e, bytes_k = int64_t(c.num_heads_k) * c.head_dim * e;
  int64_t const bytes_v = int64_t(c.num_heads_k) * c.value_dim() * e;
  constexpr unsigned kSplit = 16;  // blocks per span: a long uncovered tail still spreads over SMs
  bwd_zero_uncovered_varlen_kernel<<<dim3(unsigned(c.batch) + 1, kSplit), 256, 0, stream>>>(
      p.dq, p.dk, p.dv, c.varlen, c.batch, c.seqlen_q, c.seqlen_k, rows_q, rows_k, bytes_q, bytes_k, bytes_v);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return {err, "bwd zero-uncovered launch"};
  return {};
}

}  // namespace

size_t bwd_workspace_bytes(const BwdParams& p) {
  Sizes const s = sizes(p);
  return s.dq_accum + 2 * s.row + s.sem;
}

BwdWorkspace bwd_workspace(const BwdParams& p) {
  Sizes const s = sizes(p);
  char* base = static_cast<char*>(p.workspace);
  BwdWorkspace ws;
  ws.dq_accum = reinterpret_cast<float*>(base);
  ws.tile_m = bwd_tile_m(p);
  ws.delta = reinterpret_cast<float*>(base + s.dq_accum);
  ws.lse_log2 = reinterpret_cast<float*>(base + s.dq_accum + s.row);
  if (s.sem) ws.dq_sem = reinterpret_cast<int*>(base + s.dq_accum + 2 * s.row);
  return ws;
}

FwdStatus run_bwd_zero_uncovered(const BwdParams& p, cudaStream_t stream) {
  if (const char* why = bwd_check(p)) return {cudaErrorInvalidValue, why};
  if (!p.core.varlen.enabled()) return {};
  return p.core.dtype == DType::kBF16 ? zero_uncovered<__nv_bfloat16>(p, stream) : zero_uncovered<__half>(p, stream);
}

FwdStatus run_bwd_preprocess(const BwdParams& p, cudaStream_t stream) {
  if (const char* why = bwd_check(p)) return {cudaErrorInvalidValue, why};
  if (empty(p.core)) return {};
  return p.core.dtype == DType::kBF16 ? preprocess<__nv_bfloat16>(p, stream) : preprocess<__half>(p, stream);
}

FwdStatus run_bwd_postprocess(const BwdParams& p, cudaStream_t stream) {
  if (const char* why = bwd_check(p)) return {cudaErrorInvalidValue, why};
  if (empty(p.core)) return {};
  return p.core.dtype == DType::kBF16 ? postprocess<__nv_bfloat16>(p, stream) : postprocess<__half>(p, stream);
}

}  // namespace fa3jax

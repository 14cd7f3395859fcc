// Shared helpers of the standalone CUDA test programs: error checks, 16-bit conversions, the mask rule and the
// float64 forward reference (q, k, v as float; dense (b, s, h, d) layouts, v and out (b, s, h, dv); lse (b, hq, sq)).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fa3jax/attn_params.h"

#define CK(x)                                                                                            \
  do {                                                                                                   \
    cudaError_t e_ = (x);                                                                                \
    if (e_ != cudaSuccess) {                                                                             \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
      std::exit(2);                                                                                      \
    }                                                                                                    \
  } while (0)

inline uint16_t to_bits(float x, fa3jax::DType dt) {
  uint16_t r;
  if (dt == fa3jax::DType::kBF16) {
    __nv_bfloat16 h = __float2bfloat16(x);
    std::memcpy(&r, &h, 2);
  } else {
    __half h = __float2half(x);
    std::memcpy(&r, &h, 2);
  }
  return r;
}
inline float from_bits(uint16_t r, fa3jax::DType dt) {
  if (dt == fa3jax::DType::kBF16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &r, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &r, 2);
  return __half2float(h);
}

// masking.allowed(): bottom-right aligned window, -1 = unbounded.
inline bool allowed(int i, int j, int sq, int sk, int wl, int wr) {
  if (i < 0 || i >= sq || j < 0 || j >= sk) return false;
  int diag = i + sk - sq;
  if (wl >= 0 && j < diag - wl) return false;
  if (wr >= 0 && j > diag + wr) return false;
  return true;
}

struct RefShape {
  int b, sq, sk, hq, hk, d, wl, wr;
  float softcap, scale;
  int dv = 0;  // v's and out's head dim (MLA); 0: d
  int value_dim() const { return dv > 0 ? dv : d; }
};

// Scores of query row i of head h (b fixed) in float64, -inf where masked; softcap applied.
inline void ref_scores(RefShape const& c, int b, int h, int i, const std::vector<float>& q, const std::vector<float>& k,
                       std::vector<double>& s) {
  int const g = c.hq / c.hk;
  s.assign(c.sk, -INFINITY);
  const float* qi = &q[((size_t(b) * c.sq + i) * c.hq + h) * c.d];
  for (int j = 0; j < c.sk; ++j) {
    if (!allowed(i, j, c.sq, c.sk, c.wl, c.wr)) continue;
    const float* kj = &k[((size_t(b) * c.sk + j) * c.hk + h / g) * c.d];
    double acc = 0;
    for (int t = 0; t < c.d; ++t) acc += double(qi[t]) * kj[t];
    acc *= c.scale;
    if (c.softcap > 0) acc = c.softcap * std::tanh(acc / c.softcap);
    s[j] = acc;
  }
}

// Forward reference: out (like q) and natural-log lse; rows that see no key get 0 and -inf. With `sinks` ((hq,)
// natural-log logits, or nullptr): each head's sink joins every row's denominator with no value, and a row that
// sees no key gets 0 and lse = its sink.
inline void ref_forward(RefShape const& c, const std::vector<float>& q, const std::vector<float>& k,
                        const std::vector<float>& v, std::vector<float>& out, std::vector<float>& lse,
                        const std::vector<float>* sinks = nullptr) {
  int const g = c.hq / c.hk, dv = c.value_dim();
  std::vector<double> s;
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.hq; ++h)
      for (int i = 0; i < c.sq; ++i) {
        ref_scores(c, b, h, i, q, k, s);
        double const sink = sinks ? double((*sinks)[h]) : -INFINITY;
        double m = -INFINITY;
        for (double x : s) m = std::max(m, x);
        float* oi = &out[((size_t(b) * c.sq + i) * c.hq + h) * dv];
        float& l = lse[(size_t(b) * c.hq + h) * c.sq + i];
        if (m == -INFINITY) {
          for (int t = 0; t < dv; ++t) oi[t] = 0.f;
          l = float(sink);
          continue;
        }
        double const top = std::max(m, sink);
        double sum = std::exp(sink - top);  // 0 without sinks
        std::vector<double> o(dv, 0.0);
        for (int j = 0; j < c.sk; ++j) {
          if (s[j] == -INFINITY) continue;
          double p = std::exp(s[j] - top);
          sum += p;
          const float* vj = &v[((size_t(b) * c.sk + j) * c.hk + h / g) * dv];
          for (int t = 0; t < dv; ++t) o[t] += p * vj[t];
        }
        for (int t = 0; t < dv; ++t) oi[t] = float(o[t] / sum);
        l = float(top + std::log(sum));
      }
}

// n standard-normal values rounded to dt: their bits (for the device) and their float values (for the reference).
inline void normal_inputs(std::mt19937& rng, fa3jax::DType dt, size_t n, std::vector<uint16_t>& bits,
                          std::vector<float>& vals) {
  std::normal_distribution<float> dist(0.f, 1.f);
  bits.resize(n);
  vals.resize(n);
  for (size_t i = 0; i < n; ++i) {
    bits[i] = to_bits(dist(rng), dt);
    vals[i] = from_bits(bits[i], dt);
  }
}

// Uniform values in [-1, 1) from a hash of the index: the timings should see the power draw of real data
// (zero-filled inputs let the H100 hold higher clocks, measured ~10% faster on causal rows).
__global__ void fill_uniform(uint16_t* x, size_t n, uint32_t seed, bool bf16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 0x9E3779B1u ^ seed;
    h ^= h >> 15; h *= 0x85EBCA77u; h ^= h >> 13; h *= 0xC2B2AE3Du; h ^= h >> 16;
    float v = float(h >> 8) * (2.f / 16777216.f) - 1.f;
    if (bf16) { __nv_bfloat16 b = __float2bfloat16(v); x[i] = *reinterpret_cast<uint16_t*>(&b); }
    else { __half b = __float2half(v); x[i] = *reinterpret_cast<uint16_t*>(&b); }
  }
}

// Mean milliseconds of one run_fwd(p) on the default stream over `iters` launches, after 3 warm-up launches.
inline double time_fwd_ms(fa3jax::FwdParams const& p, int iters = 20) {
  for (int i = 0; i < 3; ++i) fa3jax::run_fwd(p, nullptr);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  CK(cudaEventRecord(e0));
  for (int i = 0; i < iters; ++i) fa3jax::run_fwd(p, nullptr);
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return ms / iters;
}

// Prints the device and what was compiled ("<what>: <list>"); false unless it is an sm_90 GPU.
inline bool device_is_sm90(const char* what, const char* compiled) {
  int dev;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device: %s (sm_%d%d); %s: %s\n", prop.name, prop.major, prop.minor, what, compiled);
  if (prop.major == 9 && prop.minor == 0) return true;
  std::printf("needs an sm_90 GPU\n");
  return false;
}

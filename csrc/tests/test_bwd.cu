// Standalone test of the backward's preprocess and postprocess passes (no Python) against a CPU reference, on
// random inputs with some rows that saw no key (lse = -inf) and GQA. Exits nonzero on any failure; meant to run
// directly and under compute-sanitizer. The main backward kernel gets its own checks when it lands.
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

using fa3jax::DType;

#define CK(x)                                                                                            \
  do {                                                                                                   \
    cudaError_t e_ = (x);                                                                                \
    if (e_ != cudaSuccess) {                                                                             \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
      std::exit(2);                                                                                      \
    }                                                                                                    \
  } while (0)

static uint16_t to_bits(float x, DType dt) {
  uint16_t r;
  if (dt == DType::kBF16) {
    __nv_bfloat16 h = __float2bfloat16(x);
    std::memcpy(&r, &h, 2);
  } else {
    __half h = __float2half(x);
    std::memcpy(&r, &h, 2);
  }
  return r;
}
static float from_bits(uint16_t r, DType dt) {
  if (dt == DType::kBF16) {
    __nv_bfloat16 h;
    std::memcpy(&h, &r, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(&h, &r, 2);
  return __half2float(h);
}

template <class T> static T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  CK(cudaMalloc(&d, h.size() * sizeof(T) + 1));
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <class T> static std::vector<T> download(const T* d, size_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

struct Case {
  int b, sq, sk, hq, hk, d;
  bool with_dlse;
};

static int g_failures = 0;
static void expect(bool ok, const char* what, const Case& c, DType dt, size_t at, double got, double want) {
  if (ok) return;
  if (++g_failures <= 10)
    std::printf("FAIL %s (b=%d sq=%d sk=%d hq=%d hk=%d d=%d %s) at %zu: got %.6g want %.6g\n", what, c.b, c.sq, c.sk,
                c.hq, c.hk, c.d, dt == DType::kBF16 ? "bf16" : "fp16", at, got, want);
}

static void run_case(const Case& c, DType dt, std::mt19937& rng) {
  std::normal_distribution<float> dist(0.f, 1.f);
  size_t const nq = size_t(c.b) * c.sq * c.hq * c.d, nk = size_t(c.b) * c.sk * c.hk * c.d;
  size_t const nl = size_t(c.b) * c.hq * c.sq;
  std::vector<uint16_t> o(nq), dout(nq);
  for (auto& x : o) x = to_bits(dist(rng), dt);
  for (auto& x : dout) x = to_bits(dist(rng), dt);
  std::vector<float> lse(nl), dlse(nl);
  for (size_t i = 0; i < nl; ++i) {
    lse[i] = (i % 7 == 3) ? -INFINITY : dist(rng) * 4.f;  // some rows saw no key
    dlse[i] = dist(rng);
  }

  fa3jax::BwdParams p;
  p.core.batch = c.b, p.core.seqlen_q = c.sq, p.core.seqlen_k = c.sk;
  p.core.num_heads_q = c.hq, p.core.num_heads_k = c.hk, p.core.head_dim = c.d, p.core.dtype = dt;
  p.core.softmax_scale = 1.f / std::sqrt(float(c.d));
  p.core.set_dense_strides();
  p.out = upload(o), p.dout = upload(dout), p.lse = upload(lse), p.dlse = c.with_dlse ? upload(dlse) : nullptr;
  CK(cudaMalloc(&p.dq, nq * 2));
  CK(cudaMalloc(&p.dk, nk * 2));
  CK(cudaMalloc(&p.dv, nk * 2));
  size_t const ws_bytes = fa3jax::bwd_workspace_bytes(p);
  CK(cudaMalloc(&p.workspace, ws_bytes));
  CK(cudaMemset(p.workspace, 0xff, ws_bytes));  // NaN everywhere: whatever a pass should write and does not shows
  if (const char* why = fa3jax::bwd_check(p)) {
    std::printf("FAIL bwd_check: %s\n", why);
    ++g_failures;
    return;
  }

  fa3jax::FwdStatus st = fa3jax::run_bwd_preprocess(p, 0);
  if (!st.ok()) {
    std::printf("FAIL preprocess: %s (%s)\n", st.what, cudaGetErrorString(st.error));
    ++g_failures;
    return;
  }
  CK(cudaDeviceSynchronize());
  fa3jax::BwdWorkspace const ws = fa3jax::bwd_workspace(p);
  int64_t const rows_pad = (c.sq + fa3jax::kBwdBlockM - 1) / fa3jax::kBwdBlockM * fa3jax::kBwdBlockM;
  size_t const nrow = size_t(c.b) * c.hq * rows_pad;
  auto delta = download(ws.delta, nrow), lse2 = download(ws.lse_log2, nrow);
  auto acc = download(ws.dq_accum, nrow * c.d);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.hq; ++h)
      for (int64_t i = 0; i < rows_pad; ++i) {
        size_t const at = (size_t(b) * c.hq + h) * rows_pad + i;
        double want_delta = 0, want_lse2 = INFINITY;
        if (i < c.sq) {
          size_t const dense = (size_t(b) * c.hq + h) * c.sq + i;
          for (int t = 0; t < c.d; ++t) {
            size_t const e = ((size_t(b) * c.sq + i) * c.hq + h) * c.d + t;
            want_delta += double(from_bits(o[e], dt)) * from_bits(dout[e], dt);
          }
          if (c.with_dlse) want_delta -= dlse[dense];
          want_lse2 = lse[dense] == -INFINITY ? INFINITY : double(lse[dense]) * 1.4426950408889634;
        }
        expect(std::fabs(delta[at] - want_delta) <= 1e-4 * (1 + std::fabs(want_delta)), "delta", c, dt, at,
               delta[at], want_delta);
        expect(std::isinf(want_lse2) ? (std::isinf(lse2[at]) && lse2[at] > 0)
                                     : std::fabs(lse2[at] - want_lse2) <= 1e-5 * (1 + std::fabs(want_lse2)),
               "lse_log2", c, dt, at, lse2[at], want_lse2);
        for (int t = 0; t < c.d; ++t) expect(acc[at * c.d + t] == 0.f, "dq_accum zeroed", c, dt, at, acc[at * c.d + t], 0);
      }
  if (c.hq != c.hk) {
    auto dka = download(ws.dk_accum, nk), dva = download(ws.dv_accum, nk);
    for (size_t i = 0; i < nk; ++i) {
      expect(dka[i] == 0.f, "dk_accum zeroed", c, dt, i, dka[i], 0);
      expect(dva[i] == 0.f, "dv_accum zeroed", c, dt, i, dva[i], 0);
    }
  }

  // Postprocess: random accumulators in, dq = bf16(acc * scale), dk/dv = bf16(acc) with GQA.
  std::vector<float> hacc(nrow * c.d), hka(nk), hva(nk);
  for (auto& x : hacc) x = dist(rng) * 10.f;
  for (auto& x : hka) x = dist(rng);
  for (auto& x : hva) x = dist(rng);
  CK(cudaMemcpy(ws.dq_accum, hacc.data(), hacc.size() * 4, cudaMemcpyHostToDevice));
  if (c.hq != c.hk) {
    CK(cudaMemcpy(ws.dk_accum, hka.data(), nk * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(ws.dv_accum, hva.data(), nk * 4, cudaMemcpyHostToDevice));
  }
  st = fa3jax::run_bwd_postprocess(p, 0);
  if (!st.ok()) {
    std::printf("FAIL postprocess: %s (%s)\n", st.what, cudaGetErrorString(st.error));
    ++g_failures;
    return;
  }
  CK(cudaDeviceSynchronize());
  auto dq = download(static_cast<uint16_t*>(p.dq), nq);
  for (int b = 0; b < c.b; ++b)
    for (int i = 0; i < c.sq; ++i)
      for (int h = 0; h < c.hq; ++h)
        for (int t = 0; t < c.d; ++t) {
          size_t const e = ((size_t(b) * c.sq + i) * c.hq + h) * c.d + t;
          float const want = from_bits(to_bits(hacc[((size_t(b) * c.hq + h) * rows_pad + i) * c.d + t] *
                                               p.core.softmax_scale, dt), dt);
          expect(from_bits(dq[e], dt) == want, "dq", c, dt, e, from_bits(dq[e], dt), want);
        }
  if (c.hq != c.hk) {
    auto dk = download(static_cast<uint16_t*>(p.dk), nk), dv = download(static_cast<uint16_t*>(p.dv), nk);
    for (size_t i = 0; i < nk; ++i) {
      expect(from_bits(dk[i], dt) == from_bits(to_bits(hka[i], dt), dt), "dk", c, dt, i, from_bits(dk[i], dt), hka[i]);
      expect(from_bits(dv[i], dt) == from_bits(to_bits(hva[i], dt), dt), "dv", c, dt, i, from_bits(dv[i], dt), hva[i]);
    }
  }
  for (const void* ptr : {p.out, p.dout, static_cast<const void*>(p.lse), static_cast<const void*>(p.dlse),
                          static_cast<const void*>(p.dq), static_cast<const void*>(p.dk),
                          static_cast<const void*>(p.dv), static_cast<const void*>(p.workspace)})
    if (ptr) CK(cudaFree(const_cast<void*>(ptr)));
}

int main() {
  std::mt19937 rng(1234);
  const Case cases[] = {
      {2, 200, 150, 4, 4, 128, true},  // rows past a tile edge, MHA
      {1, 77, 300, 8, 2, 64, false},   // GQA, no LSE cotangent
      {2, 129, 129, 3, 1, 256, true},  // MQA, d=256
      {1, 5, 9, 2, 2, 40, true},       // a head dim no tile has
  };
  int n = 0;
  for (DType dt : {DType::kBF16, DType::kFP16})
    for (const Case& c : cases) run_case(c, dt, rng), ++n;
  std::printf("%d/%d cases run, %d failures: %s\n", n, n, g_failures, g_failures ? "FAILED" : "passed");
  return g_failures ? 1 : 0;
}

// Standalone test of the forward kernels (no Python): small configs of every compiled instantiation (MLA ones, with
// a value head dim below the q/k one, included) against a CPU float reference. Exits nonzero on any failure. Meant
// to be run directly and under compute-sanitizer (memcheck / racecheck / synccheck).
//
//   fa3jax_test_fwd            run all tests
//   fa3jax_test_fwd --quick    one config per instantiation (for racecheck, which is slow)
//   fa3jax_test_fwd --bench    also time a few large configs (no checking)
//   fa3jax_test_fwd --bench-only [--case B,S,CAUSAL] [--variant dyn|static|wide] [--head-dim D | DxDV]
//                   [--dtype bf16|fp16]
//                              only the timings, optionally one case and variant (for Nsight Compute)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "test_common.h"

using fa3jax::DType;

struct Config {
  int b, sq, sk, hq, hk, wl, wr;
  float softcap;
  const char* name;
  // Attention sinks: one uniform [-2, 2) logit per head, plus sink_offset (long rows need one for the sink to
  // weigh enough that ignoring it would fail); kNegInfSink also sets head 0's sink to -inf (no sink).
  enum Sinks { kNoSinks, kSinks, kNegInfSink } sinks = kNoSinks;
  float sink_offset = 0.f;
};

static void reference(const Config& c, int d, int dv, float scale, const std::vector<float>& q,
                      const std::vector<float>& k, const std::vector<float>& v, std::vector<float>& out,
                      std::vector<float>& lse, const std::vector<float>* sinks = nullptr) {
  ref_forward(RefShape{c.b, c.sq, c.sk, c.hq, c.hk, d, c.wl, c.wr, c.softcap, scale, dv}, q, k, v, out, lse, sinks);
}

// A compiled forward: q/k head dim d, v/out head dim dv (< d: MLA).
struct Dims {
  int d, dv;
};
static const Dims kDims[] = {{64, 64}, {128, 128}, {256, 256}, {192, 128}, {128, 64}};
static std::string dims_label(Dims hd) {
  return hd.d == hd.dv ? std::to_string(hd.d) : std::to_string(hd.d) + "x" + std::to_string(hd.dv);
}

// Whether query row i sees any key (the same for every batch and head).
static bool row_sees_key(const Config& c, int i) {
  for (int j = 0; j < c.sk; ++j)
    if (allowed(i, j, c.sq, c.sk, c.wl, c.wr)) return true;
  return false;
}

// How the kernel is asked to run: dynamic tile assignment (the FFI's default), static, or the wide-key-tile
// kernel (dynamic assignment). The values stay those of the earlier programs (2 was a removed 2-CTA variant).
enum class Variant { kDynamic = 0, kStatic = 1, kWide = 3 };
static const char* label(Variant v) {
  return v == Variant::kDynamic ? "" : v == Variant::kStatic ? " [static]" : " [wide]";
}
static void* g_workspace = nullptr;
static void apply(fa3jax::FwdParams& p, Variant v) {
  p.workspace = v == Variant::kDynamic || v == Variant::kWide ? g_workspace : nullptr;
  p.wide_tiles = v == Variant::kWide ? 1 : 0;
}

static bool run_one(DType dt, Dims hd, const Config& c, Variant variant, std::mt19937& rng, bool verbose) {
  int const d = hd.d, dv = hd.dv;
  size_t nq = size_t(c.b) * c.sq * c.hq * d, nk = size_t(c.b) * c.sk * c.hk * d, nl = size_t(c.b) * c.hq * c.sq;
  size_t nv = size_t(c.b) * c.sk * c.hk * dv, no = size_t(c.b) * c.sq * c.hq * dv;  // v and out: d_v wide
  std::vector<uint16_t> hq_, hk_, hv_;
  std::vector<float> fq, fk, fv;
  normal_inputs(rng, dt, nq, hq_, fq);
  normal_inputs(rng, dt, nk, hk_, fk);
  normal_inputs(rng, dt, nv, hv_, fv);
  float scale = 1.f / std::sqrt(float(d));
  std::vector<float> hsinks;
  if (c.sinks != Config::kNoSinks) {
    std::uniform_real_distribution<float> sink_dist(-2.f, 2.f);
    for (int h = 0; h < c.hq; ++h) hsinks.push_back(sink_dist(rng) + c.sink_offset);
    if (c.sinks == Config::kNegInfSink) hsinks[0] = -INFINITY;
  }

  void *dq, *dk, *dvv, *dout;
  float *dlse, *dsinks = nullptr;
  CK(cudaMalloc(&dq, nq * 2));
  CK(cudaMalloc(&dk, nk * 2));
  CK(cudaMalloc(&dvv, nv * 2));
  CK(cudaMalloc(&dout, no * 2));
  CK(cudaMalloc(&dlse, nl * 4));
  CK(cudaMemcpy(dq, hq_.data(), nq * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dk, hk_.data(), nk * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dvv, hv_.data(), nv * 2, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout, 0xff, no * 2));  // NaN pattern: catches unwritten outputs
  CK(cudaMemset(dlse, 0xff, nl * 4));
  if (!hsinks.empty()) {
    CK(cudaMalloc(&dsinks, hsinks.size() * 4));
    CK(cudaMemcpy(dsinks, hsinks.data(), hsinks.size() * 4, cudaMemcpyHostToDevice));
  }

  fa3jax::FwdParams p;
  fa3jax::AttnCore& a = p.core;
  a.q = dq; a.k = dk; a.v = dvv; p.out = dout; p.lse = dlse;
  a.batch = c.b; a.seqlen_q = c.sq; a.seqlen_k = c.sk; a.num_heads_q = c.hq; a.num_heads_k = c.hk;
  a.head_dim = d; a.head_dim_v = dv; a.dtype = dt; a.softmax_scale = scale; a.window_left = c.wl; a.window_right = c.wr;
  a.softcap = c.softcap;
  a.set_dense_strides();
  p.sinks = dsinks;
  apply(p, variant);
  fa3jax::FwdStatus st = fa3jax::run_fwd(p, nullptr);
  if (!st.ok()) {
    std::printf("FAIL %s d=%s %s: launch: %s (%s)\n", dt == DType::kBF16 ? "bf16" : "fp16", dims_label(hd).c_str(),
                c.name, st.what, cudaGetErrorString(st.error));
    return false;
  }
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> hout(no);
  std::vector<float> hlse(nl), rout(no), rlse(nl);
  CK(cudaMemcpy(hout.data(), dout, no * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(hlse.data(), dlse, nl * 4, cudaMemcpyDeviceToHost));
  CK(cudaFree(dq)); CK(cudaFree(dk)); CK(cudaFree(dvv)); CK(cudaFree(dout)); CK(cudaFree(dlse));
  if (dsinks) CK(cudaFree(dsinks));

  reference(c, d, dv, scale, fq, fk, fv, rout, rlse, hsinks.empty() ? nullptr : &hsinks);
  double max_err = 0, max_lse_err = 0;
  size_t nan_out = 0, bad_lse_inf = 0;
  for (size_t i = 0; i < no; ++i) {
    float o = from_bits(hout[i], dt);
    if (!std::isfinite(o)) { ++nan_out; continue; }
    max_err = std::max(max_err, double(std::fabs(o - rout[i])));
  }
  for (size_t i = 0; i < nl; ++i) {
    if (std::isinf(rlse[i])) {
      if (!(std::isinf(hlse[i]) && hlse[i] < 0)) ++bad_lse_inf;
      continue;
    }
    if (!std::isfinite(hlse[i])) { ++bad_lse_inf; continue; }
    max_lse_err = std::max(max_lse_err, double(std::fabs(hlse[i] - rlse[i])));
  }
  double tol = dt == DType::kBF16 ? 2.5e-2 : 4e-3;
  double lse_tol = 2e-3 * std::log2(double(c.sk) + 2) + 1e-3;
  bool ok = nan_out == 0 && bad_lse_inf == 0 && max_err <= tol && max_lse_err <= lse_tol;
  size_t bad_empty = 0;
  double effect_out = 0, effect_lse = 0;
  bool sensitive = true;
  if (!hsinks.empty()) {
    // Rows that see no key: out exactly 0 and lse exactly the head's sink.
    for (int i = 0; i < c.sq; ++i) {
      if (row_sees_key(c, i)) continue;
      for (int b = 0; b < c.b; ++b)
        for (int h = 0; h < c.hq; ++h) {
          float const l = hlse[(size_t(b) * c.hq + h) * c.sq + i];
          if (!(l == hsinks[h])) ++bad_empty;
          for (int t = 0; t < dv; ++t)
            if (from_bits(hout[((size_t(b) * c.sq + i) * c.hq + h) * dv + t], dt) != 0.f) ++bad_empty;
        }
    }
    // The case must be able to fail: without the sinks the reference moves by more than the tolerances.
    std::vector<float> nout(no), nlse(nl);
    reference(c, d, dv, scale, fq, fk, fv, nout, nlse);
    for (size_t i = 0; i < no; ++i) effect_out = std::max(effect_out, double(std::fabs(nout[i] - rout[i])));
    for (size_t i = 0; i < nl; ++i)
      if (std::isfinite(nlse[i])) effect_lse = std::max(effect_lse, double(std::fabs(nlse[i] - rlse[i])));
    sensitive = effect_out > tol && effect_lse > lse_tol;
    ok = ok && bad_empty == 0 && sensitive;
  }
  if (!ok || verbose)
    std::printf("%s %s d=%-7s %-24s%s b=%d sq=%d sk=%d hq=%d hk=%d win=(%d,%d) cap=%g: max|dO|=%.3g max|dLSE|=%.3g "
                "non-finite out=%zu bad lse=%zu\n",
                ok ? "ok  " : "FAIL", dt == DType::kBF16 ? "bf16" : "fp16", dims_label(hd).c_str(), c.name,
                label(variant), c.b, c.sq, c.sk, c.hq, c.hk,
                c.wl, c.wr, c.softcap, max_err, max_lse_err, nan_out, bad_lse_inf);
  if (!hsinks.empty() && (!ok || verbose))
    std::printf("       sinks: empty-row mismatches=%zu; without the sinks out moves %.3g, lse %.3g%s\n", bad_empty,
                effect_out, effect_lse, sensitive ? "" : " (not above the tolerances: the case cannot fail)");
  return ok;
}

struct BenchFilter {
  int b = 0, s = 0, causal = -1;  // 0 / -1: any
  int variant = -1;               // -1: all
  int head_dim = 0, head_dim_v = 0;  // 0: every compiled one (Nsight Compute profiles the first launch it sees)
  int dtype = -1;                     // -1: every compiled one
};

// FLOPs count 2·b·s²·h·(d + d_v) (QK^T and P V), halved for causal.
static void bench(DType dt, Dims hd, BenchFilter const& f) {
  int const d = hd.d, dv = hd.dv;
  if ((f.head_dim && (f.head_dim != d || (f.head_dim_v ? f.head_dim_v : f.head_dim) != dv)) ||
      (f.dtype >= 0 && f.dtype != int(dt)))
    return;
  struct B { int b, s, h; int wr; };
  const B cases[] = {{8, 2048, 16, -1}, {8, 2048, 16, 0}, {4, 4096, 16, -1}, {4, 4096, 16, 0}, {2, 8192, 16, -1},
                     {2, 8192, 16, 0}, {1, 16384, 16, -1}, {1, 16384, 16, 0}};
  for (const B& c : cases) {
    if ((f.b && f.b != c.b) || (f.s && f.s != c.s) || (f.causal >= 0 && f.causal != (c.wr == 0))) continue;
    size_t n = size_t(c.b) * c.s * c.h * d, nv = size_t(c.b) * c.s * c.h * dv;
    void *q, *k, *v, *o;
    float* l;
    CK(cudaMalloc(&q, n * 2)); CK(cudaMalloc(&k, n * 2)); CK(cudaMalloc(&v, nv * 2)); CK(cudaMalloc(&o, nv * 2));
    CK(cudaMalloc(&l, size_t(c.b) * c.h * c.s * 4));
    fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(q), n, 1u, dt == DType::kBF16);
    fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(k), n, 2u, dt == DType::kBF16);
    fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(v), nv, 3u, dt == DType::kBF16);
    CK(cudaGetLastError());
    fa3jax::FwdParams p;
    fa3jax::AttnCore& a = p.core;
    a.q = q; a.k = k; a.v = v; p.out = o; p.lse = l; a.batch = c.b; a.seqlen_q = a.seqlen_k = c.s;
    a.num_heads_q = a.num_heads_k = c.h; a.head_dim = d; a.head_dim_v = dv; a.dtype = dt;
    a.softmax_scale = 1.f / std::sqrt(float(d));
    a.window_right = c.wr;
    a.set_dense_strides();
    for (Variant v : {Variant::kDynamic, Variant::kStatic, Variant::kWide}) {
      if (v == Variant::kWide && (d != dv || !fa3jax::fwd_compiled_wide(dt, d))) continue;
      if (f.variant >= 0 && f.variant != int(v)) continue;
      apply(p, v);
      double const ms = time_fwd_ms(p);
      double flops = 2.0 * c.b * c.h * double(c.s) * c.s * (d + dv) * (c.wr == 0 ? 0.5 : 1.0);
      std::printf("bench %s d=%s b=%d s=%d h=%d %s%s: %.3f ms, %.1f TFLOP/s\n", dt == DType::kBF16 ? "bf16" : "fp16",
                  dims_label(hd).c_str(), c.b, c.s, c.h, c.wr == 0 ? "causal" : "full  ", label(v), ms,
                  flops / ms * 1e-9);
    }
    CK(cudaFree(q)); CK(cudaFree(k)); CK(cudaFree(v)); CK(cudaFree(o)); CK(cudaFree(l));
  }
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // keep the log of a run that hangs and gets killed
  bool quick = false, do_bench = false, bench_only = false, verbose = true;
  BenchFilter filter;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--bench")) do_bench = true;
    else if (!std::strcmp(argv[i], "--bench-only")) do_bench = bench_only = true;
    else if (!std::strcmp(argv[i], "--quiet")) verbose = false;
    else if (!std::strcmp(argv[i], "--case") && i + 1 < argc) {
      if (std::sscanf(argv[++i], "%d,%d,%d", &filter.b, &filter.s, &filter.causal) != 3) {
        std::fprintf(stderr, "--case wants B,S,CAUSAL (e.g. 4,4096,1)\n");
        return 2;
      }
    } else if (!std::strcmp(argv[i], "--variant") && i + 1 < argc) {
      std::string v = argv[++i];
      filter.variant = v == "dyn" ? int(Variant::kDynamic) : v == "static" ? int(Variant::kStatic)
                     : v == "wide" ? int(Variant::kWide) : -2;
      if (filter.variant == -2) { std::fprintf(stderr, "--variant wants dyn|static|wide\n"); return 2; }
    } else if (!std::strcmp(argv[i], "--head-dim") && i + 1 < argc) {
      // D, or DxDV for an MLA instance
      if (std::sscanf(argv[++i], "%dx%d", &filter.head_dim, &filter.head_dim_v) < 1) {
        std::fprintf(stderr, "--head-dim wants D or DxDV (e.g. 128 or 192x128)\n");
        return 2;
      }
    } else if (!std::strcmp(argv[i], "--dtype") && i + 1 < argc) {
      std::string v = argv[++i];
      filter.dtype = v == "bf16" ? int(DType::kBF16) : v == "fp16" ? int(DType::kFP16) : -2;
      if (filter.dtype == -2) { std::fprintf(stderr, "--dtype wants bf16|fp16\n"); return 2; }
    } else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (!device_is_sm90("compiled", fa3jax::fwd_compiled_list())) return 3;
  const Config configs[] = {
      {1, 128, 128, 1, 1, -1, -1, 0.f, "full-aligned"},
      {2, 200, 333, 4, 2, -1, -1, 0.f, "full-gqa-ragged"},
      {2, 257, 257, 2, 1, -1, 0, 0.f, "causal"},
      {1, 100, 300, 2, 2, -1, 0, 0.f, "causal-sq<sk"},
      {1, 300, 100, 2, 2, -1, 0, 0.f, "causal-sq>sk(empty rows)"},
      {1, 333, 333, 2, 2, 64, 32, 0.f, "window(64,32)"},
      {1, 260, 517, 2, 1, 100, -1, 0.f, "window(100,-1)"},
      {1, 190, 190, 2, 2, -1, 0, 30.f, "causal-softcap30"},
      {2, 1, 515, 4, 1, -1, -1, 0.f, "mqa-decode"},
      {1, 64, 1000, 2, 2, 10, 5, 0.f, "narrow-window"},
      {1, 7, 3, 1, 1, -1, -1, 0.f, "tiny"},
      {2, 512, 700, 4, 2, -1, -1, 0.f, "full-gqa-4-query-blocks"},
      {1, 256, 256, 2, 2, -1, -1, 20.f, "full-softcap20"},
      // Attention sinks (GQA, causal, rows and whole tiles that see no key, softcap, a -inf sink).
      {2, 200, 333, 4, 2, -1, -1, 0.f, "sinks-full-gqa", Config::kSinks, 6.f},
      {2, 257, 257, 4, 2, -1, 0, 0.f, "sinks-causal-gqa", Config::kSinks},
      {1, 300, 100, 4, 2, -1, 0, 0.f, "sinks-causal-sq>sk(empty)", Config::kNegInfSink},
      {1, 64, 1000, 4, 1, 10, 5, 0.f, "sinks-narrow-window-mqa", Config::kSinks},
      {1, 190, 190, 4, 2, -1, 0, 30.f, "sinks-causal-softcap30", Config::kSinks},
      {2, 1, 515, 4, 1, -1, -1, 0.f, "sinks-mqa-decode", Config::kSinks, 6.f},
  };
  CK(cudaMalloc(&g_workspace, fa3jax::kFwdWorkspaceBytes));
  std::mt19937 rng(1234);
  int failures = 0, runs = 0;
  const DType dts[] = {DType::kBF16, DType::kFP16};
  for (DType dt : dts)
    for (Dims hd : kDims) {
      int const d = hd.d;
      if (!fa3jax::fwd_compiled(dt, d, hd.dv)) continue;
      for (const Config& c : configs) {
        if (bench_only) break;
        // --quick: one unmasked config, one causal and one with sinks and empty rows.
        if (quick && &c != &configs[1] && &c != &configs[2] && &c != &configs[15]) continue;
        for (Variant v : {Variant::kDynamic, Variant::kStatic, Variant::kWide}) {
          // the wide kernel handles masks too (forced here); it is compiled for d_v == d only
          if (v == Variant::kWide && (hd.dv != d || !fa3jax::fwd_compiled_wide(dt, d))) continue;
          ++runs;
          if (!run_one(dt, hd, c, v, rng, verbose)) ++failures;
        }
      }
      if (do_bench) bench(dt, hd, filter);
    }
  // Invalid parameters must be rejected, not launched.
  {
    fa3jax::FwdParams p;
    fa3jax::AttnCore& a = p.core;
    a.batch = 1; a.seqlen_q = a.seqlen_k = 16; a.num_heads_q = 3; a.num_heads_k = 2; a.head_dim = 128;
    ++runs;
    if (fa3jax::run_fwd(p, nullptr).ok()) { std::printf("FAIL invalid params accepted\n"); ++failures; }
    // Features the forward does not implement yet are refused, not ignored (varlen: tests/test_varlen.cu).
    a.num_heads_q = 2;
    a.set_dense_strides();
    int table[1] = {0};
    a.paged.block_table = table;
    ++runs;
    if (fa3jax::fwd_check(p) == nullptr) { std::printf("FAIL paged K/V params accepted\n"); ++failures; }
    // Sinks: accepted when 4-byte aligned, refused (naming them) otherwise. Unlaunched: any aligned address will do.
    a.paged.block_table = nullptr;
    a.q = a.k = a.v = p.out = g_workspace;
    p.lse = static_cast<float*>(g_workspace);
    p.sinks = static_cast<const float*>(g_workspace);
    if (fa3jax::fwd_compiled(a.dtype, a.head_dim)) {
      ++runs;
      if (const char* msg = fa3jax::fwd_check(p)) { std::printf("FAIL aligned sinks refused: %s\n", msg); ++failures; }
    }
    p.sinks = reinterpret_cast<const float*>(static_cast<const char*>(g_workspace) + 2);
    const char* msg = fa3jax::fwd_check(p);
    ++runs;
    if (msg == nullptr || (fa3jax::fwd_compiled(a.dtype, a.head_dim) && !std::strstr(msg, "sinks"))) {
      std::printf("FAIL misaligned sinks: %s\n", msg ? msg : "accepted");
      ++failures;
    }
    // MLA: a value head dim above the q/k one, or a pair without a kernel, is refused naming head_dim_v; a
    // compiled pair is accepted (unlaunched).
    p.sinks = nullptr;
    for (Dims hd : {Dims{128, 256}, Dims{256, 128}, Dims{192, 128}, Dims{128, 64}}) {
      a.head_dim = hd.d;
      a.head_dim_v = hd.dv;
      a.set_dense_strides();
      bool const built = hd.dv < hd.d && fa3jax::fwd_compiled(a.dtype, hd.d, hd.dv);
      msg = fa3jax::fwd_check(p);
      ++runs;
      if (built ? msg != nullptr : (msg == nullptr || !std::strstr(msg, "head_dim_v"))) {
        std::printf("FAIL MLA %s check: %s\n", dims_label(hd).c_str(), msg ? msg : "accepted");
        ++failures;
      }
    }
  }
  std::printf("%d/%d passed\n", runs - failures, runs);
  return failures == 0 ? 0 : 1;
}

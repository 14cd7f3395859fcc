// Standalone test of the backward (no Python): run_bwd (preprocess, main kernel, postprocess) on small configs of
// every compiled instantiation (MLA ones, v / out / dO / dv with their own head dim d_v < d, included), and of head
// dims between them that the smallest kernel holding them serves (bwd_kernel_dim; d_v == d), against a float64 CPU
// reference of dq, dk, dv, on random inputs, with the forward's out/lse from the reference. Guard bytes after dq, dk
// and dv catch stores past the call's head dims. Exits nonzero on any failure; meant to run directly and under
// compute-sanitizer.
//
//   fa3jax_test_bwd            run all tests
//   fa3jax_test_bwd --quick    one config per instantiation (for racecheck, which is slow)
//   fa3jax_test_bwd --head-dim D|DxDV   only that instantiation (e.g. 128 or 192x128)
//   fa3jax_test_bwd --bench    also time the backward (and the forward) on the benchmark shapes (no checking)
//   fa3jax_test_bwd --bench-only [--head-dim D|DxDV] [--case S,CAUSAL] [--deterministic]
//                              (b = 16384 / S, h = 16; one case for Nsight Compute)
//   fa3jax_test_bwd --bench-only --shape B,S,H,CAUSAL ...   those shapes instead (repeatable): with h = 1 and
//                              s / 128 <= the SM count the grid is one wave, whose time against s separates a
//                              CTA's fixed cost from its per-step cost
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
  bool dlse;
  const char* name;
  int policy_rows = -1;  // BwdParams::policy_rows: 1 runs the policy's query tile (80 or 128 rows) on a short call
};

template <class T> static T* upload(const std::vector<T>& h) {
  T* d = nullptr;
  CK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <class T> static std::vector<T> download(const void* d, size_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// Gradient buffers of n 16-bit elements with kGuard bytes after them, all 0xff (NaN: an unwritten element shows);
// guard_intact: false if a pass wrote into the guard (a store past the call's head dim in the last row).
constexpr size_t kGuard = 256;
static void* alloc_grad(size_t n) {
  void* p = nullptr;
  CK(cudaMalloc(&p, n * 2 + kGuard));
  CK(cudaMemset(p, 0xff, n * 2 + kGuard));
  return p;
}
static bool guard_intact(const void* p, size_t n) {
  std::vector<uint8_t> g(kGuard);
  CK(cudaMemcpy(g.data(), static_cast<const char*>(p) + n * 2, kGuard, cudaMemcpyDeviceToHost));
  for (uint8_t x : g)
    if (x != 0xff) return false;
  return true;
}

// Gradients of sum(out * dout) + sum(lse * dlse) in float64 (FA2 paper, Alg. 2), from the same rounded inputs.
// q, k, dq, dk have head dim c.d; v, out, dout, dv c.value_dim().
static void ref_backward(RefShape const& c, const std::vector<float>& q, const std::vector<float>& k,
                         const std::vector<float>& v, const std::vector<float>& out, const std::vector<float>& lse,
                         const std::vector<float>& dout, const std::vector<float>* dlse, std::vector<double>& dq,
                         std::vector<double>& dk, std::vector<double>& dv) {
  int const g = c.hq / c.hk, d = c.d, e = c.value_dim();
  std::vector<double> s;
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.hq; ++h)
      for (int i = 0; i < c.sq; ++i) {
        size_t const li = (size_t(b) * c.hq + h) * c.sq + i;
        if (std::isinf(lse[li])) continue;  // no key: zero gradients
        ref_scores(c, b, h, i, q, k, s);
        size_t const qi = ((size_t(b) * c.sq + i) * c.hq + h) * d, oi = ((size_t(b) * c.sq + i) * c.hq + h) * e;
        double delta = 0;
        for (int t = 0; t < e; ++t) delta += double(dout[oi + t]) * out[oi + t];
        if (dlse) delta -= (*dlse)[li];
        for (int j = 0; j < c.sk; ++j) {
          if (s[j] == -INFINITY) continue;
          size_t const kj = ((size_t(b) * c.sk + j) * c.hk + h / g) * d, vj = ((size_t(b) * c.sk + j) * c.hk + h / g) * e;
          double const p = std::exp(s[j] - double(lse[li]));
          double dp = 0;
          for (int t = 0; t < e; ++t) dp += double(dout[oi + t]) * v[vj + t];
          double ds = p * (dp - delta);
          if (c.softcap > 0) {
            double const th = s[j] / c.softcap;
            ds *= 1 - th * th;
          }
          ds *= c.scale;
          for (int t = 0; t < d; ++t) {
            dq[qi + t] += ds * k[kj + t];
            dk[kj + t] += ds * q[qi + t];
          }
          for (int t = 0; t < e; ++t) dv[vj + t] += p * dout[oi + t];
        }
      }
}

// max |got - want| / max(max |want|, 1e-3) over one gradient, and non-finite count.
static double rel_err(const std::vector<uint16_t>& got, const std::vector<double>& want, DType dt, size_t& bad) {
  double err = 0, mag = 1e-3;
  for (size_t i = 0; i < want.size(); ++i) {
    float const x = from_bits(got[i], dt);
    if (!std::isfinite(x)) {
      ++bad;
      continue;
    }
    err = std::max(err, std::fabs(x - want[i]));
    mag = std::max(mag, std::fabs(want[i]));
  }
  return err / mag;
}

// A call's head dims: q/k head dim d, v/out/dO head dim dv (< d: MLA, served by its exact instance only).
struct HeadDims {
  int d, dv;
};
// The cases: the instances' own (MLA pairs included), then narrower multiples of 8 (d_v == d) that a wider kernel
// serves.
static const HeadDims kHeadDims[] = {{64, 64}, {128, 128}, {256, 256}, {192, 128}, {128, 64}, {32, 32},
                                     {40, 40}, {72, 72},   {96, 96},   {112, 112}, {200, 200}};
// "D", "DxDV" (MLA), or "d(D)" where the kernel D serves d.
static std::string dims_label(DType dt, HeadDims hd) {
  if (hd.d != hd.dv) return std::to_string(hd.d) + "x" + std::to_string(hd.dv);
  int const kd = fa3jax::bwd_kernel_dim(dt, hd.d);
  return kd == hd.d ? std::to_string(hd.d) : std::to_string(hd.d) + "(" + std::to_string(kd) + ")";
}

// det: deterministic mode, run twice; the second run's dq, dk, dv must equal the first's bit for bit.
static bool run_one(DType dt, HeadDims hd, const Config& c, std::mt19937& rng, bool verbose, bool det = false) {
  int const d = hd.d;
  RefShape const rs{c.b, c.sq, c.sk, c.hq, c.hk, d, c.wl, c.wr, c.softcap, 1.f / std::sqrt(float(d)), hd.dv};
  size_t const nq = size_t(c.b) * c.sq * c.hq * d, nk = size_t(c.b) * c.sk * c.hk * d;
  size_t const no = size_t(c.b) * c.sq * c.hq * hd.dv, nv = size_t(c.b) * c.sk * c.hk * hd.dv;  // d_v wide
  size_t const nl = size_t(c.b) * c.hq * c.sq;
  std::normal_distribution<float> dist(0.f, 1.f);
  auto rounded = [&](size_t n, std::vector<uint16_t>& bits) {
    std::vector<float> f(n);
    bits.resize(n);
    for (size_t i = 0; i < n; ++i) {
      bits[i] = to_bits(dist(rng), dt);
      f[i] = from_bits(bits[i], dt);
    }
    return f;
  };
  std::vector<uint16_t> qb, kb, vb, dob, ob(no);
  std::vector<float> q = rounded(nq, qb), k = rounded(nk, kb), v = rounded(nv, vb), dout = rounded(no, dob);
  std::vector<float> out(no), lse(nl), dlse(nl);
  ref_forward(rs, q, k, v, out, lse);
  for (size_t i = 0; i < no; ++i) {
    ob[i] = to_bits(out[i], dt);
    out[i] = from_bits(ob[i], dt);  // the kernel's delta sees the rounded output, as it would in training
  }
  for (auto& x : dlse) x = dist(rng);
  std::vector<double> rdq(nq, 0.0), rdk(nk, 0.0), rdv(nv, 0.0);
  ref_backward(rs, q, k, v, out, lse, dout, c.dlse ? &dlse : nullptr, rdq, rdk, rdv);

  fa3jax::BwdParams p;
  fa3jax::AttnCore& core = p.core;
  core.batch = c.b, core.seqlen_q = c.sq, core.seqlen_k = c.sk, core.num_heads_q = c.hq, core.num_heads_k = c.hk;
  core.head_dim = d, core.head_dim_v = hd.dv, core.dtype = dt, core.softmax_scale = rs.scale, core.softcap = c.softcap;
  core.window_left = c.wl, core.window_right = c.wr;
  core.set_dense_strides();
  p.deterministic = det;
  p.policy_rows = c.policy_rows;
  core.q = upload(qb), core.k = upload(kb), core.v = upload(vb);
  p.out = upload(ob), p.dout = upload(dob), p.lse = upload(lse), p.dlse = c.dlse ? upload(dlse) : nullptr;
  // NaN-filled outputs and workspace: whatever a pass should write and does not shows up.
  p.dq = alloc_grad(nq), p.dk = alloc_grad(nk), p.dv = alloc_grad(nv);
  size_t const ws = fa3jax::bwd_workspace_bytes(p);
  CK(cudaMalloc(&p.workspace, ws));
  CK(cudaMemset(p.workspace, 0xff, ws));
  fa3jax::FwdStatus st = fa3jax::run_bwd(p, 0);
  bool ok = st.ok();
  if (!ok) std::printf("FAIL run_bwd: %s (%s)\n", st.what, cudaGetErrorString(st.error));
  CK(cudaDeviceSynchronize());
  size_t bad = 0;
  std::vector<uint16_t> const gq = download<uint16_t>(p.dq, nq), gk = download<uint16_t>(p.dk, nk),
                              gv = download<uint16_t>(p.dv, nv);
  double const eq = rel_err(gq, rdq, dt, bad);
  double const ek = rel_err(gk, rdk, dt, bad);
  double const ev = rel_err(gv, rdv, dt, bad);
  bool const guards = guard_intact(p.dq, nq) && guard_intact(p.dk, nk) && guard_intact(p.dv, nv);
  bool same = true;
  if (det) {
    CK(cudaMemset(p.workspace, 0xff, ws));
    CK(cudaMemset(p.dq, 0xff, nq * 2));
    st = fa3jax::run_bwd(p, 0);
    ok = ok && st.ok();
    CK(cudaDeviceSynchronize());
    same = download<uint16_t>(p.dq, nq) == gq && download<uint16_t>(p.dk, nk) == gk &&
           download<uint16_t>(p.dv, nv) == gv;
  }
  // bf16 keeps 8 bits: its rounding of P, dS and the outputs gives ~1e-2 relative errors at the extremes.
  double const tol = dt == DType::kBF16 ? 3e-2 : 5e-3;
  ok = ok && bad == 0 && eq <= tol && ek <= tol && ev <= tol && same && guards;
  if (!ok || verbose)
    std::printf("%s %s d=%s %-32s b=%d sq=%d sk=%d hq=%d hk=%d win=(%d,%d) cap=%g dlse=%d tile=%d%s: rel err dq=%.2e "
                "dk=%.2e dv=%.2e non-finite=%zu%s%s\n",
                ok ? "ok  " : "FAIL", dt == DType::kBF16 ? "bf16" : "fp16", dims_label(dt, hd).c_str(), c.name, c.b,
                c.sq, c.sk, c.hq, c.hk, c.wl, c.wr, c.softcap, int(c.dlse), fa3jax::bwd_tile_m(p),
                det ? " deterministic" : "", eq, ek, ev,
                bad, same ? "" : " RERUN DIFFERS", guards ? "" : " WROTE PAST A GRADIENT");
  for (const void* ptr : {core.q, core.k, core.v, p.out, p.dout, static_cast<const void*>(p.lse),
                          static_cast<const void*>(p.dlse), static_cast<const void*>(p.dq),
                          static_cast<const void*>(p.dk), static_cast<const void*>(p.dv),
                          static_cast<const void*>(p.workspace)})
    if (ptr) CK(cudaFree(const_cast<void*>(ptr)));
  return ok;
}

// Varlen: sequences packed back to back (cu_seqlens), optional seqused_k, q/k rows after the last sequence that no
// sequence covers (their gradients must be 0), max_seqlen_q = the longest sequence. The reference is the dense
// one per sequence (b = 1, keys cut to seqused_k); out and lse come from it as in run_one.
struct VarlenConfig {
  std::vector<int> sq, sk, used;  // used: seqused_k per sequence, or empty
  int hq, hk, wl, wr;
  float softcap;
  int tail_q, tail_k;  // uncovered rows after the last sequence
  const char* name;
  bool det;  // also deterministic mode (bitwise-equal reruns)
};

static bool run_varlen(DType dt, HeadDims hd, const VarlenConfig& c, std::mt19937& rng, bool verbose,
                       bool det = false) {
  int const d = hd.d, e = hd.dv;
  int const nb = int(c.sq.size());
  std::vector<int> cu_q(1, 0), cu_k(1, 0);
  for (int i = 0; i < nb; ++i) cu_q.push_back(cu_q.back() + c.sq[i]), cu_k.push_back(cu_k.back() + c.sk[i]);
  int const tq = cu_q.back() + c.tail_q, tk = cu_k.back() + c.tail_k;
  int max_sq = 0, max_sk = 0;
  for (int i = 0; i < nb; ++i) max_sq = std::max(max_sq, c.sq[i]), max_sk = std::max(max_sk, c.sk[i]);
  size_t const nq = size_t(tq) * c.hq * d, nk = size_t(tk) * c.hk * d;
  size_t const no = size_t(tq) * c.hq * e, nv = size_t(tk) * c.hk * e;  // d_v wide
  std::vector<uint16_t> qb, kb, vb, dob, ob(no, 0);
  std::vector<float> q, k, v, dout;
  normal_inputs(rng, dt, nq, qb, q);
  normal_inputs(rng, dt, nk, kb, k);
  normal_inputs(rng, dt, nv, vb, v);
  normal_inputs(rng, dt, no, dob, dout);
  std::vector<float> lse(size_t(c.hq) * tq, -INFINITY);
  std::vector<double> rdq(nq, 0.0), rdk(nk, 0.0), rdv(nv, 0.0);
  float const scale = 1.f / std::sqrt(float(d));
  for (int i = 0; i < nb; ++i) {
    int const sq = c.sq[i], sk = c.used.empty() ? c.sk[i] : c.used[i];
    RefShape const rs{1, sq, sk, c.hq, c.hk, d, c.wl, c.wr, c.softcap, scale, e};
    size_t const qrow = size_t(c.hq) * d, krow = size_t(c.hk) * d, orow = size_t(c.hq) * e, vrow = size_t(c.hk) * e;
    auto slice = [](const std::vector<float>& x, size_t at, size_t n) {
      return std::vector<float>(x.begin() + at, x.begin() + at + n);
    };
    std::vector<float> qi = slice(q, cu_q[i] * qrow, sq * qrow), ki = slice(k, cu_k[i] * krow, sk * krow),
                       vi = slice(v, cu_k[i] * vrow, sk * vrow), doi = slice(dout, cu_q[i] * orow, sq * orow);
    std::vector<float> oi(sq * orow), li(size_t(c.hq) * sq);
    ref_forward(rs, qi, ki, vi, oi, li);
    for (size_t j = 0; j < oi.size(); ++j) {
      ob[cu_q[i] * orow + j] = to_bits(oi[j], dt);
      oi[j] = from_bits(ob[cu_q[i] * orow + j], dt);
    }
    for (int h = 0; h < c.hq; ++h)
      for (int r = 0; r < sq; ++r) lse[size_t(h) * tq + cu_q[i] + r] = li[size_t(h) * sq + r];
    std::vector<double> dqi(sq * qrow, 0.0), dki(sk * krow, 0.0), dvi(sk * vrow, 0.0);
    ref_backward(rs, qi, ki, vi, oi, li, doi, nullptr, dqi, dki, dvi);
    std::copy(dqi.begin(), dqi.end(), rdq.begin() + cu_q[i] * qrow);
    std::copy(dki.begin(), dki.end(), rdk.begin() + cu_k[i] * krow);
    std::copy(dvi.begin(), dvi.end(), rdv.begin() + cu_k[i] * vrow);
  }

  fa3jax::BwdParams p;
  fa3jax::AttnCore& core = p.core;
  core.batch = nb, core.seqlen_q = tq, core.seqlen_k = tk, core.num_heads_q = c.hq, core.num_heads_k = c.hk;
  core.head_dim = d, core.head_dim_v = e, core.dtype = dt, core.softmax_scale = scale, core.softcap = c.softcap;
  core.window_left = c.wl, core.window_right = c.wr;
  core.set_dense_strides();  // packed (total, heads, d): the row and head strides of a dense batch of one
  core.varlen.cu_seqlens_q = upload(cu_q), core.varlen.cu_seqlens_k = upload(cu_k);
  core.varlen.seqused_k = c.used.empty() ? nullptr : upload(c.used);
  core.varlen.max_seqlen_q = max_sq, core.varlen.max_seqlen_k = max_sk;
  p.deterministic = det;
  core.q = upload(qb), core.k = upload(kb), core.v = upload(vb);
  p.out = upload(ob), p.dout = upload(dob), p.lse = upload(lse);
  p.dq = alloc_grad(nq), p.dk = alloc_grad(nk), p.dv = alloc_grad(nv);
  size_t const ws = fa3jax::bwd_workspace_bytes(p);
  CK(cudaMalloc(&p.workspace, ws + 16));
  CK(cudaMemset(p.workspace, 0xff, ws));
  fa3jax::FwdStatus st = fa3jax::run_bwd(p, 0);
  bool ok = st.ok();
  if (!ok) std::printf("FAIL run_bwd (varlen): %s (%s)\n", st.what, cudaGetErrorString(st.error));
  CK(cudaDeviceSynchronize());
  size_t bad = 0;
  std::vector<uint16_t> const gq = download<uint16_t>(p.dq, nq), gk = download<uint16_t>(p.dk, nk),
                              gv = download<uint16_t>(p.dv, nv);
  double const eq = rel_err(gq, rdq, dt, bad), ek = rel_err(gk, rdk, dt, bad), ev = rel_err(gv, rdv, dt, bad);
  bool const guards = guard_intact(p.dq, nq) && guard_intact(p.dk, nk) && guard_intact(p.dv, nv);
  // Rows no sequence covers and keys past seqused_k: want 0 (rdq/rdk/rdv), and a row no pass wrote stays NaN
  // (the 0xff fill), which rel_err counts as non-finite.
  bool same = true;
  if (det) {
    CK(cudaMemset(p.workspace, 0xff, ws));
    st = fa3jax::run_bwd(p, 0);
    ok = ok && st.ok();
    CK(cudaDeviceSynchronize());
    same = download<uint16_t>(p.dq, nq) == gq && download<uint16_t>(p.dk, nk) == gk &&
           download<uint16_t>(p.dv, nv) == gv;
  }
  double const tol = dt == DType::kBF16 ? 3e-2 : 5e-3;
  ok = ok && bad == 0 && eq <= tol && ek <= tol && ev <= tol && same && guards;
  if (!ok || verbose)
    std::printf("%s %s d=%s varlen %-22s seqs=%d tq=%d tk=%d hq=%d hk=%d win=(%d,%d) cap=%g%s: rel err dq=%.2e "
                "dk=%.2e dv=%.2e non-finite=%zu%s%s\n",
                ok ? "ok  " : "FAIL", dt == DType::kBF16 ? "bf16" : "fp16", dims_label(dt, hd).c_str(), c.name, nb,
                tq, tk, c.hq, c.hk, c.wl, c.wr, c.softcap, det ? " deterministic" : "", eq, ek, ev, bad,
                same ? "" : " RERUN DIFFERS", guards ? "" : " WROTE PAST A GRADIENT");
  for (const void* ptr : {core.q, core.k, core.v, p.out, p.dout, static_cast<const void*>(p.lse),
                          static_cast<const void*>(core.varlen.cu_seqlens_q),
                          static_cast<const void*>(core.varlen.cu_seqlens_k),
                          static_cast<const void*>(core.varlen.seqused_k), static_cast<const void*>(p.dq),
                          static_cast<const void*>(p.dk), static_cast<const void*>(p.dv),
                          static_cast<const void*>(p.workspace)})
    if (ptr) CK(cudaFree(const_cast<void*>(ptr)));
  return ok;
}

// Timings of the forward and the whole backward on the issue's shapes (h=16, b*s=16384), random inputs; the
// forward's out/lse feed the backward. TFLOPS with FA's count: fwd 2*b*s^2*h*(d + d_v) (halved causal; 4*b*s^2*h*d
// without MLA), bwd 2*b*s^2*h*(3d + 2d_v) (S^T, dK, dQ over d; dP^T, dV over d_v: 2.5x the forward without MLA).
struct BenchShape {
  int b, s, h, causal;
};

static void bench(DType dt, HeadDims hd, int only_s, int only_causal, bool det, std::vector<BenchShape> shapes) {
  int const d = hd.d, e = hd.dv;
  if (shapes.empty())
    for (int s : {512, 1024, 2048, 4096, 8192, 16384})
      for (int causal : {0, 1})
        if ((!only_s || s == only_s) && (only_causal < 0 || causal == only_causal))
          shapes.push_back({16384 / s, s, 16, causal});
  for (BenchShape const& shape : shapes) {
    int const b = shape.b, s = shape.s, h = shape.h, causal = shape.causal;
    size_t const n = size_t(b) * s * h * d, nv = size_t(b) * s * h * e;
    fa3jax::FwdParams fp;
    fa3jax::AttnCore& c = fp.core;
    c.batch = b, c.seqlen_q = s, c.seqlen_k = s, c.num_heads_q = h, c.num_heads_k = h, c.head_dim = d;
    c.head_dim_v = e, c.dtype = dt, c.softmax_scale = 1.f / std::sqrt(float(d)), c.window_right = causal ? 0 : -1;
    c.set_dense_strides();
    void *q, *k, *v, *o, *dout, *dq, *dk, *dv, *fws, *bws;
    float* lse;
    for (void** ptr : {&q, &k, &dq, &dk}) CK(cudaMalloc(ptr, n * 2));
    for (void** ptr : {&v, &o, &dout, &dv}) CK(cudaMalloc(ptr, nv * 2));
    CK(cudaMalloc(&lse, size_t(b) * h * s * 4));
    uint32_t seed = 1;
    for (void* ptr : {q, k}) fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(ptr), n, seed++, dt == DType::kBF16);
    for (void* ptr : {v, dout}) fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(ptr), nv, seed++, dt == DType::kBF16);
    CK(cudaMalloc(&fws, fa3jax::kFwdWorkspaceBytes));
    c.q = q, c.k = k, c.v = v, fp.out = o, fp.lse = lse, fp.workspace = fws;
    fa3jax::BwdParams bp;
    bp.core = c, bp.out = o, bp.dout = dout, bp.lse = lse, bp.dq = dq, bp.dk = dk, bp.dv = dv;
    bp.deterministic = det;
    CK(cudaMalloc(&bws, fa3jax::bwd_workspace_bytes(bp)));
    bp.workspace = bws;
    cudaEvent_t e0, e1, e2;
    CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1)); CK(cudaEventCreate(&e2));
    auto fwd = [&] { fa3jax::FwdStatus st = fa3jax::run_fwd(fp, 0); if (!st.ok()) std::printf("fwd: %s\n", st.what); };
    auto bwd = [&] { fa3jax::FwdStatus st = fa3jax::run_bwd(bp, 0); if (!st.ok()) std::printf("bwd: %s\n", st.what); };
    fwd(); bwd(); fwd(); bwd();
    CK(cudaDeviceSynchronize());
    int const iters = 10;
    float tf = 0, tb = 0;
    for (int round = 0; round < 3; ++round) {  // interleaved rounds, best of 3
      CK(cudaEventRecord(e0));
      for (int i = 0; i < iters; ++i) fwd();
      CK(cudaEventRecord(e1));
      for (int i = 0; i < iters; ++i) bwd();
      CK(cudaEventRecord(e2));
      CK(cudaEventSynchronize(e2));
      float a, bb;
      CK(cudaEventElapsedTime(&a, e0, e1));
      CK(cudaEventElapsedTime(&bb, e1, e2));
      tf = round == 0 ? a : std::min(tf, a);
      tb = round == 0 ? bb : std::min(tb, bb);
    }
    tf /= iters, tb /= iters;
    double const unit = 2.0 * b * double(s) * s * h / (causal ? 2 : 1);
    double const ff = unit * (d + e), fb = unit * (3 * d + 2 * e);
    std::printf("bench %s d=%s b=%d s=%d h=%d %s%s: fwd %.3f ms %.0f TFLOPS | bwd %.3f ms %.0f TFLOPS | fwd+bwd %.0f TFLOPS\n",
                dt == DType::kBF16 ? "bf16" : "fp16", dims_label(dt, hd).c_str(), b, s, h, causal ? "causal" : "full",
                det ? " deterministic" : "", tf, ff / tf / 1e9,
                tb, fb / tb / 1e9, (ff + fb) / (tf + tb) / 1e9);
    for (void* ptr : {q, k, v, o, dout, dq, dk, dv, fws, bws, static_cast<void*>(lse)}) CK(cudaFree(ptr));
    CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1)); CK(cudaEventDestroy(e2));
  }
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  bool quick = false, do_bench = false, bench_only = false;
  HeadDims only{0, 0};
  int only_s = 0, only_causal = -1;
  bool det = false;
  std::vector<BenchShape> shapes;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--bench")) do_bench = true;
    else if (!std::strcmp(argv[i], "--bench-only")) do_bench = bench_only = true;
    else if (!std::strcmp(argv[i], "--head-dim") && i + 1 < argc) {
      // D, or DxDV for an MLA instance
      int const n = std::sscanf(argv[++i], "%dx%d", &only.d, &only.dv);
      if (n < 1) {
        std::fprintf(stderr, "--head-dim wants D or DxDV (e.g. 128 or 192x128)\n");
        return 2;
      }
      if (n == 1) only.dv = only.d;
    }
    else if (!std::strcmp(argv[i], "--deterministic")) det = true;
    else if (!std::strcmp(argv[i], "--case") && i + 1 < argc) {
      if (std::sscanf(argv[++i], "%d,%d", &only_s, &only_causal) != 2) {
        std::fprintf(stderr, "--case wants S,CAUSAL (e.g. 4096,0)\n");
        return 2;
      }
    }
    else if (!std::strcmp(argv[i], "--shape") && i + 1 < argc) {
      BenchShape sh{};
      if (std::sscanf(argv[++i], "%d,%d,%d,%d", &sh.b, &sh.s, &sh.h, &sh.causal) != 4 || sh.b < 1 || sh.s < 1 ||
          sh.h < 1) {
        std::fprintf(stderr, "--shape wants B,S,H,CAUSAL (e.g. 1,4096,1,0)\n");
        return 2;
      }
      shapes.push_back(sh);
    }
    else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (!device_is_sm90("backward compiled", fa3jax::bwd_compiled_list())) return 3;
  int failures = 0, runs = 0;
  {
    // bwd_check refuses a value head dim above the q/k one, and a pair without a compiled kernel (an MLA pair
    // narrower than an instance included: MLA is served by its exact instance only), naming head_dim_v.
    fa3jax::BwdParams p;
    fa3jax::AttnCore& a = p.core;
    a.batch = a.seqlen_q = a.seqlen_k = a.num_heads_q = a.num_heads_k = 1;
    for (HeadDims hd : {HeadDims{128, 192}, HeadDims{256, 128}, HeadDims{192, 64}, HeadDims{176, 128},
                        HeadDims{120, 64}}) {
      a.head_dim = hd.d, a.head_dim_v = hd.dv;
      const char* msg = fa3jax::bwd_check(p);
      ++runs;
      if (msg == nullptr || std::strstr(msg, "head_dim_v") == nullptr) {
        ++failures;
        std::printf("FAIL MLA %s check: %s\n", dims_label(a.dtype, hd).c_str(), msg ? msg : "accepted");
      }
    }
  }
  const Config configs[] = {
      // First (the only one under --quick): the policy's query tile, which a call this short would not get.
      {1, 128, 128, 1, 1, -1, -1, 0.f, false, "full-aligned(policy tile)", 1},
      {1, 128, 128, 1, 1, -1, -1, 0.f, false, "full-aligned"},
      {2, 200, 150, 4, 4, -1, -1, 0.f, true, "full-ragged+dlse"},
      {2, 300, 300, 2, 2, -1, 0, 0.f, false, "causal"},
      {1, 77, 300, 8, 2, -1, 0, 0.f, true, "gqa-causal-sq<sk"},
      {1, 300, 77, 2, 2, -1, 0, 0.f, false, "causal-sq>sk(empty rows)"},
      {1, 333, 333, 2, 1, 64, 32, 0.f, false, "mqa-window(64,32)"},
      {1, 64, 1000, 2, 2, 10, 5, 0.f, false, "narrow-window(empty keys)"},
      {1, 190, 260, 2, 2, -1, 0, 30.f, true, "causal-softcap30"},
      {1, 256, 256, 2, 2, -1, -1, 5.f, false, "full-softcap5"},
      {2, 7, 3, 3, 1, -1, -1, 0.f, false, "tiny"},
      // Whole and partial query tiles of every height (400 = 5 x 80 = 6.25 x 64 = 3.125 x 128), GQA, unmasked (the
      // 80-row tile where the policy has block_m=80, the 128-row one where bwd64.block_m=128).
      {1, 400, 517, 4, 2, -1, -1, 0.f, true, "gqa-full-400x517(policy tile)", 1},
      {1, 400, 517, 4, 2, -1, -1, 0.f, true, "gqa-full-400x517"},
      // One query past whole 128-row tiles, MQA, causal with more keys than queries (bottom-right): partial and
      // masked 128-row tiles across 5 key blocks.
      {1, 385, 640, 4, 1, -1, 0, 0.f, true, "mqa-causal-385x640(policy tile)", 1},
      // Past the 80-row tile's min_seqlen_q (4096), with its default choice: a partial last tile (4100 = 51.25 x 80).
      {1, 4100, 200, 2, 1, -1, -1, 0.f, true, "mqa-full-4100x200"},
  };
  // Unmasked ones (and masks under which every key block sees every query block) take the rotated dQ order
  // (bwd_mainloop.h DqOrder): more key blocks than query blocks and fewer, neither a multiple of the other.
  const Config det_configs[] = {
      {2, 333, 700, 4, 2, -1, -1, 0.f, true, "gqa-full"},
      {1, 520, 520, 2, 2, -1, 0, 0.f, false, "causal"},
      {1, 300, 600, 2, 1, 100, 40, 0.f, false, "mqa-window(100,40)"},
      {1, 100, 1000, 4, 2, -1, -1, 0.f, true, "rotated-gqa-full-N>M"},
      {2, 1100, 400, 2, 2, -1, -1, 0.f, false, "rotated-full-N<M"},
      {1, 100, 1000, 2, 1, -1, 0, 0.f, false, "rotated-mqa-causal-sq<<sk"},
      {1, 300, 600, 2, 2, 2000, 2000, 0.f, false, "rotated-wide-window"},
      {1, 700, 900, 2, 2, -1, -1, 10.f, false, "rotated-full-softcap10"},
      // 133 key blocks: more than an H100's 132 SMs hold at once, so the host keeps the descending order.
      {1, 64, 133 * 128 - 5, 1, 1, -1, -1, 0.f, false, "full-133-key-blocks"},
  };
  const VarlenConfig varlen_configs[] = {
      {{1, 63, 64, 65, 200, 0, 130}, {1, 63, 64, 65, 200, 0, 130}, {}, 4, 2, -1, -1, 0.f, 0, 0, "full-gqa", true},
      {{300, 17, 129}, {300, 40, 100}, {}, 2, 2, -1, 0, 0.f, 33, 20, "causal+uncovered rows", true},
      {{150, 90}, {260, 300}, {200, 7}, 4, 1, 64, 16, 0.f, 0, 10, "mqa-window+seqused_k", false},
      {{128, 256}, {128, 256}, {}, 2, 2, -1, 0, 30.f, 0, 0, "causal-softcap30", false},
      // Each sequence in the rotated dQ order over its own key x query blocks (8 x 2, 2 x 11, 4 x 8, 4 x 3), the
      // last two's key blocks counted from seqused_k; the grid's 8 key blocks exceed all but the first's.
      {{100, 700, 450, 150}, {900, 130, 512, 500}, {900, 130, 400, 480}, 4, 2, -1, -1, 0.f, 5, 3,
       "rotated-full-gqa+seqused_k", true},
  };
  std::mt19937 rng(1234);
  for (DType dt : {DType::kBF16, DType::kFP16})
    for (HeadDims hd : kHeadDims) {
      // The kernel that serves hd (0: none in this build; MLA pairs only their exact instance).
      int const kd = fa3jax::bwd_kernel_dim(dt, hd.d, hd.dv);
      if (kd == 0 || (only.d && (hd.d != only.d || hd.dv != only.dv))) continue;
      if (!bench_only) {
        for (const Config& c : configs) {
          ++runs;
          failures += !run_one(dt, hd, c, rng, true);
          if (quick) break;
        }
        // Deterministic mode: bitwise-equal reruns, under masks and GQA, many key blocks per query block.
        for (const Config& c : det_configs) {
          ++runs;
          failures += !run_one(dt, hd, c, rng, true, true);
          if (quick) break;
        }
        for (const VarlenConfig& c : varlen_configs) {
          ++runs;
          failures += !run_varlen(dt, hd, c, rng, true, c.det);
          if (quick) break;
        }
      }
      if (do_bench && dt == DType::kBF16 && (kd == hd.d || only.d == hd.d))
        bench(dt, hd, only_s, only_causal, det, shapes);
    }
  // Head dims: any multiple of 8 up to the widest compiled backward; others refused naming why (unlaunched).
  if (!bench_only) {
    fa3jax::BwdParams p;
    fa3jax::AttnCore& c = p.core;
    c.batch = 1, c.seqlen_q = c.seqlen_k = 16, c.num_heads_q = c.num_heads_k = 2;
    int widest = 0;
    for (int d = 8; d <= 256; d += 8)
      if (fa3jax::bwd_kernel_dim(c.dtype, d) != 0) widest = d;
    for (int d : {0, 1, 59, 100, 264, widest, widest + 8}) {
      c.head_dim = d;
      c.set_dense_strides();
      char const* msg = fa3jax::bwd_check(p);
      bool const valid = d % 8 == 0 && d >= 8 && d <= widest;
      char const* want = d < 1 || d > 256 ? "[1, 256]" : d % 8 != 0 ? "multiple of 8" : "head_dim >= the call's";
      ++runs;
      // A valid head dim gets past the head-dim checks to the missing buffers ("null buffer").
      if (valid ? (msg == nullptr || !std::strstr(msg, "null buffer")) : (msg == nullptr || !std::strstr(msg, want))) {
        std::printf("FAIL head_dim=%d check (widest backward %d): %s\n", d, widest, msg ? msg : "accepted");
        ++failures;
      }
    }
    for (int d = 8; d <= widest; d += 8) {  // the narrowest compiled backward that holds d
      int const kd = fa3jax::bwd_kernel_dim(c.dtype, d);
      bool narrowest = kd >= d && fa3jax::bwd_compiled(c.dtype, kd);
      for (int w = d; w < kd; w += 8) narrowest = narrowest && !fa3jax::bwd_compiled(c.dtype, w);
      ++runs;
      if (!narrowest) { std::printf("FAIL bwd_kernel_dim(%d) = %d\n", d, kd); ++failures; }
    }
  }
  std::printf("%d/%d backward configs passed: %s\n", runs - failures, runs, failures ? "FAILED" : "passed");
  return failures ? 1 : 0;
}

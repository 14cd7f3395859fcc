// Standalone test of the varlen (packed, cu_seqlens) forward: every compiled instantiation (MLA ones included)
// against the float64 reference per sequence (test_common.h), on packed q (total_q, hq, d), k (total_k, hk, d), v
// (total_k, hk, dv), out (total_q, hq, dv) and lse (hq, total_q). Exits nonzero on any failure. Meant to be run
// directly and under compute-sanitizer memcheck (the hostile cu_seqlens cases exist for it).
//
//   fa3jax_test_varlen           all cases, dynamic and static tile assignment
//   fa3jax_test_varlen --quick   a few cases (racecheck / synccheck are slow)
//   fa3jax_test_varlen --quiet   print failures and the summary only
//   fa3jax_test_varlen --bench   also time packed random lengths against the dense kernel at equal lengths
//
// Every case also checks what the kernel must not touch: the q rows outside every sequence get exactly out 0 and
// lse -inf (the sink with sinks), and guard bytes before and after out and lse stay as they were. Keys past
// seqused_k and q rows outside every sequence hold NaN, so a kernel that reads them into a result fails.
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

namespace {

constexpr size_t kGuard = 256;  // bytes before and after out / lse (multiple of 16: out stays aligned)
constexpr uint16_t kNaN16 = 0x7fff;

struct Case {
  const char* name;
  std::vector<int> lens_q, lens_k;  // lens_k empty: cu_seqlens_k = cu_seqlens_q
  std::vector<int> used_k;          // seqused_k, or empty
  int hq, hk, wl, wr;
  float softcap;
  bool sinks;
  int pad_front, pad_back;  // q rows outside every sequence, before cu_q[0] and after cu_q[batch]
  int max_q_extra;          // max_seqlen_q passed = the true maximum + this (units past every sequence's end)
};

struct Layout {
  std::vector<int> cu_q, cu_k, used;
  int total_q, total_k, max_q, max_k;
};

Layout make_layout(const Case& c) {
  Layout l;
  int const b = int(c.lens_q.size());
  l.cu_q.push_back(c.pad_front);
  for (int x : c.lens_q) l.cu_q.push_back(l.cu_q.back() + x);
  l.total_q = l.cu_q.back() + c.pad_back;
  auto const& lk = c.lens_k.empty() ? c.lens_q : c.lens_k;
  if (c.lens_k.empty()) {
    l.cu_k = l.cu_q;
    l.total_k = l.total_q;
  } else {
    l.cu_k.push_back(0);
    for (int x : lk) l.cu_k.push_back(l.cu_k.back() + x);
    l.total_k = l.cu_k.back();
  }
  l.used = c.used_k;
  l.max_q = 0;
  l.max_k = 0;
  for (int i = 0; i < b; ++i) {
    l.max_q = std::max(l.max_q, c.lens_q[i]);
    l.max_k = std::max(l.max_k, l.used.empty() ? lk[i] : l.used[i]);
  }
  l.max_q += c.max_q_extra;
  return l;
}

const char* dt_name(DType dt) { return dt == DType::kBF16 ? "bf16" : "fp16"; }

// Device buffer with `kGuard` bytes on each side, all filled with 0xff; `mid` is the caller's buffer.
struct Guarded {
  uint8_t* base = nullptr;
  size_t bytes = 0;
  void* mid() const { return base + kGuard; }
  void alloc(size_t n) {
    bytes = n;
    CK(cudaMalloc(&base, n + 2 * kGuard));
    CK(cudaMemset(base, 0xff, n + 2 * kGuard));
  }
  // Copies the buffer out; false if a guard byte changed.
  bool fetch(void* host) const {
    std::vector<uint8_t> all(bytes + 2 * kGuard);
    CK(cudaMemcpy(all.data(), base, all.size(), cudaMemcpyDeviceToHost));
    std::memcpy(host, all.data() + kGuard, bytes);
    for (size_t i = 0; i < kGuard; ++i)
      if (all[i] != 0xff || all[kGuard + bytes + i] != 0xff) return false;
    return true;
  }
  ~Guarded() {
    if (base) cudaFree(base);
  }
};

// Device copies of host arrays, freed together (an empty array gives nullptr: an absent operand).
struct Uploads {
  std::vector<void*> owned;
  template <class T>
  T* put(const std::vector<T>& h) {
    if (h.empty()) return nullptr;
    T* d = nullptr;
    CK(cudaMalloc(&d, h.size() * sizeof(T)));
    CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    owned.push_back(d);
    return d;
  }
  ~Uploads() {
    for (void* x : owned) cudaFree(x);
  }
};

// A compiled forward: q/k head dim d, v/out head dim dv (< d: MLA).
struct Dims {
  int d, dv;
};
std::string dims_label(Dims hd) {
  return hd.d == hd.dv ? std::to_string(hd.d) : std::to_string(hd.d) + "x" + std::to_string(hd.dv);
}

fa3jax::FwdParams make_params(DType dt, Dims hd, const Case& c, const Layout& l, void* q, void* k, void* v,
                              int* cu_q, int* cu_k, int* used, float* sinks, void* out, float* lse, void* workspace) {
  int const d = hd.d;
  fa3jax::FwdParams p;
  fa3jax::AttnCore& a = p.core;
  a.q = q; a.k = k; a.v = v; p.out = out; p.lse = lse;
  a.batch = int(l.cu_q.size()) - 1;
  a.seqlen_q = l.total_q;
  a.seqlen_k = l.total_k;
  a.num_heads_q = c.hq;
  a.num_heads_k = c.hk;
  a.head_dim = d;
  a.head_dim_v = hd.dv;
  a.dtype = dt;
  a.softmax_scale = 1.f / std::sqrt(float(d));
  a.window_left = c.wl;
  a.window_right = c.wr;
  a.softcap = c.softcap;
  a.set_dense_strides();  // row and head strides of the packed tensors (the batch stride is unused)
  a.varlen.cu_seqlens_q = cu_q;
  a.varlen.cu_seqlens_k = cu_k;
  a.varlen.seqused_k = used;
  a.varlen.max_seqlen_q = l.max_q;
  a.varlen.max_seqlen_k = l.max_k;
  p.sinks = sinks;
  p.workspace = workspace;
  return p;
}

// What a launch left: its status, whether the guards around out / lse held, and out / lse.
struct Outcome {
  fa3jax::FwdStatus st;
  bool guards = false;
  std::vector<uint16_t> out;
  std::vector<float> lse;
};

// Uploads packed q (total_q, hq, d), k (total_k, hk, d), v (total_k, hk, dv), the layout's index arrays (as they
// are: unsanitized) and the sinks, runs the varlen forward into guarded out (total_q, hq, dv) / lse and copies them
// back.
Outcome run_packed(DType dt, Dims hd, const Case& c, const Layout& l, const std::vector<uint16_t>& q,
                   const std::vector<uint16_t>& k, const std::vector<uint16_t>& v, const std::vector<float>& sinks,
                   void* workspace) {
  Uploads up;
  Guarded out, lse;
  size_t const n_out = size_t(l.total_q) * c.hq * hd.dv;
  out.alloc(n_out * 2);
  lse.alloc(size_t(c.hq) * l.total_q * 4);
  fa3jax::FwdParams const p =
      make_params(dt, hd, c, l, up.put(q), up.put(k), up.put(v), up.put(l.cu_q), up.put(l.cu_k), up.put(l.used),
                  up.put(sinks), out.mid(), static_cast<float*>(lse.mid()), workspace);
  Outcome r;
  r.st = fa3jax::run_fwd(p, nullptr);
  if (!r.st.ok()) return r;
  CK(cudaDeviceSynchronize());
  r.out.resize(n_out);
  r.lse.resize(size_t(c.hq) * l.total_q);
  r.guards = out.fetch(r.out.data()) & lse.fetch(r.lse.data());
  return r;
}

// One case on one instantiation; `workspace` null: static tile assignment.
bool run_case(DType dt, Dims hd, const Case& c, void* workspace, std::mt19937& rng, bool verbose) {
  Layout const l = make_layout(c);
  int const b = int(c.lens_q.size()), hq = c.hq, hk = c.hk, tq = l.total_q, tk = l.total_k, d = hd.d, dv = hd.dv;
  size_t const nq = size_t(tq) * hq * d, nk = size_t(tk) * hk * d, nl = size_t(hq) * tq;
  size_t const nv = size_t(tk) * hk * dv, no = size_t(tq) * hq * dv;  // v and out: d_v wide
  std::vector<uint16_t> hq_, hk_, hv_;
  std::vector<float> fq, fk, fv;
  normal_inputs(rng, dt, nq, hq_, fq);
  normal_inputs(rng, dt, nk, hk_, fk);
  normal_inputs(rng, dt, nv, hv_, fv);
  // NaN where no result may read: q rows outside every sequence, keys past seqused_k.
  for (int r = 0; r < tq; ++r)
    if (r < l.cu_q[0] || r >= l.cu_q[b])
      for (size_t i = 0; i < size_t(hq) * d; ++i) hq_[size_t(r) * hq * d + i] = kNaN16;
  if (!l.used.empty())
    for (int s = 0; s < b; ++s)
      for (int r = l.cu_k[s] + l.used[s]; r < l.cu_k[s + 1]; ++r) {
        for (size_t i = 0; i < size_t(hk) * d; ++i) hk_[size_t(r) * hk * d + i] = kNaN16;
        for (size_t i = 0; i < size_t(hk) * dv; ++i) hv_[size_t(r) * hk * dv + i] = kNaN16;
      }
  std::vector<float> hsinks;
  if (c.sinks) {
    std::uniform_real_distribution<float> sd(-2.f, 2.f);
    for (int h = 0; h < hq; ++h) hsinks.push_back(sd(rng) + 3.f);
  }

  Outcome const r = run_packed(dt, hd, c, l, hq_, hk_, hv_, hsinks, workspace);
  char const* mode = workspace ? "" : " [static]";
  if (!r.st.ok()) {
    std::printf("FAIL %s d=%s %s%s: launch: %s (%s)\n", dt_name(dt), dims_label(hd).c_str(), c.name, mode,
                r.st.what, cudaGetErrorString(r.st.error));
    return false;
  }
  std::vector<uint16_t> const& hout = r.out;
  std::vector<float> const& hlse = r.lse;
  bool const guards = r.guards;

  // Reference per sequence, on its own rows (test_common.h's dense reference with batch 1).
  // Rows no sequence computes keep lse -inf, or the sink (their softmax has the sink alone).
  std::vector<float> rout(no, 0.f), rlse(nl, -INFINITY);
  if (!hsinks.empty())
    for (int h = 0; h < hq; ++h) std::fill_n(rlse.begin() + size_t(h) * tq, tq, hsinks[h]);
  float const scale = 1.f / std::sqrt(float(d));
  for (int s = 0; s < b; ++s) {
    int const q0 = l.cu_q[s], lq = l.cu_q[s + 1] - q0, k0 = l.cu_k[s];
    int const lk = l.used.empty() ? l.cu_k[s + 1] - k0 : l.used[s];
    if (lq == 0) continue;
    std::vector<float> sq_(fq.begin() + size_t(q0) * hq * d, fq.begin() + size_t(q0 + lq) * hq * d);
    std::vector<float> sk_(fk.begin() + size_t(k0) * hk * d, fk.begin() + size_t(k0 + lk) * hk * d);
    std::vector<float> sv_(fv.begin() + size_t(k0) * hk * dv, fv.begin() + size_t(k0 + lk) * hk * dv);
    std::vector<float> o(size_t(lq) * hq * dv), ls(size_t(hq) * lq);
    ref_forward(RefShape{1, lq, lk, hq, hk, d, c.wl, c.wr, c.softcap, scale, dv}, sq_, sk_, sv_, o, ls,
                hsinks.empty() ? nullptr : &hsinks);
    std::copy(o.begin(), o.end(), rout.begin() + size_t(q0) * hq * dv);
    for (int h = 0; h < hq; ++h)
      for (int i = 0; i < lq; ++i) rlse[size_t(h) * tq + q0 + i] = ls[size_t(h) * lq + i];
  }
  // Rows outside every sequence: exactly out 0 and lse -inf or the sink.
  size_t bad_uncovered = 0;
  for (int r = 0; r < tq; ++r) {
    if (r >= l.cu_q[0] && r < l.cu_q[b]) continue;
    for (int h = 0; h < hq; ++h) {
      float const want = hsinks.empty() ? -INFINITY : hsinks[h];
      if (!(hlse[size_t(h) * tq + r] == want)) ++bad_uncovered;
      for (int t = 0; t < dv; ++t)
        if (hout[(size_t(r) * hq + h) * dv + t] != 0) ++bad_uncovered;  // +0.0 exactly
    }
  }
  double max_err = 0, max_lse_err = 0;
  size_t nan_out = 0, bad_lse = 0;
  for (size_t i = 0; i < no; ++i) {
    float const o = from_bits(hout[i], dt);
    if (!std::isfinite(o)) { ++nan_out; continue; }
    max_err = std::max(max_err, double(std::fabs(o - rout[i])));
  }
  for (size_t i = 0; i < nl; ++i) {
    if (std::isinf(rlse[i])) {
      if (!(hlse[i] == rlse[i])) ++bad_lse;
      continue;
    }
    if (!std::isfinite(hlse[i])) { ++bad_lse; continue; }
    max_lse_err = std::max(max_lse_err, double(std::fabs(hlse[i] - rlse[i])));
  }
  double const tol = dt == DType::kBF16 ? 2.5e-2 : 4e-3;
  double const lse_tol = 2e-3 * std::log2(double(l.max_k) + 2) + 1e-3;
  bool const ok = guards && bad_uncovered == 0 && nan_out == 0 && bad_lse == 0 && max_err <= tol &&
                  max_lse_err <= lse_tol;
  if (!ok || verbose)
    std::printf("%s %s d=%-7s %-30s%s b=%d total_q=%d total_k=%d hq=%d hk=%d win=(%d,%d) cap=%g%s: max|dO|=%.3g "
                "max|dLSE|=%.3g non-finite out=%zu bad lse=%zu uncovered-row errors=%zu guards %s\n",
                ok ? "ok  " : "FAIL", dt_name(dt), dims_label(hd).c_str(), c.name, mode, b, tq, tk, hq, hk, c.wl,
                c.wr, c.softcap, c.sinks ? " sinks" : "", max_err, max_lse_err, nan_out, bad_lse, bad_uncovered,
                guards ? "intact" : "OVERWRITTEN");
  return ok;
}

// Hostile index arrays (unsanitized: decreasing, negative, past the total; seqused_k negative and too long; a
// max_seqlen_q below a sequence's length): the launch must succeed and write nothing outside out and lse (guards;
// run under compute-sanitizer memcheck for the reads). Results are unspecified, so they are not compared.
bool run_hostile(DType dt, Dims hd, void* workspace, bool verbose) {
  int const d = hd.d;
  struct H {
    const char* name;
    std::vector<int> cu_q, cu_k, used;
    int max_q;
  };
  int const tq = 300, tk = 260, hq = 4, hk = 2;
  const H cases[] = {
      {"decreasing", {0, 120, 40, 200, 150, 300}, {0, 100, 30, 260, 10, 200}, {}, 300},
      {"negative+past-total", {-50, 80, 400, 1 << 30, -7}, {-1000, 50, 900, 2, 260}, {}, 300},
      {"seqused hostile", {0, 100, 200, 300}, {0, 60, 120, 260}, {-5, 1000, 1 << 30}, 128},
      {"extremes", {INT32_MIN, INT32_MAX, 0, INT32_MAX}, {INT32_MAX, INT32_MIN, 5, 0}, {INT32_MIN, INT32_MAX, 3}, 300},
      {"max_seqlen_q too small", {0, 290, 300}, {0, 250, 260}, {}, 64},
  };
  std::mt19937 rng(99);
  bool all = true;
  for (const H& h : cases) {
    size_t const nq = size_t(tq) * hq * d, nk = size_t(tk) * hk * d, nv = size_t(tk) * hk * hd.dv;
    std::vector<uint16_t> hq_(nq), hk_(nk), hv_(nv);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& x : hq_) x = to_bits(u(rng), dt);
    for (auto& x : hk_) x = to_bits(u(rng), dt);
    for (auto& x : hv_) x = to_bits(u(rng), dt);
    Case c{h.name, {}, {}, {}, hq, hk, -1, 0, 0.f, false, 0, 0, 0};
    Layout l;
    l.cu_q = h.cu_q;
    l.cu_k = h.cu_k;
    l.used = h.used;
    l.total_q = tq;
    l.total_k = tk;
    l.max_q = h.max_q;
    l.max_k = tk;
    Outcome const r = run_packed(dt, hd, c, l, hq_, hk_, hv_, {}, workspace);
    bool const ok = r.st.ok() && r.guards;
    fa3jax::FwdStatus const& st = r.st;
    if (!ok || verbose)
      std::printf("%s %s d=%s hostile %-24s%s: %s\n", ok ? "ok  " : "FAIL", dt_name(dt), dims_label(hd).c_str(),
                  h.name,
                  workspace ? "" : " [static]", st.ok() ? (ok ? "no write outside out/lse" : "guards OVERWRITTEN")
                                                         : st.what);
    all = all && ok;
  }
  return all;
}

// Random lengths with the given mean, summing to `total` (the last one takes the rest).
std::vector<int> random_lengths(int total, int mean, std::mt19937& rng) {
  std::uniform_int_distribution<int> u(1, 2 * mean - 1);
  std::vector<int> lens;
  int left = total;
  while (left > 0) {
    int x = std::min(u(rng), left);
    lens.push_back(x);
    left -= x;
  }
  return lens;
}

// 16k packed tokens, h=16: random lengths (mean 1k, 4k, 8k) and equal lengths, each against the dense kernel on
// the same per-sequence lengths (equal lengths: one dense call; random: one dense call per distinct length is not
// what a user runs, so the dense rate printed is that of equal lengths at the mean). TFLOPS count 2 sq sk h (d + dv)
// per sequence (halved under causal). No checking.
void bench(DType dt, Dims hd, void* workspace) {
  int const total = 16384, h = 16, d = hd.d, dv = hd.dv;
  size_t const n = size_t(total) * h * d, nv = size_t(total) * h * dv;
  void *q, *k, *v, *o;
  float* l;
  CK(cudaMalloc(&q, n * 2)); CK(cudaMalloc(&k, n * 2)); CK(cudaMalloc(&v, nv * 2)); CK(cudaMalloc(&o, nv * 2));
  CK(cudaMalloc(&l, size_t(total) * h * 4));
  fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(q), n, 1u, dt == DType::kBF16);
  fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(k), n, 2u, dt == DType::kBF16);
  fill_uniform<<<1024, 256>>>(static_cast<uint16_t*>(v), nv, 3u, dt == DType::kBF16);
  CK(cudaGetLastError());
  std::mt19937 rng(5);
  for (int mean : {1024, 4096, 8192}) {
    for (bool equal : {true, false}) {
      for (int causal : {0, 1}) {
        std::vector<int> lens = equal ? std::vector<int>(total / mean, mean) : random_lengths(total, mean, rng);
        Case c{"bench", lens, {}, {}, h, h, -1, causal ? 0 : -1, 0.f, false, 0, 0, 0};
        Layout lay = make_layout(c);
        Uploads up;
        int* cu = up.put(lay.cu_q);
        fa3jax::FwdParams p = make_params(dt, hd, c, lay, q, k, v, cu, cu, nullptr, nullptr, o, l, workspace);
        double flops = 0;
        for (int x : lens) flops += 2.0 * h * double(x) * x * (d + dv) * (causal ? 0.5 : 1.0);
        double const ms = time_fwd_ms(p);
        std::printf("bench %s d=%s varlen total=%d h=%d mean=%d %s %s (b=%zu, max=%d): %.3f ms, %.1f TFLOP/s\n",
                    dt_name(dt), dims_label(hd).c_str(), total, h, mean, equal ? "equal " : "random",
                    causal ? "causal" : "full  ", lens.size(), lay.max_q, ms, flops / ms * 1e-9);
        // Under jit with traced cu_seqlens, max_seqlen_q is the total unless the caller passes it.
        p.core.varlen.max_seqlen_q = total;
        double const ms_t = time_fwd_ms(p);
        std::printf("bench %s d=%s varlen total=%d h=%d mean=%d %s %s max_seqlen_q=total: %.3f ms, %.1f TFLOP/s\n",
                    dt_name(dt), dims_label(hd).c_str(), total, h, mean, equal ? "equal " : "random",
                    causal ? "causal" : "full  ", ms_t, flops / ms_t * 1e-9);
        if (equal) {
          fa3jax::FwdParams pd;
          fa3jax::AttnCore& a = pd.core;
          a = p.core;
          a.varlen = fa3jax::VarlenSeqs{};
          a.batch = total / mean;
          a.seqlen_q = a.seqlen_k = mean;
          a.set_dense_strides();
          pd.out = o;
          pd.lse = l;
          pd.workspace = workspace;
          pd.wide_tiles = 0;  // the varlen kernel's tiles
          double const ms_d = time_fwd_ms(pd);
          std::printf("bench %s d=%s dense  b=%d s=%d h=%d %s: %.3f ms, %.1f TFLOP/s (varlen/dense %.3f)\n",
                      dt_name(dt), dims_label(hd).c_str(), a.batch, mean, h, causal ? "causal" : "full  ", ms_d,
                      flops / ms_d * 1e-9, ms_d / ms);
        }
      }
    }
  }
  CK(cudaFree(q)); CK(cudaFree(k)); CK(cudaFree(v)); CK(cudaFree(o)); CK(cudaFree(l));
}

std::vector<Case> cases() {
  std::mt19937 rng(7);
  std::vector<Case> cs = {
      {"one-seq", {200}, {}, {}, 2, 2, -1, -1, 0.f, false, 0, 0, 0},
      {"edges-0-1-63-64-65", {0, 1, 63, 64, 65, 127, 128, 129}, {}, {}, 4, 2, -1, -1, 0.f, false, 0, 0, 0},
      {"edges-causal", {65, 0, 1, 64, 63, 130}, {}, {}, 4, 2, -1, 0, 0.f, false, 0, 0, 0},
      {"lq!=lk-causal-gqa", {100, 7, 0, 300, 64}, {300, 1, 5, 100, 64}, {}, 6, 2, -1, 0, 0.f, false, 0, 0, 0},
      {"lq!=lk-full-mqa", {100, 7, 0, 300, 1}, {300, 1, 5, 100, 129}, {}, 4, 1, -1, -1, 0.f, false, 0, 0, 0},
      {"empty-keys", {50, 70, 3}, {0, 90, 0}, {}, 2, 2, -1, -1, 0.f, false, 0, 0, 0},
      {"window(32,8)", {333, 64, 129, 1}, {}, {}, 4, 2, 32, 8, 0.f, false, 0, 0, 0},
      {"window(100,-1)-lq!=lk", {260, 17}, {517, 40}, {}, 2, 1, 100, -1, 0.f, false, 0, 0, 0},
      {"causal-softcap30", {190, 65, 300}, {}, {}, 4, 2, -1, 0, 30.f, false, 0, 0, 0},
      {"seqused_k", {100, 64, 200, 5, 0}, {150, 64, 210, 9, 4}, {150, 1, 100, 0, 4}, 4, 2, -1, -1, 0.f, false, 0, 0, 0},
      {"seqused_k-causal-window", {100, 64, 200}, {150, 128, 210}, {80, 128, 3}, 4, 2, 50, 0, 0.f, false, 0, 0, 0},
      {"uncovered-rows", {40, 0, 90}, {}, {}, 4, 2, -1, 0, 0.f, false, 13, 70, 0},
      {"uncovered+sinks", {40, 0, 90}, {}, {}, 4, 2, -1, 0, 0.f, true, 5, 129, 0},
      {"sinks-gqa-empty-keys", {200, 60, 1}, {333, 0, 10}, {}, 4, 2, -1, -1, 0.f, true, 0, 0, 0},
      {"sinks-causal-softcap", {190, 300, 64}, {100, 300, 64}, {}, 4, 2, -1, 0, 20.f, true, 0, 0, 0},
      {"max_seqlen_q=total", {30, 200, 65}, {}, {}, 2, 2, -1, 0, 0.f, false, 0, 0, 700},
      {"all-empty+uncovered", {0, 0, 0}, {}, {}, 2, 1, -1, -1, 0.f, true, 40, 33, 0},
  };
  // Long and random: lengths up to ~1.3k, GQA, causal and full.
  Case lc{"long-random-causal", {}, {}, {}, 4, 2, -1, 0, 0.f, false, 0, 7, 0};
  Case lf{"long-random-full", {}, {}, {}, 4, 1, -1, -1, 0.f, false, 0, 0, 0};
  std::uniform_int_distribution<int> u(0, 1300);
  for (int i = 0; i < 5; ++i) lc.lens_q.push_back(u(rng));
  for (int i = 0; i < 4; ++i) {
    lf.lens_q.push_back(u(rng));
    lf.lens_k.push_back(u(rng));
  }
  lc.lens_q.push_back(1024);
  cs.push_back(lc);
  cs.push_back(lf);
  return cs;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // keep the log of a run that hangs and gets killed
  bool quick = false, do_bench = false, verbose = true;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--bench")) do_bench = true;
    else if (!std::strcmp(argv[i], "--quiet")) verbose = false;
    else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (!device_is_sm90("compiled", fa3jax::fwd_compiled_list())) return 3;
  void* workspace = nullptr;
  CK(cudaMalloc(&workspace, fa3jax::kFwdWorkspaceBytes));
  std::vector<Case> const cs = cases();
  std::mt19937 rng(1234);
  int failures = 0, runs = 0;
  for (DType dt : {DType::kBF16, DType::kFP16})
    for (Dims hd : {Dims{64, 64}, Dims{128, 128}, Dims{256, 256}, Dims{192, 128}, Dims{128, 64}}) {
      if (!fa3jax::fwd_compiled(dt, hd.d, hd.dv)) continue;
      for (size_t i = 0; i < cs.size(); ++i) {
        // --quick: edges under causal, seqused_k, uncovered rows with sinks.
        if (quick && i != 2 && i != 9 && i != 12) continue;
        for (void* ws : {workspace, static_cast<void*>(nullptr)}) {
          ++runs;
          if (!run_case(dt, hd, cs[i], ws, rng, verbose)) ++failures;
        }
      }
      for (void* ws : {workspace, static_cast<void*>(nullptr)}) {
        ++runs;
        if (!run_hostile(dt, hd, ws, verbose)) ++failures;
        if (quick) break;
      }
      if (do_bench) bench(dt, hd, workspace);
    }
  // Parameters the varlen forward must refuse, not launch.
  {
    int cu[2] = {0, 16};
    fa3jax::FwdParams p;
    fa3jax::AttnCore& a = p.core;
    a.batch = 1; a.seqlen_q = a.seqlen_k = 16; a.num_heads_q = a.num_heads_k = 2; a.head_dim = 128;
    a.set_dense_strides();
    a.q = a.k = a.v = p.out = workspace;
    p.lse = static_cast<float*>(workspace);
    a.varlen.cu_seqlens_q = cu;
    a.varlen.max_seqlen_q = 16;
    ++runs;
    if (fa3jax::fwd_check(p) == nullptr) { std::printf("FAIL varlen without cu_seqlens_k accepted\n"); ++failures; }
    a.varlen.cu_seqlens_k = cu;
    a.varlen.max_seqlen_q = -1;
    ++runs;
    if (fa3jax::fwd_check(p) == nullptr) { std::printf("FAIL varlen with max_seqlen_q < 0 accepted\n"); ++failures; }
    a.varlen.max_seqlen_q = 16;
    if (fa3jax::fwd_compiled(a.dtype, a.head_dim)) {
      ++runs;
      if (const char* msg = fa3jax::fwd_check(p)) { std::printf("FAIL valid varlen refused: %s\n", msg); ++failures; }
    }
  }
  CK(cudaFree(workspace));
  std::printf("%d/%d passed\n", runs - failures, runs);
  return failures == 0 ? 0 : 1;
}

// What the KV-cache test programs share (test_kvcache.cu, test_kvcache_repro.cu): a case, its host inputs (cache rows
// no result may read set to NaN), the float64 reference that follows the kernel's clamping rule (seq_info.h
// KVCacheSeq; a page index out of range masks that page's keys) and the comparison with its tolerances.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "test_common.h"

namespace kvref {

using fa3jax::DType;

constexpr uint16_t kNaN16 = 0x7fff;

struct Case {
  const char* name;
  int b, lq, hq, hk;
  int capacity;    // contiguous: the cache's rows per slot; paged: ignored (pages_per_seq * page_size)
  int slots;       // contiguous: cache slots (the caches' leading dim); paged: num_pages
  int page_mult;   // 0: contiguous (unless page_rows); else page_size = page_mult * the kernel's key block
  int pages_per_seq;
  int seqlen_new;
  std::vector<int> cache_seqlens, leftpad, batch_idx, page_table;  // raw (hostile allowed); empty: absent
  int wl, wr;
  float softcap;
  bool sinks;
  int splits = 1;  // split-KV parts (FwdParams::splits; > 1: fp32 parts and the combine pass)
  int pack = -1;   // FwdParams::pack_gqa: -1 the policy (decode packs), 0 never, 1 whenever hq > hk
  int page_rows = 0;  // > 0: paged with this page_size whatever the key block (blocks spanning pages: TMA boxes or
                      // the producer's gather, fwd_kvcache_load)
};

inline const char* dt_name(DType dt) { return dt == DType::kBF16 ? "bf16" : "fp16"; }

// "d", or "d(D)" where the kernel D serves d.
inline std::string dim_label(DType dt, int d) {
  int const kd = fa3jax::fwd_kernel_dim(dt, d);
  return kd == d ? std::to_string(d) : std::to_string(d) + "(" + std::to_string(kd) + ")";
}

inline int clampi(int64_t x, int64_t lo, int64_t hi) { return int(x < lo ? lo : (x > hi ? hi : x)); }

// The kernel's view of batch row bb (seq_info.h KVCacheSeq::make): clamped cache length, leftpad and slot.
struct Row {
  int cache_len, leftpad, slot;
};
inline Row row_of(const Case& c, int capacity, int bb) {
  int const cap = std::max(capacity - c.seqlen_new, 0);
  Row r;
  r.cache_len = clampi(c.cache_seqlens[bb], 0, cap);
  r.leftpad = c.leftpad.empty() ? 0 : clampi(c.leftpad[bb], 0, r.cache_len);
  r.slot = clampi(c.batch_idx.empty() ? bb : c.batch_idx[bb], 0, std::max(c.slots - 1, 0));
  return r;
}

// A random page table: pages_per_seq entries per batch row, distinct pages where there are enough.
inline std::vector<int> random_pages(int b, int pages_per_seq, int num_pages, std::mt19937& rng) {
  std::vector<int> perm(num_pages);
  for (int i = 0; i < num_pages; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int> t;
  for (int i = 0; i < b * pages_per_seq; ++i) t.push_back(perm[size_t(i) % num_pages]);
  return t;
}

// One case's host inputs at head dim d: 16-bit bits for the device and their float values for the reference.
struct Inputs {
  bool paged = false;
  int page_size = 0, slot_rows = 0, capacity = 0;
  std::vector<uint16_t> bq, bk, bv, bkn, bvn;
  std::vector<float> fq, fk, fv, fkn, fvn, sinks;
  std::vector<Row> rows;
  size_t cache_elems() const { return bk.size(); }
};

// bn: the serving kernel's key block (paged cases with page_mult). Cache rows that no result may read hold NaN (rows
// at or past a sequence's cache length, pages no table entry names, the whole cache slot of no batch row), so a
// kernel that lets them into a result fails.
inline Inputs make_inputs(DType dt, int d, int bn, const Case& c, std::mt19937& rng) {
  Inputs in;
  in.paged = c.page_mult > 0 || c.page_rows > 0;
  in.page_size = c.page_rows > 0 ? c.page_rows : c.page_mult * bn;
  in.slot_rows = in.paged ? in.page_size : c.capacity;
  in.capacity = in.paged ? c.pages_per_seq * in.page_size : c.capacity;
  int const b = c.b, lq = c.lq, hq = c.hq, hk = c.hk, sn = c.seqlen_new;
  size_t const n_cache = size_t(c.slots) * in.slot_rows * hk * d;
  normal_inputs(rng, dt, size_t(b) * lq * hq * d, in.bq, in.fq);
  normal_inputs(rng, dt, n_cache, in.bk, in.fk);
  normal_inputs(rng, dt, n_cache, in.bv, in.fv);
  if (sn > 0) {
    normal_inputs(rng, dt, size_t(b) * sn * hk * d, in.bkn, in.fkn);
    normal_inputs(rng, dt, size_t(b) * sn * hk * d, in.bvn, in.fvn);
  }
  // Which cache rows some result reads (the kernel may load the rest of a partly valid key block only where it
  // lies below the block's valid rows, i.e. before leftpad: those stay finite); all others become NaN.
  std::vector<char> readable(size_t(c.slots) * in.slot_rows, 0);
  in.rows.resize(b);
  for (int bb = 0; bb < b; ++bb) {
    in.rows[bb] = row_of(c, in.capacity, bb);
    for (int j = 0; j < in.rows[bb].cache_len; ++j) {
      if (!in.paged) {
        readable[size_t(in.rows[bb].slot) * in.slot_rows + j] = 1;
        continue;
      }
      int const page = c.page_table[size_t(bb) * c.pages_per_seq + j / in.page_size];
      if (page >= 0 && page < c.slots) readable[size_t(page) * in.slot_rows + j % in.page_size] = 1;
    }
  }
  for (size_t r = 0; r < readable.size(); ++r)
    if (!readable[r])
      for (int i = 0; i < hk * d; ++i) in.bk[r * hk * d + i] = in.bv[r * hk * d + i] = kNaN16;
  if (c.sinks) {
    std::uniform_real_distribution<float> sd(-2.f, 2.f);
    for (int h = 0; h < hq; ++h) in.sinks.push_back(sd(rng) + 3.f);
  }
  return in;
}

// float64 reference: row bb's keys are its cache keys [leftpad, cache_len) (paged: those on valid pages) then its
// appended keys, at mask positions j - leftpad with key length cache_len + sn - leftpad. out (b, lq, hq, d), lse
// (b, hq, lq); seen: whether the (b, i, h) row sees any key (else its output must be exactly 0).
struct Reference {
  std::vector<double> out, lse;
  std::vector<char> seen;
};
inline Reference reference(const Case& c, const Inputs& in, int d, float scale) {
  int const b = c.b, lq = c.lq, hq = c.hq, hk = c.hk, sn = c.seqlen_new, g = hq / hk;
  Reference ref;
  ref.out.assign(size_t(b) * lq * hq * d, 0.0);
  ref.lse.assign(size_t(b) * hq * lq, 0.0);
  ref.seen.assign(size_t(b) * lq * hq, 0);
  for (int bb = 0; bb < b; ++bb) {
    Row const r = in.rows[bb];
    int const skm = r.cache_len + sn - r.leftpad;
    std::vector<const float*> kr, vr;  // per visible key: k and v rows (head 0), and its mask position
    std::vector<int> pos;
    for (int j = r.leftpad; j < r.cache_len; ++j) {
      size_t row;
      if (in.paged) {
        int const page = c.page_table[size_t(bb) * c.pages_per_seq + j / in.page_size];
        if (page < 0 || page >= c.slots) continue;
        row = size_t(page) * in.slot_rows + j % in.page_size;
      } else {
        row = size_t(r.slot) * in.slot_rows + j;
      }
      kr.push_back(&in.fk[row * hk * d]);
      vr.push_back(&in.fv[row * hk * d]);
      pos.push_back(j - r.leftpad);
    }
    for (int t = 0; t < sn; ++t) {
      kr.push_back(&in.fkn[(size_t(bb) * sn + t) * hk * d]);
      vr.push_back(&in.fvn[(size_t(bb) * sn + t) * hk * d]);
      pos.push_back(r.cache_len + t - r.leftpad);
    }
    for (int h = 0; h < hq; ++h)
      for (int i = 0; i < lq; ++i) {
        const float* qi = &in.fq[((size_t(bb) * lq + i) * hq + h) * d];
        std::vector<double> s(kr.size(), -INFINITY);
        double m = -INFINITY;
        for (size_t j = 0; j < kr.size(); ++j) {
          if (!allowed(i, pos[j], lq, skm, c.wl, c.wr)) continue;
          const float* kj = kr[j] + size_t(h / g) * d;
          double acc = 0;
          for (int t = 0; t < d; ++t) acc += double(qi[t]) * kj[t];
          acc *= scale;
          if (c.softcap > 0) acc = c.softcap * std::tanh(acc / c.softcap);
          s[j] = acc;
          m = std::max(m, acc);
        }
        double const sink = in.sinks.empty() ? -INFINITY : double(in.sinks[h]);
        double* o = &ref.out[((size_t(bb) * lq + i) * hq + h) * d];
        double rl = sink;
        if (m != -INFINITY) {
          ref.seen[(size_t(bb) * lq + i) * hq + h] = 1;
          double const top = std::max(m, sink);
          double sum = std::exp(sink - top);
          for (size_t j = 0; j < kr.size(); ++j) {
            if (s[j] == -INFINITY) continue;
            double const pj = std::exp(s[j] - top);
            sum += pj;
            const float* vj = vr[j] + size_t(h / g) * d;
            for (int t = 0; t < d; ++t) o[t] += pj * vj[t];
          }
          for (int t = 0; t < d; ++t) o[t] /= sum;
          rl = top + std::log(sum);
        }
        ref.lse[(size_t(bb) * hq + h) * lq + i] = rl;
      }
  }
  return ref;
}

// The kernel's out (bits) and lse against the reference: non-finite outputs, nonzero outputs of rows that see no
// key and wrong infinite LSEs count as bad; tolerances a multiple of the low-precision rounding (bf16 / fp16).
struct Check {
  double max_err = 0, max_lse_err = 0;
  size_t nan_out = 0, bad_lse = 0;
  bool ok = false;
};
inline Check compare(DType dt, const Case& c, const Inputs& in, const Reference& ref, int d, const uint16_t* hout,
                     const float* hlse) {
  Check k;
  size_t const rows = size_t(c.b) * c.lq * c.hq;
  for (size_t r = 0; r < rows; ++r)
    for (int t = 0; t < d; ++t) {
      float const x = from_bits(hout[r * d + t], dt);
      if (!std::isfinite(x)) {
        ++k.nan_out;
        continue;
      }
      if (!ref.seen[r] && x != 0.f) ++k.nan_out;  // a row that sees no key: exactly 0
      k.max_err = std::max(k.max_err, std::fabs(x - ref.out[r * d + t]));
    }
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    double const rl = ref.lse[i];
    float const l = hlse[i];
    if (std::isinf(rl)) {
      if (!(l == float(rl))) ++k.bad_lse;
    } else if (!std::isfinite(l)) {
      ++k.bad_lse;
    } else {
      k.max_lse_err = std::max(k.max_lse_err, std::fabs(l - rl));
    }
  }
  double const tol = dt == DType::kBF16 ? 2.5e-2 : 4e-3;
  double const lse_tol = 2e-3 * std::log2(double(in.capacity + c.seqlen_new) + 2) + 1e-3;
  k.ok = k.nan_out == 0 && k.bad_lse == 0 && k.max_err <= tol && k.max_lse_err <= lse_tol;
  return k;
}

}  // namespace kvref

// Standalone test of the KV-cache forward (attn_params.h KVCacheSeqs): every compiled KV-cache instantiation, and head
// dims between them that the narrowest kernel holding them serves (fwd_kernel_dim), against a float64 host
// reference, on contiguous and paged caches (page sizes that are multiples of the key block, and ones whose key
// blocks span pages: TMA boxes inside pages or the producer's row gather) with appended k/v, leftpad, batch_idx,
// GQA, every mask kind, softcap and sinks, including hostile index arrays (cache_seqlens past the capacity or negative, batch_idx and page-table
// entries out of range, leftpad past the cache) whose results follow the kernel's documented clamping rule
// (seq_info.h KVCacheSeq; a page index out of range masks that page's keys). Exits nonzero on any
// failure. Meant to be run directly and under compute-sanitizer memcheck (the hostile cases exist for it).
//
//   fa3jax_test_kvcache          all cases, dynamic and static tile assignment
//   fa3jax_test_kvcache --quick  a few cases (racecheck / synccheck are slow)
//   fa3jax_test_kvcache --quiet  print failures and the summary only
//   fa3jax_test_kvcache --only S the cases whose name contains S (e.g. --only boxes, --only -long); each case is
//                                named ("run ...") before its launch, so a fault or a hang points at it
//   fa3jax_test_kvcache --gather  pages that split key blocks all through the producer's gather (no TMA boxes)
//
// Cache rows that no result may read hold NaN (rows at or past a sequence's cache length, pages no table entry
// names, the whole cache slot of no batch row), so a kernel that lets them into a result fails; guard bytes around
// out and lse must stay as they were.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kvcache_ref.h"

using fa3jax::DType;
using kvref::Case;
using kvref::dim_label;
using kvref::dt_name;
using kvref::random_pages;

namespace {
// --gather: pages that split key blocks all take the producer's gather, the TMA boxes' sizes too
// (FwdParams::gather_pages), to tell a fault of the boxes from one of the shared page handling.
bool g_gather_pages = false;
// fwd_kvcache_page_reads' values, as the verbose header names them.
const char* const kPageReads[3] = {"none (cases skipped)", "multiples of 8 rows", "any"};

// One case on one instantiation; `workspace` null: static tile assignment.
bool run_case(DType dt, int d, const Case& c, void* workspace, std::mt19937& rng, bool verbose) {
  int const bn = fa3jax::fwd_kvcache_block_n(dt, d);
  kvref::Inputs const in = kvref::make_inputs(dt, d, bn, c, rng);
  bool const paged = in.paged;
  int const page_size = in.page_size, slot_rows = in.slot_rows, capacity = in.capacity;
  int const b = c.b, lq = c.lq, hq = c.hq, hk = c.hk, sn = c.seqlen_new;

  Uploads up;
  Guarded out, lse;
  size_t const no = size_t(b) * lq * hq * d, nl = size_t(b) * hq * lq;
  out.alloc(no * 2);
  lse.alloc(nl * 4);
  fa3jax::FwdParams p;
  fa3jax::AttnCore& a = p.core;
  a.q = up.put(in.bq);
  a.k = up.put(in.bk);
  a.v = up.put(in.bv);
  a.batch = b;
  a.seqlen_q = lq;
  a.seqlen_k = capacity;
  a.num_heads_q = hq;
  a.num_heads_k = hk;
  a.head_dim = d;
  a.dtype = dt;
  a.softmax_scale = 1.f / std::sqrt(float(d));
  a.window_left = c.wl;
  a.window_right = c.wr;
  a.softcap = c.softcap;
  a.set_dense_strides();
  a.k_stride.batch = a.v_stride.batch = int64_t(slot_rows) * hk * d;  // one slot (cache row or page)
  a.kvcache.cache_seqlens = up.put(c.cache_seqlens);
  a.kvcache.leftpad = up.put(c.leftpad);
  a.kvcache.batch_idx = up.put(c.batch_idx);
  a.kvcache.cache_slots = c.slots;
  if (paged) {
    a.paged.block_table = up.put(c.page_table);
    a.paged.page_size = page_size;
    a.paged.max_pages_per_seq = c.pages_per_seq;
  }
  if (sn > 0) {
    a.append.k_new = up.put(in.bkn);
    a.append.v_new = up.put(in.bvn);
    a.append.seqlen_new = sn;
  }
  p.out = out.mid();
  p.lse = static_cast<float*>(lse.mid());
  p.sinks = up.put(in.sinks);
  p.workspace = workspace;
  p.pack_gqa = c.pack;
  p.gather_pages = g_gather_pages;
  bool const packed = fa3jax::fwd_kvcache_pack_gqa(p);
  // Split-KV parts: filled with NaN first, so a part some tile failed to write poisons the combined result.
  p.splits.num_splits = c.splits;
  void* split_ws = nullptr;
  if (size_t const bytes = fa3jax::fwd_splits_workspace_bytes(p)) {
    CK(cudaMalloc(&split_ws, bytes));
    CK(cudaMemset(split_ws, 0xff, bytes));
    fa3jax::fwd_splits_workspace(p, split_ws);
  }
  // Named before the launch: a case that faults (a sticky error ends the program in CK) or hangs is the last line.
  if (verbose)
    std::printf("run  %s d=%s %s%s\n", dt_name(dt), dim_label(dt, d).c_str(), c.name, workspace ? "" : " [static]");
  fa3jax::FwdStatus const st = fa3jax::run_fwd(p, nullptr);
  fa3jax::KVLoad const load = fa3jax::fwd_kvcache_load(p);
  std::string const mode_s = std::string(workspace ? "" : " [static]") + (packed ? " [packed]" : "") +
                             (c.splits > 1 ? " [splits=" + std::to_string(c.splits) + "]" : "") +
                             (load == fa3jax::KVLoad::kBoxes ? " [page boxes]" :
                              load == fa3jax::KVLoad::kGather ? " [page gather]" : "");
  char const* mode = mode_s.c_str();
  if (split_ws != nullptr) {
    CK(cudaDeviceSynchronize());
    CK(cudaFree(split_ws));
  }
  if (!st.ok()) {
    std::printf("FAIL %s d=%s %s%s: launch: %s (%s)\n", dt_name(dt), dim_label(dt, d).c_str(), c.name, mode, st.what,
                cudaGetErrorString(st.error));
    return false;
  }
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> hout(no);
  std::vector<float> hlse(nl);
  bool const guards = out.fetch(hout.data()) & lse.fetch(hlse.data());

  kvref::Reference const ref = kvref::reference(c, in, d, a.softmax_scale);
  kvref::Check const chk = kvref::compare(dt, c, in, ref, d, hout.data(), hlse.data());
  double const max_err = chk.max_err, max_lse_err = chk.max_lse_err;
  size_t const nan_out = chk.nan_out, bad_lse = chk.bad_lse;
  bool const ok = guards && chk.ok;
  if (!ok || verbose)
    std::printf("%s %s d=%-7s %-28s%s b=%d lq=%d hq=%d hk=%d %s cap=%d new=%d win=(%d,%d) softcap=%g%s: max|dO|=%.3g "
                "max|dLSE|=%.3g bad out=%zu bad lse=%zu guards %s\n",
                ok ? "ok  " : "FAIL", dt_name(dt), dim_label(dt, d).c_str(), c.name, mode, b, lq, hq, hk,
                paged ? ("paged(" + std::to_string(page_size) + ")").c_str() : "contiguous", capacity, sn, c.wl, c.wr,
                c.softcap, c.sinks ? " sinks" : "", max_err, max_lse_err, nan_out, bad_lse,
                guards ? "intact" : "OVERWRITTEN");
  return ok;
}

std::vector<Case> cases() {
  std::mt19937 rng(11);
  int const kMin = INT32_MIN, kMax = INT32_MAX;
  std::vector<Case> cs = {
      {"decode", 3, 1, 8, 2, 300, 3, 0, 0, 0, {1, 150, 300}, {}, {}, {}, -1, -1, 0.f, false},
      {"decode-append-causal", 2, 5, 4, 4, 512, 2, 0, 0, 5, {100, 0}, {}, {}, {}, -1, 0, 0.f, false},
      {"prefill-causal-mqa", 2, 200, 4, 1, 1000, 2, 0, 0, 0, {700, 333}, {}, {}, {}, -1, 0, 0.f, false},
      {"append-window-leftpad", 3, 3, 4, 2, 400, 3, 0, 0, 3, {250, 10, 397}, {30, 5, 0}, {}, {}, 64, 0, 0.f, false},
      {"softcap-sinks-causal", 2, 65, 4, 2, 256, 2, 0, 0, 0, {256, 129}, {}, {}, {}, -1, 0, 30.f, true},
      {"batch_idx-append", 3, 2, 6, 3, 260, 5, 0, 0, 2, {100, 200, 50}, {}, {4, 0, 2}, {}, -1, 0, 0.f, false},
      {"more-queries-than-keys", 1, 70, 2, 1, 128, 1, 0, 0, 0, {3}, {}, {}, {}, -1, 0, 0.f, false},
      {"empty-cache+sinks", 2, 4, 2, 2, 64, 2, 0, 0, 0, {0, 0}, {}, {}, {}, -1, -1, 0.f, true},
      {"window(20,10)-append", 2, 40, 4, 2, 500, 2, 0, 0, 40, {300, 41}, {}, {}, {}, 20, 10, 0.f, false},
      {"hostile-contiguous", 4, 3, 4, 2, 200, 3, 0, 0, 1, {-5, 1 << 30, kMin, 77}, {-3, 1 << 30, 5, kMin},
       {-1, 7, kMax, 1}, {}, -1, 0, 0.f, false},
      {"hostile-extremes", 3, 2, 2, 1, 130, 2, 0, 0, 0, {kMax, kMin, 129}, {kMax, 0, kMax}, {kMin, kMax, -1}, {},
       -1, -1, 5.f, false},
  };
  // Paged (page_mult x the key block per page).
  Case p1{"paged-decode-causal", 3, 4, 8, 2, 0, 10, 1, 4, 0, {300, 512, 0}, {}, {}, {}, -1, 0, 0.f, false};
  p1.page_table = random_pages(3, 4, 10, rng);
  Case p2{"paged-append-hostile", 3, 3, 4, 2, 0, 6, 1, 5, 3, {600, 200, -1}, {}, {}, {}, 100, 0, 0.f, true};
  p2.page_table = random_pages(3, 5, 6, rng);
  p2.page_table[1] = -1;
  p2.page_table[5] = 6;       // == num_pages
  p2.page_table[6] = kMax;
  p2.page_table[12] = kMin;
  Case p3{"paged-2blocks-prefill-full", 2, 130, 4, 4, 0, 5, 2, 2, 0, {400, 257}, {}, {}, {}, -1, -1, 0.f, false};
  p3.page_table = random_pages(2, 2, 5, rng);
  Case p4{"paged-shared-pages-softcap", 2, 1, 4, 1, 0, 3, 1, 3, 1, {250, 383}, {}, {}, {}, -1, -1, 15.f, false};
  p4.page_table = {2, 0, 1, 2, 0, 1};  // two rows sharing pages (a shared prefix)
  cs.push_back(p1);
  cs.push_back(p2);
  cs.push_back(p3);
  cs.push_back(p4);

  // Split-KV (parts of each row's key blocks, combined by LSE) and GQA packing (the heads of one kv head in one
  // tile). Case fields after `sinks`: splits, pack (-1: the policy's choice, which packs the decode-like ones).
  auto with = [](Case c, const char* name, int splits, int pack) {
    c.name = name;
    c.splits = splits;
    c.pack = pack;
    return c;
  };
  cs.push_back({"split2-decode-gqa", 3, 1, 8, 2, 1000, 3, 0, 0, 0, {1, 500, 1000}, {}, {}, {}, -1, -1, 0.f, false, 2});
  cs.push_back({"split3-append-leftpad-causal", 3, 3, 4, 2, 700, 3, 0, 0, 3, {650, 10, 300}, {30, 5, 0}, {}, {}, -1,
                0, 0.f, false, 3});
  cs.push_back({"split7-prefill-causal-sinks", 2, 150, 4, 2, 1200, 2, 0, 0, 0, {1100, 260}, {}, {}, {}, -1, 0, 0.f,
                true, 7});
  // More parts than key blocks (3 cache blocks + 1 appended), an empty row, sinks: most parts see no key.
  cs.push_back({"splits>blocks-empty-row-sinks", 3, 2, 4, 4, 300, 3, 0, 0, 1, {0, 5, 299}, {}, {}, {}, -1, 0, 0.f,
                true, 16});
  cs.push_back({"split3-all-rows-empty-sinks", 2, 4, 4, 2, 256, 2, 0, 0, 0, {0, 0}, {}, {}, {}, -1, -1, 0.f, true,
                3});
  cs.push_back({"split3-hostile-contiguous", 4, 3, 4, 2, 600, 3, 0, 0, 1, {-5, 1 << 30, kMin, 377},
                {-3, 1 << 30, 5, kMin}, {-1, 7, kMax, 1}, {}, -1, 0, 0.f, true, 3});
  cs.push_back({"split5-window(20,10)-softcap", 2, 40, 4, 2, 900, 2, 0, 0, 40, {800, 41}, {}, {}, {}, 20, 10, 30.f,
                false, 5});
  Case s7 = with(p2, "split7-paged-append-hostile", 7, -1);
  cs.push_back(s7);
  Case s4 = with(p1, "split4-paged-decode-causal", 4, -1);
  cs.push_back(s4);
  // Packing: forced on a tile that holds more than one query tile's rows (40 x 4 = 160 packed rows: two tiles),
  // forced off on decode (the unpacked path), with sinks per packed row's head, and combined with splits.
  cs.push_back({"pack-forced-2tiles-window-append", 2, 40, 8, 2, 500, 2, 0, 0, 40, {300, 41}, {}, {}, {}, 20, 10,
                0.f, true, 1, 1});
  cs.push_back({"pack-off-decode-gqa", 3, 1, 8, 2, 300, 3, 0, 0, 0, {1, 150, 300}, {}, {}, {}, -1, -1, 0.f, true, 1,
                0});
  cs.push_back({"pack-decode-g16-softcap-sinks", 2, 3, 32, 2, 640, 2, 0, 0, 1, {639 - 1, 77}, {}, {}, {}, -1, 0, 20.f,
                true});
  cs.push_back({"pack-split6-decode-g8-sinks", 3, 2, 16, 2, 2000, 3, 0, 0, 0, {1999, 3, 1024}, {}, {}, {}, -1, 0,
                0.f, true, 6});
  cs.push_back({"pack-forced-split2-mqa-prefill", 2, 33, 4, 1, 700, 2, 0, 0, 0, {650, 130}, {}, {}, {}, -1, 0, 0.f,
                false, 2, 1});

  // Page sizes that are not multiples of the key block (128; 80 at d=256), so that key blocks span pages: multiples
  // of 8 rows read per TMA box inside a page (8, 16, 64, 200, 264; 256 at d=256), others gathered by the producer
  // (1, 3, 12, 100, 300). Hostile entries (negative, == num_pages, INT32_MAX / MIN) sit inside rows' cache lengths,
  // so their pages' columns must be masked inside a block that also holds valid pages.
  auto paged = [&](const char* name, int ps, int b, int lq, int hq, int hk, int pps, int num_pages, int sn,
                   std::vector<int> seqlens, int wl, int wr, float softcap, bool sinks, int splits,
                   std::vector<int> hostile) {
    Case c{name, b, lq, hq, hk, 0, num_pages, 0, pps, sn, std::move(seqlens), {}, {}, {}, wl, wr, softcap, sinks,
           splits};
    c.page_rows = ps;
    c.page_table = random_pages(b, pps, num_pages, rng);
    int const bad[4] = {-1, num_pages, kMax, kMin};
    for (size_t i = 0; i < hostile.size(); ++i) c.page_table[size_t(hostile[i])] = bad[i % 4];
    return c;
  };
  cs.push_back(paged("page1-gather-decode-gqa", 1, 2, 1, 8, 2, 300, 700, 0, {299, 77}, -1, -1, 0.f, false, 1,
                     {5, 130, 131, 300 + 40}));
  cs.push_back(paged("page3-gather-append-causal-hostile", 3, 3, 4, 4, 2, 90, 200, 4, {250, 100, 266}, -1, 0, 0.f,
                     false, 1, {0, 41, 42, 90 + 10, 180 + 87}));
  cs.push_back(paged("page8-boxes-window-sinks-hostile", 8, 2, 20, 4, 4, 40, 90, 20, {300, 33}, 50, 0, 0.f, true, 1,
                     {3, 17, 40 + 2}));
  cs.push_back(paged("page12-gather-softcap", 12, 2, 3, 6, 3, 25, 60, 0, {290, 150}, -1, -1, 20.f, false, 1, {}));
  cs.push_back(paged("page16-boxes-prefill-causal-hostile", 16, 2, 150, 4, 2, 20, 45, 0, {319, 170}, -1, 0, 0.f,
                     false, 1, {1, 9, 20 + 4}));
  cs.push_back(paged("page64-boxes-split3-append-hostile", 64, 3, 2, 8, 2, 6, 20, 2, {380, 5, 200}, -1, 0, 0.f, true,
                     3, {1, 6 + 0, 12 + 2}));
  cs.push_back(paged("page100-gather-append-window", 100, 2, 5, 4, 2, 4, 9, 5, {390, 101}, 64, 3, 0.f, false, 1,
                     {4 + 1}));
  cs.push_back(paged("page200-boxes-decode-hostile", 200, 2, 1, 4, 1, 3, 7, 1, {590, 201}, -1, 0, 0.f, false, 1,
                     {1, 3 + 0}));
  cs.push_back(paged("page256-decode-split2", 256, 2, 1, 8, 2, 3, 7, 0, {700, 257}, -1, -1, 0.f, true, 2, {}));
  cs.push_back(paged("page264-boxes-prefill-sinks", 264, 2, 70, 4, 2, 3, 7, 0, {792, 265}, -1, 0, 0.f, true, 1, {}));
  cs.push_back(paged("page300-gather-split2-hostile", 300, 3, 3, 4, 2, 3, 8, 3, {850, 1, 300}, -1, 0, 0.f, false, 2,
                     {1, 3 + 0, 6 + 0}));

  // Long rows (>= 13 key blocks of the d=256 kernel's 80 keys) in the shapes of tests/test_cuda_backend.py's KV_CASES
  // that failed at d=256 (RESULTS.md): paged-2blocks-prefill (130 unpacked queries, softcap, every block visible),
  // paged-append-batch_idx-rotary (packed queries, window (100, 0), sinks, appended keys, so the first block visited
  // is an appended one) and paged-decode (no appended keys: a gathered tile's first block is a cache block).
  cs.push_back(paged("page256-boxes-prefill-long", 256, 2, 130, 4, 4, 5, 11, 0, {1100, 517}, -1, -1, 10.f, false, 1,
                     {}));
  cs.push_back(paged("page256-boxes-prefill-jax", 256, 2, 130, 4, 4, 4, 9, 0, {909, 517}, -1, -1, 10.f, false, 1,
                     {}));  // the JAX case's own shape and lengths
  cs.push_back(paged("page264-boxes-prefill-long", 264, 2, 130, 4, 4, 4, 9, 0, {837, 1056}, -1, -1, 10.f, false, 1,
                     {}));
  cs.push_back(paged("page256-boxes-append-window-sinks", 256, 3, 3, 4, 2, 4, 21, 3, {107, 152, 881}, 100, 0, 0.f,
                     true, 1, {}));
  cs.push_back(paged("page264-boxes-append-window-sinks", 264, 3, 3, 4, 2, 4, 21, 3, {662, 885, 153}, 100, 0, 0.f,
                     true, 1, {}));
  cs.push_back(paged("page256-boxes-decode-long", 256, 3, 4, 8, 2, 4, 13, 0, {784, 361, 1024}, -1, 0, 0.f, false, 1,
                     {}));
  cs.push_back(paged("page264-boxes-hostile-long", 264, 3, 2, 4, 2, 4, 13, 2, {2056, -7, 934}, -1, 0, 0.f, false, 1,
                     {1, 4 + 0, 8 + 2, 2, 4 + 1}));
  cs.push_back(paged("page12-gather-prefill-long", 12, 2, 130, 4, 4, 100, 201, 0, {1100, 309}, -1, -1, 10.f, false, 1,
                     {}));
  cs.push_back(paged("page100-gather-prefill-long", 100, 2, 130, 4, 4, 12, 25, 0, {1100, 328}, -1, -1, 10.f, false, 1,
                     {}));
  cs.push_back(paged("page300-gather-prefill-long", 300, 2, 130, 4, 4, 4, 9, 0, {616, 1190}, -1, -1, 10.f, false, 1,
                     {}));
  cs.push_back(paged("page12-gather-decode-long", 12, 3, 4, 8, 2, 90, 271, 0, {235, 1079, 118}, -1, 0, 0.f, false, 1,
                     {}));
  cs.push_back(paged("page300-gather-append-window-sinks", 300, 3, 3, 4, 2, 4, 21, 3, {1167, 37, 676}, 100, 0, 0.f,
                     true, 1, {}));
  // The same prefill on pages of whole key blocks (2 x the key block, 7 per row: 14 blocks), the one-TMA-per-block
  // path, as the control.
  Case pl{"paged-prefill-long-whole-blocks", 2, 130, 4, 4, 0, 15, 2, 7, 0, {1100, 517}, {}, {}, {}, -1, -1, 10.f,
          false};
  pl.page_table = random_pages(2, 7, 15, rng);
  cs.push_back(pl);
  return cs;
}

// The split and packing rules (fwd_kvcache_num_splits, fwd_kvcache_pack_gqa) on a few shapes: host only.
int check_rules(DType dt, int d, int& runs) {
  int failures = 0;
  auto make = [&](int b, int lq, int hq, int hk, int cap, int sn) {
    fa3jax::FwdParams p;
    fa3jax::AttnCore& a = p.core;
    a.batch = b; a.seqlen_q = lq; a.num_heads_q = hq; a.num_heads_k = hk; a.seqlen_k = cap; a.head_dim = d;
    a.dtype = dt;
    if (sn > 0) {
      a.append.k_new = a.append.v_new = &a;
      a.append.seqlen_new = sn;
    }
    return p;
  };
  int const bn = fa3jax::fwd_kvcache_block_n(dt, d), bm = fa3jax::fwd_kvcache_block_m(dt, d);
  auto expect = [&](bool ok, const char* what) {
    ++runs;
    if (!ok) {
      std::printf("FAIL %s d=%s rule: %s\n", dt_name(dt), dim_label(dt, d).c_str(), what);
      ++failures;
    }
  };
  int const sms = 132;
  // Batch-1 decode over a long cache leaves most SMs idle: split; a full grid does not.
  int const s_auto = fa3jax::fwd_kvcache_num_splits(make(1, 1, 32, 8, 8192, 0), 0, sms);
  expect(s_auto > 1 && s_auto <= fa3jax::kMaxSplits && s_auto <= 8192 / bn, "batch-1 decode over 8k keys splits");
  expect(fa3jax::fwd_kvcache_num_splits(make(64, 1, 32, 8, 8192, 0), 0, sms) == 1, "a full grid does not split");
  expect(fa3jax::fwd_kvcache_num_splits(make(1, 1, 32, 8, bn, 0), 0, sms) == 1, "one key block does not split");
  expect(fa3jax::fwd_kvcache_num_splits(make(1, 1, 32, 8, 8192, 0), 1, sms) == 1, "num_splits=1 is kept");
  expect(fa3jax::fwd_kvcache_num_splits(make(1, 1, 32, 8, 3 * bn, 2), 1000, sms) == 4,
         "a request is capped at the key blocks (3 cache + 1 appended)");
  expect(fa3jax::fwd_kvcache_num_splits(make(1, 1, 32, 8, 1 << 20, 0), 1000, sms) == fa3jax::kMaxSplits,
         "a request is capped at kMaxSplits");
  for (int b : {1, 2, 4, 8, 16})
    for (int cap : {bn, 1000, 4096, 32768}) {
      int const s = fa3jax::fwd_kvcache_num_splits(make(b, 1, 16, 2, cap, 0), 0, sms);
      expect(s >= 1 && s <= (cap + bn - 1) / bn, "auto splits within [1, key blocks]");
    }
  expect(fa3jax::fwd_kvcache_pack_gqa(make(2, 1, 32, 8, 512, 0)), "GQA decode packs");
  expect(fa3jax::fwd_kvcache_pack_gqa(make(2, bm / 4, 32, 8, 512, 0)), "a full packed tile packs");
  expect(!fa3jax::fwd_kvcache_pack_gqa(make(2, bm / 4 + 1, 32, 8, 512, 0)), "more rows than a tile do not pack");
  expect(!fa3jax::fwd_kvcache_pack_gqa(make(2, 1, 8, 8, 512, 0)), "MHA does not pack");
  fa3jax::FwdParams off = make(2, 1, 32, 8, 512, 0);
  off.pack_gqa = 0;
  expect(!fa3jax::fwd_kvcache_pack_gqa(off), "pack_gqa=0 does not pack");
  return failures;
}

// Parameters the KV-cache forward must refuse, not launch: every refusal is a fwd_check message.
int check_refusals(DType dt, int d, void* buf, int& runs) {
  int failures = 0;
  int const bn = fa3jax::fwd_kvcache_block_n(dt, d);
  int seqlens[2] = {0, 0};
  auto base = [&]() {
    fa3jax::FwdParams p;
    fa3jax::AttnCore& a = p.core;
    a.batch = 2; a.seqlen_q = 4; a.seqlen_k = 4 * bn; a.num_heads_q = a.num_heads_k = 2; a.head_dim = d;
    a.dtype = dt;
    a.set_dense_strides();
    a.k_stride.batch = a.v_stride.batch = int64_t(bn) * 2 * d;  // paged below: one page of bn rows
    a.q = a.k = a.v = p.out = buf;
    p.lse = static_cast<float*>(buf);
    a.kvcache.cache_seqlens = seqlens;
    a.kvcache.cache_slots = 3;
    a.paged.block_table = seqlens;
    a.paged.page_size = bn;
    a.paged.max_pages_per_seq = 4;
    return p;
  };
  struct R {
    const char* what;
    void (*edit)(fa3jax::FwdParams&);
  };
  const R refusals[] = {
      {"page size 0", [](fa3jax::FwdParams& p) { p.core.paged.page_size = 0; }},
      {"capacity != pages x page size", [](fa3jax::FwdParams& p) { p.core.seqlen_k += 1; }},
      {"split K/V without its buffers", [](fa3jax::FwdParams& p) { p.splits.num_splits = 2; }},
      {"num_splits above kMaxSplits",
       [](fa3jax::FwdParams& p) {
         p.splits.num_splits = fa3jax::kMaxSplits + 1;
         p.splits.out_accum = p.splits.lse_accum = static_cast<float*>(const_cast<void*>(p.core.q));
       }},
      {"misaligned out_accum",
       [](fa3jax::FwdParams& p) {
         p.splits.num_splits = 2;
         p.splits.lse_accum = static_cast<float*>(const_cast<void*>(p.core.q));
         p.splits.out_accum = p.splits.lse_accum + 1;
       }},
      {"no cache slots", [](fa3jax::FwdParams& p) { p.core.kvcache.cache_slots = 0; }},
      {"slots not packed", [](fa3jax::FwdParams& p) { p.core.k_stride.batch += 8; }},
      {"seqlen_new > capacity",
       [](fa3jax::FwdParams& p) {
         p.core.append.k_new = p.core.append.v_new = p.core.q;
         p.core.append.seqlen_new = p.core.seqlen_k + 1;
       }},
      {"MLA cache", [](fa3jax::FwdParams& p) { p.core.head_dim_v = p.core.head_dim / 2; }},
      {"head_dim not a multiple of 8", [](fa3jax::FwdParams& p) { p.core.head_dim -= 4; }},
      {"head_dim above every kernel", [](fa3jax::FwdParams& p) { p.core.head_dim = 264; }},
  };
  ++runs;
  if (const char* msg = fa3jax::fwd_check(base())) {
    std::printf("FAIL %s d=%s valid KV-cache params refused: %s\n", dt_name(dt), dim_label(dt, d).c_str(), msg);
    ++failures;
  }
  // Every page size the kernel reads (fwd_kvcache_page_served; the others refused): the whole-block TMA path for multiples of the key block, boxes of gcd(page size, key block) rows for
  // multiples of 8, the gather otherwise (fwd_kvcache_load, fwd_kvcache_box_rows).
  for (int ps : {1, 3, 8, 12, 16, 40, 64, 100, 200, 264, 300, bn, 2 * bn, 3 * bn}) {
    fa3jax::FwdParams p = base();
    p.core.paged.page_size = ps;
    p.core.seqlen_k = 4 * ps;
    p.core.k_stride.batch = p.core.v_stride.batch = int64_t(ps) * 2 * d;
    fa3jax::KVLoad const want = ps % bn == 0 ? fa3jax::KVLoad::kBlocks
                                : ps % 8 == 0 ? fa3jax::KVLoad::kBoxes : fa3jax::KVLoad::kGather;
    if (!fa3jax::fwd_kvcache_page_served(dt, d, ps)) {  // refused, not launched
      ++runs;
      if (want == fa3jax::KVLoad::kBlocks || fa3jax::fwd_check(p) == nullptr) {
        std::printf("FAIL %s d=%s page_size %d: not served, yet %s\n", dt_name(dt), dim_label(dt, d).c_str(), ps,
                    want == fa3jax::KVLoad::kBlocks ? "whole key blocks" : "accepted");
        ++failures;
      }
      continue;
    }
    int g = ps, h = bn;  // gcd, the box rows kBoxes must use
    while (h != 0) { int const t = g % h; g = h; h = t; }
    runs += 3;
    const char* msg = fa3jax::fwd_check(p);
    bool const bad_box = want == fa3jax::KVLoad::kBoxes &&
                         (fa3jax::fwd_kvcache_box_rows(ps, bn) != g || g % 8 != 0 || bn % g != 0 || ps % g != 0);
    if (msg != nullptr || fa3jax::fwd_kvcache_load(p) != want || bad_box) {
      std::printf("FAIL %s d=%s page_size %d: %s, load %d (want %d), box rows %d\n", dt_name(dt),
                  dim_label(dt, d).c_str(), ps, msg ? msg : "accepted", int(fa3jax::fwd_kvcache_load(p)), int(want),
                  fa3jax::fwd_kvcache_box_rows(ps, bn));
      ++failures;
    }
    // gather_pages: the gather for every page size that splits key blocks, whole-block pages unchanged
    fa3jax::FwdParams gp = p;
    gp.gather_pages = true;
    ++runs;
    if (fa3jax::fwd_kvcache_load(gp) != (want == fa3jax::KVLoad::kBlocks ? want : fa3jax::KVLoad::kGather)) {
      std::printf("FAIL %s d=%s page_size %d: gather_pages gives load %d\n", dt_name(dt), dim_label(dt, d).c_str(),
                  ps, int(fa3jax::fwd_kvcache_load(gp)));
      ++failures;
    }
  }
  {  // a contiguous cache always takes the whole-block path
    fa3jax::FwdParams p = base();
    p.core.paged = {};
    ++runs;
    if (fa3jax::fwd_kvcache_load(p) != fa3jax::KVLoad::kBlocks) {
      std::printf("FAIL %s d=%s contiguous cache not on the whole-block path\n", dt_name(dt), dim_label(dt, d).c_str());
      ++failures;
    }
  }
  for (R const& r : refusals) {
    fa3jax::FwdParams p = base();
    r.edit(p);
    ++runs;
    if (fa3jax::fwd_check(p) == nullptr) {
      std::printf("FAIL %s d=%s accepted: %s\n", dt_name(dt), dim_label(dt, d).c_str(), r.what);
      ++failures;
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  bool quick = false, verbose = true;
  const char* only = nullptr;  // --only SUBSTR: the cases whose name contains SUBSTR (rules and refusals skipped)
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--quick")) quick = true;
    else if (!std::strcmp(argv[i], "--quiet")) verbose = false;
    else if (!std::strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
    else if (!std::strcmp(argv[i], "--gather")) g_gather_pages = true;
    else {
      std::fprintf(stderr, "unknown argument %s\n", argv[i]);
      return 2;
    }
  }
  if (!device_is_sm90("compiled", fa3jax::fwd_compiled_list())) return 3;
  void* workspace = nullptr;
  CK(cudaMalloc(&workspace, 4096));
  std::vector<Case> const cs = cases();
  std::mt19937 rng(4321);
  int failures = 0, runs = 0;
  for (DType dt : {DType::kBF16, DType::kFP16})
    // The instances' own head dims, then narrower multiples of 8 that a wider kernel serves (its TMA loads
    // zero-filling the columns past d, its output store clipping them).
    for (int d : {64, 128, 256, 40, 96, 200}) {
      if (!fa3jax::fwd_kvcache_compiled(dt, d)) continue;
      if (verbose)
        std::printf("%s d=%s: key block %d, pages that split key blocks: %s\n", dt_name(dt), dim_label(dt, d).c_str(),
                    fa3jax::fwd_kvcache_block_n(dt, d),
                    kPageReads[fa3jax::fwd_kvcache_page_reads(dt, d)]);
      for (size_t i = 0; i < cs.size(); ++i) {
        // --quick: append with leftpad, the hostile contiguous case and the hostile paged one, split ones with
        // hostile indices (contiguous, paged) and packing with splits.
        std::string const name = cs[i].name;
        bool const in_quick = i == 3 || i == 9 || i == 12 || name == "split3-hostile-contiguous" ||
                              name == "split7-paged-append-hostile" || name == "pack-split6-decode-g8-sinks" ||
                              name == "page3-gather-append-causal-hostile" ||
                              name == "page8-boxes-window-sinks-hostile" || name == "page300-gather-split2-hostile";
        if (quick && !in_quick) continue;
        if (only != nullptr && name.find(only) == std::string::npos) continue;
        // Page sizes the kernel does not read: check_refusals checks the refusal.
        if (cs[i].page_rows > 0 && !fa3jax::fwd_kvcache_page_served(dt, d, cs[i].page_rows, g_gather_pages)) continue;
        for (void* ws : {workspace, static_cast<void*>(nullptr)}) {
          ++runs;
          if (!run_case(dt, d, cs[i], ws, rng, verbose)) ++failures;
        }
      }
      if (only != nullptr) continue;
      failures += check_refusals(dt, d, workspace, runs);
      failures += check_rules(dt, d, runs);
    }
  if (runs == 0) std::printf("FAIL no KV-cache forward compiled\n");
  CK(cudaFree(workspace));
  std::printf("%d/%d passed\n", runs - failures, runs);
  return failures == 0 && runs > 0 ? 0 : 1;
}

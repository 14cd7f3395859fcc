// Reproducer of the flaky CUDA_ERROR_ILLEGAL_ADDRESS of the paged KV-cache forward (benchmarks/RESULTS.md, session
// 16): the shapes of the JAX tests that faulted (test_kvcache_matches_xla[paged-2blocks-prefill-page264] with page
// boxes, paged-hostile-page256 with whole-block loads and hostile page-table entries; page264 and a contiguous
// cache of the same shape as controls), launched many times on several streams at once, each call with its own
// caches placed at the start or at the end of a mapping of their own, with unmapped address space on both sides, so
// that a read outside a cache (or a TMA descriptor whose base lies outside it, see --place) faults instead of landing
// in a neighbour; every output is checked against the float64 reference (kvcache_ref.h).
//
//   fa3jax_test_kvcache_repro [--iters N] [--streams S] [--place start|end|mixed] [--alloc vmm|malloc]
//                             [--only SUBSTR] [--gather] [--static] [--quiet]
//   --iters N     rounds (default 40); each round launches one call per stream, then checks them all
//   --streams S   concurrent streams (default 4), each call with buffers of its own
//   --place       start: each cache begins its mapping (unmapped VA right before it, at least the cache's size);
//                 end: each cache ends its mapping (unmapped VA right after it; mapped memory before it, at least
//                 its size); mixed (default): alternate per call
//   --alloc       vmm (default): cuMemAddressReserve/cuMemCreate/cuMemMap with unmapped guards; malloc: one
//                 cudaMalloc per cache, the cache at its start or end (a neighbour may still be mapped)
//   --only S      the cases whose name contains S;  --gather: page sizes that split key blocks via the gather;
//   --static      static tile assignment (no tile counter);  --quiet: failures and the summary only
//
// Exit status 0 when every call matched; a fault ends the program in CK with the last "launch" lines naming the
// calls in flight. Under compute-sanitizer use few iterations (e.g. --iters 3 --streams 2).
#include <cuda.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kvcache_ref.h"

using fa3jax::DType;
using kvref::Case;

namespace {

// Driver entry points through the runtime (the test links no libcuda).
struct Driver {
  decltype(&cuMemAddressReserve) reserve = nullptr;
  decltype(&cuMemAddressFree) free_va = nullptr;
  decltype(&cuMemCreate) create = nullptr;
  decltype(&cuMemRelease) release = nullptr;
  decltype(&cuMemMap) map = nullptr;
  decltype(&cuMemUnmap) unmap = nullptr;
  decltype(&cuMemSetAccess) set_access = nullptr;
  decltype(&cuMemGetAllocationGranularity) granularity = nullptr;
  size_t gran = 0;
  int device = 0;
};
Driver g_drv;

template <class F>
void load(F& f, const char* name) {
  cudaDriverEntryPointQueryResult q;
  void* p = nullptr;
  CK(cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q));
  if (p == nullptr || q != cudaDriverEntryPointSuccess) {
    std::fprintf(stderr, "driver entry point %s not found\n", name);
    std::exit(2);
  }
  f = reinterpret_cast<F>(p);
}

#define CU(x)                                                                              \
  do {                                                                                     \
    CUresult r_ = (x);                                                                     \
    if (r_ != CUDA_SUCCESS) {                                                              \
      std::fprintf(stderr, "CUDA driver error %d at %s:%d: %s\n", int(r_), __FILE__, __LINE__, #x); \
      std::exit(2);                                                                        \
    }                                                                                      \
  } while (0)

void init_driver() {
  CK(cudaFree(nullptr));  // the primary context
  CK(cudaGetDevice(&g_drv.device));
  load(g_drv.reserve, "cuMemAddressReserve");
  load(g_drv.free_va, "cuMemAddressFree");
  load(g_drv.create, "cuMemCreate");
  load(g_drv.release, "cuMemRelease");
  load(g_drv.map, "cuMemMap");
  load(g_drv.unmap, "cuMemUnmap");
  load(g_drv.set_access, "cuMemSetAccess");
  load(g_drv.granularity, "cuMemGetAllocationGranularity");
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = g_drv.device;
  CU(g_drv.granularity(&g_drv.gran, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM));
}

size_t round_up(size_t x, size_t g) { return (x + g - 1) / g * g; }

enum class Place { kStart, kEnd };
enum class Alloc { kVmm, kMalloc };

// One device buffer of `bytes` placed at the start or end of memory of its own. vmm: a reservation of [guard |
// mapped | guard] where guard >= max(bytes, granularity) stays unmapped; start: the buffer opens `mapped`; end: it
// closes it, and `mapped` holds at least 2 x bytes, so that the bytes before it (as far back as the buffer is long:
// the TMA views' base moved back by all their rows, launch.h rows_before) are mapped. malloc: a cudaMalloc of
// 2 x bytes, the buffer at its start or end.
struct Placed {
  Alloc alloc = Alloc::kVmm;
  CUdeviceptr va = 0;
  size_t reserved = 0, mapped = 0, guard = 0;
  CUmemGenericAllocationHandle handle = 0;
  void* base = nullptr;  // malloc
  void* ptr = nullptr;

  void make(size_t bytes, Place place, Alloc how, const void* host) {
    alloc = how;
    if (how == Alloc::kMalloc) {
      CK(cudaMalloc(&base, 2 * bytes));
      ptr = place == Place::kStart ? base : static_cast<char*>(base) + bytes;
    } else {
      size_t const g = g_drv.gran;
      guard = round_up(std::max(bytes, g), g);
      mapped = round_up(place == Place::kStart ? bytes : 2 * bytes, g);
      reserved = guard + mapped + guard;
      CU(g_drv.reserve(&va, reserved, g, 0, 0));
      CUmemAllocationProp prop{};
      prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
      prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
      prop.location.id = g_drv.device;
      CU(g_drv.create(&handle, mapped, &prop, 0));
      CU(g_drv.map(va + guard, mapped, 0, handle, 0));
      CUmemAccessDesc acc{};
      acc.location = prop.location;
      acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      CU(g_drv.set_access(va + guard, mapped, &acc, 1));
      // 16-byte aligned either way: bytes is a multiple of 16 (rows of d >= 8 16-bit elements)
      CUdeviceptr const p = place == Place::kStart ? va + guard : va + guard + mapped - bytes;
      ptr = reinterpret_cast<void*>(p);
      CK(cudaMemset(reinterpret_cast<void*>(va + guard), 0xff, mapped));  // NaN-like fill around the buffer
    }
    CK(cudaMemcpy(ptr, host, bytes, cudaMemcpyHostToDevice));
  }
  void release() {
    if (alloc == Alloc::kMalloc) {
      if (base) CK(cudaFree(base));
    } else if (va) {
      CU(g_drv.unmap(va + guard, mapped));
      CU(g_drv.release(handle));
      CU(g_drv.free_va(va, reserved));
    }
    *this = Placed{};
  }
};

// The cases, for a kernel of key block bn (128 at d=64 and d=128). Inputs come from tests/test_cuda_backend.py's
// KV_CASES (numpy's draws differ: the lengths are fixed here, and cover a last block that spans pages and runs past
// the last page).
std::vector<Case> repro_cases(std::mt19937& rng) {
  int const kMin = INT32_MIN, kMax = INT32_MAX;
  std::vector<Case> cs;
  auto paged = [&](const char* name, int ps, int b, int lq, int hq, int hk, int pps, int num_pages, int sn,
                   std::vector<int> seqlens, int wl, int wr, float softcap) {
    Case c{name, b, lq, hq, hk, 0, num_pages, 0, pps, sn, std::move(seqlens), {}, {}, {}, wl, wr, softcap, false};
    c.page_rows = ps;
    c.page_table = kvref::random_pages(b, pps, num_pages, rng);
    return c;
  };
  // paged-2blocks-prefill-page264: (2, 130, 4, 4), 4 pages of 264 per row, 9 pages, softcap 10, not causal; boxes
  // of gcd(264, 128) = 8 rows. Lengths: the last block 1024..1151 with 32 valid rows on page 3 and 96 past the last
  // page (row 0), a block that ends mid-page (row 1); then a row with every page full.
  cs.push_back(paged("jax-paged-2blocks-prefill-page264-a", 264, 2, 130, 4, 4, 4, 9, 0, {1056, 837}, -1, -1, 10.f));
  cs.push_back(paged("jax-paged-2blocks-prefill-page264-b", 264, 2, 130, 4, 4, 4, 9, 0, {263, 1025}, -1, -1, 10.f));
  // paged-hostile-page256 / page264: (3, 2, 4, 2), 2 appended keys, causal, 4 pages per row, 13 pages; entries -1,
  // num_pages, INT32_MAX, INT32_MIN, -5 where the JAX test puts them; cache_seqlens capacity + 1000 and -7 (clamped).
  for (int ps : {256, 264}) {
    Case c = paged(ps == 256 ? "jax-paged-hostile-page256" : "jax-paged-hostile-page264", ps, 3, 2, 4, 2, 4, 13, 2,
                   {4 * ps + 1000, -7, 3 * ps - 17}, -1, 0, 0.f);
    c.page_table[0 * 4 + 1] = -1;
    c.page_table[1 * 4 + 0] = 13;
    c.page_table[2 * 4 + 2] = kMax;
    c.page_table[0 * 4 + 3] = kMin;
    c.page_table[2 * 4 + 1] = -5;
    cs.push_back(c);
  }
  // Whole-block pages without hostile entries (the kBlocks path alone) and the contiguous cache of the page264 shape:
  // controls (both read through the same moved-back TMA views).
  cs.push_back(paged("paged-prefill-page256", 256, 2, 130, 4, 4, 4, 9, 0, {1000, 517}, -1, -1, 10.f));
  cs.push_back({"contiguous-prefill-1056", 2, 130, 4, 4, 1056, 2, 0, 0, 0, {1056, 837}, {}, {}, {}, -1, -1, 10.f,
                false});
  return cs;
}

// One call's device buffers (caches placed, the rest plain cudaMalloc) and its parameters.
struct Call {
  int case_idx = -1;
  Place place = Place::kStart;
  Placed k, v, kn, vn;
  Uploads up;
  Guarded out, lse;
  fa3jax::FwdParams p;
};

struct Prepared {
  Case c;
  DType dt;
  int d;
  kvref::Inputs in;
  kvref::Reference ref;
};

void setup(Call& call, Prepared const& pc, Place place, Alloc how, void* workspace, bool gather) {
  Case const& c = pc.c;
  kvref::Inputs const& in = pc.in;
  int const d = pc.d, b = c.b, lq = c.lq, hq = c.hq, hk = c.hk, sn = c.seqlen_new;
  call.place = place;
  size_t const cache_bytes = in.bk.size() * 2;
  call.k.make(cache_bytes, place, how, in.bk.data());
  call.v.make(cache_bytes, place, how, in.bv.data());
  fa3jax::FwdParams& p = call.p;
  p = fa3jax::FwdParams{};
  fa3jax::AttnCore& a = p.core;
  a.q = call.up.put(in.bq);
  a.k = call.k.ptr;
  a.v = call.v.ptr;
  a.batch = b;
  a.seqlen_q = lq;
  a.seqlen_k = in.capacity;
  a.num_heads_q = hq;
  a.num_heads_k = hk;
  a.head_dim = d;
  a.dtype = pc.dt;
  a.softmax_scale = 1.f / std::sqrt(float(d));
  a.window_left = c.wl;
  a.window_right = c.wr;
  a.softcap = c.softcap;
  a.set_dense_strides();
  a.k_stride.batch = a.v_stride.batch = int64_t(in.slot_rows) * hk * d;
  a.kvcache.cache_seqlens = call.up.put(c.cache_seqlens);
  a.kvcache.leftpad = call.up.put(c.leftpad);
  a.kvcache.batch_idx = call.up.put(c.batch_idx);
  a.kvcache.cache_slots = c.slots;
  if (in.paged) {
    a.paged.block_table = call.up.put(c.page_table);
    a.paged.page_size = in.page_size;
    a.paged.max_pages_per_seq = c.pages_per_seq;
  }
  if (sn > 0) {  // read through moved-back views too
    call.kn.make(in.bkn.size() * 2, place, how, in.bkn.data());
    call.vn.make(in.bvn.size() * 2, place, how, in.bvn.data());
    a.append.k_new = call.kn.ptr;
    a.append.v_new = call.vn.ptr;
    a.append.seqlen_new = sn;
  }
  call.out.alloc(size_t(b) * lq * hq * d * 2);
  call.lse.alloc(size_t(b) * hq * lq * 4);
  p.out = call.out.mid();
  p.lse = static_cast<float*>(call.lse.mid());
  p.sinks = call.up.put(in.sinks);
  p.workspace = workspace;
  p.gather_pages = gather;
}

void teardown(Call& call) {
  call.k.release();
  call.v.release();
  call.kn.release();
  call.vn.release();
}

const char* load_name(fa3jax::KVLoad l) {
  return l == fa3jax::KVLoad::kBoxes ? "page boxes" : l == fa3jax::KVLoad::kGather ? "page gather" : "whole blocks";
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  int iters = 40, nstreams = 4;
  std::string place_mode = "mixed";
  Alloc how = Alloc::kVmm;
  const char* only = nullptr;
  bool gather = false, dynamic = true, verbose = true;
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    bool const has = i + 1 < argc;
    if (a == "--iters" && has) iters = std::atoi(argv[++i]);
    else if (a == "--streams" && has) nstreams = std::atoi(argv[++i]);
    else if (a == "--place" && has) place_mode = argv[++i];
    else if (a == "--alloc" && has) {
      std::string const v = argv[++i];
      if (v != "vmm" && v != "malloc") { std::fprintf(stderr, "--alloc vmm|malloc\n"); return 2; }
      how = v == "vmm" ? Alloc::kVmm : Alloc::kMalloc;
    } else if (a == "--only" && has) only = argv[++i];
    else if (a == "--gather") gather = true;
    else if (a == "--static") dynamic = false;
    else if (a == "--quiet") verbose = false;
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (iters < 1 || nstreams < 1 || (place_mode != "start" && place_mode != "end" && place_mode != "mixed")) {
    std::fprintf(stderr, "need --iters >= 1, --streams >= 1, --place start|end|mixed\n");
    return 2;
  }
  if (!device_is_sm90("compiled", fa3jax::fwd_compiled_list())) return 3;
  init_driver();
  std::printf("alloc %s (granularity %zu B), place %s, %d streams x %d rounds, %s tile assignment%s\n",
              how == Alloc::kVmm ? "vmm" : "malloc", g_drv.gran, place_mode.c_str(), nstreams, iters,
              dynamic ? "dynamic" : "static", gather ? ", gather" : "");

  // Every (case, kernel) with its inputs and reference, computed once.
  std::mt19937 rng(20261207);
  std::vector<Case> const cs = repro_cases(rng);
  std::vector<Prepared> prep;
  for (int d : {128, 64}) {
    DType const dt = DType::kBF16;
    if (!fa3jax::fwd_kvcache_compiled(dt, d) || fa3jax::fwd_kernel_dim(dt, d) != d) continue;
    int const bn = fa3jax::fwd_kvcache_block_n(dt, d);
    for (Case const& c : cs) {
      if (only != nullptr && std::string(c.name).find(only) == std::string::npos) continue;
      if (c.page_rows > 0 && !fa3jax::fwd_kvcache_page_served(dt, d, c.page_rows, gather)) {
        std::printf("skip %s d=%d: page size %d not served by this build (FA3JAX_KVCACHE_SPANS_ALL=ON serves it)\n",
                    c.name, d, c.page_rows);
        continue;
      }
      Prepared pc{c, dt, d, {}, {}};
      pc.in = kvref::make_inputs(dt, d, bn, c, rng);
      pc.ref = kvref::reference(c, pc.in, d, 1.f / std::sqrt(float(d)));
      prep.push_back(std::move(pc));
    }
  }
  if (prep.empty()) {
    std::printf("FAIL no case to run (no bf16 d=64/128 KV-cache kernel, or --only matched none)\n");
    return 1;
  }

  std::vector<cudaStream_t> streams(nstreams);
  std::vector<void*> ws(nstreams, nullptr);  // one tile counter per stream: concurrent calls must not share one
  for (int s = 0; s < nstreams; ++s) {
    CK(cudaStreamCreateWithFlags(&streams[s], cudaStreamNonBlocking));
    if (dynamic) CK(cudaMalloc(&ws[s], fa3jax::kFwdWorkspaceBytes));
  }
  int failures = 0, runs = 0;
  std::vector<int> per_case_fail(prep.size(), 0), per_case_runs(prep.size(), 0);
  for (int it = 0; it < iters; ++it) {
    std::vector<Call> calls(nstreams);
    for (int s = 0; s < nstreams; ++s) {
      int const ci = (it * nstreams + s) % int(prep.size());
      Place const place = place_mode == "start" ? Place::kStart
                          : place_mode == "end" ? Place::kEnd
                                                : ((it + s) % 2 == 0 ? Place::kStart : Place::kEnd);
      Call& call = calls[s];
      call.case_idx = ci;
      setup(call, prep[ci], place, how, ws[s], gather);
    }
    CK(cudaDeviceSynchronize());  // uploads done before any launch (the launches then overlap)
    for (int s = 0; s < nstreams; ++s) {
      Call& call = calls[s];
      Prepared const& pc = prep[call.case_idx];
      // Named before the launch: after a fault, the last lines are the calls in flight.
      if (verbose || it == 0)
        std::printf("launch round %d stream %d: %s d=%d [%s] caches at %s (k %p)\n", it, s, pc.c.name, pc.d,
                    load_name(fa3jax::fwd_kvcache_load(call.p)), call.place == Place::kStart ? "start" : "end",
                    call.p.core.k);
      fa3jax::FwdStatus const st = fa3jax::run_fwd(call.p, streams[s]);
      if (!st.ok()) {
        std::printf("FAIL %s d=%d: launch: %s (%s)\n", pc.c.name, pc.d, st.what, cudaGetErrorString(st.error));
        return 1;
      }
    }
    CK(cudaDeviceSynchronize());
    for (int s = 0; s < nstreams; ++s) {
      Call& call = calls[s];
      Prepared const& pc = prep[call.case_idx];
      size_t const no = size_t(pc.c.b) * pc.c.lq * pc.c.hq * pc.d, nl = size_t(pc.c.b) * pc.c.hq * pc.c.lq;
      std::vector<uint16_t> hout(no);
      std::vector<float> hlse(nl);
      bool const guards = call.out.fetch(hout.data()) & call.lse.fetch(hlse.data());
      kvref::Check const chk = kvref::compare(pc.dt, pc.c, pc.in, pc.ref, pc.d, hout.data(), hlse.data());
      bool const ok = guards && chk.ok;
      ++runs;
      ++per_case_runs[call.case_idx];
      if (!ok) {
        ++failures;
        ++per_case_fail[call.case_idx];
        std::printf("FAIL round %d stream %d: %s d=%d caches at %s: max|dO|=%.3g max|dLSE|=%.3g bad out=%zu bad "
                    "lse=%zu guards %s\n", it, s, pc.c.name, pc.d, call.place == Place::kStart ? "start" : "end",
                    chk.max_err, chk.max_lse_err, chk.nan_out, chk.bad_lse, guards ? "intact" : "OVERWRITTEN");
      }
      teardown(call);
    }
  }
  for (size_t i = 0; i < prep.size(); ++i)
    std::printf("%s %s d=%d: %d/%d matched\n", per_case_fail[i] ? "FAIL" : "ok  ", prep[i].c.name, prep[i].d,
                per_case_runs[i] - per_case_fail[i], per_case_runs[i]);
  for (int s = 0; s < nstreams; ++s) {
    if (ws[s]) CK(cudaFree(ws[s]));
    CK(cudaStreamDestroy(streams[s]));
  }
  std::printf("%d/%d passed\n", runs - failures, runs);
  return failures == 0 ? 0 : 1;
}

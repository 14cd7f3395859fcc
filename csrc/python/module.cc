// Thin nanobind module: exposes the FFI handlers as PyCapsules, the sizes of their workspace results, and describes
// the build. No kernel code here.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "fa3jax/ffi_handlers.h"
#include "fa3jax/attn_params.h"

namespace nb = nanobind;

// "bf16:128;fp16:64;bf16:192x128;..." -> pairs [("bf16", 128), ("fp16", 64), ...] of the entries with one head
// dim, and, if `mla` is given, triples [("bf16", 192, 128), ...] of the "DxDV" ones (MLA) into it.
static nb::list instance_list(std::string const& s, nb::list* mla = nullptr) {
  nb::list pairs;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find(';', pos);
    if (end == std::string::npos) end = s.size();
    std::string const item = s.substr(pos, end - pos);
    size_t const c = item.find(':');
    if (c != std::string::npos) {
      size_t const x = item.find('x', c);
      std::string const dt = item.substr(0, c);
      int const d = std::atoi(item.c_str() + c + 1);
      if (x == std::string::npos) pairs.append(nb::make_tuple(dt, d));
      else if (mla != nullptr) mla->append(nb::make_tuple(dt, d, std::atoi(item.c_str() + x + 1)));
    }
    pos = end + 1;
  }
  return pairs;
}

// build_info's dtype names as the FFI size functions take them (fa3jax::DType).
static int dtype_code(std::string const& dt) {
  if (dt == "bf16") return int(fa3jax::DType::kBF16);
  if (dt == "fp16") return int(fa3jax::DType::kFP16);
  throw std::invalid_argument("dtype must be 'bf16' or 'fp16'; got '" + dt + "'");
}

NB_MODULE(_fa3jax_cuda, m) {
  m.def("handlers", []() {
    nb::dict d;
    d["fwd"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwd));
    d["fwd_sinks"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwdSinks));
    d["fwd_varlen"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwdVarlen));
    d["fwd_kvcache"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwdKvcache));
    d["bwd"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaBwd));
    d["bwd_varlen"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaBwdVarlen));
    return d;
  });
  // Bytes of each target's workspace result (its last: a 1-D uint8 buffer), from the call's scalars, by the functions
  // the handlers check it with (ffi_handlers.h).
  m.def("fwd_workspace_bytes", []() { return fa3jax_ffi::fwd_workspace_size(); });
  // (num_splits, bytes): the split count to pass as the KV-cache call's num_splits attribute and its workspace size.
  m.def(
      "kvcache_workspace",
      [](std::string const& dtype, int64_t batch, int64_t seqlen_q, int64_t heads_q, int64_t heads_k, int64_t head_dim,
         int64_t capacity, int64_t seqlen_new, int requested, int num_sms) {
        fa3jax_ffi::KvcacheWorkspace const w = fa3jax_ffi::fwd_kvcache_workspace(
            dtype_code(dtype), batch, seqlen_q, heads_q, heads_k, head_dim, capacity, seqlen_new, requested, num_sms);
        if (w.error != cudaSuccess)
          throw std::runtime_error(std::string("fa3jax_cuda: reading the SM count: ") + cudaGetErrorString(w.error));
        return nb::make_tuple(w.num_splits, w.bytes);
      },
      nb::arg("dtype"), nb::arg("batch"), nb::arg("seqlen_q"), nb::arg("heads_q"), nb::arg("heads_k"),
      nb::arg("head_dim"), nb::arg("capacity"), nb::arg("seqlen_new"), nb::arg("requested"), nb::arg("num_sms") = -1);
  m.def(
      "bwd_workspace_bytes",
      [](std::string const& dtype, int64_t batch, int64_t seqlen_q, int64_t heads_q, int64_t head_dim,
         int64_t head_dim_v, int32_t window_left, int32_t window_right, float softcap, bool deterministic,
         bool varlen) {
        return fa3jax_ffi::bwd_workspace_size(dtype_code(dtype), batch, seqlen_q, heads_q, head_dim, head_dim_v,
                                              window_left, window_right, softcap, deterministic, varlen);
      },
      nb::arg("dtype"), nb::arg("batch"), nb::arg("seqlen_q"), nb::arg("heads_q"), nb::arg("head_dim"),
      nb::arg("head_dim_v"), nb::arg("window_left"), nb::arg("window_right"), nb::arg("softcap"),
      nb::arg("deterministic"), nb::arg("varlen"));
  m.def("build_info", []() {
    nb::list mla;
    nb::list fwd_pairs = instance_list(fa3jax::fwd_compiled_list(), &mla);
    std::vector<std::string> dtypes;
    std::vector<int> dims;
    for (auto item : fwd_pairs) {
      auto t = nb::cast<nb::tuple>(item);
      std::string const dt = nb::cast<std::string>(t[0]);
      int const hd = nb::cast<int>(t[1]);
      if (std::find(dtypes.begin(), dtypes.end(), dt) == dtypes.end()) dtypes.push_back(dt);
      if (std::find(dims.begin(), dims.end(), hd) == dims.end()) dims.push_back(hd);
    }
    std::sort(dims.begin(), dims.end());
    nb::list ldims, ldtypes;
    for (int d : dims) ldims.append(d);
    for (auto const& t : dtypes) ldtypes.append(t);
    nb::dict d;
    d["head_dims"] = ldims;
    d["dtypes"] = ldtypes;
    d["instances"] = fwd_pairs;  // (dtype, head_dim) forwards with d_v == d
    d["mla_instances"] = mla;     // (dtype, head_dim, head_dim_v) forwards with d_v < d
    nb::list bwd_mla;
    d["bwd_instances"] = instance_list(fa3jax::bwd_compiled_list(), &bwd_mla);  // (dtype, head_dim), d_v == d
    d["bwd_mla_instances"] = bwd_mla;  // (dtype, head_dim, head_dim_v) backwards with d_v < d
    // (dtype, head_dim, key block) of the KV-cache forwards: paged caches of a multiple of the key block take the
    // whole-block TMA path, others read key blocks spanning pages (fa3jax::fwd_kvcache_load).
    nb::list kv;
    for (auto item : fwd_pairs) {
      auto t = nb::cast<nb::tuple>(item);
      std::string const dt = nb::cast<std::string>(t[0]);
      int const hd = nb::cast<int>(t[1]);
      fa3jax::DType const e = dt == "fp16" ? fa3jax::DType::kFP16 : fa3jax::DType::kBF16;
      int const bn = fa3jax::fwd_kvcache_block_n(e, hd);
      if (bn > 0) kv.append(nb::make_tuple(dt, hd, bn));
    }
    d["kvcache_instances"] = kv;
    // (dtype, head_dim, key block, page reads) for every head dim (a multiple of 8) a KV-cache call may have: the key
    // block of the kernel the C++ dispatch picks for it (fwd_kvcache_block_n) and which pages that split it the
    // kernel reads (fwd_kvcache_page_reads: 0 none, 1 multiples of 8 rows, 2 any), so Python re-derives neither.
    nb::list kv_dims;
    for (auto const& dt : dtypes) {
      fa3jax::DType const e = dt == "fp16" ? fa3jax::DType::kFP16 : fa3jax::DType::kBF16;
      for (int hd = 8; hd <= 256; hd += 8)
        if (int const bn = fa3jax::fwd_kvcache_block_n(e, hd); bn > 0)
          kv_dims.append(nb::make_tuple(dt, hd, bn, fa3jax::fwd_kvcache_page_reads(e, hd)));
    }
    d["kvcache_head_dims"] = kv_dims;
    d["arch"] = fa3jax::fwd_arch();
    // Features beyond the plain dense call, so that Python can refuse them on an extension built before them.
    nb::list features;
    features.append("sinks");
    features.append("varlen");      // the fwd_varlen target
    features.append("varlen_bwd");  // the bwd_varlen target
    features.append("mla");         // the forward targets take v with its own head dim (mla_instances)
    features.append("mla_bwd");     // ... and the backward targets (bwd_mla_instances)
    // Any head dim that is a multiple of 8 up to the largest instance (fwd_kernel_dim / bwd_kernel_dim), not only
    // the instances' own (d_v == d; MLA pairs stay exact).
    features.append("any_head_dim");
    features.append("kvcache");     // the fwd_kvcache target (kvcache_instances, kvcache_head_dims)
    // ... taking a num_splits attribute: split-KV with its combine, and GQA packing for decode.
    features.append("kvcache_splits");
    // ... serving every page size >= 1 (fa3jax::fwd_kvcache_load: page boxes or the row gather where key blocks span
    // pages).
    features.append("kvcache_any_page");
    // Every target's workspace is its last result (a uint8 buffer sized by fwd_workspace_bytes, kvcache_workspace,
    // bwd_workspace_bytes), not XLA scratch; the KV-cache call takes the split count kvcache_workspace resolved.
    features.append("workspace_result");
    d["features"] = features;
    d["cuda_runtime_version"] = int(CUDART_VERSION);
    return d;
  });
}

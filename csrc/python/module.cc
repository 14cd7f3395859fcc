// Thin nanobind module: exposes the FFI handlers as PyCapsules and describes the build. No kernel code here.
#include <algorithm>
#include <cstdlib>
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

NB_MODULE(_fa3jax_cuda, m) {
  m.def("handlers", []() {
    nb::dict d;
    d["fwd"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwd));
    d["fwd_sinks"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwdSinks));
    d["fwd_varlen"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwdVarlen));
    d["bwd"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaBwd));
    d["bwd_varlen"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaBwdVarlen));
    return d;
  });
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
    d["bwd_instances"] = instance_list(fa3jax::bwd_compiled_list());
    d["arch"] = fa3jax::fwd_arch();
    // Features beyond the plain dense call, so that Python can refuse them on an extension built before them.
    nb::list features;
    features.append("sinks");
    features.append("varlen");      // the fwd_varlen target
    features.append("varlen_bwd");  // the bwd_varlen target
    features.append("mla");         // the forward targets take v with its own head dim (mla_instances)
    d["features"] = features;
    d["cuda_runtime_version"] = int(CUDART_VERSION);
    return d;
  });
}

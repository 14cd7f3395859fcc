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

NB_MODULE(_fa3jax_cuda, m) {
  m.def("handlers", []() {
    nb::dict d;
    d["fwd"] = nb::capsule(reinterpret_cast<void*>(&Fa3jaxCudaFwd));
    return d;
  });
  m.def("build_info", []() {
    // fwd_compiled_list() is "bf16:128;fp16:64;..."
    std::vector<std::string> dtypes;
    std::vector<int> dims;
    nb::list pairs;
    std::string const s = fa3jax::fwd_compiled_list();
    size_t pos = 0;
    while (pos < s.size()) {
      size_t end = s.find(';', pos);
      if (end == std::string::npos) end = s.size();
      std::string const item = s.substr(pos, end - pos);
      size_t const c = item.find(':');
      if (c != std::string::npos) {
        std::string const dt = item.substr(0, c);
        int const hd = std::atoi(item.c_str() + c + 1);
        pairs.append(nb::make_tuple(dt, hd));
        if (std::find(dtypes.begin(), dtypes.end(), dt) == dtypes.end()) dtypes.push_back(dt);
        if (std::find(dims.begin(), dims.end(), hd) == dims.end()) dims.push_back(hd);
      }
      pos = end + 1;
    }
    std::sort(dims.begin(), dims.end());
    nb::list ldims, ldtypes;
    for (int d : dims) ldims.append(d);
    for (auto const& t : dtypes) ldtypes.append(t);
    nb::dict d;
    d["head_dims"] = ldims;
    d["dtypes"] = ldtypes;
    d["instances"] = pairs;
    d["arch"] = fa3jax::fwd_arch();
    d["cuda_runtime_version"] = int(CUDART_VERSION);
    return d;
  });
}

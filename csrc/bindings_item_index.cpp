// Bindings of the item index build (csrc/item_index_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <tuple>

#include "bindings_util.h"
#include "item_index_cpu.h"

namespace sigma_fast::bind {
namespace {

void item_index_build(const py::array& embeddings, const py::array& buckets, int64_t num_buckets,
                      const py::object& ids, py::array out_emb, py::array offsets,
                      py::array out_ids, py::array positions) {
  check_array<float>(embeddings, "embeddings", 2);
  check_array<int64_t>(buckets, "buckets", 1);
  require_contiguous(buckets, "buckets");
  const int64_t n = embeddings.shape(0), d = embeddings.shape(1);
  require(num_buckets >= 1, "num_buckets must be >= 1; got " + std::to_string(num_buckets));
  require_shape(buckets, "buckets", {n});
  check_array<float>(out_emb, "out_emb", 2, true);
  require_contiguous(out_emb, "out_emb");
  require_shape(out_emb, "out_emb", {n, d});
  for (auto [arr, name, len] : {std::tuple{&offsets, "offsets", num_buckets + 1},
                                std::tuple{&out_ids, "out_ids", n},
                                std::tuple{&positions, "positions", n}}) {
    check_array<int64_t>(*arr, name, 1, true);
    require_contiguous(*arr, name);
    require_shape(*arr, name, {len});
  }
  const int64_t* id_ptr = nullptr;
  py::array id_arr;
  if (!ids.is_none()) {
    id_arr = ids.cast<py::array>();
    check_array<int64_t>(id_arr, "item_ids", 1);
    require_contiguous(id_arr, "item_ids");
    require_shape(id_arr, "item_ids", {n});
    id_ptr = static_cast<const int64_t*>(id_arr.data());
  }
  const int64_t lde = row_stride(embeddings, "embeddings");
  const auto* ep = static_cast<const float*>(embeddings.data());
  const auto* bp = static_cast<const int64_t*>(buckets.data());
  auto* oe = static_cast<float*>(out_emb.mutable_data());
  auto* oo = static_cast<int64_t*>(offsets.mutable_data());
  auto* oi = static_cast<int64_t*>(out_ids.mutable_data());
  auto* op = static_cast<int64_t*>(positions.mutable_data());
  guard_alloc("item_index_build",
              [&] {
                return "n=" + std::to_string(n) + ", num_buckets=" + std::to_string(num_buckets);
              },
              [&] {
                py::gil_scoped_release release;
                sigma_fast::item_index_build_cpu(ep, n, d, lde, bp, num_buckets, id_ptr, oe, oo,
                                                 oi, op);
              });
}

}  // namespace

void bind_item_index(py::module_& m) {
  m.def("item_index_build", &item_index_build, py::arg("embeddings"), py::arg("buckets"),
        py::arg("num_buckets"), py::arg("item_ids"), py::arg("out_emb"), py::arg("offsets"),
        py::arg("out_ids"), py::arg("positions"));
}

}  // namespace sigma_fast::bind

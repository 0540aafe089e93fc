// Bindings of the APF kernel (csrc/apf_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>

#include "apf_cpu.h"
#include "bindings_util.h"
#include "item_index.h"

namespace sigma_fast::bind {
namespace {

void apf_fuse(const py::array& prefix_scores, const py::array& prefix_ids,
              const py::array& queries, const py::array& embeddings, const py::array& offsets,
              const py::array& item_ids, const py::object& allowed, int64_t top_m, int64_t top_n,
              double tau, bool adaptive, double sigma_min, bool normalize_bucket, bool dedup,
              py::array out_ids, py::array out_logp, py::array out_src,
              const py::object& bucket_ids, const py::object& bucket_sims) {
  check_array<float>(prefix_scores, "prefix_scores", 2);
  check_array<int64_t>(prefix_ids, "prefix_ids", 2);
  check_array<float>(queries, "queries", 3);
  check_array<float>(embeddings, "embeddings", 2);
  check_array<int64_t>(offsets, "offsets", 1);
  check_array<int64_t>(item_ids, "item_ids", 1);
  for (auto [arr, name] : {std::pair{&prefix_scores, "prefix_scores"},
                           std::pair{&prefix_ids, "prefix_ids"}, std::pair{&queries, "queries"},
                           std::pair{&embeddings, "embeddings"}, std::pair{&offsets, "offsets"},
                           std::pair{&item_ids, "item_ids"}})
    require_contiguous(*arr, name);
  const int64_t b = prefix_scores.shape(0), k = prefix_scores.shape(1);
  const int64_t n = embeddings.shape(0), d = embeddings.shape(1);
  require(top_m >= 1 && top_n >= 1, "top_m and top_n must be >= 1");
  require(offsets.shape(0) >= 2, "offsets: expected at least 2 entries (num_buckets + 1)");
  const int64_t num_buckets = offsets.shape(0) - 1;
  require_shape(prefix_ids, "prefix_ids", {b, k});
  require_shape(queries, "queries", {b, k, d});
  require_shape(item_ids, "item_ids", {n});
  const auto* off = static_cast<const int64_t*>(offsets.data());
  check_offsets(off, num_buckets, n);

  sigma_fast::ApfMask mask{nullptr, 0, 0};
  py::array mask_arr;
  if (!allowed.is_none()) {
    mask_arr = allowed.cast<py::array>();
    check_array<bool>(mask_arr, "allowed", 2);
    require_contiguous(mask_arr, "allowed");
    require(mask_arr.shape(0) == 1 || mask_arr.shape(0) == b,
            "allowed: expected 1 or " + std::to_string(b) + " rows, got shape " + shape_str(mask_arr));
    mask.data = static_cast<const uint8_t*>(mask_arr.data());
    mask.length = mask_arr.shape(1);
    mask.ld = mask_arr.shape(0) == 1 ? 0 : mask.length;
  }
  check_array<int64_t>(out_ids, "out_ids", 2, true);
  check_array<float>(out_logp, "out_logp", 2, true);
  check_array<int64_t>(out_src, "out_src", 2, true);
  for (auto [arr, name] : {std::pair{&out_ids, "out_ids"}, std::pair{&out_logp, "out_logp"},
                           std::pair{&out_src, "out_src"}}) {
    require_contiguous(*arr, name);
    require_shape(*arr, name, {b, top_n});
  }
  int64_t* bid = nullptr;
  float* bsim = nullptr;
  py::array bid_arr, bsim_arr;
  if (!bucket_ids.is_none()) {
    bid_arr = bucket_ids.cast<py::array>();
    check_array<int64_t>(bid_arr, "bucket_ids", 3, true);
    require_contiguous(bid_arr, "bucket_ids");
    require_shape(bid_arr, "bucket_ids", {b, k, top_m});
    bid = static_cast<int64_t*>(bid_arr.mutable_data());
  }
  if (!bucket_sims.is_none()) {
    bsim_arr = bucket_sims.cast<py::array>();
    check_array<float>(bsim_arr, "bucket_sims", 3, true);
    require_contiguous(bsim_arr, "bucket_sims");
    require_shape(bsim_arr, "bucket_sims", {b, k, top_m});
    bsim = static_cast<float*>(bsim_arr.mutable_data());
  }
  const sigma_fast::ApfIndex index{embeddings.data(), ApfEmbType::kFloat32, n, d, off,
                                   num_buckets, static_cast<const int64_t*>(item_ids.data())};
  const sigma_fast::ApfParams params{top_m, top_n, tau, adaptive, sigma_min, normalize_bucket,
                                     dedup};
  const auto* ps = static_cast<const float*>(prefix_scores.data());
  const auto* pi = static_cast<const int64_t*>(prefix_ids.data());
  const auto* qp = static_cast<const float*>(queries.data());
  auto* oi = static_cast<int64_t*>(out_ids.mutable_data());
  auto* ol = static_cast<float*>(out_logp.mutable_data());
  auto* os = static_cast<int64_t*>(out_src.mutable_data());
  guard_alloc("apf_fuse",
              [&] {
                return "B=" + std::to_string(b) + ", K=" + std::to_string(k) + ", N=" +
                       std::to_string(n) + ", D=" + std::to_string(d) + ", top_m=" +
                       std::to_string(top_m) + ", top_n=" + std::to_string(top_n);
              },
              [&] {
                py::gil_scoped_release release;
                sigma_fast::apf_fuse_cpu(ps, pi, qp, b, k, index, mask, params, oi, ol, os, bid,
                                         bsim);
              });
}

}  // namespace

void bind_apf(py::module_& m) {
  m.def("apf_fuse", &apf_fuse, py::arg("prefix_scores"), py::arg("prefix_ids"),
        py::arg("queries"), py::arg("embeddings"), py::arg("offsets"), py::arg("item_ids"),
        py::arg("allowed"), py::arg("top_m"), py::arg("top_n"), py::arg("tau"),
        py::arg("adaptive"), py::arg("sigma_min"), py::arg("normalize_bucket"),
        py::arg("dedup"), py::arg("out_ids"), py::arg("out_logp"), py::arg("out_src"),
        py::arg("bucket_ids") = py::none(), py::arg("bucket_sims") = py::none());
}

}  // namespace sigma_fast::bind

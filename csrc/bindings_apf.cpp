// Bindings of the item index build and the APF kernel (csrc/item_index_cpu.h, csrc/apf_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "apf_cpu.h"
#include "bindings_util.h"
#include "item_index_cpu.h"

namespace sigma_fast::bind {
namespace {

std::string len_str(int64_t n) { return std::to_string(n); }

void require_shape(const py::array& a, const char* name, std::initializer_list<int64_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  std::string want = "[";
  int i = 0;
  for (int64_t s : shape) {
    want += (i ? ", " : "") + std::to_string(s);
    ok = ok && a.shape(i) == s;
    ++i;
  }
  require(ok, std::string(name) + ": expected shape " + want + "], got " + shape_str(a));
}

void item_index_build(const py::array& embeddings, const py::array& buckets, int64_t num_buckets,
                      const py::object& ids, py::array out_emb, py::array offsets,
                      py::array out_ids, py::array positions) {
  check_array<float>(embeddings, "embeddings", 2);
  check_array<int64_t>(buckets, "buckets", 1);
  require_contiguous(buckets, "buckets");
  const int64_t n = embeddings.shape(0), d = embeddings.shape(1);
  require(num_buckets >= 1, "num_buckets must be >= 1; got " + len_str(num_buckets));
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
  py::gil_scoped_release release;
  sigma_fast::item_index_build_cpu(ep, n, d, lde, bp, num_buckets, id_ptr, oe, oo, oi, op);
}

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
            "allowed: expected 1 or " + len_str(b) + " rows, got shape " + shape_str(mask_arr));
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
  py::gil_scoped_release release;
  sigma_fast::apf_fuse_cpu(ps, pi, qp, b, k, index, mask, params, oi, ol, os, bid, bsim);
}

}  // namespace

void bind_apf(py::module_& m) {
  m.def("item_index_build", &item_index_build, py::arg("embeddings"), py::arg("buckets"),
        py::arg("num_buckets"), py::arg("item_ids"), py::arg("out_emb"), py::arg("offsets"),
        py::arg("out_ids"), py::arg("positions"));
  m.def("apf_fuse", &apf_fuse, py::arg("prefix_scores"), py::arg("prefix_ids"),
        py::arg("queries"), py::arg("embeddings"), py::arg("offsets"), py::arg("item_ids"),
        py::arg("allowed"), py::arg("top_m"), py::arg("top_n"), py::arg("tau"),
        py::arg("adaptive"), py::arg("sigma_min"), py::arg("normalize_bucket"),
        py::arg("dedup"), py::arg("out_ids"), py::arg("out_logp"), py::arg("out_src"),
        py::arg("bucket_ids") = py::none(), py::arg("bucket_sims") = py::none());
}

}  // namespace sigma_fast::bind

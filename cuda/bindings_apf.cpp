// CUDA bindings of adaptive probabilistic fusion (cuda/apf_cuda.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "apf_cuda.h"
#include "bindings_cuda.h"

namespace sigma_fast::bind {
namespace {

int64_t apf_workspace_bytes(int64_t batch, int64_t k, int64_t dim, int64_t top_m) {
  return sigma_fast::apf_fuse_cuda_workspace_bytes(batch, k, dim, top_m);
}

void apf_fuse(std::uintptr_t prefix_scores, std::uintptr_t prefix_ids, std::uintptr_t queries,
              int64_t batch, int64_t k, std::uintptr_t embeddings, int emb_type,
              int64_t num_items, int64_t dim, std::uintptr_t offsets, int64_t num_buckets,
              std::uintptr_t item_ids, std::uintptr_t allowed, int64_t allowed_ld,
              int64_t allowed_length, int64_t top_m, int64_t top_n, double tau, bool adaptive,
              double sigma_min, bool normalize_bucket, bool dedup, std::uintptr_t out_ids,
              std::uintptr_t out_logp, std::uintptr_t out_src, std::uintptr_t bucket_ids,
              std::uintptr_t bucket_sims, std::uintptr_t workspace, int64_t workspace_bytes,
              std::uintptr_t stream) {
  py::gil_scoped_release release;
  const sigma_fast::ApfIndex index{as_ptr<const void>(embeddings),
                                   static_cast<sigma_fast::ApfEmbType>(emb_type), num_items, dim,
                                   as_ptr<const int64_t>(offsets), num_buckets,
                                   as_ptr<const int64_t>(item_ids)};
  const sigma_fast::ApfMask mask{as_ptr<const uint8_t>(allowed), allowed_ld, allowed_length};
  const sigma_fast::ApfParams params{top_m,     top_n,            tau,  adaptive,
                                     sigma_min, normalize_bucket, dedup};
  sigma_fast::apf_fuse_cuda(as_ptr<const float>(prefix_scores), as_ptr<const int64_t>(prefix_ids),
                            as_ptr<const float>(queries), batch, k, index, mask, params,
                            as_ptr<int64_t>(out_ids), as_ptr<float>(out_logp),
                            as_ptr<int64_t>(out_src), as_ptr<int64_t>(bucket_ids),
                            as_ptr<float>(bucket_sims), as_ptr<void>(workspace), workspace_bytes,
                            as_stream(stream));
}

}  // namespace

void bind_apf(py::module_& m) {
  m.def("apf_workspace_bytes", &apf_workspace_bytes, py::arg("batch"), py::arg("k"),
        py::arg("dim"), py::arg("top_m"), "Bytes of device scratch apf_fuse needs.");
  m.def("apf_fuse", &apf_fuse, py::arg("prefix_scores_ptr"), py::arg("prefix_ids_ptr"),
        py::arg("queries_ptr"), py::arg("batch"), py::arg("k"), py::arg("embeddings_ptr"),
        py::arg("emb_type"), py::arg("num_items"), py::arg("dim"), py::arg("offsets_ptr"),
        py::arg("num_buckets"), py::arg("item_ids_ptr"), py::arg("allowed_ptr"),
        py::arg("allowed_ld"), py::arg("allowed_length"), py::arg("top_m"), py::arg("top_n"),
        py::arg("tau"), py::arg("adaptive"), py::arg("sigma_min"), py::arg("normalize_bucket"),
        py::arg("dedup"), py::arg("out_ids_ptr"), py::arg("out_logp_ptr"), py::arg("out_src_ptr"),
        py::arg("bucket_ids_ptr"), py::arg("bucket_sims_ptr"), py::arg("ws_ptr"),
        py::arg("ws_bytes"), py::arg("stream"),
        "Adaptive probabilistic fusion (see cuda/apf_cuda.h), asynchronously on stream; "
        "emb_type 0/1/2 = float32/float16/bfloat16; allowed_ptr, bucket_*_ptr may be 0.");
}

}  // namespace sigma_fast::bind

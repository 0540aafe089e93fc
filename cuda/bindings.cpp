// pybind11 bindings of the CUDA backend (module sigma_fast._cuda). Torch-free: device
// pointers and the stream arrive as Python ints (tensor.data_ptr(), stream.cuda_stream) from
// python/sigma_fast/rq.py, which validates user input and allocates every buffer. These
// wrappers only convert, release the GIL and call the entry points of rq_cuda.h (which throw
// std::invalid_argument for bad sizes and std::runtime_error for CUDA errors).
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>

#include "apf_cuda.h"
#include "beam_step_cuda.h"
#include "rq_cuda.h"

namespace py = pybind11;

namespace {

template <class T>
T* as_ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

int64_t rq_encode_workspace_bytes(int64_t n, int64_t d, int64_t levels, int64_t k,
                                  int64_t beam_width) {
  return sigma_fast::rq_encode_cuda_workspace_bytes(n, d, levels, k, beam_width);
}

void rq_encode(std::uintptr_t x, int64_t n, int64_t d, int64_t ldx, std::uintptr_t codebooks,
               int64_t levels, int64_t k, int64_t beam_width, std::uintptr_t codes,
               std::uintptr_t err, std::uintptr_t workspace, int64_t workspace_bytes,
               std::uintptr_t stream) {
  py::gil_scoped_release release;
  sigma_fast::rq_encode_cuda(as_ptr<const float>(x), n, d, ldx, as_ptr<const float>(codebooks),
                             levels, k, beam_width, as_ptr<int64_t>(codes), as_ptr<float>(err),
                             as_ptr<void>(workspace), workspace_bytes, as_stream(stream));
}

void rq_decode(std::uintptr_t codes, bool codes_is_int64, int64_t n, int64_t ldc, int64_t levels,
               std::uintptr_t codebooks, int64_t k, int64_t d, std::uintptr_t out,
               std::uintptr_t stream) {
  py::gil_scoped_release release;
  if (codes_is_int64) {
    sigma_fast::rq_decode_cuda<int64_t>(as_ptr<const int64_t>(codes), n, ldc, levels,
                                        as_ptr<const float>(codebooks), k, d, as_ptr<float>(out),
                                        as_stream(stream));
  } else {
    sigma_fast::rq_decode_cuda<int32_t>(as_ptr<const int32_t>(codes), n, ldc, levels,
                                        as_ptr<const float>(codebooks), k, d, as_ptr<float>(out),
                                        as_stream(stream));
  }
}

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

int64_t beam_step_workspace_bytes(int64_t batch, int64_t beams_in, int64_t k,
                                  int64_t beam_width) {
  return sigma_fast::constrained_beam_step_cuda_workspace_bytes(batch, beams_in, k, beam_width);
}

void beam_step(std::uintptr_t logits, int64_t batch, int64_t beams_in, int64_t k, int64_t ld_b,
               int64_t ld_w, std::uintptr_t beam_scores, std::uintptr_t states,
               std::uintptr_t child_offsets, std::uintptr_t child_tokens,
               std::uintptr_t child_nodes, int64_t num_nodes, int64_t slots,
               std::uintptr_t allowed, int64_t ld_allowed, int64_t beam_width, int normalize,
               std::uintptr_t out_scores, std::uintptr_t out_parent, std::uintptr_t out_token,
               std::uintptr_t out_state, std::uintptr_t status, std::uintptr_t workspace,
               int64_t workspace_bytes, std::uintptr_t stream) {
  py::gil_scoped_release release;
  sigma_fast::BeamStepArgs a;
  a.logits = as_ptr<const float>(logits);
  a.batch = batch, a.beams_in = beams_in, a.k = k, a.ld_b = ld_b, a.ld_w = ld_w;
  a.beam_scores = as_ptr<const float>(beam_scores);
  a.states = as_ptr<const int64_t>(states);
  a.child_offsets = as_ptr<const int64_t>(child_offsets);
  a.child_tokens = as_ptr<const int64_t>(child_tokens);
  a.child_nodes = as_ptr<const int64_t>(child_nodes);
  a.num_nodes = num_nodes, a.slots = slots;
  a.allowed = as_ptr<const uint8_t>(allowed);
  a.ld_allowed = ld_allowed;
  a.beam_width = beam_width;
  a.normalize = static_cast<sigma_fast::BeamNormalize>(normalize);  // checked by the op
  a.out_scores = as_ptr<float>(out_scores);
  a.out_parent = as_ptr<int64_t>(out_parent);
  a.out_token = as_ptr<int64_t>(out_token);
  a.out_state = as_ptr<int64_t>(out_state);
  a.status = as_ptr<int32_t>(status);
  a.workspace = as_ptr<void>(workspace);
  a.workspace_bytes = workspace_bytes;
  sigma_fast::constrained_beam_step_cuda(a, as_stream(stream));
}

// Number of visible CUDA devices; 0 (never an exception) without a driver or device.
int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear it so a later launch check does not report it
    return 0;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "sigma_fast CUDA backend (torch-free; pointers and streams are passed as ints)";
  m.def("rq_encode_workspace_bytes", &rq_encode_workspace_bytes, py::arg("n"), py::arg("d"),
        py::arg("levels"), py::arg("k"), py::arg("beam_width"),
        "Bytes of device scratch rq_encode needs (0 for n == 0).");
  m.def("rq_encode", &rq_encode, py::arg("x_ptr"), py::arg("n"), py::arg("d"), py::arg("ldx"),
        py::arg("codebooks_ptr"), py::arg("levels"), py::arg("k"), py::arg("beam_width"),
        py::arg("codes_ptr"), py::arg("err_ptr"), py::arg("ws_ptr"), py::arg("ws_bytes"),
        py::arg("stream"),
        "Residual-quantize x [n, d] (row stride ldx) with codebooks [levels, k, d] into codes "
        "int64 [n, levels] and err float32 [n] (err_ptr may be 0), asynchronously on stream.");
  m.def("rq_decode", &rq_decode, py::arg("codes_ptr"), py::arg("codes_is_int64"), py::arg("n"),
        py::arg("ldc"), py::arg("levels"), py::arg("codebooks_ptr"), py::arg("k"), py::arg("d"),
        py::arg("out_ptr"), py::arg("stream"),
        "out [n, d] = sum over l < levels of codebooks[l, codes[i * ldc + l]], asynchronously "
        "on stream.");
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
  m.def("constrained_beam_step_workspace_bytes", &beam_step_workspace_bytes, py::arg("batch"),
        py::arg("beams_in"), py::arg("k"), py::arg("beam_width"),
        "Bytes of device scratch constrained_beam_step needs.");
  m.def("constrained_beam_step", &beam_step, py::arg("logits_ptr"), py::arg("batch"),
        py::arg("beams_in"), py::arg("k"), py::arg("ld_b"), py::arg("ld_w"),
        py::arg("beam_scores_ptr"), py::arg("states_ptr"), py::arg("child_offsets_ptr"),
        py::arg("child_tokens_ptr"), py::arg("child_nodes_ptr"), py::arg("num_nodes"),
        py::arg("slots"), py::arg("allowed_ptr"), py::arg("ld_allowed"), py::arg("beam_width"),
        py::arg("normalize"), py::arg("scores_ptr"), py::arg("parent_ptr"), py::arg("token_ptr"),
        py::arg("state_ptr"), py::arg("status_ptr"), py::arg("ws_ptr"), py::arg("ws_bytes"),
        py::arg("stream"),
        "One fused constrained beam step (beam_step_cuda.h), asynchronously on stream; "
        "allowed_ptr may be 0; status int32 [batch, 2] gets (BeamStepStatus, beam).");
  m.def("device_count", &device_count, "Visible CUDA devices (0 when none or no driver).");
  m.attr("workspace_budget_bytes") = sigma_fast::kRqWorkspaceBudget;
}

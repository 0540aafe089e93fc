// CUDA bindings of the constrained beam step (cuda/beam_step_cuda.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "beam_step_cuda.h"
#include "bindings_cuda.h"

namespace sigma_fast::bind {
namespace {

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

}  // namespace

void bind_beam_step(py::module_& m) {
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
}

}  // namespace sigma_fast::bind

// Bindings of the constrained beam step (csrc/beam_step_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "beam_step_cpu.h"
#include "bindings_util.h"

namespace sigma_fast::bind {
namespace {

// The common end of both step bindings: the options, the outputs (allocated here, cheaper than
// allocating torch tensors and converting) and the call. The options' values are checked by
// the kernel (check_beam_step_args); beam_width is checked here too, as it sizes the outputs.
py::tuple run_beam_step(BeamStepArgs& a, const py::array& child_offsets,
                        const py::array& child_tokens, const py::array& child_nodes,
                        int64_t beam_width, int normalize, bool pad_empty) {
  if (beam_width < 1)
    throw std::invalid_argument("beam_width must be >= 1; got " + std::to_string(beam_width));
  a.beam_width = beam_width;
  a.normalize = static_cast<BeamNormalize>(normalize);
  a.pad_empty = pad_empty;
  // The outputs are [batch, beam_width]: refuse sizes whose byte count overflows before NumPy
  // is asked for them (Python checks them against the machine's memory first).
  if (a.batch > 0 && beam_width > (int64_t{1} << 59) / 8 / a.batch)
    throw std::invalid_argument("beam_width=" + std::to_string(beam_width) + " with batch " +
                                std::to_string(a.batch) + ": the [batch, beam_width] outputs "
                                "are too large to allocate");
  const std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(a.batch),
                                       static_cast<py::ssize_t>(beam_width)};
  py::array_t<float> out_scores(shape);
  py::array_t<int64_t> out_parent(shape), out_token(shape), out_state(shape);
  a.child_offsets = i64(child_offsets);
  a.child_tokens = i64(child_tokens);
  a.child_nodes = i64(child_nodes);
  a.out_scores = static_cast<float*>(out_scores.mutable_data());
  a.out_parent = static_cast<int64_t*>(out_parent.mutable_data());
  a.out_token = static_cast<int64_t*>(out_token.mutable_data());
  a.out_state = static_cast<int64_t*>(out_state.mutable_data());
  guard_alloc("constrained_beam_step",
              [&] {
                return "batch=" + std::to_string(a.batch) + ", beams_in=" +
                       std::to_string(a.beams_in) + ", k=" + std::to_string(a.k) +
                       ", beam_width=" + std::to_string(a.beam_width);
              },
              [&] {
                py::gil_scoped_release release;
                sigma_fast::constrained_beam_step_cpu(a);
              });
  return py::make_tuple(out_scores, out_parent, out_token, out_state);
}

// Returns (scores float32, parent, token, next_states int64), each [B, beam_width].
py::tuple constrained_beam_step(const py::array& logits, const py::array& beam_scores,
                                const py::array& states, const py::array& child_offsets,
                                const py::array& child_tokens, const py::array& child_nodes,
                                const py::object& allowed, int64_t beam_width, int normalize,
                                bool pad_empty) {
  BeamStepArgs a;
  a.num_nodes = check_children(child_offsets, child_tokens, child_nodes);
  a.slots = child_tokens.shape(0);
  check_arg<float>(logits, "logits", 3);
  a.batch = logits.shape(0);
  a.beams_in = logits.shape(1);
  a.k = logits.shape(2);
  // Strides of empty or size-1 dimensions are never used (NumPy may report anything there).
  const bool empty = a.batch == 0 || a.beams_in == 0 || a.k == 0;
  require(empty || a.k == 1 || logits.strides(2) == static_cast<py::ssize_t>(sizeof(float)),
          "logits: rows must be contiguous (last-dimension stride 1)");
  a.ld_b = empty || a.batch == 1 ? 0 : elem_stride(logits, 0, "logits");
  a.ld_w = empty || a.beams_in == 1 ? 0 : elem_stride(logits, 1, "logits");
  check_arg<float>(beam_scores, "beam_scores", 2);
  check_arg<int64_t>(states, "states", 2);
  require(beam_scores.flags() & py::array::c_style, "beam_scores: expected a C-contiguous array");
  require(states.flags() & py::array::c_style, "states: expected a C-contiguous array");
  for (const py::array* x : {&beam_scores, &states})
    if (x->shape(0) != a.batch || x->shape(1) != a.beams_in)
      throw std::invalid_argument("beam_scores, states: expected shape [" +
                                  std::to_string(a.batch) + ", " + std::to_string(a.beams_in) +
                                  "], got " + shape_str(*x));
  if (!allowed.is_none()) {
    py::array al = allowed.cast<py::array>();
    check_arg<bool>(al, "allowed", 2);
    if (!((al.shape(0) == 1 || al.shape(0) == a.batch) && al.shape(1) == a.num_nodes))
      throw std::invalid_argument("allowed: expected shape [1 or " + std::to_string(a.batch) +
                                  ", " + std::to_string(a.num_nodes) + "], got " + shape_str(al));
    require(al.shape(1) <= 1 || al.shape(0) == 0 || al.strides(1) == 1,
            "allowed: rows must be contiguous");
    a.allowed = static_cast<const uint8_t*>(al.data());
    a.ld_allowed = al.shape(0) <= 1 ? 0 : elem_stride(al, 0, "allowed");
  }
  a.logits = static_cast<const float*>(logits.data());
  a.beam_scores = static_cast<const float*>(beam_scores.data());
  a.states = i64(states);
  return run_beam_step(a, child_offsets, child_tokens, child_nodes, beam_width, normalize,
                       pad_empty);
}

// The step with the per-call inputs given as addresses: the fast path of
// sigma_fast.constrained_beam_step, which reads them off CPU torch tensors after checking
// their dtypes, shapes and strides (cheaper than NumPy views of them). The caller guarantees
// that logits (float32, element strides ld_b, ld_w, 1), beam_scores (float32) and states
// (int64, both C-contiguous [batch, beams_in]) and allowed (bool rows of num_nodes, ld_allowed
// apart; 0 = none) are live tensors of those shapes. The trie's arrays are checked here.
py::tuple constrained_beam_step_ptr(uintptr_t logits, int64_t batch, int64_t beams_in,
                                    int64_t k, int64_t ld_b, int64_t ld_w,
                                    uintptr_t beam_scores, uintptr_t states,
                                    const py::array& child_offsets,
                                    const py::array& child_tokens,
                                    const py::array& child_nodes, uintptr_t allowed,
                                    int64_t ld_allowed, int64_t beam_width, int normalize,
                                    bool pad_empty) {
  require(batch >= 0 && beams_in >= 0 && k >= 0 && ld_b >= 0 && ld_w >= 0 && ld_allowed >= 0,
          "constrained_beam_step_ptr: sizes and strides must be >= 0");
  BeamStepArgs a;
  a.num_nodes = check_children(child_offsets, child_tokens, child_nodes);
  a.slots = child_tokens.shape(0);
  a.batch = batch, a.beams_in = beams_in, a.k = k, a.ld_b = ld_b, a.ld_w = ld_w;
  a.logits = reinterpret_cast<const float*>(logits);
  a.beam_scores = reinterpret_cast<const float*>(beam_scores);
  a.states = reinterpret_cast<const int64_t*>(states);
  a.allowed = reinterpret_cast<const uint8_t*>(allowed);
  a.ld_allowed = ld_allowed;
  return run_beam_step(a, child_offsets, child_tokens, child_nodes, beam_width, normalize,
                       pad_empty);
}

}  // namespace

void bind_beam_step(py::module_& m) {
  m.def("constrained_beam_step", &constrained_beam_step, py::arg("logits"),
        py::arg("beam_scores"), py::arg("states"), py::arg("child_offsets"),
        py::arg("child_tokens"), py::arg("child_nodes"), py::arg("allowed"),
        py::arg("beam_width"), py::arg("normalize"), py::arg("pad_empty"));
  m.def("constrained_beam_step_ptr", &constrained_beam_step_ptr, py::arg("logits"),
        py::arg("batch"), py::arg("beams_in"), py::arg("k"), py::arg("ld_b"), py::arg("ld_w"),
        py::arg("beam_scores"), py::arg("states"), py::arg("child_offsets"),
        py::arg("child_tokens"), py::arg("child_nodes"), py::arg("allowed"),
        py::arg("ld_allowed"), py::arg("beam_width"), py::arg("normalize"),
        py::arg("pad_empty"));
}

}  // namespace sigma_fast::bind

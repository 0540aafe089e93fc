// Bindings of the prefix trie (csrc/trie_cpu.h) and the constrained beam step
// (csrc/beam_step_cpu.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

#include "beam_step_cpu.h"
#include "bindings_util.h"
#include "trie_cpu.h"

namespace sigma_fast::bind {
namespace {

// Hands a vector to NumPy without copying (the array owns it through a capsule).
py::array_t<int64_t> to_numpy(std::vector<int64_t>&& v) {
  auto* owned = new std::vector<int64_t>(std::move(v));
  py::capsule owner(owned, [](void* p) { delete static_cast<std::vector<int64_t>*>(p); });
  return py::array_t<int64_t>({static_cast<py::ssize_t>(owned->size())},
                              {static_cast<py::ssize_t>(sizeof(int64_t))}, owned->data(), owner);
}

// Argument checks that build their message only on failure: the step runs once per generated
// token, so a few microseconds of string formatting per argument would dominate small steps.
template <class T>
void check_arg(const py::array& a, const char* name, int ndim, bool writable = false) {
  if (!a.dtype().is(py::dtype::of<T>()) || a.ndim() != ndim || (writable && !a.writeable()))
    check_array<T>(a, name, ndim, writable);  // throws with the full message
}

void check_vector(const py::array& a, const char* name, int64_t length = -1) {
  check_arg<int64_t>(a, name, 1);
  if (!(a.flags() & py::array::c_style)) require_contiguous(a, name);
  if (length >= 0 && a.shape(0) != length)
    throw std::invalid_argument(std::string(name) + ": expected length " +
                                std::to_string(length) + ", got " + shape_str(a));
}

const int64_t* i64(const py::array& a) { return static_cast<const int64_t*>(a.data()); }

// Checks the CSR child lists the walk and the step index into; returns the number of nodes.
int64_t check_children(const py::array& child_offsets, const py::array& child_tokens,
                       const py::array& child_nodes) {
  check_vector(child_offsets, "child_offsets");
  require(child_offsets.shape(0) >= 2, "child_offsets: expected at least 2 entries (a root)");
  const int64_t nodes = child_offsets.shape(0) - 1;
  const int64_t slots = i64(child_offsets)[nodes];
  require(slots >= 0, "child_offsets: the last entry must be >= 0");
  check_vector(child_tokens, "child_tokens", slots);
  check_vector(child_nodes, "child_nodes", slots);
  return nodes;
}

template <class CodeT>
py::dict trie_build_t(const py::array& codes, int64_t codebook_size) {
  const int64_t n = codes.shape(0), levels = codes.shape(1);
  const int64_t ldc = row_stride(codes, "codes");
  const auto* cp = static_cast<const CodeT*>(codes.data());
  TrieArrays t;
  {
    py::gil_scoped_release release;
    t = sigma_fast::trie_build_cpu<CodeT>(cp, n, levels, ldc, codebook_size);
  }
  py::dict out;
  out["num_nodes"] = t.num_nodes;
  out["level_offsets"] = to_numpy(std::move(t.level_offsets));
  out["child_offsets"] = to_numpy(std::move(t.child_offsets));
  out["child_tokens"] = to_numpy(std::move(t.child_tokens));
  out["child_nodes"] = to_numpy(std::move(t.child_nodes));
  out["node_parent"] = to_numpy(std::move(t.node_parent));
  out["item_begin"] = to_numpy(std::move(t.item_begin));
  out["item_end"] = to_numpy(std::move(t.item_end));
  out["item_perm"] = to_numpy(std::move(t.item_perm));
  out["root_children"] = to_numpy(std::move(t.root_children));
  return out;
}

py::dict trie_build(const py::array& codes, int64_t codebook_size) {
  require(codes.ndim() == 2, "codes: expected a 2-d array, got shape " + shape_str(codes));
  if (codes.dtype().is(py::dtype::of<int64_t>()))
    return trie_build_t<int64_t>(codes, codebook_size);
  if (codes.dtype().is(py::dtype::of<int32_t>()))
    return trie_build_t<int32_t>(codes, codebook_size);
  throw std::invalid_argument("codes: expected dtype int32 or int64, got " +
                              std::string(py::str(codes.dtype())));
}

template <class TokT>
void trie_walk_t(const py::array& tokens, const py::array& co, const py::array& ct,
                 const py::array& cn, int64_t nodes, py::array& out) {
  const int64_t b = tokens.shape(0), len = tokens.shape(1);
  const int64_t ldt = row_stride(tokens, "tokens");
  const auto* tp = static_cast<const TokT*>(tokens.data());
  auto* op = static_cast<int64_t*>(out.mutable_data());
  py::gil_scoped_release release;
  sigma_fast::trie_walk_cpu<TokT>(tp, b, len, ldt, i64(co), i64(ct), i64(cn), nodes, op);
}

void trie_walk(const py::array& tokens, const py::array& child_offsets,
               const py::array& child_tokens, const py::array& child_nodes, py::array out) {
  const int64_t nodes = check_children(child_offsets, child_tokens, child_nodes);
  require(tokens.ndim() == 2, "tokens: expected a 2-d array, got shape " + shape_str(tokens));
  check_array<int64_t>(out, "out", 1, true);
  require_contiguous(out, "out");
  require(out.shape(0) == tokens.shape(0),
          "out: expected length " + std::to_string(tokens.shape(0)));
  if (tokens.dtype().is(py::dtype::of<int64_t>())) {
    trie_walk_t<int64_t>(tokens, child_offsets, child_tokens, child_nodes, nodes, out);
  } else if (tokens.dtype().is(py::dtype::of<int32_t>())) {
    trie_walk_t<int32_t>(tokens, child_offsets, child_tokens, child_nodes, nodes, out);
  } else {
    throw std::invalid_argument("tokens: expected dtype int32 or int64, got " +
                                std::string(py::str(tokens.dtype())));
  }
}

void trie_allowed_nodes(const py::array& masks, const py::array& item_perm,
                        const py::array& item_begin, const py::array& item_end, py::array out) {
  check_array<bool>(masks, "item_mask", 2);
  check_vector(item_perm, "item_perm");
  check_vector(item_begin, "item_begin");
  const int64_t nodes = item_begin.shape(0);
  check_vector(item_end, "item_end", nodes);
  check_array<bool>(out, "out", 2, true);
  require_contiguous(out, "out");
  const int64_t m = masks.shape(0);
  require(out.shape(0) == m && out.shape(1) == nodes,
          "out: expected shape [" + std::to_string(m) + ", " + std::to_string(nodes) + "], got " +
              shape_str(out));
  const int64_t ldm = row_stride(masks, "item_mask");
  const auto* mp = static_cast<const uint8_t*>(masks.data());
  auto* op = static_cast<uint8_t*>(out.mutable_data());
  const int64_t id_bound = masks.shape(1), n = item_perm.shape(0);
  py::gil_scoped_release release;
  sigma_fast::trie_allowed_nodes_cpu(mp, m, ldm, id_bound, i64(item_perm), n, i64(item_begin),
                                     i64(item_end), nodes, op);
}

// Element stride of dimension `dim` (bytes -> elements), required non-negative.
int64_t elem_stride(const py::array& a, int dim, const char* name) {
  const auto item = static_cast<py::ssize_t>(a.itemsize());
  if (a.strides(dim) < 0 || a.strides(dim) % item != 0)
    throw std::invalid_argument(std::string(name) + ": unsupported stride in dimension " +
                                std::to_string(dim));
  return static_cast<int64_t>(a.strides(dim) / item);
}

// The common end of both step bindings: the options, the outputs (allocated here, cheaper than
// allocating torch tensors and converting) and the call.
py::tuple run_beam_step(BeamStepArgs& a, const py::array& child_offsets,
                        const py::array& child_tokens, const py::array& child_nodes,
                        int64_t beam_width, int normalize, bool pad_empty) {
  if (beam_width < 1)
    throw std::invalid_argument("beam_width must be >= 1; got " + std::to_string(beam_width));
  require(normalize >= 0 && normalize <= 2, "normalize: expected 0 (full), 1 (valid) or 2 (none)");
  a.beam_width = beam_width;
  a.normalize = static_cast<BeamNormalize>(normalize);
  a.pad_empty = pad_empty;
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
  {
    py::gil_scoped_release release;
    sigma_fast::constrained_beam_step_cpu(a);
  }
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

void bind_trie(py::module_& m) {
  m.def("trie_build", &trie_build, py::arg("codes"), py::arg("codebook_size"));
  m.def("trie_walk", &trie_walk, py::arg("tokens"), py::arg("child_offsets"),
        py::arg("child_tokens"), py::arg("child_nodes"), py::arg("out"));
  m.def("trie_allowed_nodes", &trie_allowed_nodes, py::arg("item_mask"), py::arg("item_perm"),
        py::arg("item_begin"), py::arg("item_end"), py::arg("out"));
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

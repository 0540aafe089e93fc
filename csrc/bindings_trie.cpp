// Bindings of the prefix trie (csrc/trie_cpu.h): build, walk, allowed nodes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

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

template <class CodeT>
py::dict trie_build_t(const py::array& codes, int64_t codebook_size) {
  const int64_t n = codes.shape(0), levels = codes.shape(1);
  const int64_t ldc = row_stride(codes, "codes");
  const auto* cp = static_cast<const CodeT*>(codes.data());
  TrieArrays t;
  guard_alloc("trie_build",
              [&] {
                return "n=" + std::to_string(n) + ", levels=" + std::to_string(levels) +
                       ", codebook_size=" + std::to_string(codebook_size);
              },
              [&] {
                py::gil_scoped_release release;
                t = sigma_fast::trie_build_cpu<CodeT>(cp, n, levels, ldc, codebook_size);
              });
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
  guard_alloc("trie_walk", [&] { return "b=" + std::to_string(b); }, [&] {
    py::gil_scoped_release release;
    sigma_fast::trie_walk_cpu<TokT>(tp, b, len, ldt, i64(co), i64(ct), i64(cn), nodes, op);
  });
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
  guard_alloc("trie_allowed_nodes",
              [&] { return "masks=" + std::to_string(m) + ", items=" + std::to_string(n); },
              [&] {
                py::gil_scoped_release release;
                sigma_fast::trie_allowed_nodes_cpu(mp, m, ldm, id_bound, i64(item_perm), n,
                                                   i64(item_begin), i64(item_end), nodes, op);
              });
}

}  // namespace

void bind_trie(py::module_& m) {
  m.def("trie_build", &trie_build, py::arg("codes"), py::arg("codebook_size"));
  m.def("trie_walk", &trie_walk, py::arg("tokens"), py::arg("child_offsets"),
        py::arg("child_tokens"), py::arg("child_nodes"), py::arg("out"));
  m.def("trie_allowed_nodes", &trie_allowed_nodes, py::arg("item_mask"), py::arg("item_perm"),
        py::arg("item_begin"), py::arg("item_end"), py::arg("out"));
}

}  // namespace sigma_fast::bind

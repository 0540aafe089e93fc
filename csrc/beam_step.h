// One step of trie-constrained beam search (constrained_beam_step): the argument struct, the
// normalization modes, the status codes and the argument checks shared by the CPU twin
// (beam_step_cpu.h) and the CUDA twin (cuda/beam_step_cuda.h). Torch-free and CUDA-free: it
// compiles with a plain C++17 compiler and with nvcc. Semantics:
// python/sigma_fast/reference/beam.py (DESIGN.md section 3).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sigma_fast {

// How a beam's logits become log-probabilities before they are added to the beam score: a
// log-softmax over the whole row, over the valid children only, or none (score = beam score +
// logit). The values are the bindings' int codes.
enum class BeamNormalize : int { kFull = 0, kValid = 1, kNone = 2 };

// Per-request outcome of a step on a device backend (CUDA, and the Triton kernel, which uses the
// same codes): status[b * 2 + 0] is the code, status[b * 2 + 1] the input beam concerned (or
// -1). A request with an input error (codes >= 2, the first failing beam in beam order wins)
// gets W "poisoned" output beams: score NaN, parent / token / state -1. A request without
// candidates (kBeamStatusEmpty) gets W padding beams (-inf, -1, -1, -1). The caller decides what
// to raise. The CPU twin reports the same conditions as exceptions instead.
enum BeamStepStatus : int32_t {
  kBeamStatusOk = 0,
  kBeamStatusEmpty = 1,     // no candidate at all
  kBeamStatusBadScore = 2,  // a beam score is NaN or +inf
  kBeamStatusBadState = 3,  // a live beam's state is outside [0, num_nodes)
  kBeamStatusBadLogit = 4,  // a live beam's logits row holds NaN or +inf
  kBeamStatusBadTrie = 5,   // child offsets / tokens / nodes out of range (corrupt trie)
};

struct BeamStepArgs {
  // logits of beam (b, w) are the k floats at logits + b * ld_b + w * ld_w (contiguous rows).
  const float* logits = nullptr;
  int64_t batch = 0, beams_in = 0, k = 0, ld_b = 0, ld_w = 0;
  const float* beam_scores = nullptr;  // batch x beams_in, contiguous; -inf = padding beam
  const int64_t* states = nullptr;     // batch x beams_in, contiguous; node ids
  // The trie's CSR child lists (see trie.h): num_nodes + 1 offsets, `slots` entries each.
  const int64_t* child_offsets = nullptr;
  const int64_t* child_tokens = nullptr;
  const int64_t* child_nodes = nullptr;
  int64_t num_nodes = 0, slots = 0;
  // Node validity, nullable: allowed[b * ld_allowed + node] != 0 (ld_allowed = 0: shared).
  const uint8_t* allowed = nullptr;
  int64_t ld_allowed = 0;
  int64_t beam_width = 1;
  BeamNormalize normalize = BeamNormalize::kFull;
  // CPU: a request without candidates gives padding instead of an error. Device backends always
  // pad it and report kBeamStatusEmpty, so they ignore this flag.
  bool pad_empty = false;
  // Outputs, batch x beam_width, contiguous.
  float* out_scores = nullptr;
  int64_t* out_parent = nullptr;
  int64_t* out_token = nullptr;
  int64_t* out_state = nullptr;
  // Device backends only (the CPU twin throws instead of reporting, and allocates its own
  // scratch): status batch x 2 int32 (see BeamStepStatus), and the caller's scratch memory of
  // workspace_bytes bytes, any alignment (see constrained_beam_step_cuda_workspace_bytes).
  int32_t* status = nullptr;
  void* workspace = nullptr;
  int64_t workspace_bytes = 0;
};

// The checks every backend makes before touching memory; each adds the size limits of its own
// kernel. Messages are built only on failure: the step runs once per generated token.
inline void check_beam_step_args(const BeamStepArgs& a) {
  if (a.batch < 0 || a.beams_in < 0 || a.k < 0)
    throw std::invalid_argument("constrained_beam_step: negative batch, beams_in or k");
  if (a.ld_b < 0 || a.ld_w < 0 || a.ld_allowed < 0)
    throw std::invalid_argument("constrained_beam_step: negative stride");
  if (a.beam_width < 1)
    throw std::invalid_argument("beam_width must be >= 1; got " + std::to_string(a.beam_width));
  if (a.num_nodes < 1) throw std::invalid_argument("the trie must have a root (num_nodes >= 1)");
  const int normalize = static_cast<int>(a.normalize);
  if (normalize < 0 || normalize > 2)
    throw std::invalid_argument("normalize: expected 0 (full), 1 (valid) or 2 (none); got " +
                                std::to_string(normalize));
}

}  // namespace sigma_fast

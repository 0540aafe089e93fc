// One step of trie-constrained beam search on the CPU (torch-free).
// Semantics: python/sigma_fast/reference/beam.py (DESIGN.md section 3).
#pragma once

#include <cstdint>

namespace sigma_fast {

enum class BeamNormalize : int { kFull = 0, kValid = 1, kNone = 2 };

struct BeamStepArgs {
  // logits of beam (b, w) are the k floats at logits + b * ld_b + w * ld_w (contiguous rows).
  const float* logits = nullptr;
  int64_t batch = 0, beams_in = 0, k = 0, ld_b = 0, ld_w = 0;
  const float* beam_scores = nullptr;  // batch x beams_in, contiguous; -inf = padding beam
  const int64_t* states = nullptr;     // batch x beams_in, contiguous; node ids
  // The trie's CSR child lists (see trie_cpu.h): num_nodes + 1 offsets, `slots` entries each.
  const int64_t* child_offsets = nullptr;
  const int64_t* child_tokens = nullptr;
  const int64_t* child_nodes = nullptr;
  int64_t num_nodes = 0, slots = 0;
  // Node validity, nullable: allowed[b * ld_allowed + node] != 0 (ld_allowed = 0: shared).
  const uint8_t* allowed = nullptr;
  int64_t ld_allowed = 0;
  int64_t beam_width = 1;
  BeamNormalize normalize = BeamNormalize::kFull;
  bool pad_empty = false;  // a request without candidates gives padding instead of an error
  // Outputs, batch x beam_width, contiguous.
  float* out_scores = nullptr;
  int64_t* out_parent = nullptr;
  int64_t* out_token = nullptr;
  int64_t* out_state = nullptr;
};

// Threaded over requests. Throws std::invalid_argument for NaN / +inf logits of a live beam and
// for a request without candidates (unless pad_empty), std::out_of_range for states or trie
// entries out of range; when several requests fail, the message names the first one.
void constrained_beam_step_cpu(const BeamStepArgs& args);

}  // namespace sigma_fast

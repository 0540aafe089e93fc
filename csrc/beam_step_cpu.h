// One step of trie-constrained beam search on the CPU (torch-free). The arguments, shared with
// the CUDA twin, are in beam_step.h; semantics: python/sigma_fast/reference/beam.py
// (DESIGN.md section 3).
#pragma once

#include "beam_step.h"

namespace sigma_fast {

// Threaded over requests. Reads every field of BeamStepArgs except status and workspace. Throws
// std::invalid_argument for NaN / +inf logits of a live beam and for a request without
// candidates (unless pad_empty), std::out_of_range for states or trie entries out of range;
// when several requests fail, the message names the first one.
void constrained_beam_step_cpu(const BeamStepArgs& args);

}  // namespace sigma_fast

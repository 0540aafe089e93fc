// One step of trie-constrained beam search on CUDA (torch-free). Semantics:
// python/sigma_fast/reference/beam.py (DESIGN.md section 3); the CPU twin is
// csrc/beam_step_cpu.h, whose argument layout this mirrors.
//
// One fused kernel, one block per request: check + normalize every live beam, score the valid
// children, select the top W exactly by (score desc, parent asc, token asc), advance, pad. A
// request with many candidates in a small batch is split over two blocks, whose top-W lists a
// second small kernel merges (see beam_step.cu; SIGMA_FAST_BEAM_SPLITS overrides the choice).
// Nothing here synchronizes with the host or allocates: scratch comes from a caller-provided
// workspace (see constrained_beam_step_cuda_workspace_bytes) and errors that only the host can
// report are written to a per-request status array, so a launch is capturable in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace sigma_fast {

// status[b * 2 + 0] after a step; status[b * 2 + 1] is the input beam concerned (or -1).
// A request with an input error (codes >= 2, the first failing beam in beam order wins) gets
// W "poisoned" output beams: score NaN, parent / token / state -1. A request without candidates
// (kBeamStatusEmpty) gets W padding beams (-inf, -1, -1, -1). The caller decides what to raise.
enum BeamStepStatus : int32_t {
  kBeamStatusOk = 0,
  kBeamStatusEmpty = 1,      // no candidate at all
  kBeamStatusBadScore = 2,   // a beam score is NaN or +inf
  kBeamStatusBadState = 3,   // a live beam's state is outside [0, num_nodes)
  kBeamStatusBadLogit = 4,   // a live beam's logits row holds NaN or +inf
  kBeamStatusBadTrie = 5,    // child offsets / tokens / nodes out of range (corrupt trie)
};

struct BeamStepCudaArgs {
  // logits of beam (b, w) are the k floats at logits + b * ld_b + w * ld_w (unit stride).
  const float* logits = nullptr;
  int64_t batch = 0, beams_in = 0, k = 0, ld_b = 0, ld_w = 0;
  const float* beam_scores = nullptr;  // batch x beams_in, contiguous; -inf = padding beam
  const int64_t* states = nullptr;     // batch x beams_in, contiguous; node ids
  // The trie's CSR child lists: num_nodes + 1 offsets, `slots` entries each.
  const int64_t* child_offsets = nullptr;
  const int64_t* child_tokens = nullptr;
  const int64_t* child_nodes = nullptr;
  int64_t num_nodes = 0, slots = 0;
  // Node validity, nullable: allowed[b * ld_allowed + node] != 0 (ld_allowed = 0: shared).
  const uint8_t* allowed = nullptr;
  int64_t ld_allowed = 0;
  int64_t beam_width = 1;
  int normalize = 0;  // 0 full, 1 valid, 2 none (BeamNormalize in beam_step_cpu.h)
  // Outputs, batch x beam_width, contiguous; status batch x 2 int32 (see BeamStepStatus).
  float* out_scores = nullptr;
  int64_t* out_parent = nullptr;
  int64_t* out_token = nullptr;
  int64_t* out_state = nullptr;
  int32_t* status = nullptr;
  void* workspace = nullptr;  // >= constrained_beam_step_cuda_workspace_bytes, any alignment
  int64_t workspace_bytes = 0;
};

// Bytes of device scratch for these sizes: per request about 28 * beams_in + 4 * beams_in * k
// + 200 * beam_width bytes (every array 256-byte aligned). Throws std::invalid_argument for
// sizes the kernel rejects (beams_in * k >= 2^31, beam_width < 1).
int64_t constrained_beam_step_cuda_workspace_bytes(int64_t batch, int64_t beams_in, int64_t k,
                                                   int64_t beam_width);

// Launches the step on `stream` (asynchronous; batch == 0 launches nothing). Deterministic:
// fixed reduction orders, integer atomics only. Throws std::invalid_argument for bad sizes or a
// short workspace, std::runtime_error when the launch fails.
void constrained_beam_step_cuda(const BeamStepCudaArgs& args, cudaStream_t stream);

}  // namespace sigma_fast

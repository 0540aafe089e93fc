// One step of trie-constrained beam search on CUDA (torch-free). The arguments and the status
// codes, shared with the CPU twin, are in csrc/beam_step.h; semantics:
// python/sigma_fast/reference/beam.py (DESIGN.md section 3).
//
// One fused kernel, one block per request: check + normalize every live beam, score the valid
// children, select the top W exactly by (score desc, parent asc, token asc), advance, pad. A
// request with many candidates in a small batch is split over two blocks, whose top-W lists a
// second small kernel merges (see beam_step.cu; SIGMA_FAST_BEAM_SPLITS overrides the choice).
// Nothing here synchronizes with the host or allocates: scratch comes from a caller-provided
// workspace (see constrained_beam_step_cuda_workspace_bytes) and errors that only the host can
// report are written to the per-request status array (BeamStepStatus), so a launch is
// capturable in a CUDA graph.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "beam_step.h"

namespace sigma_fast {

// Bytes of device scratch for these sizes: per request about 28 * beams_in + 4 * beams_in * k
// + 200 * beam_width bytes (every array 256-byte aligned). Throws std::invalid_argument for
// sizes the kernel rejects (beams_in * k >= 2^31, beam_width < 1).
int64_t constrained_beam_step_cuda_workspace_bytes(int64_t batch, int64_t beams_in, int64_t k,
                                                   int64_t beam_width);

// Launches the step on `stream` (asynchronous; batch == 0 launches nothing). Every field of
// BeamStepArgs is on the device except pad_empty, which is ignored (a request without candidates
// is padded and reported as kBeamStatusEmpty); status, workspace and workspace_bytes
// (>= constrained_beam_step_cuda_workspace_bytes) are required. Deterministic: fixed reduction
// orders, integer atomics only. Throws std::invalid_argument for bad sizes or a short
// workspace, std::runtime_error when the launch fails.
void constrained_beam_step_cuda(const BeamStepArgs& args, cudaStream_t stream);

}  // namespace sigma_fast

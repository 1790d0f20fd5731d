// The dropout mask's debug kernel (dropout_mask.cu): its arguments and launch, for the binding, which
// includes no device code (dropout.h holds the scheme both the attention kernels and this one follow).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flash {

// keep (batch, heads, seqlen_q, seqlen_k) uint8 (1 kept, 0 dropped), in each sequence's own coordinates (as
// the attention kernels use them, varlen included), for (seed, offset) read from rng_state (int64 (2,), as
// the forward writes it); dropout_threshold as AttnParams has it.
struct DropoutMaskParams {
  uint8_t *keep;
  int64_t const *rng_state;
  int batch, heads, seqlen_q, seqlen_k;
  uint32_t dropout_threshold;
};

// For tests at small shapes, not a speed path.
cudaError_t run_dropout_mask(DropoutMaskParams const &params, cudaStream_t stream);

}  // namespace flash

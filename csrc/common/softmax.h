// Online softmax over key blocks (FlashAttention-2): a running row max and row sum per query row,
// kept in registers; the output is normalised once, after the last block.
#pragma once

#include <cmath>

#include <cute/tensor.hpp>

#include "utils.h"

namespace flash {

using namespace cute;

// kRows: accumulator rows this thread holds (2 per 16-row MMA tile).
template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];  // in log2 units: the raw max times scale_log2
  float row_sum[kRows];  // this thread's columns only; the quad's partial sums are added in finalize()

  // Folds one block of raw scores (hidden ones already -inf) into the running max and sum, turns the
  // scores into unnormalised probabilities in place, and rescales the output accumulator to the new max.
  template <bool First, class Scores, class AccO>
  CUTE_DEVICE void update(Scores &acc_s, AccO &acc_o, float scale_log2) {
    auto const correction = exp_step<First>(acc_s, scale_log2);
    if constexpr (!First) { rescale(acc_o, correction); }
  }

  // update() in two halves, for a kernel whose P·V of the previous block is still in flight when this
  // block's scores are ready (SM90): the max, exponentials and sums first; the output's rescaling once
  // the matmul writing it has finished. Returns each row's correction exp2(old max - new max).
  // kFmaOf8: of every 8 columns, how many take exp2_fma (the FMA units) rather than exp2_approx (the Hopper
  // forward's knob, given for its unmasked key blocks).
  template <bool First, int kFmaOf8 = 0, class Scores>
  CUTE_DEVICE cute::array<float, kRows> exp_step(Scores &acc_s, float scale_log2) {
    Tensor s = make_tensor(acc_s.data(), rows_cols(acc_s.layout()));  // (rows, cols)
    static_assert(decltype(size<0>(s))::value == kRows);
    cute::array<float, kRows> correction;
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float block_max = -INFINITY;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) { block_max = fmaxf(block_max, s(r, c)); }
      block_max = quad_allreduce(block_max, [](float a, float b) { return fmaxf(a, b); });
      // The max is kept scaled, so an unmoved max gives prev - max = 0 exactly and a correction of
      // exactly 1 (an unscaled max fused into an FMA leaves a rounding residue: 1.2e-4 of LSE drift
      // after 2048 blocks, seen at 128k keys).
      float const prev_max = First ? -INFINITY : row_max[r];
      float const max = fmaxf(prev_max, block_max * scale_log2);
      row_max[r] = max;
      // A row that has seen only hidden scores keeps max = -inf: subtract 0 so exp2 gives 0, not NaN.
      float const max_shift = max == -INFINITY ? 0.f : max;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(s); ++c) {
        float const x = s(r, c) * scale_log2 - max_shift;  // the scale folded into one FMA
        s(r, c) = c % 8 < kFmaOf8 ? exp2_fma(x) : exp2_approx(x);
        sum += s(r, c);
      }
      if constexpr (First) {
        row_sum[r] = sum;
        correction[r] = 1.f;
      } else {
        correction[r] = exp2_approx(prev_max - max_shift);
        row_sum[r] = row_sum[r] * correction[r] + sum;
      }
    }
    return correction;
  }

  template <class AccO>
  CUTE_DEVICE void rescale(AccO &acc_o, cute::array<float, kRows> const &correction) {
    Tensor o = make_tensor(acc_o.data(), rows_cols(acc_o.layout()));  // (rows, head_dim)
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) { o(r, c) *= correction[r]; }
    }
  }

  // Divides the output rows by their sums; returns the natural-log LSE per row: +inf where the row saw
  // no key (so the backward's exp(S - LSE) gives 0 there), the output row then being 0. sink_log2: a
  // learnable sink's logit in log2 units, whose exponential joins every row's sum (and so the LSE) but
  // adds nothing to the output; -inf for none. out_scale multiplies the output rows besides (dropout's
  // 1 / (1 - p), applied here once rather than to every kept entry of P).
  template <class AccO>
  CUTE_DEVICE auto finalize(AccO &acc_o, float sink_log2, float out_scale = 1.f) {
    Tensor o = make_tensor(acc_o.data(), rows_cols(acc_o.layout()));
    Tensor lse = make_tensor<float>(Int<kRows>{});
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      float sum = quad_allreduce(row_sum[r], [](float a, float b) { return a + b; });
      float max = row_max[r];
      float rescale = 1.f;  // of the output accumulator, when the sink moves the max
      if (sink_log2 != -INFINITY) {
        // Taken to the larger of the row's max and the sink, so that neither exponential overflows;
        // a row that saw no key (max -inf) keeps only the sink.
        float const new_max = fmaxf(max, sink_log2);
        rescale = exp2_approx(max - new_max);
        sum = sum * rescale + exp2_approx(sink_log2 - new_max);
        max = new_max;
      }
      bool const empty = sum == 0.f;
      lse(r) = empty ? INFINITY : (max + log2f(sum)) * float(M_LN2);
      float const inv_sum = empty ? 0.f : rescale * out_scale / sum;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(o); ++c) { o(r, c) *= inv_sum; }
    }
    return lse;
  }
};

}  // namespace flash

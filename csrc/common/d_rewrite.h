// The backward's D, rewritten by the dQ kernels (sm80 and sm90). D = rowsum(dO∘O) from the preprocess uses O
// rounded to 16 bits (with dropout, v / (1 - p) rounded even where one key gives P = 1); rowsum(P∘dP) is the
// same quantity from the fp32 P and dP. A dQ kernel sees every key of its rows, so it sums rowsum(dS) and
// rowsum(P) as it goes, and rowsum(P∘dP) = rowsum(dS) + D·rowsum(P) replaces D for the dK/dV kernel, launched
// after it, and for the sink gradient: where exact dS is 0 (one visible key) the rounding error no longer adds
// up over the rows into dK. dQ itself keeps the D it was computed with. Only the block that owns the rows reads
// or writes their D.
#pragma once

#include <cute/tensor.hpp>

#include "utils.h"

namespace flash {

using namespace cute;

// kRows: the accumulator rows this thread holds; a row's columns are spread over one quad (both
// architectures' accumulators, utils.h rows_cols).
template <int kRows>
struct DRewrite {
  decltype(make_tensor<float>(Int<kRows>{})) ds_sum = make_tensor<float>(Int<kRows>{});
  decltype(make_tensor<float>(Int<kRows>{})) p_sum = make_tensor<float>(Int<kRows>{});

  CUTE_DEVICE DRewrite() {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) { ds_sum(r) = p_sum(r) = 0.f; }
  }

  // One score of row r: its P and its dS.
  CUTE_DEVICE void add(int r, float p, float ds) {
    ds_sum(r) += ds;
    p_sum(r) += p;
  }

  // D's new values into gD (kRows,), from this thread's D and its quad's sums; tCc: the tile's (row, col)
  // coordinates partitioned like the accumulator; rows at or past max_row are skipped.
  template <class RowTile, class Coords>
  CUTE_DEVICE void store(float const (&dpsum)[kRows], RowTile &gD, Coords const &tCc, int max_row) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      auto const plus = [](float a, float b) { return a + b; };
      ds_sum(r) = quad_allreduce(ds_sum(r), plus) + dpsum[r] * quad_allreduce(p_sum(r), plus);
    }
    store_row_values(ds_sum, gD, tCc, max_row);
  }
};

}  // namespace flash

// SM80 tile copies between global and shared memory (cp.async with zero-fill) with row and column bounds.
#pragma once

#include <cute/tensor.hpp>

namespace flash {

using namespace cute;

// Global -> shared tile load, cp.async with zero-fill. tCcC holds the (row, col) of each copy, partitioned
// like the source; columns at or past head_dim and (when CheckRows) rows at or past max_row arrive as 0.
template <bool CheckRows, class TiledCopy, class Src, class Dst, class Coords>
CUTE_DEVICE void load_tile(TiledCopy const &tiled_copy, Src const &src, Dst &&dst, Coords const &tCcC,
                           int max_row, int head_dim) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    bool const row_ok = !CheckRows || get<0>(tCcC(0, m, 0)) < max_row;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      bool const ok = row_ok && get<1>(tCcC(0, m, k)) < head_dim;
      copy(tiled_copy.with(ok), src(_, m, k), dst(_, m, k));
    }
  }
}

// Shared -> global tile store: only rows below max_row and columns below head_dim are written.
template <class TiledCopy, class Src, class Dst, class Coords>
CUTE_DEVICE void store_tile(TiledCopy const &tiled_copy, Src const &src, Dst &&dst, Coords const &tCcC,
                            int max_row, int head_dim) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(tCcC(0, m, 0)) < max_row) {
      CUTE_UNROLL
      for (int k = 0; k < size<2>(src); ++k) {
        if (get<1>(tCcC(0, m, k)) < head_dim) { copy(tiled_copy, src(_, m, k), dst(_, m, k)); }
      }
    }
  }
}

}  // namespace flash

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

// load_tile where each row of the tile has an address of its own, row_address(row) for a row within the tile
// (a paged KV cache: a tile may span pages, cache_layout.h). src_like: the tile's source partition, for the
// per-copy layout only (its addresses are not used).
template <bool CheckRows, class TiledCopy, class Src, class Dst, class Coords, class RowAddress>
CUTE_DEVICE void load_tile_rows(TiledCopy const &tiled_copy, Src const &src_like, Dst &&dst, Coords const &tCcC,
                                int max_row, int head_dim, RowAddress const &row_address) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src_like); ++m) {
    int const row = get<0>(tCcC(0, m, 0));
    bool const row_ok = !CheckRows || row < max_row;
    auto const *src_row = row_address(row);
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src_like); ++k) {
      int const col = get<1>(tCcC(0, m, k));
      Tensor src = make_tensor(make_gmem_ptr(src_row + col), src_like(_, m, k).layout());
      copy(tiled_copy.with(row_ok && col < head_dim), src, dst(_, m, k));
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

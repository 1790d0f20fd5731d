// Which scores a query row may see, and which tiles need checking at all. Written once for the forward,
// dQ and dK/dV kernels: all of them compute S = Q·Kᵀ on (kBlockM, kBlockN) tiles with the same MMA.
#pragma once

#include <climits>
#include <cmath>

#include <cute/tensor.hpp>

#include "utils.h"

namespace flash {

using namespace cute;

template <int kBlockM, int kBlockN, bool Causal>
struct Mask {
  int seqlen_q, seqlen_k;

  // Causal is aligned bottom-right: query row i sees key column j <= i + diagonal().
  CUTE_DEVICE int diagonal() const { return seqlen_k - seqlen_q; }

  // Key blocks [0, n_block_end) hold every column that some row of query block m_block sees.
  CUTE_DEVICE int n_block_end(int m_block) const {
    int const n_blocks = ceil_div(seqlen_k, kBlockN);
    if constexpr (!Causal) {
      return n_blocks;
    } else {
      int const last_col_seen = (m_block + 1) * kBlockM - 1 + diagonal();
      return last_col_seen < 0 ? 0 : min(n_blocks, last_col_seen / kBlockN + 1);
    }
  }

  // Key blocks at or past this one need masking for query block m_block: the ragged last block, and
  // those the diagonal crosses. Blocks below it are visible to every row.
  CUTE_DEVICE int n_block_first_masked(int m_block) const {
    int first = seqlen_k % kBlockN == 0 ? INT_MAX : seqlen_k / kBlockN;
    if constexpr (Causal) {
      int const first_hidden_col = m_block * kBlockM + diagonal() + 1;  // of the block's first row
      first = min(first, first_hidden_col <= 0 ? 0 : first_hidden_col / kBlockN);
    }
    return first;
  }

  // Query blocks [m_block_begin, m_blocks) see key block n_block (the dK/dV kernel's loop).
  CUTE_DEVICE int m_block_begin(int n_block) const {
    if constexpr (!Causal) {
      return 0;
    } else {
      int const first_row = n_block * kBlockN - diagonal();  // first row that sees column n_block*kBlockN
      return first_row <= 0 ? 0 : first_row / kBlockM;
    }
  }

  // Query blocks below this one need masking against key block n_block (the diagonal crosses them, or
  // the key block is ragged and then all of them do).
  CUTE_DEVICE int m_block_end_masked(int n_block) const {
    if (seqlen_k % kBlockN != 0 && n_block == seqlen_k / kBlockN) { return INT_MAX; }
    if constexpr (!Causal) {
      return 0;
    } else {
      // Block m is fully visible iff its first row sees the key block's last column.
      int const rows_needed = (n_block + 1) * kBlockN - 1 - diagonal();  // first row that sees it all
      return rows_needed <= 0 ? 0 : ceil_div(rows_needed, kBlockM);
    }
  }

  // Sets to -inf every score that its query may not see. tScS holds each score's (row, col) within the
  // tile, partitioned like the accumulator, so this serves any tiled MMA. Rows are queries and columns
  // keys, or the reverse when Transposed (the dK/dV kernel computes Sᵀ). One limit per row keeps the
  // per-element work to a compare.
  template <bool Masked, bool Transposed = false, class Scores, class Coords>
  CUTE_DEVICE void apply(Scores &scores, Coords const &tScS, int m_block, int n_block) const {
    if constexpr (Masked) {
      Tensor s = make_tensor(scores.data(), rows_cols(scores.layout()));  // (rows, cols)
      Tensor c = make_tensor(tScS.data(), rows_cols(tScS.layout()));      // (rows, cols) -> (row, col)
      static_assert(decltype(size(s) == size(c))::value);
      int const query0 = m_block * kBlockM, key0 = n_block * kBlockN;
      CUTE_UNROLL
      for (int r = 0; r < size<0>(s); ++r) {
        // Visible columns of this row, relative to the tile: [col_begin, col_end).
        int col_begin = 0, col_end = INT_MAX;
        if constexpr (!Transposed) {
          col_end = seqlen_k - key0;
          if constexpr (Causal) { col_end = min(col_end, query0 + get<0>(c(r, 0)) + diagonal() + 1 - key0); }
        } else {
          int const key = key0 + get<0>(c(r, 0));
          if (key >= seqlen_k) { col_end = 0; }
          if constexpr (Causal) { col_begin = key - diagonal() - query0; }
        }
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) {
          int const col = get<1>(c(r, j));
          if (col < col_begin || col >= col_end) { s(r, j) = -INFINITY; }
        }
      }
    }
  }
};

}  // namespace flash

// The score policy: which keys a query row may see, which tiles hold any of them and which of those need
// checking element by element, and how a raw Q·Kᵀ value becomes a score (softcap, ALiBi), with the
// derivative the backward needs. Written once for the forward, dQ and dK/dV kernels: all of them compute
// S = Q·Kᵀ on (kBlockM, kBlockN) tiles with the same MMA. flash.h states the score's formula.
#pragma once

#include <climits>
#include <cmath>

#include <cute/tensor.hpp>

#include "block_info.h"
#include "flash.h"
#include "utils.h"

namespace flash {

using namespace cute;

// Windowed: whether any key is hidden by position (causal, or a sliding window); the window's sides are
// run-time values, causal being (unbounded, 0), so that causal and windowed calls share instantiations.
// General: whether the window's left edge, softcap and ALiBi may be on (run-time branches then). The
// kernels are instantiated with and without it: at D = 128 the left edge's compares and ALiBi's
// per-element coordinates raise the forward's spills from ~120 to 400-500 bytes even when off, and the
// softcap's branch per tile, between Q·Kᵀ and the softmax, cost the forward 7-20% on the H200 even when
// off (benchmarks/NOTES.md). The common cases (plain, causal, sinks) run without them.
template <int kBlockM, int kBlockN, bool Windowed, bool General>
struct Mask {
  AttnParams const &params;  // the kernel's __grid_constant__ params: its fields are read from constant memory
  int seqlen_q, seqlen_k;
  float alibi_slope;         // in units of the raw scores the kernel holds; 0 without ALiBi

  CUTE_DEVICE Mask(AttnParams const &p, BlockInfo const &seq, int head)
      : params(p), seqlen_q(seq.seqlen_q), seqlen_k(seq.seqlen_k),
        alibi_slope(!General || p.alibi_slopes == nullptr
                        ? 0.f
                        : p.alibi_slopes[seq.batch * p.alibi_batch_stride + head] * p.inv_score_scale) {}

  // The window is aligned bottom-right: query row i sees key columns [first_col(i), last_col(i)], clipped to
  // [0, seqlen_k). Only meaningful when Windowed; without General the left side is unbounded.
  static constexpr bool kLeftEdge = Windowed && General;
  CUTE_DEVICE int diagonal() const { return seqlen_k - seqlen_q; }
  CUTE_DEVICE int first_col(int row) const { return row + diagonal() - params.window_left; }
  CUTE_DEVICE int last_col(int row) const { return row + diagonal() + params.window_right; }

  // ---- The loops over key blocks for a query block m_block (forward, dQ) ----

  // Key blocks [n_block_begin, n_block_end) hold every column that some row of query block m_block sees.
  CUTE_DEVICE int n_block_begin(int m_block) const {
    if constexpr (!kLeftEdge) { return 0; }
    int const first = first_col(m_block * kBlockM);  // of the block's first row
    return first <= 0 ? 0 : min(first / kBlockN, ceil_div(seqlen_k, kBlockN));
  }
  CUTE_DEVICE int n_block_end(int m_block) const {
    int const n_blocks = ceil_div(seqlen_k, kBlockN);
    if constexpr (!Windowed) { return n_blocks; }
    int const last = last_col((m_block + 1) * kBlockM - 1);  // of the block's last row
    return last < 0 ? 0 : min(n_blocks, last / kBlockN + 1);
  }

  // Key blocks at or past this one need masking: the ragged last block, and those the window's right
  // edge (the causal diagonal) crosses for some row of query block m_block.
  CUTE_DEVICE int n_block_first_masked(int m_block) const {
    int first = seqlen_k % kBlockN == 0 ? INT_MAX : seqlen_k / kBlockN;
    if constexpr (Windowed) {
      int const first_hidden = last_col(m_block * kBlockM) + 1;  // of the block's first row
      first = min(first, first_hidden <= 0 ? 0 : first_hidden / kBlockN);
    }
    return first;
  }
  // Key blocks below this one need masking too: the window's left edge crosses them.
  CUTE_DEVICE int n_block_unmasked_begin(int m_block) const {
    if constexpr (!kLeftEdge) { return 0; }
    int const first_seen = first_col((m_block + 1) * kBlockM - 1);  // of the block's last row
    return first_seen <= 0 ? 0 : ceil_div(first_seen, kBlockN);
  }

  // ---- The loop over query blocks for a key block n_block (dK/dV, which holds Sᵀ) ----

  // Query blocks [m_block_begin, m_block_end) see key block n_block.
  CUTE_DEVICE int m_block_begin(int n_block) const {
    if constexpr (!Windowed) { return 0; }
    int const first_row = n_block * kBlockN - diagonal() - params.window_right;  // sees the block's first column
    return first_row <= 0 ? 0 : first_row / kBlockM;
  }
  CUTE_DEVICE int m_block_end(int n_block) const {
    int const m_blocks = ceil_div(seqlen_q, kBlockM);
    if constexpr (!kLeftEdge) { return m_blocks; }
    int const last_row = (n_block + 1) * kBlockN - 1 - diagonal() + params.window_left;  // sees its last column
    return last_row < 0 ? 0 : min(m_blocks, last_row / kBlockM + 1);
  }

  // Query blocks below this one need masking against key block n_block (the right edge crosses them, or
  // the key block is ragged and then all of them do).
  CUTE_DEVICE int m_block_end_masked(int n_block) const {
    if (seqlen_k % kBlockN != 0 && n_block == seqlen_k / kBlockN) { return INT_MAX; }
    if constexpr (!Windowed) { return 0; }
    // Block m is clear of the right edge iff its first row sees the key block's last column.
    int const rows_needed = (n_block + 1) * kBlockN - 1 - diagonal() - params.window_right;
    return rows_needed <= 0 ? 0 : ceil_div(rows_needed, kBlockM);
  }
  // Query blocks at or past this one need masking too: the left edge crosses them.
  CUTE_DEVICE int m_block_first_masked(int n_block) const {
    if constexpr (!kLeftEdge) { return INT_MAX; }
    // Block m is clear of the left edge iff its last row sees the key block's first column.
    int const rows = n_block * kBlockN + params.window_left - diagonal() + 1;
    return rows <= 0 ? 0 : rows / kBlockM;
  }

  // ---- Scores ----

  // Raw Q·Kᵀ values (fp32 accumulators) -> scores as the softmax takes them: the softcap's tanh, the ALiBi
  // bias, and -inf where Masked and the query may not see the key. tScS holds each score's (row, col) within
  // the tile, partitioned like the accumulator, so this serves any tiled MMA. Rows are queries and columns
  // keys, or the reverse when Transposed (the dK/dV kernel computes Sᵀ).
  template <bool Masked, bool Transposed = false, class Scores, class Coords>
  CUTE_DEVICE void apply(Scores &scores, Coords const &tScS, int m_block, int n_block) const {
    Tensor s = make_tensor(scores.data(), rows_cols(scores.layout()));  // (rows, cols)
    Tensor c = make_tensor(tScS.data(), rows_cols(tScS.layout()));      // (rows, cols) -> (row, col)
    static_assert(decltype(size(s) == size(c))::value);
    int const query0 = m_block * kBlockM, key0 = n_block * kBlockN;
    if (General && params.softcap_premul != 0.f) {
      CUTE_UNROLL
      for (int i = 0; i < size(s); ++i) { s(i) = tanh_approx(s(i) * params.softcap_premul); }
    }
    if (alibi_slope != 0.f) {
      CUTE_UNROLL
      for (int r = 0; r < size<0>(s); ++r) {
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) { s(r, j) -= alibi_slope * alibi_distance<Transposed>(c(r, j), query0, key0); }
      }
    }
    if constexpr (Masked) {
      CUTE_UNROLL
      for (int r = 0; r < size<0>(s); ++r) {
        // Visible columns of this row, relative to the tile: [col_begin, col_end). One pair per row keeps
        // the per-element work to two compares.
        int col_begin = INT_MIN, col_end = INT_MAX;
        if constexpr (!Transposed) {
          int const query = query0 + get<0>(c(r, 0));
          col_end = seqlen_k - key0;
          if constexpr (kLeftEdge) { col_begin = first_col(query) - key0; }
          if constexpr (Windowed) { col_end = min(col_end, last_col(query) + 1 - key0); }
        } else {
          int const key = key0 + get<0>(c(r, 0));
          // Query i sees this key iff key - diag - right <= i <= key - diag + left.
          if constexpr (Windowed) { col_begin = key - diagonal() - params.window_right - query0; }
          if constexpr (kLeftEdge) { col_end = key - diagonal() + params.window_left + 1 - query0; }
          if (key >= seqlen_k) { col_end = INT_MIN; }
        }
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) {
          int const col = get<1>(c(r, j));
          if (col < col_begin || col >= col_end) { s(r, j) = -INFINITY; }
        }
      }
    }
  }

  // dS w.r.t. the score -> dS w.r.t. softmax_scale·q·k, in place: with softcap, times tanh's derivative
  // 1 - t². t is recovered from P and the row's LSE (t·scale_log2 = log2 P + lse_log2, plus the ALiBi bias
  // taken off), so that no (rows, cols) tile of t stays live beside P and dP. Where P = 0, dS is 0 already.
  // lse_log2: per row, or per column when Transposed.
  template <bool Transposed = false, class DS, class P, class Coords>
  CUTE_DEVICE void chain_rule(DS &ds, P const &p, float const *lse_log2, Coords const &tScS, int m_block,
                              int n_block) const {
    if (!General || params.softcap_premul == 0.f) { return; }
    Tensor d = make_tensor(ds.data(), rows_cols(ds.layout()));   // (rows, cols)
    Tensor pr = make_tensor(p.data(), rows_cols(p.layout()));    // (rows, cols)
    Tensor c = make_tensor(tScS.data(), rows_cols(tScS.layout()));
    float const inv_scale_log2 = 1.f / params.softmax_scale_log2;
    int const query0 = m_block * kBlockM, key0 = n_block * kBlockN;
    CUTE_UNROLL
    for (int r = 0; r < size<0>(d); ++r) {
      CUTE_UNROLL
      for (int j = 0; j < size<1>(d); ++j) {
        float const prob = pr(r, j);
        float t = (__log2f(prob) + lse_log2[Transposed ? j : r]) * inv_scale_log2;
        if (alibi_slope != 0.f) { t += alibi_slope * alibi_distance<Transposed>(c(r, j), query0, key0); }
        if (prob > 0.f) { d(r, j) *= 1.f - t * t; }
      }
    }
  }

 private:
  // |i + Sk - Sq - j| for the score at tile coordinate rc, as a float.
  template <bool Transposed, class RowCol>
  CUTE_DEVICE float alibi_distance(RowCol const &rc, int query0, int key0) const {
    int const query = query0 + (Transposed ? get<1>(rc) : get<0>(rc));
    int const key = key0 + (Transposed ? get<0>(rc) : get<1>(rc));
    return float(abs(query + diagonal() - key));
  }
};

}  // namespace flash

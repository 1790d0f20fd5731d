// Small device helpers shared by every kernel: accumulator views, matmul steps, tile copies.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include "flash.h"

namespace flash {

using namespace cute;

// One head's (seqlen, kHeadDim) matrix of a (batch, seqlen, heads, head_dim) tensor of T, starting at row
// row_start (varlen: the sequence's first row, with batch_stride 0); 64-bit offsets.
template <int kHeadDim, typename T>
CUTE_DEVICE auto head_matrix(HeadTensor const &t, int batch, int head, int row_start, int seqlen) {
  index_t const offset = batch * t.batch_stride + row_start * t.row_stride + head * t.head_stride;
  return make_tensor(make_gmem_ptr(static_cast<T *>(t.ptr) + offset), make_shape(seqlen, Int<kHeadDim>{}),
                     make_stride(t.row_stride, _1{}));
}

// One head's (seqlen) values of a per-row fp32 tensor (LSE, rowsum(dO * O)), starting at row row_start.
CUTE_DEVICE auto row_vector(RowTensor const &t, int batch, int head, int row_start, int seqlen) {
  return make_tensor(make_gmem_ptr(t.ptr + batch * t.batch_stride + head * t.head_stride + row_start),
                     make_shape(seqlen));
}

// An SM80 accumulator ((2,2),MMA_M,MMA_N) seen as (rows, cols) = ((2,MMA_M),(2,MMA_N)):
// each thread holds two rows (r and r+8) and column pairs of each 16x8 tile.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto rows_cols(Layout const &acc) {
  static_assert(rank(Layout{}) == 3 && size<0>(Layout{}) == 4);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
}

// The same accumulator as the A operand of the next MMA: ((2,2),MMA_M,MMA_N) -> ((2,2,2),MMA_M,MMA_N/2).
// The m16n8k16 A fragment is exactly the C fragments of two neighbouring n8 tiles, so no data moves.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a(Layout const &acc) {
  static_assert(rank(Layout{}) == 3 && size<2>(Layout{}) % 2 == 0);
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2),MMA_M,(2,MMA_N/2))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// Register tensor of another element type (e.g. fp32 accumulator -> bf16 operand), converted in pairs.
template <typename To, class Engine, class Layout>
CUTE_DEVICE auto convert_type(Tensor<Engine, Layout> const &src) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(src))::value;
  Tensor dst = make_tensor<To>(src.layout());
  cutlass::NumericArrayConverter<To, From, N> convert;
  *reinterpret_cast<cutlass::Array<To, N> *>(dst.data()) =
      convert(*reinterpret_cast<cutlass::Array<From, N> const *>(src.data()));
  return dst;
}

// 2^x on the special-function unit; exp2(-inf) = 0, which masking relies on.
CUTE_DEVICE float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh on the special-function unit (relative error about 2^-11, below the bf16 rounding of the scores it
// is applied to): the softcap.
CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The four threads of a quad hold the same accumulator rows: reduce across them.
template <class Op>
CUTE_DEVICE float quad_allreduce(float x, Op op) {
  x = op(x, __shfl_xor_sync(0xffffffff, x, 2));
  x = op(x, __shfl_xor_sync(0xffffffff, x, 1));
  return x;
}

// acc += A·B with both operands in shared memory. ldmatrix of k-slice k+1 is issued before the MMAs of
// slice k so shared-memory latency hides behind tensor-core work.
template <class TiledMma, class Acc, class RegA, class RegB, class SmemA, class SmemB, class CopyA, class CopyB>
CUTE_DEVICE void gemm_smem_smem(TiledMma const &mma, Acc &acc, RegA &tCrA, RegB &tCrB, SmemA const &tCsA,
                                SmemB const &tCsB, CopyA const &copy_a, CopyB const &copy_b) {
  Tensor tCrA_view = make_tensor(tCrA.data(), CopyA::retile(tCrA.layout()));
  Tensor tCrB_view = make_tensor(tCrB.data(), CopyB::retile(tCrB.layout()));
  static_assert(size<2>(RegA{}) == size<2>(RegB{}));
  copy(copy_a, tCsA(_, _, _0{}), tCrA_view(_, _, _0{}));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) {
      copy(copy_a, tCsA(_, _, k + 1), tCrA_view(_, _, k + 1));
      copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1));
    }
    gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

// acc += A·B with A already in registers (P, dS) and B in shared memory.
template <class TiledMma, class Acc, class RegA, class RegB, class SmemB, class CopyB>
CUTE_DEVICE void gemm_reg_smem(TiledMma const &mma, Acc &acc, RegA const &tCrA, RegB &tCrB, SmemB const &tCsB,
                               CopyB const &copy_b) {
  Tensor tCrB_view = make_tensor(tCrB.data(), CopyB::retile(tCrB.layout()));
  copy(copy_b, tCsB(_, _, _0{}), tCrB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tCrA); ++k) {
    if (k + 1 < size<2>(tCrA)) { copy(copy_b, tCsB(_, _, k + 1), tCrB_view(_, _, k + 1)); }
    gemm(mma, tCrA(_, _, k), tCrB(_, _, k), acc);
  }
}

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

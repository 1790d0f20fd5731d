// Small device helpers shared by every kernel of both architectures: tensor views, accumulator views,
// conversions, the special-function unit.
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

// An accumulator seen as (rows, cols). Both architectures' tensor-core accumulators give each thread two
// rows (r and r+8 of a 16-row slice) and column pairs, the four threads of a quad sharing the rows:
//   SM80 mma.sync ((2,2),MMA_M,MMA_N)     -> ((2,MMA_M),(2,MMA_N)), one 8-column pair per 16x8 tile;
//   SM90 wgmma    ((2,2,N/8),MMA_M,MMA_N) -> ((2,MMA_M),(2,N/8,MMA_N)), N/8 pairs per 64xN tile.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto rows_cols(Layout const &acc) {
  static_assert(rank(Layout{}) == 3 && size<0, 0>(Layout{}) == 2 && size<0, 1>(Layout{}) == 2);
  if constexpr (rank<0>(Layout{}) == 2) {
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)), make_layout(get<0, 0>(acc), get<2>(acc)));
  } else {
    static_assert(rank<0>(Layout{}) == 3);
    return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                       make_layout(get<0, 0>(acc), get<0, 2>(acc), get<2>(acc)));
  }
}

// Writes one fp32 value per accumulator row (the LSE) to gRow (kRows,): in each quad, the thread that
// holds column 0 writes. tCc: the tile's (row, col) coordinates partitioned like the accumulator. Rows at
// or past max_row are skipped.
template <class RowValues, class RowTile, class Coords>
CUTE_DEVICE void store_row_values(RowValues const &values, RowTile &gRow, Coords const &tCc, int max_row) {
  Tensor rc = make_tensor(tCc.data(), rows_cols(tCc.layout()));  // (rows, cols) -> (row, col)
  static_assert(decltype(size<0>(rc) == size(values))::value);
  if (get<1>(rc(0, 0)) == 0) {
    CUTE_UNROLL
    for (int r = 0; r < size(values); ++r) {
      int const row = get<0>(rc(r, 0));
      if (row < max_row) { gRow(row) = values(r); }
    }
  }
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

// 2^x on the FMA units, for a kernel that the special-function unit's 16 exp2 per SM and clock bound (the
// Hopper forward at D = 64): x = j + f, j = round(x) and f in [-1/2, 1/2]; 2^f by a cubic with p(0) = 1
// (relative error 1.0e-4, 20 times below the bf16 rounding of P), 2^j added into its exponent bits. x is
// clamped at -127 so that j's bits cannot reach the sign: x <= -127 (-inf too) gives exactly 0, x in
// (-127, -126) a denormal where exp2_approx flushes to 0. x must not be NaN or +inf.
CUTE_DEVICE float exp2_fma(float x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: x + kRound holds round(x) in its low mantissa bits
  x = fmaxf(x, -127.f);
  float const t = x + kRound;
  float const f = x - (t - kRound);  // both subtractions exact
  float const p = fmaf(fmaf(fmaf(0.05500852f, f, 0.24221025f), f, 0.6932826f), f, 1.f);
  // t's bits are those of kRound plus j; shifted by 23 only j's remain, at the exponent.
  return __uint_as_float(__float_as_uint(p) + (__float_as_uint(t) << 23));
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

}  // namespace flash

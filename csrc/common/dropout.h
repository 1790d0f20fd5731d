// Attention dropout: which entries of P are kept, regenerated identically by the forward, dQ and dK/dV
// kernels (and by the debug kernel of dropout_mask.cu) from one (seed, offset), with no state in memory.
//
// The random bits come from Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011): a counter-based generator, so the bits of an entry are a pure function of its coordinates, and
// kernels that hold the same entry in different thread layouts still agree. 16 bits per entry: an entry is
// dropped iff they are below max(1, round(p * 2^16)), so the keep probability is 1 - p within 2^-17 (2^-16
// for p < 2^-17) where 8 bits, as flash_attn uses, would bias it by up to 1/512, which a kept-fraction test
// over a few million entries sees.
//
// One Philox call (128 bits = 8 entries) covers, within a sequence of (batch b, query head h), the queries
// {i, i + 8} and the keys {j0, j0 + 1, j0 + 8, j0 + 9}, i mod 16 < 8, j0 mod 16 in {0, 2, 4, 6}. That is what
// a thread holds of a 16x16 tile of the SM80 m16n8k16 accumulator (rows r and r + 8, column pairs c, c + 1 of
// two n8 tiles 8 apart) when rows are queries: the forward and dQ make one call per 8 entries. In the dK/dV
// kernel rows are keys: a thread holds keys {j, j + 8} and queries {i, i + 1, i + 8, i + 9}, half of two calls,
// and the lane holding keys {j ^ 1, j ^ 1 + 8} (lane ^ 4) needs the other halves of the same two calls; each of
// the two makes one and they swap halves with two shuffles: one call per 8 entries there too. (Where warps
// split the columns, as the dK/dV kernel does above D = 128, a thread's n8 tiles are not 8 apart: one call
// per 4 entries there.)
//
// Counter: (key unit, query unit, 64-bit offset + b * heads + h); key: the 64-bit seed. A forward asks the
// generator for an offset increment of batch * heads (rounded up to 4, as PyTorch requires), so calls that
// follow one another never share a counter.
#pragma once

#include <cstdint>
#include <utility>

#include <cute/tensor.hpp>

#include "flash.h"
#include "utils.h"

namespace flash {

using namespace cute;

struct Philox4x32 {
  uint32_t word[4];
};

// Ten rounds of Philox4x32 (the published multipliers and Weyl key increments).
CUTE_HOST_DEVICE Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                          uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  CUTE_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint64_t const p0 = uint64_t(kMul0) * c0;  // one 32x32 -> 64 multiply each (IMAD.WIDE.U32)
    uint64_t const p1 = uint64_t(kMul1) * c2;
    uint32_t const hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    uint32_t const hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

// The unit of one Philox call, and where an entry's 16 bits sit in it: word 2 * (query bit 3) + (key bit 3),
// half key bit 0. Host and device: dropout_mask.cu and the kernels agree by construction.
CUTE_HOST_DEVICE uint32_t dropout_query_unit(int query) { return uint32_t(query >> 4) * 8 + uint32_t(query & 7); }
CUTE_HOST_DEVICE uint32_t dropout_key_unit(int key) { return uint32_t(key >> 4) * 4 + uint32_t((key >> 1) & 3); }
CUTE_HOST_DEVICE int dropout_word(int query, int key) { return ((query >> 3) & 1) * 2 + ((key >> 3) & 1); }

// (seed, offset) from the params' RngState: under CUDA-graph capture they are read from device memory at
// replay (PyTorch's philox unpack, written here without torch).
CUTE_DEVICE void unpack_rng(RngState const &rng, uint64_t &seed, uint64_t &offset) {
  if (rng.seed_ptr != nullptr) {
    seed = uint64_t(*rng.seed_ptr);
    offset = uint64_t(*rng.offset_ptr) + rng.offset_intragraph;
  } else {
    seed = rng.seed;
    offset = rng.offset;
  }
}

// What keep_mask returns for a tile partitioned as Coords: one bit per entry.
template <class Coords>
using KeepMask = cute::array<uint32_t, (decltype(size(std::declval<Coords>()))::value + 31) / 32>;

// Made where it is used, from the params (constant memory, or the rng_state in global memory): held through
// a kernel's main loop, its five registers raised the general variant's spills.
struct Dropout {
  uint32_t seed_lo, seed_hi;
  uint32_t stream_lo, stream_hi;  // offset + batch * heads + head
  uint32_t threshold;             // dropped iff the entry's 16 bits < threshold

  CUTE_DEVICE Dropout(AttnParams const &p, int batch, int head) : threshold(p.dropout_threshold) {
    uint64_t seed, offset;
    unpack_rng(p.rng, seed, offset);
    uint64_t const stream = offset + uint64_t(batch) * uint64_t(p.heads) + uint64_t(head);
    seed_lo = uint32_t(seed), seed_hi = uint32_t(seed >> 32);
    stream_lo = uint32_t(stream), stream_hi = uint32_t(stream >> 32);
  }

  // The call whose unit holds (query, key).
  CUTE_DEVICE Philox4x32 bits(int query, int key) const {
    return philox4x32_10(dropout_key_unit(key), dropout_query_unit(query), stream_lo, stream_hi, seed_lo, seed_hi);
  }
  CUTE_DEVICE bool keep(uint32_t half_word) const { return (half_word & 0xffffu) >= threshold; }

  // Calls f(row, col, keep) for every entry of an SM80 accumulator tile, in its (rows, cols) view, whose
  // (row, col) within the tile tScS holds (partitioned like the accumulator, as Mask::apply takes it); the
  // tile's first row and column are row0 and col0 of the sequence. Rows are queries and columns keys, or the
  // reverse when Transposed (dK/dV). Paired: the n8 tiles 2k and 2k + 1 of a
  // thread lie 8 columns apart (a single warp across the columns, kWarpsN = 1), so that one call serves both;
  // without it, each n8 tile makes its own call (correct for any layout, at twice the calls).
  //
  // Rolled: one call at a time (a loop, not unrolled), so that only one call's state is live; then f gets run-time
  // (row, col) and must not index registers with them (keep_mask's bits may). Unrolled, the calls of a step
  // overlap, and beside the dK, dV (or dQ) accumulators their 4 x 10 live registers raised the general
  // variant's spills from 84 to ~400 bytes (dK/dV, D = 128).
  template <bool Transposed, bool Paired, bool Rolled = false, class Coords, class F>
  CUTE_DEVICE void for_each_keep(Coords const &tScS, int row0, int col0, F &&f) const {
    Tensor c = make_tensor(tScS.data(), rows_cols(tScS.layout()));  // (rows, cols) -> (row, col)
    constexpr int kRows = decltype(size<0>(c))::value, kCols = decltype(size<1>(c))::value;
    static_assert(kRows % 2 == 0 && kCols % 2 == 0, "rows r, r + 8 and columns c, c + 1 of each m16n8 tile");
    static_assert(!Paired || kCols % 4 == 0);
    constexpr int kStep = Paired ? 4 : 2;  // columns per call
    constexpr int kCalls = (kRows / 2) * (kCols / kStep);
    constexpr int kUnroll = Rolled ? 1 : kCalls;
    // Rows r (even) and r + 1 of the (rows, cols) view are rows g and g + 8 of a 16-row MMA tile, g < 8, so
    // that their bit 3 is 0 and 1; with Paired, columns col..col + 3 (col a multiple of 4) are c, c + 1,
    // c + 8, c + 9 with c mod 16 < 8. Then the word of an entry is known at compile time; without Paired
    // the column's bit 3 is read from its coordinate.
    if constexpr (!Transposed) {
#pragma unroll kUnroll
      for (int call = 0; call < kCalls; ++call) {
        int const r = 2 * (call % (kRows / 2)), col = kStep * (call / (kRows / 2));  // rows r (query i), r + 1 (i + 8)
        int const query = row0 + get<0>(c(r, col)), key = col0 + get<1>(c(r, col));
        Philox4x32 const rand = bits(query, key);
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {
          CUTE_UNROLL
          for (int e = 0; e < kStep; ++e) {
            // Key bit 3: e / 2 when Paired, else that of this column's key (the same for e = 0, 1).
            uint32_t const word = Paired ? rand.word[2 * h + e / 2] : pick(rand, h, (key >> 3) & 1);
            f(r + h, col + e, keep(word >> (16 * (e & 1))));
          }
        }
      }
    } else {
      // Rows are keys: this lane holds keys j, j + 8 (parity p = j & 1), the lane ^ 4 keys j ^ 1, j ^ 1 + 8, in
      // the same columns. Each makes the call of the queries of its parity, i + p (and i + p + 8), keeps its
      // own keys' halves and sends the partner's.
      uint32_t const parity = uint32_t((row0 + get<0>(c(0, 0))) & 1);
#pragma unroll kUnroll
      for (int call = 0; call < kCalls; ++call) {
        int const r = 2 * (call % (kRows / 2)), col = kStep * (call / (kRows / 2));  // rows r (key j), r + 1 (j + 8)
        int const key = row0 + get<0>(c(r, col)), query = col0 + get<1>(c(r, col));  // query even
        Philox4x32 const rand = bits(query + int(parity), key);
        CUTE_UNROLL
        for (int a = 0; a < kStep / 2; ++a) {  // the n8 tiles: queries i + p (+ 8 when Paired and a = 1)
          // Query bit 3: a when Paired, else that of this tile's queries.
          int const qbit = Paired ? a : (query >> 3) & 1;
          uint32_t const w0 = pick(rand, qbit, 0), w1 = pick(rand, qbit, 1);  // keys j0 (+1), j0 + 8 (+9)
          uint32_t const own = parity ? __byte_perm(w0, w1, 0x7632) : __byte_perm(w0, w1, 0x5410);  // j | j + 8
          uint32_t const send = parity ? __byte_perm(w0, w1, 0x5410) : __byte_perm(w0, w1, 0x7632);
          uint32_t const recv = __shfl_xor_sync(0xffffffff, send, 4);  // the partner's queries, this lane's keys
          int const col_own = col + 2 * a + int(parity), col_other = col + 2 * a + 1 - int(parity);
          CUTE_UNROLL
          for (int kh = 0; kh < 2; ++kh) {
            f(r + kh, col_own, keep(own >> (16 * kh)));
            f(r + kh, col_other, keep(recv >> (16 * kh)));
          }
        }
      }
    }
  }

  // Word 2 * query_bit + key_bit of a call, by selects (a run-time index would put rand in local memory).
  CUTE_DEVICE static uint32_t pick(Philox4x32 const &rand, int query_bit, int key_bit) {
    uint32_t const lo = key_bit ? rand.word[1] : rand.word[0], hi = key_bit ? rand.word[3] : rand.word[2];
    return query_bit ? hi : lo;
  }

  // Zeroes the dropped entries of a tile of P (fp32 or 16-bit), in place (the forward: kept ones are scaled with
  // the output).
  template <bool Paired, class Acc, class Coords>
  CUTE_DEVICE void drop(Acc &acc, Coords const &tScS, int row0, int col0) const {
    Tensor s = make_tensor(acc.data(), rows_cols(acc.layout()));
    for_each_keep<false, Paired>(tScS, row0, col0, [&](int r, int col, bool kept) {
      if (!kept) { s(r, col) = typename decltype(s)::value_type(0.f); }
    });
  }

  // The keep bits of a tile as a bit mask (entry (r, col) of the (rows, cols) view at bit r + rows * col), for a
  // kernel that applies them to two tiles (dK/dV: Pᵀ and dPᵀ) without making the calls twice.
  // One call at a time (Rolled) where the bits fit one register, whose run-time bit index costs nothing.
  template <bool Transposed, bool Paired, class Coords>
  CUTE_DEVICE auto keep_mask(Coords const &tScS, int row0, int col0) const {
    constexpr int kRows = decltype(size<0>(rows_cols(tScS.layout())))::value;
    constexpr int kSize = decltype(size(tScS))::value;
    constexpr bool kOneWord = kSize <= 32;
    KeepMask<Coords> mask{};
    for_each_keep<Transposed, Paired, kOneWord>(tScS, row0, col0, [&](int r, int col, bool kept) {
      int const bit = r + kRows * col;
      if constexpr (kOneWord) {
        mask[0] |= uint32_t(kept) << bit;
      } else {
        mask[bit / 32] |= uint32_t(kept) << (bit % 32);
      }
    });
    return mask;
  }
};

// Whether entry (r, col) of a tile's (rows, cols) view is kept, by a keep_mask of that tile.
template <int kRows, class Mask>
CUTE_DEVICE bool kept_in(Mask const &mask, int r, int col) {
  int const bit = r + kRows * col;
  return (mask[bit / 32] >> (bit % 32)) & 1u;
}

// Zeroes the dropped entries of a tile laid out as an accumulator (fp32 or 16-bit), in place.
template <class Mask, class Acc>
CUTE_DEVICE void zero_dropped(Mask const &mask, Acc &acc) {
  Tensor t = make_tensor(acc.data(), rows_cols(acc.layout()));
  constexpr int kRows = decltype(size<0>(t))::value;
  CUTE_UNROLL
  for (int col = 0; col < size<1>(t); ++col) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (!kept_in<kRows>(mask, r, col)) { t(r, col) = typename decltype(t)::value_type(0.f); }
    }
  }
}

// An fp32 accumulator tile, in place: dropped entries 0, kept ones times scale (dP of the dropped P -> dP of P).
template <class Mask, class Acc>
CUTE_DEVICE void apply_keep_mask(Mask const &mask, Acc &acc, float scale) {
  Tensor t = make_tensor(acc.data(), rows_cols(acc.layout()));
  constexpr int kRows = decltype(size<0>(t))::value;
  CUTE_UNROLL
  for (int col = 0; col < size<1>(t); ++col) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) { t(r, col) = kept_in<kRows>(mask, r, col) ? t(r, col) * scale : 0.f; }
  }
}

}  // namespace flash

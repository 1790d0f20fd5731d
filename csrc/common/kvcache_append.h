// flash_attn_with_kvcache's append: the new keys and values go into the caches (contiguous or paged) in place,
// at each sequence's cache_seqlens[b], before the attention kernel reads them (same stream); with rotary, the new keys are
// rotated on the way and q is rotated into a buffer of its own. Memory-bound and small (seqlen_new rows):
// plain CUDA, one thread per 16 bytes (8 elements) of a row, every index clamped into the tensors.
#pragma once

#include <cuda_runtime.h>

#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include "flash.h"
#include "cache_layout.h"

namespace flash {

namespace append {

constexpr int kVec = 8;  // elements per thread: 16 bytes; head_dim and rotary_dim / 2 are multiples of 8

template <typename Element>
__device__ void load(Element const *src, float (&x)[kVec]) {
  auto const v = *reinterpret_cast<cutlass::Array<Element, kVec> const *>(src);
  auto const f = cutlass::NumericArrayConverter<float, Element, kVec>{}(v);
  for (int t = 0; t < kVec; ++t) { x[t] = f[t]; }
}

template <typename Element>
__device__ void store(Element *dst, float const (&x)[kVec]) {
  cutlass::Array<float, kVec> f;
  for (int t = 0; t < kVec; ++t) { f[t] = x[t]; }
  *reinterpret_cast<cutlass::Array<Element, kVec> *>(dst) = cutlass::NumericArrayConverter<Element, float, kVec>{}(f);
}

// Row `row` of a head tensor, as Element.
template <typename Element>
__device__ Element *row_ptr(HeadTensor const &t, int batch, int row, int head) {
  return static_cast<Element *>(t.ptr) + batch * t.batch_stride + row * t.row_stride + head * t.head_stride;
}

// Columns [8 chunk, 8 chunk + 8) of a row, rotated at `position` where they lie in the rotary dims (in fp32,
// as flash_attn; the rest pass through). Interleaved (GPT-J) pairs (2i, 2i + 1), which one chunk holds;
// GPT-NeoX pairs (i, i + rotary_dim / 2), whose partner chunk lies rotary_dim / 16 chunks away.
template <typename Element>
__device__ void rotated_chunk(KvCacheAppendParams const &p, Element const *row, int chunk, int position,
                              float (&x)[kVec]) {
  load(row + chunk * kVec, x);
  int const col = chunk * kVec;
  if (p.rotary_cos == nullptr || col >= p.rotary_dim) { return; }
  position = min(max(position, 0), p.seqlen_ro - 1);
  auto const *cos = static_cast<Element const *>(p.rotary_cos) + position * p.rotary_row_stride;
  auto const *sin = static_cast<Element const *>(p.rotary_sin) + position * p.rotary_row_stride;
  if (p.rotary_interleaved) {
    for (int t = 0; t < kVec; t += 2) {
      float const c = float(cos[(col + t) / 2]), s = float(sin[(col + t) / 2]);
      float const x0 = x[t], x1 = x[t + 1];
      x[t] = x0 * c - x1 * s;
      x[t + 1] = x0 * s + x1 * c;
    }
  } else {
    int const half = p.rotary_dim / 2;
    bool const first = col < half;
    float partner[kVec];
    load(row + (first ? col + half : col - half), partner);
    for (int t = 0; t < kVec; ++t) {
      int const i = (first ? col : col - half) + t;
      float const c = float(cos[i]), s = float(sin[i]);
      x[t] = first ? x[t] * c - partner[t] * s : x[t] * c + partner[t] * s;
    }
  }
}

}  // namespace append

// Threads [0, kv) each append 8 elements of one new key and value row (batch, row, kv head, chunk); threads
// [kv, kv + q) rotate 8 elements of one query row (rotary only).
template <typename Element>
__global__ void kvcache_append_kernel(__grid_constant__ const KvCacheAppendParams p) {
  using namespace append;
  int const chunks = p.head_dim / kVec;
  index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  index_t const kv_items = index_t(p.batch) * p.seqlen_new * p.heads_kv * chunks;
  index_t const q_items = p.q_rotated.ptr == nullptr ? 0 : index_t(p.batch) * p.seqlen_q * p.heads * chunks;
  // The last block's spare threads: without rotary there are no q items, and a thread past the kv items
  // would otherwise be read as one and store through the null q_rotated (session 6's illegal address).
  if (idx >= kv_items + q_items) { return; }
  bool const is_kv = idx < kv_items;
  if (!is_kv) { idx -= kv_items; }
  int const chunk = int(idx % chunks);
  idx /= chunks;
  int const heads = is_kv ? p.heads_kv : p.heads, rows = is_kv ? p.seqlen_new : p.seqlen_q;
  int const head = int(idx % heads);
  idx /= heads;
  int const row = int(idx % rows);
  int const batch = int(idx / rows);
  if (batch >= p.batch) { return; }
  // As BlockInfo sees it; positions (rotary) count from the sequence's first key, span.begin (leftpad).
  CacheSpan const span = cache_span(p.cache_seqlens, p.cache_rows, batch, p.seqlen_cache, p.seqlen_new);
  float x[kVec];
  if (is_kv) {
    int const dst = span.start + row;
    if (dst >= span.end) { return; }  // past the cache: dropped (the host refuses what it can see)
    rotated_chunk(p, row_ptr<Element>(p.k_new, batch, row, head), chunk, dst - span.begin, x);
    store(cache_row<Element>(p.k_cache, p.pages, span.batch, dst, head) + chunk * kVec, x);
    load(row_ptr<Element>(p.v_new, batch, row, head) + chunk * kVec, x);
    store(cache_row<Element>(p.v_cache, p.pages, span.batch, dst, head) + chunk * kVec, x);
  } else {
    int const position = span.start - span.begin + (p.rotary_q_per_row ? row : 0);
    rotated_chunk(p, row_ptr<Element>(p.q, batch, row, head), chunk, position, x);
    store(row_ptr<Element>(p.q_rotated, batch, row, head) + chunk * kVec, x);
  }
}

template <typename Element>
cudaError_t run_kvcache_append(KvCacheAppendParams const &params, cudaStream_t stream) {
  constexpr int kThreads = 256;
  index_t const chunks = params.head_dim / append::kVec;
  index_t const kv = index_t(params.batch) * params.seqlen_new * params.heads_kv * chunks;
  index_t const q = params.q_rotated.ptr == nullptr ? 0 : index_t(params.batch) * params.seqlen_q * params.heads * chunks;
  if (kv + q == 0) { return cudaSuccess; }
  kvcache_append_kernel<Element><<<unsigned((kv + q + kThreads - 1) / kThreads), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace flash

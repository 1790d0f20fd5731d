// Where a sequence's keys lie in a KV cache (contiguous or paged): the one place the kernels (the forward's
// KvCache variant, the append) turn cache_seqlens, cache_batch_idx, cache_leftpad and the block table into
// rows and addresses, clamping every index into the tensors whatever the caller's values.
#pragma once

#include <cute/config.hpp>

#include "flash.h"

namespace flash {

// Sequence b's keys are rows [begin, end) of cache row `batch`; the append writes rows [start, end), start =
// cache_seqlens[b] (the keys before it being [begin, start)). Clamped: 0 <= begin <= start <= end <= capacity,
// and the cache row into [0, batch_cache).
struct CacheSpan {
  int batch, begin, start, end;
};

CUTE_DEVICE CacheSpan cache_span(int const *cache_seqlens, CacheRows const &rows, int batch, int capacity,
                                 int seqlen_new) {
  CacheSpan s;
  s.batch = rows.batch_idx == nullptr ? batch : min(max(rows.batch_idx[batch], 0), rows.batch_cache - 1);
  s.start = min(max(cache_seqlens[batch], 0), capacity);
  s.end = min(s.start + seqlen_new, capacity);
  s.begin = rows.leftpad == nullptr ? 0 : min(max(rows.leftpad[batch], 0), s.start);
  return s;
}

// Row `row` of kv head `head` in a cache laid out as `t`: contiguous, (batch_cache, seqlen_cache, heads_kv,
// head_dim), `batch` its cache row (CacheSpan::batch); paged, (num_pages, page_size, heads_kv, head_dim),
// `batch` the sequence's row of the block table (which cache_batch_idx never remaps). A row past the table
// reads its last entry, a page id outside [0, num_pages) is clamped: the address is always inside the cache.
template <typename Element>
CUTE_DEVICE Element *cache_row(HeadTensor const &t, PageTable const &pages, int batch, int row, int head) {
  if (pages.table == nullptr) {
    return static_cast<Element *>(t.ptr) + batch * t.batch_stride + row * t.row_stride + head * t.head_stride;
  }
  int const index = min(row / pages.page_size, pages.max_pages - 1);
  int const page = min(max(pages.table[batch * pages.batch_stride + index], 0), pages.num_pages - 1);
  return static_cast<Element *>(t.ptr) + page * t.batch_stride + (row % pages.page_size) * t.row_stride +
         head * t.head_stride;
}

}  // namespace flash

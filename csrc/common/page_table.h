// Where a row of a paged KV cache lies: the one place the kernels (the forward's KvCache variant, the
// append) turn a sequence row into an address through the block table, clamping every index into the
// tensors whatever the table holds.
#pragma once

#include <cute/config.hpp>

#include "flash.h"

namespace flash {

// Row `row` of sequence `batch`, kv head `head`, in a cache laid out as `t` (contiguous: (batch, seqlen_cache,
// heads_kv, head_dim); paged: (num_pages, page_size, heads_kv, head_dim) through pages). A row past the table
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

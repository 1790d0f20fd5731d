// Where one sequence of the batch lives and how long it is: the one place every kernel (forward,
// preprocess, dQ, dK/dV) takes its row offsets and lengths from, for fixed-length and varlen batches alike.
#pragma once

#include <cute/tensor.hpp>

#include "cache_layout.h"
#include "flash.h"
#include "utils.h"

namespace flash {

using namespace cute;

struct BlockInfo {
  int batch;
  int k_batch;  // the batch index of k and v: batch, but for a KV cache's cache_batch_idx
  int q_start, k_start;  // first row of the sequence in q, o (k, v); 0 for fixed-length, where batch_stride picks it
  int seqlen_q, seqlen_k;

  // maybe_varlen: whether cu_seqlens may be given, so that the batch is told apart at run time. Every kernel
  // is instantiated for fixed-length batches with false_type (their "common" variant, mask.h), so that the
  // offsets and lengths fold back to the params: the run-time branch more than doubled the D = 128
  // forward's spills and cost causal short sequences up to 10% (benchmarks/NOTES.md).
  //
  // KvCache (the forward's KvCache variant only, false_type elsewhere so that nothing changes there): k and
  // v are caches whose rows [cache_leftpad[b], cache_seqlens[b] + seqlen_new) of cache row cache_batch_idx[b]
  // are the keys (cache_layout.h: clamped into the cache whatever the values).
  template <class MaybeVarlen = cute::true_type, class KvCache = cute::false_type>
  CUTE_DEVICE BlockInfo(AttnParams const &p, int batch, MaybeVarlen maybe_varlen = {}, KvCache kv_cache = {})
      : batch(batch), k_batch(batch) {
    if (!maybe_varlen || p.cu_seqlens_q == nullptr) {
      q_start = k_start = 0;
      seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
    } else {
      clamped_span(p.cu_seqlens_q, p.total_q, p.seqlen_q, q_start, seqlen_q);
      clamped_span(p.cu_seqlens_k, p.total_k, p.seqlen_k, k_start, seqlen_k);
    }
    if constexpr (KvCache::value) {
      if (p.cache_seqlens != nullptr) {
        CacheSpan const span = cache_span(p.cache_seqlens, p.cache_rows, batch, p.seqlen_k, p.seqlen_new);
        k_batch = span.batch, k_start = span.begin, seqlen_k = span.end - span.begin;
      }
    }
  }

  // One head's (seqlen, kHeadDim) rows of this sequence in a q-like (o, dO, dQ) or k-like (v, dK, dV) tensor.
  template <int kHeadDim, typename T>
  CUTE_DEVICE auto q_rows(HeadTensor const &t, int head) const {
    return head_matrix<kHeadDim, T>(t, batch, head, q_start, seqlen_q);
  }
  template <int kHeadDim, typename T>
  CUTE_DEVICE auto k_rows(HeadTensor const &t, int head) const {
    return head_matrix<kHeadDim, T>(t, k_batch, head, k_start, seqlen_k);
  }
  // One head's per-query values (LSE, D) of this sequence: (seqlen_q).
  CUTE_DEVICE auto q_values(RowTensor const &t, int head) const { return row_vector(t, batch, head, q_start, seqlen_q); }

 private:
  // Rows [cu[batch], cu[batch + 1]) clamped into [0, total) and to at most max_len rows (the grid covers no
  // more): whatever the caller's values (decreasing, negative, past the end), every row a kernel touches
  // exists. Valid cu_seqlens pass unchanged.
  CUTE_DEVICE void clamped_span(int const *cu, int total, int max_len, int &start, int &len) const {
    int const begin = min(max(cu[batch], 0), total);
    int const end = min(max(cu[batch + 1], begin), total);
    start = begin;
    len = min(end - begin, max_len);
  }
};

}  // namespace flash

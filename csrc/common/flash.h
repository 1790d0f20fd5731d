// Kernel parameters: plain structs, no torch, so the kernels can be driven from any framework.
#pragma once

#ifndef FLASH_ATTN2_DECODE_FUSED
#define FLASH_ATTN2_DECODE_FUSED 0  // setup.py defines it: 1 when the KV-cache kernels' fused split combine is built
#endif
#ifndef FLASH_ATTN2_SM90_BWD_GENERAL
#define FLASH_ATTN2_SM90_BWD_GENERAL 0  // setup.py defines it: 1 when the Hopper backward's general variant is built
#endif

#include <cstdint>

namespace flash {

// 64-bit strides and offsets: batch * seqlen * heads * head_dim may pass 2^31.
using index_t = int64_t;

// One (batch, seqlen, heads, head_dim) tensor with a contiguous last dim: its base and strides, in elements.
// A varlen (total, heads, head_dim) tensor is the same with batch_stride 0: its sequences are told apart
// by their first row (cu_seqlens), not by a batch index.
struct HeadTensor {
  void *ptr;
  index_t batch_stride, row_stride, head_stride;
};

// One fp32 value per query row (LSE, rowsum(dO * O)), rows contiguous: (batch, heads, seqlen_q), or
// (heads, total_q) with batch_stride 0 for varlen.
struct RowTensor {
  float *ptr;
  index_t batch_stride, head_stride;
};

// The dropout RNG's (seed, offset), as PyTorch's CUDA generator hands them out (its PhiloxCudaState, without
// torch): the values themselves, or, under CUDA-graph capture (seed_ptr set), where they lie in device
// memory, read by the kernel at replay, the offset then being *offset_ptr + offset_intragraph. The
// backward takes the forward's rng_state tensor in this pointer form, so that it regenerates the same mask.
struct RngState {
  uint64_t seed, offset;
  int64_t const *seed_ptr;
  int64_t const *offset_ptr;
  uint64_t offset_intragraph;
};

// A paged KV cache's block table (flash_attn_with_kvcache's block_table); table nullptr for a contiguous cache.
struct PageTable {
  int const *__restrict__ table;  // (batch, max_pages) int32
  index_t batch_stride;
  int page_size, max_pages, num_pages;
};

// Which cache row a sequence reads and where its keys start (flash_attn_with_kvcache's cache_batch_idx and
// cache_leftpad; cache_layout.h clamps both): sequence b uses cache row batch_idx[b] of a (batch_cache, ...)
// contiguous cache (nullptr: row b), its keys starting at row leftpad[b] (nullptr: 0).
struct CacheRows {
  int const *__restrict__ batch_idx;
  int batch_cache;
  int const *__restrict__ leftpad;
};

// Inputs shared by every pass.
struct AttnParams {
  HeadTensor q, k, v;

  int batch, heads, heads_kv;  // heads % heads_kv == 0 (GQA/MQA)
  int seqlen_q, seqlen_k;      // varlen: the longest sequences (max_seqlen), which size the grid

  // Varlen: sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]) of the (total, heads, head_dim)
  // tensors; (batch + 1,) device arrays, or nullptr for a fixed-length batch. Their values come from the
  // caller unchecked: BlockInfo (block_info.h) clamps them into [0, total) so that no kernel leaves the tensors.
  int const *__restrict__ cu_seqlens_q;
  int const *__restrict__ cu_seqlens_k;
  int total_q, total_k;        // rows of the varlen tensors
  int head_dim;                // a multiple of 8, at most the kernel's kHeadDim

  // The score of query i and key j, for each sequence (Sq, Sk its lengths, mask.h computes it):
  //   T(softmax_scale * q_i·k_j) - alibi_slope * |i + Sk - Sq - j|,  T(x) = softcap * tanh(x / softcap) or x,
  // visible iff i + Sk - Sq - window_left <= j <= i + Sk - Sq + window_right (causal: window_right = 0).
  float softmax_scale;         // applied to Q·Kᵀ; the gradients w.r.t. Q and K carry it
  // The kernels hold raw scores s = q·k, or t = tanh(s * softcap_premul) with softcap; the score is
  // s * score_scale with score_scale = softmax_scale, or softcap. The softmax runs in exp2 on those:
  float softmax_scale_log2;    // score_scale * log2(e)
  float softcap_premul;        // softmax_scale / softcap, or 0 without softcap
  // Both sides bounded to the longest sequence (the binding normalises -1 = unbounded to it, where it cuts
  // nothing), so that the kernels' index arithmetic stays in int. is_windowed picks the kernels that mask
  // by position at all: causal is the window (unbounded, 0).
  int window_left, window_right;
  bool is_windowed;
  // ALiBi: (heads) or (batch, heads) fp32 slopes, nullptr for none; the kernels divide by score_scale.
  float const *__restrict__ alibi_slopes;
  index_t alibi_batch_stride;  // 0 for (heads) slopes
  float inv_score_scale;       // 1 / score_scale
  // Learnable sinks (gpt-oss): (heads) fp32 logits, exp(sink) added to every row's softmax denominator
  // (and LSE); nullptr for none.
  float const *__restrict__ sinks;

  // Attention dropout (dropout.h): an entry of P is dropped iff its 16 random bits are below drop_threshold,
  // round(p * 2^16) (0, as zero-initialised params have it: no dropout), and kept entries count 1 / (1 - p).
  uint32_t dropout_threshold;
  float dropout_scale;
  RngState rng;

  __host__ __device__ bool has_dropout() const { return dropout_threshold != 0; }

  // Whether the kernels' general variant is needed (mask.h): varlen, softcap, ALiBi, a window's left edge
  // that hides a key from some row, or dropout (whose Philox calls, in the common variant behind a run-time
  // branch, would cost the plain kernels registers: dropout.h).
  bool needs_general() const { return cu_seqlens_q != nullptr || needs_score_mod(); }
  // needs_general() but varlen: the features that change scores or probabilities (softcap, ALiBi, a left
  // window edge, dropout). Varlen plain or causal calls without them run the common key loop of the Hopper
  // kernels (sm90/fwd_launch.h, flash_api.cpp's hopper_bwd).
  bool needs_score_mod() const {
    return softcap_premul != 0.f || alibi_slopes != nullptr || (is_windowed && window_left < seqlen_k - 1) ||
           has_dropout();
  }

  // Which kv head serves query head h.
  __host__ __device__ int kv_head(int h) const { return h / (heads / heads_kv); }

  // ---- KV cache (flash_attn_with_kvcache; read only by the kernels' KvCache variant, fwd_kernel.h) ----
  // k and v are the caches, (batch, seqlen_cache, heads_kv, head_dim): seqlen_k is their capacity.
  // Sequence b's keys are the first cache_seqlens[b] rows of its cache, a device (batch,) array whose
  // values come unchecked: BlockInfo clamps them into [0, seqlen_k].
  int const *__restrict__ cache_seqlens;
  // Rows appended to each cache at cache_seqlens[b] before the attention (KvCacheAppendParams): sequence b
  // then has min(cache_seqlens[b] + seqlen_new, seqlen_k) keys.
  int seqlen_new;
  // Paged caches (block_table != nullptr): k and v are (num_pages, page_size, heads_kv, head_dim), seqlen_k
  // = max_pages * page_size, and row r of sequence b lies in row r % page_size of page
  // block_table[b * block_table_batch_stride + r / page_size]. Page ids come unchecked: the kernels clamp
  // them into [0, num_pages) (cache_layout.h).
  PageTable pages;
  CacheRows cache_rows;
};

struct FwdParams : AttnParams {
  HeadTensor o;
  RowTensor lse;  // natural log
  // With dropout: (2,) int64 that the forward writes the (seed, offset) it used into, for the backward
  // and for the caller (valid under CUDA-graph capture too, where only the device knows them); or nullptr.
  int64_t *rng_state_out;

  // ---- Split-KV (flash-decoding; the KvCache variant only) ----
  // With num_splits > 1 each sequence's key blocks are cut into num_splits runs, one thread block each;
  // a block writes its unnormalised-by-the-others O (fp32, (num_splits, batch, heads, seqlen_q, head_dim),
  // contiguous) and LSE (fp32, (num_splits, batch, heads, seqlen_q); -inf for a split that sees no key),
  // and the combine kernel (common/split_combine.h) merges them into o and lse.
  int num_splits;
  float *__restrict__ o_partial;
  float *__restrict__ lse_partial;
  // The combine folded into the split kernel instead (FLASH_ATTN2_DECODE_FUSED_COMBINE=1; split_combine.h
  // combine_in_last_split): one int32 count per (batch, head, query block), zero between launches; nullptr:
  // the combine kernel. Last, so that no field above moves.
  int *split_counters;
};

// ---- KV cache append (flash_attn_with_kvcache's k, v and rotary; common/kvcache_append.h) ----
// New keys and values (batch, seqlen_new, heads_kv, head_dim) written into the caches in place at rows
// cache_seqlens[b] + j (clamped: the rows past the cache are dropped), the keys rotated at those positions
// when rotary_cos is given; q rotated into q_rotated at cache_seqlens[b] + i (rotary_q_per_row: causal or
// a window) or cache_seqlens[b] (otherwise: every query at the first new position), as flash_attn does.
struct KvCacheAppendParams {
  HeadTensor k_cache, v_cache, k_new, v_new;
  HeadTensor q, q_rotated;  // q_rotated.ptr nullptr: no rotary
  int const *__restrict__ cache_seqlens;  // (batch,), unchecked values
  int batch, heads, heads_kv, head_dim, seqlen_q, seqlen_new, seqlen_cache;
  // Rotary: (seqlen_ro, rotary_dim / 2) tables of q's dtype, rows rotary_row_stride apart; nullptr for none.
  void const *rotary_cos;
  void const *rotary_sin;
  index_t rotary_row_stride;
  int rotary_dim, seqlen_ro;
  bool rotary_interleaved;  // pairs (2i, 2i + 1) (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX)
  bool rotary_q_per_row;
  PageTable pages;  // k_cache and v_cache paged where pages.table is set (seqlen_cache = max_pages * page_size)
  CacheRows cache_rows;
};

struct BwdParams : FwdParams {  // o and lse: the forward's outputs
  HeadTensor dout, dq;
  // dK and dV per query head: with GQA they are (batch, seqlen_k, heads, head_dim) buffers that the
  // caller then sums over each group of query heads, in a fixed order.
  HeadTensor dk, dv;
  // D, laid out as lse: rowsum(dO∘O) from the preprocess, rewritten by a dQ kernel as rowsum(P∘dP).
  RowTensor dpsum;
  // The non-deterministic backward's fp32 dQ (bwd_dkdv_kernel.h, AtomicDq), laid out as q (its own strides),
  // zeroed by the caller, already scaled: the caller casts it into dq. Unused (nullptr) by the split backward.
  HeadTensor dq_accum;
};

}  // namespace flash

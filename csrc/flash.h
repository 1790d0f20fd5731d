// Kernel parameters: plain structs, no torch, so the kernels can be driven from any framework.
#pragma once

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

  float softmax_scale;         // applied to Q·Kᵀ
  float softmax_scale_log2;    // softmax_scale * log2(e): the kernels use exp2
  bool is_causal;              // bottom-right aligned: row i sees columns j <= i + seqlen_k - seqlen_q

  // Which kv head serves query head h.
  __host__ __device__ int kv_head(int h) const { return h / (heads / heads_kv); }
};

struct FwdParams : AttnParams {
  HeadTensor o;
  RowTensor lse;  // natural log
};

struct BwdParams : FwdParams {  // o and lse: the forward's outputs
  HeadTensor dout, dq;
  // dK and dV per query head: with GQA they are (batch, seqlen_k, heads, head_dim) buffers that the
  // caller then sums over each group of query heads, in a fixed order.
  HeadTensor dk, dv;
  RowTensor dpsum;  // rowsum(dO * O), laid out as lse
};

}  // namespace flash

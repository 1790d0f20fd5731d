// Kernel parameters: plain structs, no torch, so the kernels can be driven from any framework.
#pragma once

#include <cstdint>

namespace flash {

// 64-bit strides and offsets: batch * seqlen * heads * head_dim may pass 2^31.
using index_t = int64_t;

// Inputs shared by every pass. Tensors are (batch, seqlen, heads, head_dim) with a contiguous last dim.
struct AttnParams {
  const void *__restrict__ q_ptr;
  const void *__restrict__ k_ptr;
  const void *__restrict__ v_ptr;
  index_t q_batch_stride, q_row_stride, q_head_stride;
  index_t k_batch_stride, k_row_stride, k_head_stride;
  index_t v_batch_stride, v_row_stride, v_head_stride;

  int batch, heads, heads_kv;  // heads % heads_kv == 0 (GQA/MQA)
  int seqlen_q, seqlen_k;
  int head_dim;                // a multiple of 8, at most the kernel's kHeadDim

  float softmax_scale;         // applied to Q·Kᵀ
  float softmax_scale_log2;    // softmax_scale * log2(e): the kernels use exp2
  bool is_causal;              // bottom-right aligned: row i sees columns j <= i + seqlen_k - seqlen_q

  // Which kv head serves query head h.
  __host__ __device__ int kv_head(int h) const { return h / (heads / heads_kv); }
};

struct FwdParams : AttnParams {
  void *__restrict__ o_ptr;
  index_t o_batch_stride, o_row_stride, o_head_stride;
  float *__restrict__ lse_ptr;  // (batch, heads, seqlen_q), contiguous, natural log
};

struct BwdParams : FwdParams {  // o_ptr and lse_ptr: the forward's outputs
  const void *__restrict__ do_ptr;
  index_t do_batch_stride, do_row_stride, do_head_stride;
  void *__restrict__ dq_ptr;
  index_t dq_batch_stride, dq_row_stride, dq_head_stride;
  // dK and dV per query head: with GQA they point at (batch, seqlen_k, heads, head_dim) buffers that the
  // caller then sums over each group of query heads, in a fixed order.
  void *__restrict__ dk_ptr;
  index_t dk_batch_stride, dk_row_stride, dk_head_stride;
  void *__restrict__ dv_ptr;
  index_t dv_batch_stride, dv_row_stride, dv_head_stride;
  float *__restrict__ dpsum_ptr;  // rowsum(dO * O): (batch, heads, seqlen_q), contiguous
};

}  // namespace flash

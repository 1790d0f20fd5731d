// Kernel parameters: plain structs, no torch, so the kernels can be driven from any framework.
#pragma once

#include <cstdint>

namespace flash {

// 64-bit strides and offsets: batch * seqlen * heads * head_dim may pass 2^31.
using index_t = int64_t;

// One (batch, seqlen, heads, head_dim) tensor with a contiguous last dim: its base and strides, in elements.
struct HeadTensor {
  void *ptr;
  index_t batch_stride, row_stride, head_stride;
};

// Inputs shared by every pass.
struct AttnParams {
  HeadTensor q, k, v;

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
  HeadTensor o;
  float *__restrict__ lse_ptr;  // (batch, heads, seqlen_q), contiguous, natural log
};

struct BwdParams : FwdParams {  // o and lse_ptr: the forward's outputs
  HeadTensor dout, dq;
  // dK and dV per query head: with GQA they are (batch, seqlen_k, heads, head_dim) buffers that the
  // caller then sums over each group of query heads, in a fixed order.
  HeadTensor dk, dv;
  float *__restrict__ dpsum_ptr;  // rowsum(dO * O): (batch, heads, seqlen_q), contiguous
};

}  // namespace flash

"""Exact attention in plain PyTorch: the yardstick the kernels are tested against."""

import math

import torch


def attention_ref(q, k, v, softmax_scale=None, causal=False, compute_dtype=torch.float32):
    """Attention with flash_attn_func's layout and semantics, in plain (differentiable) PyTorch.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), with
    heads_q a multiple of heads_kv (query head h reads kv head h // (heads_q // heads_kv)).
    Causal is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q.

    compute_dtype float32 or float64 gives the reference. compute_dtype fp16/bf16 gives PyTorch's
    own low-precision result, the error yardstick: matmuls in that dtype, softmax in float32, and
    P rounded to that dtype before P @ V, as a kernel does.

    Returns (out, lse): out (batch, seqlen_q, heads_q, head_dim) in compute_dtype; lse float32
    (batch, heads_q, seqlen_q), the natural-log log-sum-exp of the scaled scores. A row that sees
    no key gets out 0 and lse +inf, never NaN.
    """
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[2] // k.shape[2]
    # (batch, heads, seqlen, head_dim), with every query head given its own copy of its kv head.
    q, k, v = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))

    softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
    scores = (q @ k.transpose(-1, -2)).to(softmax_dtype) * softmax_scale  # (b, h, sq, sk)
    if causal:
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(~visible.tril(seqlen_k - seqlen_q), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows that see no key
    empty = torch.isneginf(lse)
    # Subtracting 0 instead of -inf on empty rows gives P = exp(-inf) = 0 there, so out = 0
    # rather than the NaN that softmax would give.
    p = torch.exp(scores - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    out = p.to(compute_dtype) @ v
    return out.transpose(1, 2), lse.masked_fill(empty, float("inf")).float()


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         compute_dtype=torch.float32):
    """attention_ref on each sequence of a varlen batch, flash_attn_varlen_func's layout and semantics.

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim); sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v (valid
    values: from 0, non-decreasing, ending at total). Causal is aligned bottom-right per sequence.

    Returns (out, lse): out (total_q, heads_q, head_dim) in compute_dtype, lse float32 (heads_q, total_q).
    Differentiable, as attention_ref.
    """
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out, lse = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale, causal,
                                 compute_dtype)
        outs.append(out[0])
        lses.append(lse[0])
    empty_out = q.new_zeros((0, *q.shape[1:]), dtype=compute_dtype)
    return (torch.cat(outs) if outs else empty_out,
            torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32))

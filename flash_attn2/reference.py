"""Exact attention in plain PyTorch: the yardstick the kernels are tested against."""

import math

import torch


def visible_keys(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1), device=None):
    """(seqlen_q, seqlen_k) bool: whether query i sees key j.

    Query i sits on key diagonal d = i + seqlen_k - seqlen_q (bottom-right alignment). With
    window_size (left, right), -1 meaning unbounded on that side, it sees d - left <= j <= d + right;
    causal forces right = 0 and keeps left. No other normalisation: a bound past the keys cuts
    nothing beyond what the formula says.
    """
    left, right = window_size
    if causal:
        right = 0
    diagonal = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= diagonal - left
    if right >= 0:
        visible &= j <= diagonal + right
    return visible


def attention_ref(q, k, v, softmax_scale=None, causal=False, compute_dtype=torch.float32, *,
                  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None):
    """Attention with flash_attn_func's layout and semantics, in plain (differentiable) PyTorch.

    q: (batch, seqlen_q, heads_q, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), with
    heads_q a multiple of heads_kv (query head h reads kv head h // (heads_q // heads_kv)).
    Causal is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q.

    The variants, as in the issue-11 contract (slopes and sinks are indexed by the query head):
      logit(i, j) = T(softmax_scale * q_i . k_j) - slope[b, h] * |i + seqlen_k - seqlen_q - j|,
      T(x) = softcap * tanh(x / softcap) where softcap > 0, else x; the ALiBi term only with
      alibi_slopes, (heads_q,) or (batch, heads_q). window_size: which keys are visible, see
      visible_keys. s_aux (heads_q,): a sink, exp(s_aux[h]) added to every row's softmax
      denominator (and so to its lse), with no value behind it.

    compute_dtype float32 or float64 gives the reference. compute_dtype fp16/bf16 gives PyTorch's
    own low-precision result, the error yardstick: matmuls in that dtype, the logits (softcap,
    ALiBi, sink) and softmax in float32, and P rounded to that dtype before P @ V, as a kernel does.

    Returns (out, lse): out (batch, seqlen_q, heads_q, head_dim) in compute_dtype; lse float32
    (batch, heads_q, seqlen_q), the natural-log log-sum-exp of the logits (and the sink). A row that
    sees no key gets out 0 and lse +inf (s_aux[h] with a sink), never NaN, in the gradients too.
    Differentiable in q, k, v and s_aux.
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
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        diagonal = torch.arange(seqlen_q, device=q.device)[:, None] + (seqlen_k - seqlen_q)
        distance = (diagonal - torch.arange(seqlen_k, device=q.device)).abs().to(softmax_dtype)
        slopes = alibi_slopes.to(softmax_dtype)
        slopes = slopes.view(-1 if slopes.dim() == 2 else 1, slopes.shape[-1], 1, 1)  # (b or 1, h, 1, 1)
        scores = scores - slopes * distance
    # Masking last: softcap would turn a -inf into -softcap.
    if causal or tuple(window_size) != (-1, -1):
        visible = visible_keys(seqlen_q, seqlen_k, causal, window_size, q.device)
        # masked_fill's backward drops the gradient where it filled, so the NaN that logsumexp's
        # backward gives on all -inf rows never reaches q or k.
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows that see no key
    if s_aux is not None:
        lse = torch.logaddexp(lse, s_aux.to(softmax_dtype).view(1, -1, 1))  # s_aux[h] where no key
    empty = torch.isneginf(lse)
    # Subtracting 0 instead of -inf on empty rows gives P = exp(-inf) = 0 there, so out = 0
    # rather than the NaN that softmax would give.
    p = torch.exp(scores - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    out = p.to(compute_dtype) @ v
    return out.transpose(1, 2), lse.masked_fill(empty, float("inf")).float()


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         compute_dtype=torch.float32, *, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                         s_aux=None):
    """attention_ref on each sequence of a varlen batch, flash_attn_varlen_func's layout and semantics.

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim); sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v (valid
    values: from 0, non-decreasing, ending at total). Causal, the window and ALiBi distances are taken
    per sequence, with that sequence's lengths; alibi_slopes (batch, heads_q) gives sequence b row b.

    Returns (out, lse): out (total_q, heads_q, head_dim) in compute_dtype, lse float32 (heads_q, total_q).
    Differentiable, as attention_ref.
    """
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:]))):
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        out, lse = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale, causal,
                                 compute_dtype, window_size=window_size, softcap=softcap, alibi_slopes=slopes,
                                 s_aux=s_aux)
        outs.append(out[0])
        lses.append(lse[0])
    empty_out = q.new_zeros((0, *q.shape[1:]), dtype=compute_dtype)
    return (torch.cat(outs) if outs else empty_out,
            torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32))

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


def attention_scores(q, k, softmax_scale=None, causal=False, compute_dtype=torch.float32, *, window_size=(-1, -1),
                     softcap=0.0, alibi_slopes=None):
    """The logits of attention_ref: (batch, heads_q, seqlen_q, seqlen_k), float32 (float64 with that
    compute_dtype), -inf where the key is hidden. q, k in flash_attn_func's layout; matmul in compute_dtype."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    groups = q.shape[2] // k.shape[2]
    q, k = (t.to(compute_dtype).transpose(1, 2) for t in (q, k))
    k = k.repeat_interleave(groups, dim=1)
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
    return scores


def attention_ref(q, k, v, softmax_scale=None, causal=False, compute_dtype=torch.float32, *,
                  window_size=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None, dropout_p=0.0,
                  dropout_mask=None):
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
    Dropout (flash_attn's semantics): with dropout_mask, a bool keep mask broadcastable to (batch,
      heads_q, seqlen_q, seqlen_k), out = (P * mask / (1 - dropout_p)) @ v for the softmax P; lse is
      that of the undropped scores. dropout_p without a mask drops nothing (the mask is the caller's:
      the kernels' own, from flash_attn2's dropout_keep_mask, in the tests).

    compute_dtype float32 or float64 gives the reference. compute_dtype fp16/bf16 gives PyTorch's
    own low-precision result, the error yardstick: matmuls in that dtype, the logits (softcap,
    ALiBi, sink) and softmax in float32, and P rounded to that dtype before P @ V, as a kernel does.

    Returns (out, lse): out (batch, seqlen_q, heads_q, head_dim) in compute_dtype; lse float32
    (batch, heads_q, seqlen_q), the natural-log log-sum-exp of the logits (and the sink). A row that
    sees no key gets out 0 and lse +inf (s_aux[h] with a sink), never NaN, in the gradients too.
    Differentiable in q, k, v and s_aux.
    """
    scores = attention_scores(q, k, softmax_scale, causal, compute_dtype, window_size=window_size, softcap=softcap,
                              alibi_slopes=alibi_slopes)
    softmax_dtype = scores.dtype
    # (batch, heads, seqlen, head_dim), with every query head given its own copy of its kv head.
    v = v.to(compute_dtype).transpose(1, 2).repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows that see no key
    if s_aux is not None:
        lse = torch.logaddexp(lse, s_aux.to(softmax_dtype).view(1, -1, 1))  # s_aux[h] where no key
    empty = torch.isneginf(lse)
    # Subtracting 0 instead of -inf on empty rows gives P = exp(-inf) = 0 there, so out = 0
    # rather than the NaN that softmax would give.
    p = torch.exp(scores - lse.masked_fill(empty, 0.0).unsqueeze(-1))
    if dropout_mask is not None:
        p = p.masked_fill(~dropout_mask, 0.0) * (1.0 / (1.0 - dropout_p))
    out = p.to(compute_dtype) @ v
    return out.transpose(1, 2), lse.masked_fill(empty, float("inf")).float()


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         compute_dtype=torch.float32, *, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                         s_aux=None, dropout_p=0.0, dropout_mask=None):
    """attention_ref on each sequence of a varlen batch, flash_attn_varlen_func's layout and semantics.

    q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim); sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v (valid
    values: from 0, non-decreasing, ending at total). Causal, the window and ALiBi distances are taken
    per sequence, with that sequence's lengths; alibi_slopes (batch, heads_q) gives sequence b row b.

    dropout_mask: bool (batch, heads_q, >= max seqlen_q, >= max seqlen_k), each sequence's keep mask in
    its own coordinates (sequence b uses [b, :, :seqlen_q, :seqlen_k]), as the kernels' mask is made.

    Returns (out, lse): out (total_q, heads_q, head_dim) in compute_dtype, lse float32 (heads_q, total_q).
    Differentiable, as attention_ref.
    """
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:]))):
        slopes = alibi_slopes[b] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes
        mask = dropout_mask[b:b + 1, :, :q1 - q0, :k1 - k0] if dropout_mask is not None else None
        out, lse = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale, causal,
                                 compute_dtype, window_size=window_size, softcap=softcap, alibi_slopes=slopes,
                                 s_aux=s_aux, dropout_p=dropout_p, dropout_mask=mask)
        outs.append(out[0])
        lses.append(lse[0])
    empty_out = q.new_zeros((0, *q.shape[1:]), dtype=compute_dtype)
    return (torch.cat(outs) if outs else empty_out,
            torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32))


# Philox4x32-10 (Salmon et al., SC 2011), as csrc/common/dropout.h has it.
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 of counters (c0, c1, c2, c3) and key (k0, k1): each an integer or a uint64 numpy array of
    32-bit values (broadcast together). Returns the four output words, uint64 arrays of 32-bit values."""
    import numpy as np

    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    m0, m1 = np.uint64(_PHILOX_MUL[0]), np.uint64(_PHILOX_MUL[1])
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (p1 >> shift) ^ c1 ^ k0, p1 & mask, (p0 >> shift) ^ c3 ^ k1, p0 & mask
        k0, k1 = (k0 + np.uint64(_PHILOX_WEYL[0])) & mask, (k1 + np.uint64(_PHILOX_WEYL[1])) & mask
    return c0, c1, c2, c3


def dropout_keep_mask_ref(seed, offset, dropout_p, batch, heads, seqlen_q, seqlen_k):
    """The keep mask the kernels drop by for a forward's (seed, offset), in plain numpy: bool (batch, heads,
    seqlen_q, seqlen_k) on the CPU, each (sequence, head) in its own coordinates. An independent statement
    of dropout.h's scheme (counter = (key unit, query unit, offset + b * heads + h), key = seed; 16 bits
    per entry, dropped iff below max(1, round(p * 2^16))), for tests; small shapes only."""
    import numpy as np

    threshold = max(1, math.floor(dropout_p * 65536 + 0.5)) if dropout_p > 0 else 0  # llround, as the binding
    b = np.arange(batch, dtype=np.uint64)[:, None, None, None]
    h = np.arange(heads, dtype=np.uint64)[None, :, None, None]
    i = np.arange(seqlen_q, dtype=np.int64)[None, None, :, None]
    j = np.arange(seqlen_k, dtype=np.int64)[None, None, None, :]
    stream = (np.uint64(offset) + b * np.uint64(heads) + h)
    key_unit = ((j >> 4) * 4 + ((j >> 1) & 3)).astype(np.uint64)
    query_unit = ((i >> 4) * 8 + (i & 7)).astype(np.uint64)
    words = philox4x32_10((key_unit, query_unit, stream & np.uint64(_MASK32), stream >> np.uint64(32)),
                          (seed & _MASK32, seed >> 32))
    word = ((i >> 3) & 1) * 2 + ((j >> 3) & 1)
    shape = (batch, heads, seqlen_q, seqlen_k)
    chosen = np.choose(np.broadcast_to(word, shape), [np.broadcast_to(w, shape) for w in words])
    bits = (chosen >> (np.uint64(16) * np.broadcast_to(j & 1, shape).astype(np.uint64))) & np.uint64(0xFFFF)
    return torch.from_numpy(bits >= np.uint64(threshold))

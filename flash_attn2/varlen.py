"""The variable-length entry points, as flash_attn 2.x names them: sequences of different lengths packed
into one (total, heads, head_dim) tensor with no padding, told apart by cu_seqlens. Each checks its
arguments and calls the one op path in _ops."""

from . import _checks
from ._ops import attention


def _check_block_table(block_table):
    if block_table is not None:
        raise NotImplementedError("block_table: paged KV is not implemented in flash_attn2; pass None")


def _check_varlen(named, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k, scores,
                  names=_checks.VARLEN_NAMES):
    """The varlen rules for q and k (unpacked views) and the score arguments (window_size, softcap,
    alibi_slopes, s_aux), then every device, then (if on) the values."""
    args = (q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names)
    _checks.check_varlen(*args)
    _checks.check_scores(q, cu_seqlens_q.numel() - 1, *scores)
    _checks.check_devices((*named, (names[0], cu_seqlens_q), (names[1], cu_seqlens_k),
                           *_checks.score_tensors(*scores[2:])))
    _checks.check_varlen_values(*args)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, s_aux=None):
    """flash_attn_func over a batch of sequences of different lengths, packed without padding.

    q: (total_q, heads, head_dim), k and v: (total_k, heads_kv, head_dim); sequence b is rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v.
    cu_seqlens_*: int32 (batch + 1,) on q's device, starting at 0 and non-decreasing; max_seqlen_*:
    Python ints, the longest sequence (they size the grid, so nothing in the call waits for the GPU).
    Everything else as flash_attn_func, per sequence: causal, the window and ALiBi are aligned
    bottom-right within each sequence (alibi_slopes may be (batch, heads), one row per sequence), a
    sequence may be empty, a row that sees no key gets out 0 and LSE +inf (s_aux[h] with a sink).

    The values of cu_seqlens are not read on the host: flash_attn2.set_value_checks(True) (or
    FLASH_ATTN2_CHECK_VALUES=1) checks them at the cost of a sync. Unchecked bad values give wrong
    rows (a sequence longer than max_seqlen is cut at it; rows outside every sequence are not written),
    never an access outside the tensors.

    dropout_p: as flash_attn_func's, each sequence's mask in its own coordinates. return_attn_probs with
    dropout_p > 0 raises NotImplementedError (the probabilities come only from the fixed-length entries).

    Returns out (total_q, heads, head_dim), or (out, softmax_lse, None) if return_attn_probs, with
    softmax_lse fp32 (heads, total_q).
    """
    _checks.check_dropout(dropout_p)
    _check_block_table(block_table)
    _checks.check_inputs(q, k, v, softmax_scale, varlen=True)
    scores = (window_size, softcap, alibi_slopes, s_aux)
    _check_varlen((("q", q), ("k", k), ("v", v)), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k,
                  scores)
    return attention(q, k, v, softmax_scale, causal, return_attn_probs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, *scores, dropout_p=dropout_p, deterministic=deterministic)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, s_aux=None):
    """flash_attn_varlen_func with k and v packed in one kv (total_k, 2, heads_kv, head_dim), read in place;
    its gradient comes back as one tensor of that shape."""
    _checks.check_dropout(dropout_p)
    _checks.check_packed("kv", kv, 2, ("total_k", "2", "heads_kv", "head_dim"))
    _checks.check_inputs(q, *kv.unbind(1), softmax_scale, varlen=True, names=("q", "kv", "kv"))
    scores = (window_size, softcap, alibi_slopes, s_aux)
    _check_varlen((("q", q), ("kv", kv)), cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, kv[:, 0],
                  scores)
    return attention(q, kv, None, softmax_scale, causal, return_attn_probs, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, *scores, dropout_p=dropout_p, deterministic=deterministic)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, s_aux=None):
    """flash_attn_varlen_func with q, k, v packed in one qkv (total, 3, heads, head_dim) and one cu_seqlens
    and max_seqlen for all three, read in place; its gradient comes back as one tensor of that shape."""
    _checks.check_dropout(dropout_p)
    _checks.check_packed("qkv", qkv, 3, ("total", "3", "heads", "head_dim"))
    _checks.check_inputs(*qkv.unbind(1), softmax_scale, varlen=True, names=("qkv",) * 3)
    scores = (window_size, softcap, alibi_slopes, s_aux)
    _check_varlen((("qkv", qkv),), cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, qkv[:, 0], qkv[:, 1], scores,
                  names=("cu_seqlens", "cu_seqlens", "max_seqlen", "max_seqlen"))
    return attention(qkv, None, None, softmax_scale, causal, return_attn_probs, cu_seqlens, cu_seqlens, max_seqlen,
                     max_seqlen, *scores, dropout_p=dropout_p, deterministic=deterministic)

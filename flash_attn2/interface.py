"""The fixed-length entry points, as flash_attn 2.x names them: flash_attn_func and its packed variants.
Each checks its arguments and calls the one op path in _ops."""

from . import _checks
from ._checks import MAX_HEAD_DIM, SUPPORTED_DTYPES  # noqa: F401  (part of this module's face)
from ._ops import _bwd, _fwd, attention, built_head_dims  # noqa: F401  (tests call the kernels directly)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, s_aux=None):
    """Exact attention softmax(q·kᵀ·softmax_scale)·v, as flash_attn 2.x's function of the same name.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), fp16 or bf16 on
    one CUDA device, any strides with a contiguous last dim. heads must be a multiple of heads_kv
    (MQA/GQA; K and V are not copied). head_dim up to 256; non-multiples of 8 are zero-padded.
    softmax_scale defaults to 1/sqrt(head_dim). With Sq, Sk the sequence lengths, the score of query i
    and key j is

        T(softmax_scale * q_i . k_j) - slope_h * |i + Sk - Sq - j|,   T(x) = softcap * tanh(x / softcap)

    (T the identity where softcap = 0, the ALiBi term only with alibi_slopes), and key j is visible to
    query i iff i + Sk - Sq - left <= j <= i + Sk - Sq + right, window_size = (left, right), -1 meaning
    unbounded on that side. causal sets right = 0 (bottom-right aligned). alibi_slopes: fp32 (heads,) or
    (batch, heads), no gradient. s_aux (learnable sinks, as gpt-oss; beyond flash_attn): fp32 (heads,),
    exp(s_aux[h]) joins every row's softmax denominator and its LSE; it gets a gradient. A row that sees
    no key gets output 0 and LSE +inf (s_aux[h] with a sink).

    dropout_p in [0, 1): attention dropout as flash_attn's, on the softmax P: each entry is dropped with
    probability dropout_p and the kept ones are scaled by 1 / (1 - dropout_p) before P @ v (softmax_lse
    is that of the undropped P). The mask comes from a counter-based Philox RNG in the kernels, seeded from
    torch's CUDA generator of q's device: torch.manual_seed reproduces a call, two calls differ, the
    backward drops the same entries as its forward, and CUDA-graph capture works (each replay draws anew).
    Any combination with the other arguments (softcap included, which flash_attn refuses).

    Differentiable w.r.t. q, k, v and s_aux (softmax_lse is not). The backward recomputes the attention
    matrix from q, k, v and the saved LSE, by default in separate dQ and dK/dV kernels with no atomics:
    gradients bit-identical from run to run (deterministic=True, or torch.use_deterministic_algorithms(True),
    guarantees it). deterministic=False (the default, as flash_attn's) also allows FlashAttention-2's atomic
    backward, taken only with FLASH_ATTN2_ATOMIC_BWD=1 in a build with FLASH_ATTN2_BUILD_ATOMIC_BWD=1 (today
    it is the slower one, README): one dK/dV kernel that also adds each block's share of dQ into an fp32
    buffer with atomics, so dq may differ from run to run in its last bits (dk, dv do not). With GQA, dK and
    dV are summed over each group of query heads in a fixed order in both modes.

    Returns out (batch, seqlen_q, heads, head_dim), or (out, softmax_lse, probs) if return_attn_probs,
    with softmax_lse fp32 (batch, heads, seqlen_q), the natural-log logsumexp of the scores, and probs None
    without dropout; with dropout_p > 0, the attention probabilities fp32 (batch, heads, seqlen_q,
    seqlen_k), exp(score - softmax_lse), negated where dropped (flash_attn's S_dmask; no 1 / (1 - p)), for
    tests at small shapes: it costs a seqlen_q x seqlen_k tensor and is not differentiable.
    """
    _checks.check_dropout(dropout_p)
    _checks.check_inputs(q, k, v, softmax_scale)
    _checks.check_scores(q, q.shape[0], window_size, softcap, alibi_slopes, s_aux)
    _checks.check_devices((("q", q), ("k", k), ("v", v), *_checks.score_tensors(alibi_slopes, s_aux)))
    return attention(q, k, v, softmax_scale, causal, return_attn_probs, window_size=window_size, softcap=softcap,
                     alibi_slopes=alibi_slopes, s_aux=s_aux, dropout_p=dropout_p, deterministic=deterministic)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, s_aux=None):
    """flash_attn_func with k and v packed in one kv (batch, seqlen_k, 2, heads_kv, head_dim), read in
    place; its gradient comes back as one tensor of that shape."""
    _checks.check_dropout(dropout_p)
    _checks.check_packed("kv", kv, 2, ("batch", "seqlen_k", "2", "heads_kv", "head_dim"))
    _checks.check_inputs(q, *kv.unbind(2), softmax_scale, names=("q", "kv", "kv"))
    _checks.check_scores(q, q.shape[0], window_size, softcap, alibi_slopes, s_aux)
    _checks.check_devices((("q", q), ("kv", kv), *_checks.score_tensors(alibi_slopes, s_aux)))
    return attention(q, kv, None, softmax_scale, causal, return_attn_probs, window_size=window_size, softcap=softcap,
                     alibi_slopes=alibi_slopes, s_aux=s_aux, dropout_p=dropout_p, deterministic=deterministic)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              s_aux=None):
    """flash_attn_func with q, k, v packed in one qkv (batch, seqlen, 3, heads, head_dim), read in place;
    its gradient comes back as one tensor of that shape."""
    _checks.check_dropout(dropout_p)
    _checks.check_packed("qkv", qkv, 3, ("batch", "seqlen", "3", "heads", "head_dim"))
    _checks.check_inputs(*qkv.unbind(2), softmax_scale, names=("qkv",) * 3)
    _checks.check_scores(qkv[:, :, 0], qkv.shape[0], window_size, softcap, alibi_slopes, s_aux)
    _checks.check_devices((("qkv", qkv), *_checks.score_tensors(alibi_slopes, s_aux)))
    return attention(qkv, None, None, softmax_scale, causal, return_attn_probs, window_size=window_size,
                     softcap=softcap, alibi_slopes=alibi_slopes, s_aux=s_aux, dropout_p=dropout_p,
                     deterministic=deterministic)

"""The Python face of the kernels: argument checks, a torch.library custom op, and flash_attn_func."""

import math

import torch
import torch.nn.functional as F

try:
    from . import _C
except ImportError as _error:  # not built: checks and the reference still work
    _C, _C_ERROR = None, _error

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def built_head_dims():
    """The kernel head dims compiled into this build (empty if the extension is not built)."""
    return tuple(_C.built_head_dims()) if _C is not None else ()


def _ext():
    if _C is None:
        raise ImportError(f"flash_attn2._C is not built; run `pip install --no-build-isolation -e .` ({_C_ERROR})")
    return _C


def _check_features(dropout_p, window_size, softcap, alibi_slopes):
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: dropout is not implemented in flash_attn2; pass 0.0")
    try:
        window_size = tuple(window_size)
    except TypeError:
        raise TypeError(f"window_size must be a pair of ints, (-1, -1) for no window; got {window_size!r}") from None
    if window_size != (-1, -1):
        raise NotImplementedError(f"window_size={window_size}: sliding-window attention is not implemented "
                                  "in flash_attn2; pass (-1, -1)")
    if softcap != 0.0:
        raise NotImplementedError(f"softcap={softcap}: softcapping is not implemented in flash_attn2; pass 0.0")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not implemented in flash_attn2; pass None")


def _check_inputs(q, k, v, softmax_scale):
    """Raise on anything the kernels cannot take. Device rules come last, so that every other rule can be
    checked with CPU tensors."""
    named = (("q", q), ("k", k), ("v", v))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; flash_attn2 takes torch.float16 or torch.bfloat16")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k and v must share one dtype")
    for name, t in named:
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    batch, _, heads, head_dim = q.shape
    for name, t in named[1:]:
        if t.shape[0] != batch:
            raise ValueError(f"{name} has batch {t.shape[0]} but q has batch {batch}: they must match")
        if t.shape[3] != head_dim:
            raise ValueError(f"{name} has head_dim {t.shape[3]} but q has head_dim {head_dim}: they must match")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v has seqlen {v.shape[1]} but k has seqlen {k.shape[1]}: they must match")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} heads but k has {k.shape[2]}: they must match")
    heads_kv = k.shape[2]
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(f"q has {heads} heads, which must be a multiple of the {heads_kv} heads of k and v")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim is {head_dim}; flash_attn2 supports head dims 1 to {MAX_HEAD_DIM}")
    for name, t in named:
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    if softmax_scale is not None:
        if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not (math.isfinite(softmax_scale) and softmax_scale > 0):  # masking relies on -inf * scale = -inf
            raise ValueError(f"softmax_scale must be finite and positive, got {softmax_scale}")
    for name, t in named:
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; flash_attn2 needs CUDA tensors")
    for name, t in named[1:]:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: they must be on one device")


def _vector_aligned(t):
    """The kernels move 16-byte vectors: the base must be 16-byte aligned and every stride but the last
    (of a dim longer than 1) a multiple of 8 elements."""
    return t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def _kernel_ready(t):
    """t itself if the kernels can read it in place, else a contiguous copy."""
    return t if t.stride(-1) == 1 and _vector_aligned(t) else t.contiguous()


def _fwd(q, k, v, out, lse, softmax_scale, causal):
    """Kernel call into caller-owned buffers (tests poison them). Head dim must be a multiple of 8."""
    _ext().fwd(q, k, v, out, lse, softmax_scale, causal)


@torch.library.custom_op("flash_attn2::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, softmax_scale, causal)
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal):
    batch, seqlen_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal):
    """Kernel call into caller-owned gradient buffers (tests poison them). Head dim a multiple of 8."""
    _ext().bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal)


@torch.library.custom_op("flash_attn2::bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dout = _kernel_ready(dout)
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    _bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal)
    return dq, dk, dv


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)  # nothing of size seqlen_q x seqlen_k
    ctx.softmax_scale, ctx.causal = softmax_scale, causal
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Exact attention softmax(q·kᵀ·softmax_scale)·v, as flash_attn 2.x's function of the same name.

    q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads_kv, head_dim), fp16 or bf16 on
    one CUDA device, any strides with a contiguous last dim. heads must be a multiple of heads_kv
    (MQA/GQA; K and V are not copied). head_dim up to 256; non-multiples of 8 are zero-padded.
    softmax_scale defaults to 1/sqrt(head_dim). causal masks bottom-right aligned: query i sees keys
    j <= i + seqlen_k - seqlen_q; a row that sees no key gets output 0 and LSE +inf.
    dropout_p, window_size, softcap and alibi_slopes exist for flash_attn compatibility and raise
    NotImplementedError unless left at their defaults.

    Differentiable w.r.t. q, k and v (softmax_lse is not). The backward recomputes the attention
    matrix from q, k, v and the saved LSE, in separate dQ and dK/dV kernels with no atomics, so
    gradients are bit-identical from run to run: deterministic is always true, the argument is
    accepted for compatibility and ignored. With GQA, dK and dV are summed over each group of query
    heads in a fixed order.

    Returns out (batch, seqlen_q, heads, head_dim), or (out, softmax_lse, None) if return_attn_probs,
    with softmax_lse fp32 (batch, heads, seqlen_q), the natural-log logsumexp of the scaled scores.
    """
    _check_features(dropout_p, window_size, softcap, alibi_slopes)
    _check_inputs(q, k, v, softmax_scale)
    head_dim = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    if head_dim % 8 != 0:  # kernels load 16-byte rows; zeros add nothing to q·kᵀ and are sliced off out
        q, k, v = (F.pad(t, (0, 8 - head_dim % 8)) for t in (q, k, v))
    q, k, v = (_kernel_ready(t) for t in (q, k, v))  # odd strides or offsets: one copy, not a fault
    out, lse = _fwd_op(q, k, v, scale, bool(causal))
    out = out[..., :head_dim]
    return (out, lse, None) if return_attn_probs else out

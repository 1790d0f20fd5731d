"""The kernels as torch.library custom ops, with fake implementations and one autograd path that every
entry point (fixed-length or varlen, separate or packed q/k/v) goes through.

Packed inputs stay packed: the op takes qkv (k and v None) or kv (v None) as one tensor, reads q, k, v
as strided views of it, and its backward writes the gradients into views of one tensor of the packed
shape, so nothing is copied either way.
"""

from typing import Optional

import torch

from . import _extension
from ._extension import C as _C  # None where it is not built: checks and the reference still work


def built_head_dims():
    """The kernel head dims compiled into this build (empty if the extension is not built)."""
    return tuple(_C.built_head_dims()) if _C is not None else ()


def _ext():
    """The kernels; errors that say what to do if they are not built, not for this torch or not for this GPU."""
    return _extension.ext()


def _vector_aligned(t):
    """The kernels move 16-byte vectors: the base must be 16-byte aligned and every stride but the last
    (of a dim longer than 1) a multiple of 8 elements."""
    return t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def kernel_ready(t):
    """t itself if the kernels can read it in place, else a contiguous copy."""
    return t if t.stride(-1) == 1 and _vector_aligned(t) else t.contiguous()


def _fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
         max_seqlen_k=0, window=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None):
    """Kernel call into caller-owned buffers (tests poison them). Head dim must be a multiple of 8.
    Varlen when cu_seqlens are given: q, k, v, out (total, heads, head_dim), lse (heads, total_q)."""
    _ext().fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               *window, softcap, alibi_slopes, s_aux)


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=0, max_seqlen_k=0, window=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None):
    """Kernel call into caller-owned gradient buffers (tests poison them). Head dim a multiple of 8.
    Returns D = rowsum(dout * out) (fp32, laid out as lse), which the sink's gradient needs."""
    return _ext().bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, *window, softcap, alibi_slopes, s_aux)


def _kernel_ready(*tensors):
    """Odd strides or offsets: one copy, not a fault. Inside the ops, where tensors are real: data_ptr
    cannot be traced by torch.compile."""
    return [None if t is None else kernel_ready(t) for t in tensors]


def unpack(q, k, v):
    """q, k, v from the op's inputs: qkv (..., 3, heads, d) if k is None, q and kv (..., 2, heads_kv, d)
    if v is None, else as given. Views: nothing is copied."""
    if k is None:
        return q.unbind(-3)
    if v is None:
        return (q, *k.unbind(-3))
    return q, k, v


def _lse_shape(q, cu_seqlens_q):
    """(batch, heads, seqlen_q), or (heads, total_q) for varlen. q unpacked."""
    if cu_seqlens_q is not None:
        return q.shape[-2], q.shape[0]
    return q.shape[0], q.shape[2], q.shape[1]


@torch.library.custom_op("flash_attn2::fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
            max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
            softcap: float, alibi_slopes: Optional[torch.Tensor],
            s_aux: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = unpack(*_kernel_ready(q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
         (window_left, window_right), softcap, alibi_slopes, s_aux)
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, s_aux):
    q, _, _ = unpack(q, k, v)
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


def _sink_grad(s_aux, lse, dpsum):
    """d s_aux[h] = -sum over rows of P(sink) * D, with P(sink) = exp(s_aux[h] - lse): the sink's share of
    each row's softmax takes from every visible key's, and its value is zero."""
    head_dim = 0 if lse.dim() == 2 else 1  # lse: (heads, total_q) or (batch, heads, seqlen_q)
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    p_sink = torch.exp(s_aux.view(shape) - lse)  # 0 on rows with lse = +inf
    rows = [d for d in range(lse.dim()) if d != head_dim]
    return -(p_sink * dpsum).sum(dim=rows)


@torch.library.custom_op("flash_attn2::bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
            out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
            causal: bool, window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
            s_aux: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of the op's tensor inputs q, k, v, each shaped like its input (packed ones packed), then
    that of s_aux if it is given."""
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v) if t is not None]
    dq, dk, dv = unpack(*grads, *[None] * (3 - len(grads)))
    dpsum = _bwd(kernel_ready(dout), *unpack(*_kernel_ready(q, k, v)), out, lse, dq, dk, dv, softmax_scale, causal,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, (window_left, window_right), softcap,
                 alibi_slopes, s_aux)
    if s_aux is not None:
        grads.append(_sink_grad(s_aux, lse, dpsum))
    return grads


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, s_aux):
    return [t.new_empty(t.shape) for t in (q, k, v, s_aux) if t is not None]


_OP_INPUTS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal",
              "window_left", "window_right", "softcap", "alibi_slopes", "s_aux")


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *args, alibi_slopes, s_aux = inputs
    out, lse = output
    # Nothing of size seqlen_q x seqlen_k is kept.
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s_aux)
    ctx.args = args  # max_seqlen_q ... softcap
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s_aux = ctx.saved_tensors
    grads = iter(_bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, alibi_slopes, s_aux))
    differentiable = {"q": q, "k": k, "v": v, "s_aux": s_aux}
    return tuple(next(grads) if differentiable.get(name) is not None else None for name in _OP_INPUTS)


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def attention(q, k, v, softmax_scale, causal, return_attn_probs, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=0, max_seqlen_k=0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None):
    """The one path of every entry point, after their checks: q, k, v as the op takes them (packed or
    not), any head dim up to 256. Pads a head dim that is not a multiple of 8, copies views the kernels
    cannot read in place, and slices the padding off out."""
    head_dim = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    tensors = [t for t in (q, k, v) if t is not None]
    if head_dim % 8 != 0:  # kernels load 16-byte rows; zeros add nothing to q·kᵀ and are sliced off out
        tensors = [torch.nn.functional.pad(t, (0, 8 - head_dim % 8)) for t in tensors]
    q, k, v = (*tensors, *[None] * (3 - len(tensors)))
    out, lse = _fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal),
                       int(window_size[0]), int(window_size[1]), float(softcap), alibi_slopes, s_aux)
    out = out[..., :head_dim]
    return (out, lse, None) if return_attn_probs else out

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
         max_seqlen_k=0):
    """Kernel call into caller-owned buffers (tests poison them). Head dim must be a multiple of 8.
    Varlen when cu_seqlens are given: q, k, v, out (total, heads, head_dim), lse (heads, total_q)."""
    _ext().fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=0, max_seqlen_k=0):
    """Kernel call into caller-owned gradient buffers (tests poison them). Head dim a multiple of 8."""
    _ext().bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k,
               max_seqlen_q, max_seqlen_k)


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
            max_seqlen_k: int, softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = unpack(q, k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    q, _, _ = unpack(q, k, v)
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


@torch.library.custom_op("flash_attn2::bwd", mutates_args=())
def _bwd_op(dout: torch.Tensor, q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
            out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
            cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
            causal: bool) -> list[torch.Tensor]:
    """The gradients of the op's tensor inputs, each shaped like its input (packed ones packed)."""
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v) if t is not None]
    dq, dk, dv = unpack(*grads, *[None] * (3 - len(grads)))
    _bwd(kernel_ready(dout), *unpack(q, k, v), out, lse, dq, dk, dv, softmax_scale, causal, cu_seqlens_q,
         cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return grads


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return [t.new_empty(t.shape) for t in (q, k, v) if t is not None]


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)  # nothing of size seqlen_q x seqlen_k
    ctx.args = max_seqlen_q, max_seqlen_k, softmax_scale, causal
    ctx.mark_non_differentiable(lse)


def _fwd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    grads = iter(_bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args))
    return (*(None if t is None else next(grads) for t in (q, k, v)), None, None, None, None, None, None)


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def attention(q, k, v, softmax_scale, causal, return_attn_probs, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=0, max_seqlen_k=0):
    """The one path of every entry point, after their checks: q, k, v as the op takes them (packed or
    not), any head dim up to 256. Pads a head dim that is not a multiple of 8, copies views the kernels
    cannot read in place, and slices the padding off out."""
    head_dim = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    tensors = [t for t in (q, k, v) if t is not None]
    if head_dim % 8 != 0:  # kernels load 16-byte rows; zeros add nothing to q·kᵀ and are sliced off out
        tensors = [torch.nn.functional.pad(t, (0, 8 - head_dim % 8)) for t in tensors]
    tensors = [kernel_ready(t) for t in tensors]  # odd strides or offsets: one copy, not a fault
    q, k, v = (*tensors, *[None] * (3 - len(tensors)))
    out, lse = _fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(causal))
    out = out[..., :head_dim]
    return (out, lse, None) if return_attn_probs else out

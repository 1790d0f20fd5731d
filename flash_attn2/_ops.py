"""The kernels as torch.library custom ops, with fake implementations and one autograd path that every
entry point (fixed-length or varlen, separate or packed q/k/v) goes through.

Packed inputs stay packed: the op takes qkv (k and v None) or kv (v None) as one tensor, reads q, k, v
as strided views of it, and its backward writes the gradients into views of one tensor of the packed
shape, so nothing is copied either way.
"""

import os
from typing import Optional

import torch

from . import _checks, _extension
from .reference import attention_scores
from ._extension import C as _C  # None where it is not built: checks and the reference still work


def built_head_dims():
    """The kernel head dims compiled into this build (empty if the extension is not built)."""
    return tuple(_C.built_head_dims()) if _C is not None else ()


def _ext():
    """The kernels; errors that say what to do if they are not built, not for this torch or not for this GPU."""
    return _extension.ext()


def kernel_ready(t):
    """t itself if the kernels can read it in place (_checks.vector_aligned), else a contiguous copy."""
    return t if t.stride(-1) == 1 and _checks.vector_aligned(t) else t.contiguous()


def _fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
         max_seqlen_k=0, window=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None, dropout_p=0.0, rng_state=None):
    """Kernel call into caller-owned buffers (tests poison them). Head dim must be a multiple of 8.
    Varlen when cu_seqlens are given: q, k, v, out (total, heads, head_dim), lse (heads, total_q).
    dropout_p > 0 draws (seed, offset) from torch's CUDA generator and writes them into rng_state, int64 (2,)."""
    _ext().fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               *window, softcap, alibi_slopes, s_aux, dropout_p, rng_state)


def _bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, cu_seqlens_q=None, cu_seqlens_k=None,
         max_seqlen_q=0, max_seqlen_k=0, window=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None, dropout_p=0.0,
         rng_state=None, deterministic=True):
    """Kernel call into caller-owned gradient buffers (tests poison them). Head dim a multiple of 8.
    Returns D = rowsum(dout * out) (fp32, laid out as lse), which the sink's gradient needs. With dropout_p > 0,
    rng_state is the forward's: the same entries are dropped. deterministic: the split backward (bit-identical
    from run to run), else dQ by fp32 atomic adds in the dK/dV kernel (faster; see use_deterministic_backward)."""
    return _ext().bwd(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, *window, softcap, alibi_slopes, s_aux, dropout_p, rng_state,
                      deterministic)


# The atomic backward is opt-in until it is the faster one: on the H200 it measured 0.55-0.75x the split
# backward's forward + backward speed (benchmarks/NOTES.md, session 6), so deterministic=False, which allows
# atomics but does not ask for them, takes the split kernels too unless this is set to 1.
ATOMIC_BACKWARD_ENV = "FLASH_ATTN2_ATOMIC_BWD"


def use_deterministic_backward(deterministic):
    """Whether the backward takes the split kernels: asked for (deterministic=True), required by
    torch.use_deterministic_algorithms(True), or the atomic one not opted into (FLASH_ATTN2_ATOMIC_BWD=1).
    Read when the backward runs."""
    if deterministic or torch.are_deterministic_algorithms_enabled():
        return True
    return os.environ.get(ATOMIC_BACKWARD_ENV, "0") != "1"


def dropout_keep_mask(rng_state, dropout_p, batch, heads, seqlen_q, seqlen_k):
    """The keep mask (bool (batch, heads, seqlen_q, seqlen_k), True where kept) that a forward with this
    dropout_p and its rng_state dropped by, each sequence (of a varlen batch too) and head in its own
    coordinates. From a debug kernel: for tests at small shapes."""
    return _ext().dropout_mask(rng_state, float(dropout_p), batch, heads, seqlen_q, seqlen_k).bool()


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


# nondeterministic_seeded: with dropout it draws from the CUDA generator, so that torch.compile never merges
# two calls with the same inputs into one (they must drop different entries).
@torch.library.custom_op("flash_attn2::fwd", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _fwd_op(q: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
            cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int,
            max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int,
            softcap: float, alibi_slopes: Optional[torch.Tensor], s_aux: Optional[torch.Tensor],
            dropout_p: float, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, rng_state): rng_state the (seed, offset) int64 (2,) the kernel dropped with (written by the
    kernel, so right under CUDA-graph capture too), or an empty int64 tensor without dropout. deterministic
    does not change the forward: the autograd context keeps it for the backward (flash_attn2::bwd)."""
    q, k, v = unpack(*_kernel_ready(q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32, device=q.device)
    rng_state = torch.empty(_rng_state_shape(dropout_p), dtype=torch.int64, device=q.device)
    _fwd(q, k, v, out, lse, softmax_scale, causal, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
         (window_left, window_right), softcap, alibi_slopes, s_aux, dropout_p, rng_state if dropout_p > 0 else None)
    return out, lse, rng_state


def _rng_state_shape(dropout_p):
    return (2,) if dropout_p > 0 else (0,)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
      window_right, softcap, alibi_slopes, s_aux, dropout_p, deterministic=False):
    q, _, _ = unpack(q, k, v)
    return (q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32),
            q.new_empty(_rng_state_shape(dropout_p), dtype=torch.int64))


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
            s_aux: Optional[torch.Tensor], dropout_p: float, rng_state: torch.Tensor,
            deterministic: bool = False) -> list[torch.Tensor]:
    """The gradients of the op's tensor inputs q, k, v, each shaped like its input (packed ones packed), then
    that of s_aux if it is given. rng_state: the forward's (dropout drops the same entries). The split
    backward where use_deterministic_backward(deterministic), read when the kernels run; else the atomic dQ."""
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v) if t is not None]
    dq, dk, dv = unpack(*grads, *[None] * (3 - len(grads)))
    dpsum = _bwd(kernel_ready(dout), *unpack(*_kernel_ready(q, k, v)), out, lse, dq, dk, dv, softmax_scale, causal,
                 cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, (window_left, window_right), softcap,
                 alibi_slopes, s_aux, dropout_p, rng_state if dropout_p > 0 else None,
                 use_deterministic_backward(deterministic))
    if s_aux is not None:
        grads.append(_sink_grad(s_aux, lse, dpsum))
    return grads


@_bwd_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_left, window_right, softcap, alibi_slopes, s_aux, dropout_p, rng_state, deterministic=False):
    return [t.new_empty(t.shape) for t in (q, k, v, s_aux) if t is not None]


_OP_INPUTS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal",
              "window_left", "window_right", "softcap", "alibi_slopes", "s_aux", "dropout_p", "deterministic")


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *args, alibi_slopes, s_aux, dropout_p, deterministic = inputs
    out, lse, rng_state = output
    # Nothing of size seqlen_q x seqlen_k is kept: the backward regenerates the dropout mask from rng_state.
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s_aux, rng_state)
    ctx.args = args  # max_seqlen_q ... softcap
    ctx.dropout_p = dropout_p
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse, rng_state)


def _fwd_backward(ctx, dout, _dlse, _drng_state):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, s_aux, rng_state = ctx.saved_tensors
    grads = iter(_bwd_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args, alibi_slopes, s_aux,
                         ctx.dropout_p, rng_state, ctx.deterministic))
    differentiable = {"q": q, "k": k, "v": v, "s_aux": s_aux}
    return tuple(next(grads) if differentiable.get(name) is not None else None for name in _OP_INPUTS)


_fwd_op.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def attention(q, k, v, softmax_scale, causal, return_attn_probs, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=0, max_seqlen_k=0, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None,
              dropout_p=0.0, deterministic=False):
    """The one path of every entry point, after their checks: q, k, v as the op takes them (packed or
    not), any head dim up to 256. Pads a head dim that is not a multiple of 8, copies views the kernels
    cannot read in place, and slices the padding off out. deterministic: the backward's mode
    (use_deterministic_backward)."""
    head_dim = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    dropout_p = float(dropout_p)
    _checks.check_dropout_use(dropout_p, return_attn_probs, cu_seqlens_q is not None)
    unpadded = unpack(q, k, v)
    tensors = [t for t in (q, k, v) if t is not None]
    if head_dim % 8 != 0:  # kernels load 16-byte rows; zeros add nothing to q·kᵀ and are sliced off out
        tensors = [torch.nn.functional.pad(t, (0, 8 - head_dim % 8)) for t in tensors]
    q, k, v = (*tensors, *[None] * (3 - len(tensors)))
    out, lse, rng_state = _fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                  bool(causal), int(window_size[0]), int(window_size[1]), float(softcap), alibi_slopes,
                                  s_aux, dropout_p, bool(deterministic))
    out = out[..., :head_dim]
    if not return_attn_probs:
        return out
    probs = None
    if dropout_p > 0:
        probs = _dropped_probs(*unpadded[:2], lse, rng_state, dropout_p, scale, causal, window_size, softcap,
                               alibi_slopes)
    return out, lse, probs


def _dropped_probs(q, k, lse, rng_state, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes):
    """return_attn_probs' third value with dropout, as flash_attn's S_dmask (for tests, small shapes): the
    softmax probabilities exp(score - lse), fp32 (batch, heads, seqlen_q, seqlen_k), negated where dropout
    dropped the entry (a dropped 0 stays 0), without the 1 / (1 - p). Scores from the reference's formula,
    the LSE and mask the kernel's, so that a kernel bug in either shows. Not differentiable."""
    with torch.no_grad():
        scores = attention_scores(q, k, softmax_scale, causal, window_size=tuple(window_size), softcap=softcap,
                                  alibi_slopes=alibi_slopes)
        probs = torch.exp(scores - lse.unsqueeze(-1))  # lse = +inf on rows that see nothing: 0
        keep = dropout_keep_mask(rng_state, dropout_p, *probs.shape)
        return torch.where(keep, probs, -probs)

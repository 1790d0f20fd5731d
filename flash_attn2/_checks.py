"""Argument checks shared by every entry point: each raises before any launch, naming the argument and
the rule. Device rules come last, so that every other rule can be checked with CPU tensors."""

import math
import os

import torch

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# Sequence positions are 32-bit in the kernels; they leave room for one block past the end.
MAX_SEQLEN = 2 ** 31 - 1024
MAX_BATCH = 65535  # the grid's y dimension

# Whether the varlen entry points read cu_seqlens back to the host to check their values (one sync per
# call, which flash_attn never does; off by default). Without it, bad values give wrong rows, never an
# access outside the tensors: the kernels clamp every sequence into them.
_check_values = os.environ.get("FLASH_ATTN2_CHECK_VALUES", "") not in ("", "0")


def value_checks_enabled():
    """Whether set_value_checks (or FLASH_ATTN2_CHECK_VALUES=1) turned the host-side value checks on."""
    return _check_values


def set_value_checks(enabled):
    """Turns the host-side checks of index values (cu_seqlens; flash_attn_with_kvcache's cache_batch_idx) on or
    off (default: off, or on where the environment sets FLASH_ATTN2_CHECK_VALUES=1). Returns the previous
    setting."""
    global _check_values
    previous, _check_values = _check_values, bool(enabled)
    return previous


def check_dropout(dropout_p):
    """dropout_p: a real number (int or float, not bool), finite, in [0, 1)."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float in [0, 1) (0.0 for none), got {type(dropout_p).__name__}")
    if not (math.isfinite(dropout_p) and 0 <= dropout_p < 1):
        raise ValueError(f"dropout_p must be finite and in [0, 1) (0.0 for none), got {dropout_p}")


def check_dropout_use(dropout_p, return_attn_probs, varlen):
    """What dropout does not do yet, refused before any launch (dropout_p already checked)."""
    if return_attn_probs and dropout_p > 0 and varlen:
        raise NotImplementedError("return_attn_probs with dropout_p > 0 returns the attention probabilities for "
                                  "flash_attn_func and its packed variants only (as flash_attn); varlen has no "
                                  "(batch, heads, seqlen_q, seqlen_k) layout for them")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def vector_aligned(t):
    """The kernels move 16-byte vectors: the base must be 16-byte aligned and every stride but the last
    (of a dim longer than 1) a multiple of 8 elements."""
    return t.data_ptr() % 16 == 0 and all(st % 8 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)


def _check_per_head(name, t, heads, batch=None):
    """fp32 (heads,), or (batch, heads) where batch is given, with a contiguous last dim."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be torch.float32, got {t.dtype}")
    shapes = {(heads,): f"(heads,) = ({heads},)"}
    if batch is not None:
        shapes[(batch, heads)] = f"(batch, heads) = ({batch}, {heads})"
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(shapes.values())}, got {tuple(t.shape)}")
    if t.numel() > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")


def check_scores(q, batch, window_size, softcap, alibi_slopes, s_aux, qn="q"):
    """The score arguments (flash.h states what they do), q already checked: heads from q, batch the
    number of sequences. Their devices: check_devices, with the tensors'."""
    try:
        pair = tuple(window_size)
    except TypeError:
        pair = None
    if pair is None or len(pair) != 2 or not all(_is_int(w) for w in pair):
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 for unbounded; got {window_size!r}")
    if min(pair) < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded on that side), got {pair}")
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a float (0.0 for none), got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be finite and >= 0 (0.0 for none), got {softcap}")
    heads = q.shape[-2]
    if alibi_slopes is not None:
        _check_per_head("alibi_slopes", alibi_slopes, heads, batch)
    if s_aux is not None:
        _check_per_head("s_aux", s_aux, heads)


def score_tensors(alibi_slopes, s_aux):
    """The (name, tensor) pairs of the score arguments that are given, for check_devices."""
    return tuple((name, t) for name, t in (("alibi_slopes", alibi_slopes), ("s_aux", s_aux)) if t is not None)


def check_inputs(q, k, v, softmax_scale, varlen=False, names=("q", "k", "v")):
    """q, k, v as the kernels take them: (batch, seqlen, heads, head_dim), or with varlen (total, heads,
    head_dim); fp16/bf16, a contiguous last dim. Their devices: check_devices, last. names: what the caller
    called them (the packed entries pass views of qkv or kv, and name those)."""
    named = tuple(zip(names, (q, k, v)))
    qn, kn = names[0], names[1]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; flash_attn2 takes torch.float16 or torch.bfloat16")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {qn} has {q.dtype}: q, k and v must share one dtype")
    rank, layout = (3, "(total, heads, head_dim)") if varlen else (4, "(batch, seqlen, heads, head_dim)")
    for name, t in named:
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    heads, head_dim = q.shape[-2:]
    rows = "total" if varlen else "seqlen"
    for name, t in named[1:]:
        if not varlen and t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch {t.shape[0]} but {qn} has batch {q.shape[0]}: they must match")
        if t.shape[-1] != head_dim:
            raise ValueError(f"{name} has head_dim {t.shape[-1]} but {qn} has head_dim {head_dim}: they must match")
    if v.shape[-3] != k.shape[-3]:
        raise ValueError(f"{names[2]} has {rows} {v.shape[-3]} but {kn} has {rows} {k.shape[-3]}: they must match")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"{names[2]} has heads {v.shape[-2]} but {kn} has heads {k.shape[-2]}: they must match")
    heads_kv = k.shape[-2]
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(f"{qn} has {heads} heads, which must be a multiple of the {heads_kv} heads of k and v")
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{qn}: head_dim is {head_dim}; flash_attn2 supports head dims 1 to {MAX_HEAD_DIM}")
    for name, t in named:
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")
    if softmax_scale is not None:
        if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not (math.isfinite(softmax_scale) and softmax_scale > 0):  # masking relies on -inf * scale = -inf
            raise ValueError(f"softmax_scale must be finite and positive, got {softmax_scale}")


def check_devices(named):
    """Every tensor of (name, tensor) pairs on the CUDA device of the first."""
    for name, t in named:
        if t.device.type != "cuda":
            raise ValueError(f"{name} is on {t.device}; flash_attn2 needs CUDA tensors")
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: they must be on one "
                             "device")


def check_packed(name, packed, count, layout):
    """A packed tensor (..., count, heads, head_dim): qkv with count 3, kv with count 2."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != len(layout) or packed.shape[-3] != count:
        raise ValueError(f"{name} must be {len(layout)}-D ({', '.join(layout)}) with {count} in dim "
                         f"{len(layout) - 3}, got shape {tuple(packed.shape)}")


VARLEN_NAMES = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names):
    cu_q, cu_k, max_q, max_k = names
    return ((cu_q, cu_seqlens_q, max_q, max_seqlen_q, q), (cu_k, cu_seqlens_k, max_k, max_seqlen_k, k))


def check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names=VARLEN_NAMES):
    """cu_seqlens and max_seqlen of a varlen call, q and k already checked; devices and values apart.
    names: what the caller called them (the varlen qkvpacked entry has one cu_seqlens and max_seqlen)."""
    seqlens = _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names)
    for name, cu, max_name, max_seqlen, rows in seqlens:
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {tuple(cu.shape)}")
        if not cu.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {cu.stride()}")
        if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool):
            raise TypeError(f"{max_name} must be a Python int, got {type(max_seqlen).__name__}")
        if not 0 <= max_seqlen <= MAX_SEQLEN:
            raise ValueError(f"{max_name} must be in [0, 2^31 - 1024], got {max_seqlen}")
        if max_seqlen < 1 and rows.shape[0] > 0:
            raise ValueError(f"{max_name} must be at least 1 when the sequences hold tokens "
                             f"({rows.shape[0]} rows), got {max_seqlen}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{names[0]} has {cu_seqlens_q.numel()} entries but {names[1]} has "
                         f"{cu_seqlens_k.numel()}: both must be (batch + 1,)")
    if cu_seqlens_q.numel() - 1 > MAX_BATCH:
        raise ValueError(f"{names[0]}: batch must be at most {MAX_BATCH}, got {cu_seqlens_q.numel() - 1}")
    if max(q.shape[0], k.shape[0]) > MAX_SEQLEN:
        raise ValueError(f"q, k: total rows must be below 2^31 - 1024, got {q.shape[0]} and {k.shape[0]}")


def check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, names=VARLEN_NAMES):
    """cu_seqlens starts at 0, never decreases, ends at the tensor's rows, and no sequence is longer
    than max_seqlen. Reads them to the host (a sync), so only where value checks are on."""
    if not _check_values:
        return
    for name, cu, max_name, max_seqlen, rows in _seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                         max_seqlen_k, names):
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"{name} must not decrease, got {values}")
        if values[-1] != rows.shape[0]:
            raise ValueError(f"{name} must end at total = {rows.shape[0]} (the rows of "
                             f"{'q' if name.endswith('q') else 'k'}), got {values[-1]}")
        if lengths and max(lengths) > max_seqlen:
            raise ValueError(f"{name} has a sequence of {max(lengths)} rows, longer than {max_name} = {max_seqlen}")

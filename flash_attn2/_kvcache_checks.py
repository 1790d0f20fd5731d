"""Argument checks of flash_attn_with_kvcache, in _checks' style: each raises before any launch, naming the
argument and the rule (TypeError for a type or dtype, ValueError for a shape, a value or a device), device
rules last so that every other rule can be checked with CPU tensors."""

import math

import torch

from . import _checks
from ._checks import MAX_HEAD_DIM, SUPPORTED_DTYPES, _is_int

PAGE_MULTIPLE = 16  # a page holds whole 16-row slices of the key tiles' MMAs
ROTARY_MULTIPLE = 16
MAX_SPLITS = 128


def _tensor(name, t, optional=True):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")


def _index_vector(name, t, batch):
    """An int32 (batch,) tensor: cache_seqlens, cache_batch_idx, cache_leftpad."""
    _tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32, got {t.dtype}")
    if tuple(t.shape) != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {tuple(t.shape)}")
    if batch > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def check_cache_alignment(k_cache, v_cache):
    """The caches are read (and written) in place, never copied to fix their alignment. Called inside the op,
    where tensors are real: data_ptr cannot be traced by torch.compile."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.numel() > 0 and not _checks.vector_aligned(t):
            raise ValueError(f"{name} must have a 16-byte aligned data pointer and strides that are multiples of "
                             f"8 elements (it is read and written in place, never copied), got strides {t.stride()}")


def _bool(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


def check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                  block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                  num_splits, return_softmax_lse):
    """Every rule of flash_attn_with_kvcache's arguments; returns nothing. The values inside index tensors
    (cache_seqlens, page ids) are not read (that would sync): the kernels clamp them."""
    # Tensors and dtypes.
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _tensor(name, t, optional=False)
    for name, t in (("k", k), ("v", v), ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        _tensor(name, t)
    named = [(n, t) for n, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v))
             if t is not None]
    for name, t in named:
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; flash_attn2 takes torch.float16 or torch.bfloat16")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: they must share one dtype")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if t is not None and t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: they must match")
    _bool("causal", causal)
    _bool("rotary_interleaved", rotary_interleaved)
    _bool("return_softmax_lse", return_softmax_lse)
    if not _is_int(num_splits):
        raise TypeError(f"num_splits must be an int (0: chosen from the shape, 1: no split), got "
                        f"{type(num_splits).__name__}")
    if not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [0, {MAX_SPLITS}] (0: chosen from the shape), got {num_splits}")

    # Shapes of q and the caches.
    for name, t in named:
        if t.dim() != 4:
            layout = "(batch, seqlen_q, heads, head_dim)" if name == "q" else (
                "(batch, seqlen_new, heads_kv, head_dim)" if name in ("k", "v") else
                "(batch_cache, seqlen_cache, heads_kv, head_dim) or, with block_table, "
                "(num_pages, page_size, heads_kv, head_dim)")
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    batch, seqlen_q, heads, head_dim = q.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}: "
                         "they must match")
    heads_kv = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache has head_dim {k_cache.shape[3]} but q has head_dim {head_dim}: they must match")
    if heads_kv == 0 or heads % heads_kv != 0:
        raise ValueError(f"q has {heads} heads, which must be a multiple of the {heads_kv} heads of k_cache and "
                         "v_cache")
    if not (0 < head_dim <= MAX_HEAD_DIM and head_dim % 8 == 0):
        raise ValueError(f"q: head_dim is {head_dim}; flash_attn_with_kvcache takes multiples of 8 up to "
                         f"{MAX_HEAD_DIM} (the cache is written in place, so it is never padded)")
    if batch > _checks.MAX_BATCH:
        raise ValueError(f"q: batch must be at most {_checks.MAX_BATCH}, got {batch}")

    # The cache's layout: contiguous (batch_cache, seqlen_cache) or pages through block_table.
    paged = block_table is not None
    if paged:
        _tensor("block_table", block_table)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be torch.int32, got {block_table.dtype}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(f"block_table must be 2-D (batch, max_pages) with batch = {batch}, got shape "
                             f"{tuple(block_table.shape)}")
        if block_table.shape[1] > 1 and block_table.stride(1) != 1:
            raise ValueError(f"block_table must have a contiguous last dim, got strides {block_table.stride()}")
        page_size = k_cache.shape[1]
        if page_size == 0 or page_size % PAGE_MULTIPLE != 0:
            raise ValueError(f"k_cache: with block_table, dim 1 is the page size, which must be a positive multiple "
                             f"of {PAGE_MULTIPLE}, got {page_size}")
        seqlen_cache = block_table.shape[1] * page_size
    else:
        if cache_batch_idx is None and k_cache.shape[0] != batch:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has batch {batch}: they must match "
                             "(or give cache_batch_idx)")
        seqlen_cache = k_cache.shape[1]
    if max(seqlen_q, seqlen_cache) > _checks.MAX_SEQLEN:
        raise ValueError(f"q, k_cache: seqlen must be below 2^31 - 1024, got {seqlen_q} and {seqlen_cache}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides {t.stride()}")

    # Lengths and indices.
    if cache_seqlens is not None:
        if _is_int(cache_seqlens):
            if not 0 <= cache_seqlens <= seqlen_cache:
                raise ValueError(f"cache_seqlens must be in [0, seqlen_cache = {seqlen_cache}], got {cache_seqlens}")
        elif isinstance(cache_seqlens, torch.Tensor):
            _index_vector("cache_seqlens", cache_seqlens, batch)
        else:
            raise TypeError(f"cache_seqlens must be an int, an int32 (batch,) tensor or None, got "
                            f"{type(cache_seqlens).__name__}")
    if cache_batch_idx is not None:
        _index_vector("cache_batch_idx", cache_batch_idx, batch)
        if paged:
            raise ValueError("cache_batch_idx and block_table cannot be combined: block_table already maps each "
                             "batch row to its pages")
    if cache_leftpad is not None:
        _index_vector("cache_leftpad", cache_leftpad, batch)
        if paged:
            raise ValueError("cache_leftpad and block_table cannot be combined (as in flash_attn): a paged "
                             "sequence starts at its first page")

    # New keys and values.
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append) or both be None")
    if k is not None:
        new_shape = (batch, k.shape[1], heads_kv, head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != new_shape:
                raise ValueError(f"{name} must have shape (batch, seqlen_new, heads_kv, head_dim) = {new_shape}, "
                                 f"got {tuple(t.shape)}")
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last dim (stride(-1) == 1), got strides "
                                 f"{t.stride()}")
        seqlen_new = k.shape[1]
        room = seqlen_cache - (cache_seqlens if _is_int(cache_seqlens) else 0)
        if seqlen_new > room:
            raise ValueError(f"k, v: {seqlen_new} new rows do not fit the cache ({seqlen_cache} rows"
                             f"{f', {cache_seqlens} already used' if _is_int(cache_seqlens) else ''})")

    # Rotary.
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together or both be None")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos, rotary_sin: rotary embedding is applied to q and the new k, so k and v "
                             "must be given too")
        if rotary_cos.dim() != 2 or tuple(rotary_sin.shape) != tuple(rotary_cos.shape):
            raise ValueError(f"rotary_cos and rotary_sin must both be 2-D (seqlen_ro, rotary_dim / 2), got shapes "
                             f"{tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
        rotary_dim = 2 * rotary_cos.shape[1]
        if not (0 < rotary_dim <= head_dim and rotary_dim % ROTARY_MULTIPLE == 0):
            raise ValueError(f"rotary_cos: rotary_dim = 2 * dim 1 = {rotary_dim} must be a positive multiple of "
                             f"{ROTARY_MULTIPLE}, at most head_dim = {head_dim}")
        if rotary_cos.shape[0] < seqlen_cache:
            raise ValueError(f"rotary_cos, rotary_sin: seqlen_ro = {rotary_cos.shape[0]} must cover the cache "
                             f"(seqlen_cache = {seqlen_cache} positions)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have a contiguous last dim, got strides {t.stride()}")

    # Scores.
    if softmax_scale is not None:
        if not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not (math.isfinite(softmax_scale) and softmax_scale > 0):
            raise ValueError(f"softmax_scale must be finite and positive, got {softmax_scale}")
    _checks.check_scores(q, batch, window_size, softcap, alibi_slopes, None)

    # Devices, last.
    tensors = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v), ("rotary_cos", rotary_cos),
               ("rotary_sin", rotary_sin), ("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx),
               ("cache_leftpad", cache_leftpad), ("block_table", block_table), ("alibi_slopes", alibi_slopes)]
    _checks.check_devices([(n, t) for n, t in tensors if isinstance(t, torch.Tensor)])
    check_kvcache_values(k, cache_batch_idx, k_cache.shape[0])


def check_kvcache_values(k, cache_batch_idx, batch_cache):
    """cache_batch_idx's rows lie in the cache and, when k and v are appended, are distinct (two sequences
    appending into one cache row race). Reads it to the host (a sync), so only where value checks are on;
    without them the kernels clamp the rows into the cache."""
    if cache_batch_idx is None or not _checks.value_checks_enabled():
        return
    rows = cache_batch_idx.tolist()
    if any(not 0 <= r < batch_cache for r in rows):
        raise ValueError(f"cache_batch_idx must be rows of the cache, in [0, {batch_cache}), got {rows}")
    if k is not None and len(set(rows)) != len(rows):
        raise ValueError(f"cache_batch_idx must be distinct when k and v are appended (two sequences would write "
                         f"one cache row), got {rows}")

"""The inference entry point, as flash_attn 2.8 names it: attention of a few new query tokens over a KV
cache (decoding), forward only. One torch.library custom op (flash_attn2::fwd_kvcache) with a fake
implementation that declares the caches' mutation, so that torch.compile and CUDA graphs can capture a
decode step; its arguments are those of flash_attn's contract (new k/v, rotary, paged caches, cache_batch_idx,
cache_leftpad)."""

from typing import Optional

import torch

from . import _kvcache_checks
from ._ops import _ext, kernel_ready


def _fwd_kvcache(q, k_cache, v_cache, out, lse, cache_seqlens, softmax_scale, causal, window=(-1, -1), softcap=0.0,
                 alibi_slopes=None, num_splits=0, k=None, v=None, rotary_cos=None, rotary_sin=None,
                 rotary_interleaved=True, block_table=None, cache_batch_idx=None, cache_leftpad=None):
    """Kernel call into caller-owned out (like q) and lse (batch, heads, seqlen_q) fp32 (tests poison them).
    cache_seqlens: int32 (batch,) on q's device. k, v: appended to the caches in place first."""
    _ext().fwd_kvcache(q, k_cache, v_cache, out, lse, cache_seqlens, float(softmax_scale), bool(causal),
                       int(window[0]), int(window[1]), float(softcap), alibi_slopes, int(num_splits), k, v,
                       rotary_cos, rotary_sin, bool(rotary_interleaved), block_table, cache_batch_idx, cache_leftpad)


def kvcache_num_splits(q, k_cache, num_splits=0, block_table=None, causal=False, window_size=(-1, -1),
                       alibi_slopes=None):
    """The split count a call with these q, k_cache, block_table and scores (causal, window_size,
    alibi_slopes: they decide whether GQA decode packs, which changes the grid) runs with, on q's device:
    num_splits=0 the heuristic's (csrc/common/decode_plan.h), else num_splits clamped as the call clamps it.
    k_cache stands for v_cache; the inputs are checked as the call checks them."""
    return _ext().kvcache_num_splits(q, k_cache, int(num_splits), block_table, bool(causal), int(window_size[0]),
                                     int(window_size[1]), alibi_slopes)


@torch.library.custom_op("flash_attn2::fwd_kvcache", mutates_args=("k_cache", "v_cache"))
def _fwd_kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                    v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor], rotary_sin: Optional[torch.Tensor],
                    cache_seqlens: torch.Tensor, cache_batch_idx: Optional[torch.Tensor],
                    cache_leftpad: Optional[torch.Tensor], block_table: Optional[torch.Tensor], softmax_scale: float,
                    causal: bool, window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                    alibi_slopes: Optional[torch.Tensor], num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse). k_cache and v_cache are mutated: the new k and v are appended to them in place."""
    _kvcache_checks.check_cache_alignment(k_cache, v_cache)
    q, k, v = (None if t is None else kernel_ready(t) for t in (q, k, v))
    rotary_cos, rotary_sin = (None if t is None else t.contiguous() for t in (rotary_cos, rotary_sin))
    batch, seqlen_q, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    _fwd_kvcache(q, k_cache, v_cache, out, lse, cache_seqlens, softmax_scale, causal, (window_left, window_right),
                 softcap, alibi_slopes, num_splits, k, v, rotary_cos, rotary_sin, rotary_interleaved, block_table,
                 cache_batch_idx, cache_leftpad)
    return out, lse


@_fwd_kvcache_op.register_fake
def _(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
      softmax_scale, causal, window_left, window_right, softcap, rotary_interleaved, alibi_slopes, num_splits):
    batch, seqlen_q, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


def _cache_seqlens_tensor(cache_seqlens, q, k_cache, block_table):
    """cache_seqlens as the op takes it, an int32 (batch,) tensor on q's device: an int, or None for the
    whole cache, becomes one (a fill on the device, no copy from the host)."""
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens
    if cache_seqlens is None:
        cache_seqlens = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    return torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q over a KV cache, as flash_attn 2.8's function of the same name (forward only).

    q: (batch, seqlen_q, heads, head_dim); k_cache, v_cache: (batch, seqlen_cache, heads_kv, head_dim), fp16
    or bf16 on q's device, heads a multiple of heads_kv (GQA/MQA), head_dim a multiple of 8 up to 256 (the
    caches are read in place and never padded or copied: a contiguous last dim, 16-byte aligned, strides
    multiples of 8 elements).
    cache_seqlens: the keys of sequence b are the first cache_seqlens[b] rows of its cache; an int (the
    same for every sequence), an int32 (batch,) tensor on q's device, or None for the whole cache. Tensor
    values are not read on the host: a value outside [0, seqlen_cache] is clamped into it in the kernel.
    The scores are flash_attn_func's with Sk = cache_seqlens[b]: causal and window_size are aligned to the
    end of each sequence's cache (query i sits on key i + Sk - seqlen_q), softcap and alibi_slopes ((heads,)
    or (batch, heads)) as there. A row that sees no key gets out 0 and LSE +inf.
    k, v: (batch, seqlen_new, heads_kv, head_dim) new keys and values, written into the caches in place at
    rows cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (by a small kernel before the attention, in
    the same call; rows that would fall past the cache are dropped) and attended to: the keys of sequence b
    are then its first cache_seqlens[b] + seqlen_new rows.
    rotary_cos, rotary_sin: (seqlen_ro >= seqlen_cache, rotary_dim / 2) tables of q's dtype, rotary_dim a
    multiple of 16 up to head_dim; with them the new keys are rotated at their positions cache_seqlens[b] + j
    before they are stored, and q at cache_seqlens[b] + i where causal or a window is on, else every query
    at cache_seqlens[b] (flash_attn's rule); the cache's existing keys are taken as rotated already.
    rotary_interleaved: pairs dims (2i, 2i + 1) (GPT-J), else (i, i + rotary_dim / 2) (GPT-NeoX); the dims
    past rotary_dim pass through.
    num_splits: split-KV (flash-decoding) splits the keys of each (sequence, head) across thread blocks
    whose partial results a second kernel merges by their LSE; 0 chooses the count from the shape (a cost
    model of waves of resident blocks, each split at least 512 keys at D = 128: csrc/common/decode_plan.h;
    kvcache_num_splits tells the count), 1 disables it, n > 1 asks for n (at most 128, and at most the
    cache's key blocks).

    block_table: paged KV, int32 (batch, max_pages) on q's device; k_cache and v_cache are then (num_pages,
    page_size, heads_kv, head_dim), page_size any multiple of 16 (16 included), and row r of sequence b lies
    in row r % page_size of page block_table[b, r // page_size]; each sequence holds up to max_pages *
    page_size rows. Page ids are not read on the host: one outside [0, num_pages) is clamped into it in
    the kernels (wrong rows, never an access outside the cache). The append writes through the table too.

    cache_batch_idx: int32 (batch,): sequence b reads (and appends to) row cache_batch_idx[b] of a contiguous
    cache of any batch_cache rows (not with block_table); values clamped into [0, batch_cache) in the
    kernels; rows must be distinct when appending (two sequences writing one row race): checked, with the
    range, where flash_attn2.set_value_checks(True) is on (a host sync).
    cache_leftpad: int32 (batch,): sequence b's keys start at row cache_leftpad[b] of its cache (left
    padding): its keys are rows [cache_leftpad[b], cache_seqlens[b] + seqlen_new), positions (causal,
    window, ALiBi, rotary) counted from cache_leftpad[b]; not with block_table; clamped into
    [0, cache_seqlens[b]].

    Returns out (batch, seqlen_q, heads, head_dim), or (out, softmax_lse) if return_softmax_lse, softmax_lse
    fp32 (batch, heads, seqlen_q), the natural-log logsumexp of each row's scores.
    """
    _kvcache_checks.check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                                  cache_leftpad, block_table, softmax_scale, causal, window_size, softcap,
                                  rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    seqlens = _cache_seqlens_tensor(cache_seqlens, q, k_cache, block_table)
    out, lse = _fwd_kvcache_op(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, seqlens, cache_batch_idx,
                               cache_leftpad, block_table, scale, causal, int(window_size[0]), int(window_size[1]),
                               float(softcap), rotary_interleaved, alibi_slopes, num_splits)
    return (out, lse) if return_softmax_lse else out

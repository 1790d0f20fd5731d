"""flash_attn_with_kvcache rejects bad arguments before any launch, naming the argument and the rule, as
test_input_checks does for flash_attn_func. Device rules come last, so every other rule is tested here with
CPU tensors and needs neither a GPU nor the compiled extension."""

import pytest
import torch

from flash_attn2 import flash_attn_with_kvcache
from flash_attn2._kvcache_checks import check_cache_alignment
from test_input_checks import HEAD_DIM, STRIDE, message, randn

# Two sequences of 3 queries, 6 query heads over 2 kv heads, a cache of 48 rows; page size 32 with
# block_table. Sizes avoid each other so that a number in a message is not confused.
BATCH, SEQ_Q, HEADS_Q, HEADS_KV, D, CACHE = 2, 3, 6, 2, 64, 48
PAGES, PAGE = 5, 32
F32, BF16, I32, I64 = torch.float32, torch.bfloat16, torch.int32, torch.int64


def ints(*values, dtype=I32):
    return torch.tensor(values, dtype=dtype)


def kvcache_args(device="cpu", **change):
    """Arguments for flash_attn_with_kvcache, all valid on `device` but for `change`."""
    args = dict(q=randn(BATCH, SEQ_Q, HEADS_Q, D, device=device), k_cache=randn(BATCH, CACHE, HEADS_KV, D, device=device),
                v_cache=randn(BATCH, CACHE, HEADS_KV, D, device=device), cache_seqlens=ints(5, 40).to(device))
    return {**args, **change}


def new_kv(rows=4, heads=HEADS_KV, d=D, dtype=torch.float16):
    return dict(k=randn(BATCH, rows, heads, d, dtype=dtype), v=randn(BATCH, rows, heads, d, dtype=dtype))


def paged(**change):
    return {**dict(k_cache=randn(PAGES, PAGE, HEADS_KV, D), v_cache=randn(PAGES, PAGE, HEADS_KV, D),
                   block_table=torch.zeros(BATCH, 2, dtype=I32)), **change}


def rotary(rows=CACHE, half=16, dtype=torch.float16):
    return dict(rotary_cos=randn(rows, half, dtype=dtype), rotary_sin=randn(rows, half, dtype=dtype))


# (id, changed arguments, exception, argument the message names, rule the message states)
BAD_INPUTS = [
    # q and the caches.
    ("q-not-tensor", lambda: dict(q=randn(BATCH, SEQ_Q, HEADS_Q, D).tolist()), TypeError, "q", "[Tt]ensor"),
    ("k-cache-none", lambda: dict(k_cache=None), TypeError, "k_cache", "[Tt]ensor"),
    ("q-float32", lambda: dict(q=randn(BATCH, SEQ_Q, HEADS_Q, D, dtype=F32)), TypeError, "q", "float16"),
    ("v-cache-dtype", lambda: dict(v_cache=randn(BATCH, CACHE, HEADS_KV, D, dtype=BF16)), TypeError, "v_cache",
     "dtype"),
    ("q-3d", lambda: dict(q=randn(SEQ_Q, HEADS_Q, D)), ValueError, "q", "4-D"),
    ("k-cache-5d", lambda: dict(k_cache=randn(1, BATCH, CACHE, HEADS_KV, D)), ValueError, "k_cache", "4-D"),
    ("v-cache-shape", lambda: dict(v_cache=randn(BATCH, CACHE - 8, HEADS_KV, D)), ValueError, "v_cache", "shape"),
    ("head-dim-differs", lambda: dict(k_cache=randn(BATCH, CACHE, HEADS_KV, 32), v_cache=randn(BATCH, CACHE, HEADS_KV, 32)),
     ValueError, "k_cache", HEAD_DIM),
    ("heads-not-multiple", lambda: dict(k_cache=randn(BATCH, CACHE, 4, D), v_cache=randn(BATCH, CACHE, 4, D)),
     ValueError, "q", "multiple"),
    ("head-dim-not-8", lambda: dict(q=randn(BATCH, SEQ_Q, HEADS_Q, 60), k_cache=randn(BATCH, CACHE, HEADS_KV, 60),
                                    v_cache=randn(BATCH, CACHE, HEADS_KV, 60)), ValueError, "q", "multiples of 8"),
    ("head-dim-264", lambda: dict(q=randn(BATCH, SEQ_Q, HEADS_Q, 264), k_cache=randn(BATCH, CACHE, HEADS_KV, 264),
                                  v_cache=randn(BATCH, CACHE, HEADS_KV, 264)), ValueError, "q", "256"),
    ("cache-batch-differs", lambda: dict(k_cache=randn(BATCH + 1, CACHE, HEADS_KV, D),
                                         v_cache=randn(BATCH + 1, CACHE, HEADS_KV, D)), ValueError, "k_cache", "batch"),
    ("q-stride", lambda: dict(q=randn(BATCH, SEQ_Q, HEADS_Q, 2 * D)[..., ::2]), ValueError, "q", STRIDE),
    ("k-cache-stride", lambda: dict(k_cache=randn(BATCH, CACHE, HEADS_KV, 2 * D)[..., ::2]), ValueError, "k_cache",
     STRIDE),

    # cache_seqlens: an int in [0, seqlen_cache], an int32 (batch,) tensor, or None.
    ("seqlens-int64", lambda: dict(cache_seqlens=ints(5, 40, dtype=I64)), TypeError, "cache_seqlens", "int32"),
    ("seqlens-float", lambda: dict(cache_seqlens=5.0), TypeError, "cache_seqlens", "int"),
    ("seqlens-list", lambda: dict(cache_seqlens=[5, 40]), TypeError, "cache_seqlens", "int"),
    ("seqlens-shape", lambda: dict(cache_seqlens=ints(5, 40, 7)), ValueError, "cache_seqlens", r"\(batch,\)"),
    ("seqlens-2d", lambda: dict(cache_seqlens=ints(5, 40)[None]), ValueError, "cache_seqlens", r"\(batch,\)"),
    ("seqlens-strided", lambda: dict(cache_seqlens=torch.stack([ints(5, 40), ints(5, 40)], 1)[:, 0]), ValueError,
     "cache_seqlens", "contiguous"),
    ("seqlens-int-negative", lambda: dict(cache_seqlens=-1), ValueError, "cache_seqlens", r"\[0, seqlen_cache"),
    ("seqlens-int-past-cache", lambda: dict(cache_seqlens=CACHE + 1), ValueError, "cache_seqlens", str(CACHE)),

    # block_table: int32 (batch, max_pages), a page size that is a multiple of 16.
    ("block-table-int64", lambda: paged(block_table=torch.zeros(BATCH, 2, dtype=I64)), TypeError, "block_table",
     "int32"),
    ("block-table-1d", lambda: paged(block_table=torch.zeros(2, dtype=I32)), ValueError, "block_table",
     r"\(batch, max_pages\)"),
    ("block-table-batch", lambda: paged(block_table=torch.zeros(BATCH + 1, 2, dtype=I32)), ValueError, "block_table",
     "batch"),
    ("block-table-strided", lambda: paged(block_table=torch.zeros(BATCH, 4, dtype=I32)[:, ::2]), ValueError,
     "block_table", "contiguous"),
    ("page-size-24", lambda: paged(k_cache=randn(PAGES, 24, HEADS_KV, D), v_cache=randn(PAGES, 24, HEADS_KV, D)),
     ValueError, "k_cache", "multiple of 16"),
    ("page-size-0", lambda: paged(k_cache=randn(PAGES, 0, HEADS_KV, D), v_cache=randn(PAGES, 0, HEADS_KV, D)),
     ValueError, "k_cache", "multiple of 16"),
    ("block-table-with-batch-idx", lambda: paged(cache_batch_idx=ints(0, 1)), ValueError, "cache_batch_idx",
     "block_table"),

    # cache_batch_idx, cache_leftpad: int32 (batch,).
    ("batch-idx-int64", lambda: dict(cache_batch_idx=ints(0, 1, dtype=I64)), TypeError, "cache_batch_idx", "int32"),
    ("batch-idx-shape", lambda: dict(cache_batch_idx=ints(0)), ValueError, "cache_batch_idx", r"\(batch,\)"),
    ("leftpad-float", lambda: dict(cache_leftpad=torch.zeros(BATCH)), TypeError, "cache_leftpad", "int32"),
    ("leftpad-shape", lambda: dict(cache_leftpad=ints(0, 0, 0)), ValueError, "cache_leftpad", r"\(batch,\)"),

    # k, v: together, (batch, seqlen_new, heads_kv, head_dim), fitting the cache.
    ("k-without-v", lambda: dict(k=new_kv()["k"]), ValueError, "v", "together"),
    ("k-heads", lambda: dict(**new_kv(heads=HEADS_Q)), ValueError, "k", "shape"),
    ("v-head-dim", lambda: dict(k=new_kv()["k"], v=new_kv(d=32)["v"]), ValueError, "v", "shape"),
    ("k-dtype", lambda: dict(**new_kv(dtype=BF16)), TypeError, "k", "dtype"),
    ("k-too-long", lambda: dict(**new_kv(rows=CACHE + 1)), ValueError, "k", "fit"),
    ("k-past-int-seqlens", lambda: dict(cache_seqlens=CACHE - 3, **new_kv(rows=4)), ValueError, "k", "fit"),
    ("k-stride", lambda: dict(k=randn(BATCH, 4, HEADS_KV, 2 * D)[..., ::2], v=new_kv()["v"]), ValueError, "k", STRIDE),

    # rotary_cos, rotary_sin: together, with k and v, (seqlen_ro >= seqlen_cache, rotary_dim / 2).
    ("cos-without-sin", lambda: dict(rotary_cos=rotary()["rotary_cos"], **new_kv()), ValueError, "rotary_sin",
     "together"),
    ("rotary-without-k", lambda: dict(**rotary()), ValueError, "rotary_cos", "k and v"),
    ("rotary-1d", lambda: dict(rotary_cos=randn(CACHE), rotary_sin=randn(CACHE), **new_kv()), ValueError,
     "rotary_cos", "2-D"),
    ("rotary-shapes-differ", lambda: dict(rotary_cos=randn(CACHE, 16), rotary_sin=randn(CACHE, 8), **new_kv()),
     ValueError, "rotary_sin", "2-D"),
    ("rotary-dim-not-16", lambda: dict(**rotary(half=12), **new_kv()), ValueError, "rotary_dim", "multiple of 16"),
    ("rotary-dim-past-head-dim", lambda: dict(**rotary(half=40), **new_kv()), ValueError, "rotary_dim", "head_dim"),
    ("rotary-too-short", lambda: dict(**rotary(rows=CACHE - 1), **new_kv()), ValueError, "rotary_cos",
     "seqlen_ro"),
    ("rotary-dtype", lambda: dict(**rotary(dtype=F32), **new_kv()), TypeError, "rotary_cos", "dtype"),

    # Flags and scores.
    ("causal-int", lambda: dict(causal=1), TypeError, "causal", "bool"),
    ("rotary-interleaved-none", lambda: dict(rotary_interleaved=None), TypeError, "rotary_interleaved", "bool"),
    ("return-lse-str", lambda: dict(return_softmax_lse="yes"), TypeError, "return_softmax_lse", "bool"),
    ("splits-float", lambda: dict(num_splits=2.0), TypeError, "num_splits", "int"),
    ("splits-bool", lambda: dict(num_splits=True), TypeError, "num_splits", "int"),
    ("splits-negative", lambda: dict(num_splits=-1), ValueError, "num_splits", r"\[0, 128\]"),
    ("splits-129", lambda: dict(num_splits=129), ValueError, "num_splits", r"\[0, 128\]"),
    ("scale-zero", lambda: dict(softmax_scale=0.0), ValueError, "softmax_scale", "positive"),
    ("scale-str", lambda: dict(softmax_scale="1"), TypeError, "softmax_scale", "float"),
    ("window-below-unbounded", lambda: dict(window_size=(8, -2)), ValueError, "window_size", ">= -1"),
    ("window-float", lambda: dict(window_size=(8.0, 0)), TypeError, "window_size", "int"),
    ("softcap-negative", lambda: dict(softcap=-1.0), ValueError, "softcap", ">= 0"),
    ("alibi-shape", lambda: dict(alibi_slopes=torch.ones(HEADS_Q + 1)), ValueError, "alibi_slopes", "shape"),
    ("alibi-dtype", lambda: dict(alibi_slopes=torch.ones(HEADS_Q, dtype=torch.float16)), TypeError, "alibi_slopes",
     "float32"),

    # Every feature's valid arguments reach the device rule.
    ("block-table-with-leftpad", lambda: paged(cache_leftpad=ints(0, 1)), ValueError, "cache_leftpad", "block_table"),
    ("cpu-batch-idx", lambda: dict(cache_batch_idx=ints(1, 0)), ValueError, "q", "CUDA"),
    ("cpu-leftpad", lambda: dict(cache_leftpad=ints(0, 2)), ValueError, "q", "CUDA"),
    ("cpu-paged", lambda: paged(), ValueError, "q", "CUDA"),
    ("batch-idx-any-cache-batch", lambda: dict(cache_batch_idx=ints(1, 0), k_cache=randn(5, CACHE, HEADS_KV, D),
                                               v_cache=randn(5, CACHE, HEADS_KV, D)), ValueError, "q", "CUDA"),

    # Everything here is on the CPU: the device rule comes last.
    ("cpu", lambda: dict(), ValueError, "q", "CUDA"),
    ("cpu-int-seqlens", lambda: dict(cache_seqlens=7), ValueError, "q", "CUDA"),
    ("cpu-append", lambda: dict(**new_kv()), ValueError, "q", "CUDA"),
    ("cpu-rotary", lambda: dict(**rotary(), **new_kv()), ValueError, "q", "CUDA"),
    ("order-shape-before-index", lambda: dict(q=randn(SEQ_Q, HEADS_Q, D), cache_leftpad=ints(0, 2, 3)), ValueError,
     "q", "4-D"),
    ("order-index-before-device", lambda: dict(cache_leftpad=ints(0, 2, dtype=I64)), TypeError, "cache_leftpad",
     "int32"),
]


@pytest.mark.parametrize("change, error, name, rule", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_kvcache_input(change, error, name, rule):
    with pytest.raises(error, match=message(name, rule)):
        flash_attn_with_kvcache(**kvcache_args(**change()))


def test_valid_arguments_reach_the_device_rule():
    # Shapes and types every feature combination accepts: paged with int lengths, None lengths, a window.
    for change in (dict(), dict(cache_seqlens=None), dict(cache_seqlens=CACHE), dict(cache_seqlens=0),
                   dict(causal=True, window_size=(16, 0), softcap=30.0, alibi_slopes=torch.ones(BATCH, HEADS_Q)),
                   dict(num_splits=128), dict(q=randn(BATCH, 0, HEADS_Q, D))):
        with pytest.raises(ValueError, match=message("q", "CUDA")):
            flash_attn_with_kvcache(**kvcache_args(**change))


def test_cache_alignment_is_checked_in_the_op():
    # The caches are never copied to fix their layout: a misaligned one is an error naming it (inside the op,
    # where data_ptr is real).
    base = randn(BATCH * CACHE * HEADS_KV * D + 1)
    misaligned = base[1:].view(BATCH, CACHE, HEADS_KV, D)
    with pytest.raises(ValueError, match=message("k_cache", "aligned")):
        check_cache_alignment(misaligned, randn(BATCH, CACHE, HEADS_KV, D))
    odd_stride = randn(BATCH, CACHE, HEADS_KV, D + 4)[..., :D]
    with pytest.raises(ValueError, match=message("v_cache", "multiples of 8")):
        check_cache_alignment(randn(BATCH, CACHE, HEADS_KV, D), odd_stride)
    check_cache_alignment(randn(BATCH, CACHE, HEADS_KV, D), randn(BATCH, CACHE, HEADS_KV, D))



@pytest.mark.parametrize("rows, append, error", [((1, 1), True, "distinct"), ((0, 2), False, r"\[0, 2\)"),
                                                 ((-1, 0), True, r"\[0, 2\)"), ((1, 0), True, None),
                                                 ((1, 1), False, None)],
                         ids=["repeated-append", "past-the-cache", "negative", "valid-append", "repeated-read"])
def test_cache_batch_idx_values_are_checked_when_asked(rows, append, error, monkeypatch):
    # With value checks on (a host sync): rows outside the cache, or one row twice when appending (a race),
    # raise before any launch; reading one row twice is fine. With them off the kernels clamp, and nothing is
    # read back. The device rule is switched off so that the CPU call gets that far.
    from flash_attn2 import _kvcache_checks, set_value_checks
    monkeypatch.setattr(_kvcache_checks._checks, "check_devices", lambda named: None)
    args = kvcache_args(cache_batch_idx=ints(*rows), **(new_kv() if append else {}))
    values = (args.get("k"), args["cache_batch_idx"], args["k_cache"].shape[0])
    previous = set_value_checks(True)
    try:
        if error:
            with pytest.raises(ValueError, match=message("cache_batch_idx", error)):
                flash_attn_with_kvcache(**args)
        else:
            _kvcache_checks.check_kvcache_values(*values)
    finally:
        set_value_checks(previous)
    set_value_checks(False)
    try:
        _kvcache_checks.check_kvcache_values(*values)
    finally:
        set_value_checks(previous)

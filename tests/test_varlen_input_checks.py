"""The varlen and packed entry points reject bad arguments before any launch, naming the argument and the
rule, as test_input_checks does for flash_attn_func.

Device rules come last, so every other rule is tested here with CPU tensors and needs neither a GPU nor
the compiled extension. The checks of cu_seqlens' values (set_value_checks) run after the device rules and
so only on CUDA tensors: test_varlen_gpu tries them.
"""

import pytest
import torch

from flash_attn2 import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                         flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func, set_value_checks)
from test_input_checks import HEAD_DIM, STRIDE, every_arg_valid_but, message, randn

# Two sequences of 2 and 6 queries and 7 and 9 keys: q (8, 6, 64), k and v (16, 2, 64). Shapes and
# lengths avoid 3 and 256, so that a rule's number in a message is not confused with them.
LENGTHS_Q, LENGTHS_K = (2, 6), (7, 9)
HEADS_Q, HEADS_KV, D = 6, 2, 64
TOTAL_Q, TOTAL_K = sum(LENGTHS_Q), sum(LENGTHS_K)
F32, I64 = torch.float32, torch.int64


def cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


def varlen_args(device="cpu", **change):
    """Arguments for flash_attn_varlen_func, all valid on `device` but for `change`."""
    args = dict(q=randn(TOTAL_Q, HEADS_Q, D, device=device), k=randn(TOTAL_K, HEADS_KV, D, device=device),
                v=randn(TOTAL_K, HEADS_KV, D, device=device), cu_seqlens_q=cu(0, 2, 8).to(device),
                cu_seqlens_k=cu(0, 7, 16).to(device), max_seqlen_q=max(LENGTHS_Q), max_seqlen_k=max(LENGTHS_K))
    return {**args, **change}


def strided_cu(*values):
    """cu_seqlens with these values, every other element of a longer tensor (stride 2)."""
    return torch.stack([cu(*values), cu(*values)], dim=1)[:, 0]


# (id, changed arguments, exception, argument the message names, rule the message states)
VARLEN_BAD_INPUTS = [
    ("dropout-one", lambda: dict(dropout_p=1.0), ValueError, "dropout_p", r"\[0, 1\)"),
    ("window-below-unbounded", lambda: dict(window_size=(64, -3)), ValueError, "window_size", ">= -1"),
    ("softcap-nan", lambda: dict(softcap=float("nan")), ValueError, "softcap", "finite"),
    ("alibi-heads", lambda: dict(alibi_slopes=torch.ones(HEADS_Q + 1)), ValueError, "alibi_slopes", "shape"),
    ("block-table", lambda: dict(block_table=torch.zeros(2, 1, dtype=torch.int32)), NotImplementedError,
     "block_table", "paged"),

    # cu_seqlens: an int32 tensor, 1-D (batch + 1,), contiguous, as many entries for q as for k.
    ("cu-q-int64", lambda: dict(cu_seqlens_q=cu(0, 2, 8, dtype=I64)), TypeError, "cu_seqlens_q", "int32"),
    ("cu-k-int64", lambda: dict(cu_seqlens_k=cu(0, 7, 16, dtype=I64)), TypeError, "cu_seqlens_k", "int32"),
    ("cu-q-float32", lambda: dict(cu_seqlens_q=cu(0, 2, 8, dtype=F32)), TypeError, "cu_seqlens_q", "int32"),
    ("cu-q-list", lambda: dict(cu_seqlens_q=[0, 2, 8]), TypeError, "cu_seqlens_q", "[Tt]ensor"),
    ("cu-k-none", lambda: dict(cu_seqlens_k=None), TypeError, "cu_seqlens_k", "[Tt]ensor"),
    ("cu-q-2d", lambda: dict(cu_seqlens_q=cu(0, 2, 8)[None]), ValueError, "cu_seqlens_q", "1-D"),
    ("cu-k-0d", lambda: dict(cu_seqlens_k=torch.tensor(16, dtype=torch.int32)), ValueError, "cu_seqlens_k",
     "1-D"),
    ("cu-q-empty", lambda: dict(cu_seqlens_q=cu()), ValueError, "cu_seqlens_q", "1-D|batch"),
    ("cu-q-strided", lambda: dict(cu_seqlens_q=strided_cu(0, 2, 8)), ValueError, "cu_seqlens_q", "contiguous"),
    ("cu-k-strided", lambda: dict(cu_seqlens_k=strided_cu(0, 7, 16)), ValueError, "cu_seqlens_k", "contiguous"),
    ("cu-entries-differ", lambda: dict(cu_seqlens_k=cu(0, 7, 10, 16)), ValueError, "cu_seqlens_k",
     "entries|batch"),

    # max_seqlen: a Python int (it sizes the grid with no sync), in [0, 2^31 - 1024], >= 1 with rows.
    ("max-q-float", lambda: dict(max_seqlen_q=6.0), TypeError, "max_seqlen_q", "int"),
    ("max-k-bool", lambda: dict(max_seqlen_k=True), TypeError, "max_seqlen_k", "int"),
    ("max-q-tensor", lambda: dict(max_seqlen_q=torch.tensor(6)), TypeError, "max_seqlen_q", "int"),
    ("max-k-none", lambda: dict(max_seqlen_k=None), TypeError, "max_seqlen_k", "int"),
    ("max-q-negative", lambda: dict(max_seqlen_q=-1), ValueError, "max_seqlen_q", r"\[0, 2\^31"),
    ("max-k-too-large", lambda: dict(max_seqlen_k=2 ** 31), ValueError, "max_seqlen_k", r"2\^31"),
    ("max-q-zero-with-rows", lambda: dict(max_seqlen_q=0), ValueError, "max_seqlen_q", "at least 1"),
    ("max-k-zero-with-rows", lambda: dict(max_seqlen_k=0), ValueError, "max_seqlen_k", "at least 1"),

    # q, k, v: (total, heads, head_dim), as flash_attn_func's rules otherwise.
    ("q-4d", lambda: dict(q=randn(1, TOTAL_Q, HEADS_Q, D)), ValueError, "q", "3-D"),
    ("k-4d", lambda: dict(k=randn(1, TOTAL_K, HEADS_KV, D)), ValueError, "k", "3-D"),
    ("v-2d", lambda: dict(v=randn(TOTAL_K, HEADS_KV * D)), ValueError, "v", "3-D"),
    ("q-not-tensor", lambda: dict(q=randn(TOTAL_Q, HEADS_Q, D).tolist()), TypeError, "q", "[Tt]ensor"),
    ("q-float32", lambda: dict(q=randn(TOTAL_Q, HEADS_Q, D, dtype=F32), k=randn(TOTAL_K, HEADS_KV, D, dtype=F32),
                               v=randn(TOTAL_K, HEADS_KV, D, dtype=F32)), TypeError, "q", "float16|fp16|half"),
    ("k-dtype-differs", lambda: dict(k=randn(TOTAL_K, HEADS_KV, D, dtype=torch.bfloat16)), TypeError, "k",
     "dtype"),
    ("heads-not-multiple", lambda: dict(k=randn(TOTAL_K, 4, D), v=randn(TOTAL_K, 4, D)), ValueError, "q",
     "multiple"),
    ("v-heads-differ", lambda: dict(v=randn(TOTAL_K, 1, D)), ValueError, "v", "head"),
    ("k-head-dim-differs", lambda: dict(k=randn(TOTAL_K, HEADS_KV, 32)), ValueError, "k", HEAD_DIM),
    ("v-head-dim-differs", lambda: dict(v=randn(TOTAL_K, HEADS_KV, 32)), ValueError, "v", HEAD_DIM),
    ("v-total-differs", lambda: dict(v=randn(12, HEADS_KV, D)), ValueError, "v", "total"),
    ("head-dim-264", lambda: dict(q=randn(TOTAL_Q, HEADS_Q, 264), k=randn(TOTAL_K, HEADS_KV, 264),
                                  v=randn(TOTAL_K, HEADS_KV, 264)), ValueError, "q", "256"),
    ("q-stride", lambda: dict(q=randn(TOTAL_Q, HEADS_Q, 2 * D)[..., ::2]), ValueError, "q", STRIDE),
    ("scale-nan", lambda: dict(softmax_scale=float("nan")), ValueError, "softmax_scale", "finite"),

    ("cpu", lambda: dict(), ValueError, "q", "CUDA"),

    # Two faults at once: the rule checked earlier (features, block_table, q/k/v, cu_seqlens and
    # max_seqlen, devices) must win.
    ("order-feature-cu", lambda: dict(dropout_p=1.5, cu_seqlens_q=cu(0, 2, 8, dtype=I64)), ValueError,
     "dropout_p", r"\[0, 1\)"),
    ("order-block-table-dtype", lambda: dict(block_table=torch.zeros(2, 1), q=randn(TOTAL_Q, HEADS_Q, D, dtype=F32)),
     NotImplementedError, "block_table", "paged"),
    ("order-rank-cu", lambda: dict(q=randn(1, TOTAL_Q, HEADS_Q, D), cu_seqlens_q=cu(0, 2, 8, dtype=I64)),
     ValueError, "q", "3-D"),
    ("order-cu-max", lambda: dict(cu_seqlens_q=cu(0, 2, 8)[None], max_seqlen_q=6.0), ValueError, "cu_seqlens_q",
     "1-D"),
    # Everything here is on the CPU: the device rule comes after the others.
    ("order-cu-device", lambda: dict(cu_seqlens_k=cu(0, 7, 16, dtype=I64)), TypeError, "cu_seqlens_k", "int32"),
    ("order-max-device", lambda: dict(max_seqlen_k=0), ValueError, "max_seqlen_k", "at least 1"),
]


def ids(cases):
    return [case[0] for case in cases]


@pytest.mark.parametrize("change, error, name, rule", [case[1:] for case in VARLEN_BAD_INPUTS],
                         ids=ids(VARLEN_BAD_INPUTS))
def test_bad_varlen_input(change, error, name, rule):
    with pytest.raises(error, match=message(name, rule)):
        flash_attn_varlen_func(**varlen_args(**change()))


@pytest.mark.parametrize("value_checks", [False, True], ids=["values-unchecked", "values-checked"])
def test_empty_batch_is_no_error_before_the_device_rule(value_checks):
    # cu_seqlens of one entry (batch 0) with no rows and max_seqlen 0 are valid: only the device rule
    # (these are CPU tensors) rejects the call, with value checks on or off.
    previous = set_value_checks(value_checks)
    try:
        args = varlen_args(q=randn(0, HEADS_Q, D), k=randn(0, HEADS_KV, D), v=randn(0, HEADS_KV, D),
                           cu_seqlens_q=cu(0), cu_seqlens_k=cu(0), max_seqlen_q=0, max_seqlen_k=0)
        with pytest.raises(ValueError, match=message("q", "CUDA")):
            flash_attn_varlen_func(**args)
    finally:
        set_value_checks(previous)


def test_values_are_checked_after_devices():
    # With value checks on, bad values in CPU tensors still meet the device rule first (values are read
    # back to the host only once every tensor is known to be on the GPU).
    previous = set_value_checks(True)
    try:
        with pytest.raises(ValueError, match=message("q", "CUDA")):
            flash_attn_varlen_func(**varlen_args(cu_seqlens_q=cu(1, 2, 8), max_seqlen_k=1))
    finally:
        set_value_checks(previous)


def test_set_value_checks_returns_the_previous_setting():
    previous = set_value_checks(True)
    try:
        assert set_value_checks(False) is True
        assert set_value_checks(1) is False  # any truthy value turns them on
        assert set_value_checks(False) is True
    finally:
        set_value_checks(previous)


def test_varlen_tensors_to_flash_attn_func():
    # The likely mix-up: (total, heads, head_dim) tensors given to the fixed-length entry.
    with pytest.raises(ValueError, match=message("k", "4-D")):
        flash_attn_func(**every_arg_valid_but(k=randn(16, 2, 64)))
    with pytest.raises(ValueError, match=message("q", "4-D")):
        flash_attn_func(randn(TOTAL_Q, HEADS_Q, D), randn(TOTAL_K, HEADS_KV, D), randn(TOTAL_K, HEADS_KV, D))


# The packed entries. Their messages on the unpacked q, k, v name the slice (q, k or v) or the packed
# tensor; either names what is wrong, so both are accepted: NAMED_QKV and NAMED_KV.
NAMED_QKV, NAMED_KV = "(?:qkv|q)", "(?:kv|k)"


def packed_args(entry, device="cpu", **change):
    """Arguments for a packed entry (a name below), all valid on `device` but for `change`."""
    like = dict(device=device)
    if entry == "qkvpacked":
        args = dict(qkv=randn(2, 8, 3, HEADS_Q, D, **like))
    elif entry == "kvpacked":
        args = dict(q=randn(2, 8, HEADS_Q, D, **like), kv=randn(2, 16, 2, HEADS_KV, D, **like))
    elif entry == "varlen_qkvpacked":
        args = dict(qkv=randn(TOTAL_K, 3, HEADS_Q, D, **like), cu_seqlens=cu(0, 7, 16).to(device),
                    max_seqlen=max(LENGTHS_K))
    else:
        assert entry == "varlen_kvpacked"
        varlen = varlen_args(device)
        args = dict(q=varlen["q"], kv=randn(TOTAL_K, 2, HEADS_KV, D, **like),
                    **{name: varlen[name] for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")})
    return {**args, **change}


PACKED_ENTRIES = {"qkvpacked": flash_attn_qkvpacked_func, "kvpacked": flash_attn_kvpacked_func,
                  "varlen_qkvpacked": flash_attn_varlen_qkvpacked_func,
                  "varlen_kvpacked": flash_attn_varlen_kvpacked_func}

# (id, entry, changed arguments, exception, argument the message names, rule the message states)
PACKED_BAD_INPUTS = [
    ("qkv-count-2", "qkvpacked", lambda: dict(qkv=randn(2, 8, 2, HEADS_Q, D)), ValueError, "qkv", "with 3 in dim 2"),
    ("qkv-count-4", "qkvpacked", lambda: dict(qkv=randn(2, 8, 4, HEADS_Q, D)), ValueError, "qkv", "with 3 in dim 2"),
    ("qkv-4d", "qkvpacked", lambda: dict(qkv=randn(8, 3, HEADS_Q, D)), ValueError, "qkv", "5-D"),
    ("qkv-not-tensor", "qkvpacked", lambda: dict(qkv=None), TypeError, "qkv", "[Tt]ensor"),
    ("qkv-float32", "qkvpacked", lambda: dict(qkv=randn(2, 8, 3, HEADS_Q, D, dtype=F32)), TypeError, NAMED_QKV,
     "float16"),
    ("qkv-stride", "qkvpacked", lambda: dict(qkv=randn(2, 8, 3, HEADS_Q, 2 * D)[..., ::2]), ValueError, NAMED_QKV,
     STRIDE),
    ("qkv-head-dim-264", "qkvpacked", lambda: dict(qkv=randn(2, 8, 3, HEADS_Q, 264)), ValueError, NAMED_QKV, "256"),
    ("qkv-cpu", "qkvpacked", lambda: dict(), ValueError, "qkv", "CUDA"),
    ("qkv-dropout", "qkvpacked", lambda: dict(dropout_p=True), TypeError, "dropout_p", "float"),

    ("kv-count-3", "kvpacked", lambda: dict(kv=randn(2, 16, 3, HEADS_KV, D)), ValueError, "kv", "with 2 in dim 2"),
    ("kv-4d", "kvpacked", lambda: dict(kv=randn(2, 16, HEADS_KV, D)), ValueError, "kv", "5-D"),
    ("kv-not-tensor", "kvpacked", lambda: dict(kv=[1.0]), TypeError, "kv", "[Tt]ensor"),
    ("kv-heads-not-multiple", "kvpacked", lambda: dict(kv=randn(2, 16, 2, 4, D)), ValueError, "q", "multiple"),
    ("kv-head-dim-differs", "kvpacked", lambda: dict(kv=randn(2, 16, 2, HEADS_KV, 32)), ValueError, NAMED_KV,
     HEAD_DIM),
    ("kv-batch-differs", "kvpacked", lambda: dict(kv=randn(4, 16, 2, HEADS_KV, D)), ValueError, NAMED_KV, "batch"),
    ("kv-dtype-differs", "kvpacked", lambda: dict(kv=randn(2, 16, 2, HEADS_KV, D, dtype=torch.bfloat16)),
     TypeError, NAMED_KV, "dtype"),
    ("kv-q-3d", "kvpacked", lambda: dict(q=randn(8, HEADS_Q, D)), ValueError, "q", "4-D"),
    ("kv-cpu", "kvpacked", lambda: dict(), ValueError, "q", "CUDA"),
    ("kv-softcap", "kvpacked", lambda: dict(softcap=True), TypeError, "softcap", "float"),

    ("varlen-qkv-count-2", "varlen_qkvpacked", lambda: dict(qkv=randn(TOTAL_K, 2, HEADS_Q, D)), ValueError, "qkv",
     "with 3 in dim 1"),
    ("varlen-qkv-5d", "varlen_qkvpacked", lambda: dict(qkv=randn(1, TOTAL_K, 3, HEADS_Q, D)), ValueError, "qkv",
     "4-D"),
    ("varlen-qkv-cu-int64", "varlen_qkvpacked", lambda: dict(cu_seqlens=cu(0, 7, 16, dtype=I64)), TypeError,
     "cu_seqlens", "int32"),
    ("varlen-qkv-cu-2d", "varlen_qkvpacked", lambda: dict(cu_seqlens=cu(0, 7, 16)[None]), ValueError,
     "cu_seqlens", "1-D"),
    ("varlen-qkv-max-float", "varlen_qkvpacked", lambda: dict(max_seqlen=9.0), TypeError, "max_seqlen", "int"),
    ("varlen-qkv-max-zero", "varlen_qkvpacked", lambda: dict(max_seqlen=0), ValueError, "max_seqlen", "at least 1"),
    ("varlen-qkv-cpu", "varlen_qkvpacked", lambda: dict(), ValueError, "qkv", "CUDA"),
    ("varlen-qkv-alibi", "varlen_qkvpacked", lambda: dict(alibi_slopes=torch.ones(HEADS_Q, dtype=torch.int32)),
     TypeError, "alibi_slopes", "float32"),

    ("varlen-kv-count-3", "varlen_kvpacked", lambda: dict(kv=randn(TOTAL_K, 3, HEADS_KV, D)), ValueError, "kv",
     "with 2 in dim 1"),
    ("varlen-kv-3d", "varlen_kvpacked", lambda: dict(kv=randn(TOTAL_K, HEADS_KV, D)), ValueError, "kv", "4-D"),
    ("varlen-kv-q-4d", "varlen_kvpacked", lambda: dict(q=randn(1, TOTAL_Q, HEADS_Q, D)), ValueError, "q", "3-D"),
    ("varlen-kv-heads-not-multiple", "varlen_kvpacked", lambda: dict(kv=randn(TOTAL_K, 2, 4, D)), ValueError, "q",
     "multiple"),
    ("varlen-kv-cu-entries-differ", "varlen_kvpacked", lambda: dict(cu_seqlens_k=cu(0, 7, 10, 16)), ValueError,
     "cu_seqlens_k", "entries|batch"),
    ("varlen-kv-max-k-negative", "varlen_kvpacked", lambda: dict(max_seqlen_k=-5), ValueError, "max_seqlen_k",
     r"\[0, 2\^31"),
    ("varlen-kv-cpu", "varlen_kvpacked", lambda: dict(), ValueError, "q", "CUDA"),
    ("varlen-kv-window", "varlen_kvpacked", lambda: dict(window_size=(-1.0, 0)), TypeError, "window_size",
     "pair of ints"),

    # Two faults at once: the packed tensor's own shape is checked before what its slices hold.
    ("order-count-dtype", "qkvpacked", lambda: dict(qkv=randn(2, 8, 2, HEADS_Q, D, dtype=F32)), ValueError, "qkv",
     "with 3 in dim 2"),
    ("order-feature-count", "varlen_kvpacked", lambda: dict(dropout_p=float("nan"), kv=randn(TOTAL_K, 3, HEADS_KV, D)),
     ValueError, "dropout_p", "finite"),
]


@pytest.mark.parametrize("entry, change, error, name, rule", [case[1:] for case in PACKED_BAD_INPUTS],
                         ids=ids(PACKED_BAD_INPUTS))
def test_bad_packed_input(entry, change, error, name, rule):
    with pytest.raises(error, match=message(name, rule)):
        PACKED_ENTRIES[entry](**packed_args(entry, **change()))


@pytest.mark.parametrize("entry", PACKED_ENTRIES)
def test_packed_valid_but_for_the_device(entry):
    # packed_args' arguments are valid: on the CPU only the device rule rejects them (so that each case
    # above fails for its own change alone).
    with pytest.raises(ValueError, match="CUDA"):
        PACKED_ENTRIES[entry](**packed_args(entry))

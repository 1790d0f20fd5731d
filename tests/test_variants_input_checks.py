"""The variant arguments (window_size, softcap, alibi_slopes, s_aux) are checked before any launch by every
entry point that takes them, naming the argument, as the issue-11 contract states:

- window_size: a pair (length-2 sequence) of Python ints, bool not allowed (else TypeError), each >= -1
  (else ValueError);
- softcap: an int or float, bool not allowed (TypeError), finite and >= 0 (ValueError);
- alibi_slopes: a float32 tensor (TypeError) of shape (heads,) or (batch, heads), batch the number of
  sequences for varlen, with stride(-1) == 1, on q's device (ValueError);
- s_aux: a float32 tensor (TypeError) of shape (heads,), stride 1, on q's device (ValueError).

Device rules come last, so every other rule is tried here with CPU tensors, with neither a GPU nor the
compiled extension; a valid call on CPU tensors meets the device rule. The rules about the device of
alibi_slopes and s_aux need a CUDA q: those tests skip without a GPU (they need no extension).
"""

import pytest
import torch

from conftest import requires_gpu
from flash_attn2 import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                         flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func)
from test_input_checks import every_arg_valid_but, message
from test_varlen_input_checks import TOTAL_Q, packed_args, varlen_args

# Every entry's arguments (from test_input_checks and test_varlen_input_checks) hold 2 sequences of 6
# query heads: alibi_slopes may be (6,) or (2, 6), s_aux (6,).
BATCH, HEADS = 2, 6
INF, NAN = float("inf"), float("nan")
F32 = torch.float32

# name -> (entry, arguments valid on a device but for a change, the tensor the device rule names first)
ENTRIES = {
    "func": (flash_attn_func, lambda device="cpu", **change: every_arg_valid_but(device, **change), "q"),
    "kvpacked": (flash_attn_kvpacked_func, lambda device="cpu", **change: packed_args("kvpacked", device, **change),
                 "q"),
    "qkvpacked": (flash_attn_qkvpacked_func,
                  lambda device="cpu", **change: packed_args("qkvpacked", device, **change), "qkv"),
    "varlen": (flash_attn_varlen_func, lambda device="cpu", **change: varlen_args(device, **change), "q"),
    "varlen_kvpacked": (flash_attn_varlen_kvpacked_func,
                        lambda device="cpu", **change: packed_args("varlen_kvpacked", device, **change), "q"),
    "varlen_qkvpacked": (flash_attn_varlen_qkvpacked_func,
                         lambda device="cpu", **change: packed_args("varlen_qkvpacked", device, **change), "qkv"),
}


def call(entry, device="cpu", **change):
    function, arguments, _ = ENTRIES[entry]
    return function(**arguments(device, **change))


def ones(*shape, dtype=F32):
    return torch.ones(*shape, dtype=dtype)


# (id, changed arguments, exception, the argument the message must name)
BAD_VARIANTS = [
    # window_size: a pair of Python ints, each >= -1.
    ("window-int", lambda: dict(window_size=4), TypeError, "window_size"),
    ("window-none", lambda: dict(window_size=None), TypeError, "window_size"),
    ("window-one-entry", lambda: dict(window_size=(4,)), TypeError, "window_size"),
    ("window-three-entries", lambda: dict(window_size=(4, 0, 0)), TypeError, "window_size"),
    ("window-empty", lambda: dict(window_size=()), TypeError, "window_size"),
    ("window-float-left", lambda: dict(window_size=(4.0, 0)), TypeError, "window_size"),
    ("window-float-right", lambda: dict(window_size=(4, 0.5)), TypeError, "window_size"),
    ("window-bool-left", lambda: dict(window_size=(True, 0)), TypeError, "window_size"),
    ("window-bool-right", lambda: dict(window_size=(-1, False)), TypeError, "window_size"),
    ("window-strings", lambda: dict(window_size="40"), TypeError, "window_size"),
    ("window-tensor-entry", lambda: dict(window_size=(torch.tensor(4), 0)), TypeError, "window_size"),
    ("window-tensor", lambda: dict(window_size=torch.tensor([4, 0])), TypeError, "window_size"),
    ("window-left-below", lambda: dict(window_size=(-2, 0)), ValueError, "window_size"),
    ("window-right-below", lambda: dict(window_size=(0, -3)), ValueError, "window_size"),
    ("window-both-below", lambda: dict(window_size=(-100, -100)), ValueError, "window_size"),

    # softcap: an int or float, finite and not negative.
    ("softcap-str", lambda: dict(softcap="30"), TypeError, "softcap"),
    ("softcap-none", lambda: dict(softcap=None), TypeError, "softcap"),
    ("softcap-bool", lambda: dict(softcap=True), TypeError, "softcap"),
    ("softcap-tensor", lambda: dict(softcap=torch.tensor(30.0)), TypeError, "softcap"),
    ("softcap-complex", lambda: dict(softcap=30j), TypeError, "softcap"),
    ("softcap-negative", lambda: dict(softcap=-1.0), ValueError, "softcap"),
    ("softcap-negative-int", lambda: dict(softcap=-5), ValueError, "softcap"),
    ("softcap-inf", lambda: dict(softcap=INF), ValueError, "softcap"),
    ("softcap-neg-inf", lambda: dict(softcap=-INF), ValueError, "softcap"),
    ("softcap-nan", lambda: dict(softcap=NAN), ValueError, "softcap"),

    # alibi_slopes: float32 (heads,) or (batch, heads), stride(-1) == 1.
    ("alibi-list", lambda: dict(alibi_slopes=[0.5] * HEADS), TypeError, "alibi_slopes"),
    ("alibi-float", lambda: dict(alibi_slopes=0.5), TypeError, "alibi_slopes"),
    ("alibi-numpy", lambda: dict(alibi_slopes=ones(HEADS).numpy()), TypeError, "alibi_slopes"),
    ("alibi-float16", lambda: dict(alibi_slopes=ones(HEADS, dtype=torch.float16)), TypeError, "alibi_slopes"),
    ("alibi-bfloat16", lambda: dict(alibi_slopes=ones(HEADS, dtype=torch.bfloat16)), TypeError, "alibi_slopes"),
    ("alibi-float64", lambda: dict(alibi_slopes=ones(HEADS, dtype=torch.float64)), TypeError, "alibi_slopes"),
    ("alibi-int32", lambda: dict(alibi_slopes=ones(HEADS, dtype=torch.int32)), TypeError, "alibi_slopes"),
    ("alibi-0d", lambda: dict(alibi_slopes=torch.tensor(0.5)), ValueError, "alibi_slopes"),
    ("alibi-empty", lambda: dict(alibi_slopes=ones(0)), ValueError, "alibi_slopes"),
    ("alibi-heads-plus-one", lambda: dict(alibi_slopes=ones(HEADS + 1)), ValueError, "alibi_slopes"),
    ("alibi-batch-long", lambda: dict(alibi_slopes=ones(BATCH)), ValueError, "alibi_slopes"),
    ("alibi-heads-by-batch", lambda: dict(alibi_slopes=ones(HEADS, BATCH)), ValueError, "alibi_slopes"),
    ("alibi-batch-1", lambda: dict(alibi_slopes=ones(1, HEADS)), ValueError, "alibi_slopes"),
    ("alibi-batch-plus-one", lambda: dict(alibi_slopes=ones(BATCH + 1, HEADS)), ValueError, "alibi_slopes"),
    # For varlen the batch is the number of sequences, not of rows.
    ("alibi-rows-by-heads", lambda: dict(alibi_slopes=ones(TOTAL_Q, HEADS)), ValueError, "alibi_slopes"),
    ("alibi-3d", lambda: dict(alibi_slopes=ones(BATCH, HEADS, 1)), ValueError, "alibi_slopes"),
    ("alibi-strided", lambda: dict(alibi_slopes=ones(HEADS, 2)[:, 0]), ValueError, "alibi_slopes"),
    ("alibi-batch-heads-transposed", lambda: dict(alibi_slopes=ones(HEADS, BATCH).t()), ValueError, "alibi_slopes"),

    # s_aux: float32 (heads,), stride 1.
    ("sink-list", lambda: dict(s_aux=[0.0] * HEADS), TypeError, "s_aux"),
    ("sink-float", lambda: dict(s_aux=0.0), TypeError, "s_aux"),
    ("sink-float16", lambda: dict(s_aux=ones(HEADS, dtype=torch.float16)), TypeError, "s_aux"),
    ("sink-bfloat16", lambda: dict(s_aux=ones(HEADS, dtype=torch.bfloat16)), TypeError, "s_aux"),
    ("sink-float64", lambda: dict(s_aux=ones(HEADS, dtype=torch.float64)), TypeError, "s_aux"),
    ("sink-int64", lambda: dict(s_aux=ones(HEADS, dtype=torch.int64)), TypeError, "s_aux"),
    ("sink-0d", lambda: dict(s_aux=torch.tensor(0.0)), ValueError, "s_aux"),
    ("sink-empty", lambda: dict(s_aux=ones(0)), ValueError, "s_aux"),
    ("sink-heads-plus-one", lambda: dict(s_aux=ones(HEADS + 1)), ValueError, "s_aux"),
    ("sink-kv-heads", lambda: dict(s_aux=ones(2)), ValueError, "s_aux"),  # one per kv head: not the rule
    ("sink-1-by-heads", lambda: dict(s_aux=ones(1, HEADS)), ValueError, "s_aux"),
    ("sink-batch-heads", lambda: dict(s_aux=ones(BATCH, HEADS)), ValueError, "s_aux"),
    ("sink-strided", lambda: dict(s_aux=ones(2 * HEADS)[::2]), ValueError, "s_aux"),
]


def ids(cases):
    return [case[0] for case in cases]


def naming(name):
    """A pattern for a message that names the argument `name` (as test_input_checks.message) and is not
    Python's own complaint about a keyword the function does not take, which names it too."""
    return rf"(?s)^(?!.*unexpected keyword argument)(?=.*(?<![A-Za-z]){name}(?![A-Za-z]))"


@pytest.mark.parametrize("change, error, name", [case[1:] for case in BAD_VARIANTS], ids=ids(BAD_VARIANTS))
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_variant_argument(entry, change, error, name):
    with pytest.raises(error, match=naming(name)):
        call(entry, **change())


# Valid spellings of each variant and of their combinations: on CPU tensors only the device rule, naming
# the entry's first tensor and CUDA, rejects them (so each case above fails for its own change alone).
VALID_VARIANTS = [
    ("window", lambda: dict(window_size=(3, 0))),
    ("window-list", lambda: dict(window_size=[3, 0])),
    ("window-zero", lambda: dict(window_size=(0, 0))),
    ("window-right-only", lambda: dict(window_size=(-1, 5))),
    ("window-past-keys", lambda: dict(window_size=(100000, 100000))),
    ("window-causal", lambda: dict(window_size=(7, 2), causal=True)),
    ("softcap-float", lambda: dict(softcap=30.0)),
    ("softcap-int", lambda: dict(softcap=50)),
    ("softcap-off-int", lambda: dict(softcap=0)),
    ("alibi-heads", lambda: dict(alibi_slopes=ones(HEADS))),
    ("alibi-batch-heads", lambda: dict(alibi_slopes=ones(BATCH, HEADS))),
    ("alibi-row-strided", lambda: dict(alibi_slopes=ones(BATCH, 2 * HEADS)[:, :HEADS])),  # only stride(-1) counts
    ("sink", lambda: dict(s_aux=ones(HEADS))),
    ("sink-requires-grad", lambda: dict(s_aux=ones(HEADS).requires_grad_())),
    ("everything", lambda: dict(window_size=(9, 0), causal=True, softcap=30.0, alibi_slopes=ones(BATCH, HEADS),
                                s_aux=ones(HEADS))),
    ("all-off", lambda: dict(window_size=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None)),
]


@pytest.mark.parametrize("change", [case[1] for case in VALID_VARIANTS], ids=ids(VALID_VARIANTS))
@pytest.mark.parametrize("entry", ENTRIES)
def test_valid_variant_meets_the_device_rule(entry, change):
    with pytest.raises(ValueError, match=message(ENTRIES[entry][2], "CUDA")):
        call(entry, **change())


# A variant tensor on another device than q: (q's device, the argument, its value, the value's device, what the
# message may say beside the argument's name). The CPU cases need a GPU, the other-GPU cases two.
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
MISPLACED_VARIANTS = [
    pytest.param("cuda", "alibi_slopes", lambda: ones(HEADS), "cpu", "CUDA|device|cpu", id="cpu-alibi-heads"),
    pytest.param("cuda", "alibi_slopes", lambda: ones(BATCH, HEADS), "cpu", "CUDA|device|cpu",
                 id="cpu-alibi-batch-heads"),
    pytest.param("cuda", "s_aux", lambda: ones(HEADS), "cpu", "CUDA|device|cpu", id="cpu-sink"),
    pytest.param("cuda:0", "alibi_slopes", lambda: ones(HEADS), "cuda:1", "device|cuda:1", id="other-gpu-alibi",
                 marks=TWO_GPUS),
    pytest.param("cuda:0", "s_aux", lambda: ones(HEADS), "cuda:1", "device|cuda:1", id="other-gpu-sink",
                 marks=TWO_GPUS),
]


@requires_gpu
@pytest.mark.parametrize("q_device, name, value, device, says", MISPLACED_VARIANTS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_variant_tensor_on_another_device(entry, q_device, name, value, device, says):
    with pytest.raises(ValueError, match=message(name, says)):
        call(entry, device=q_device, **{name: value().to(device)})

"""flash_attn_func rejects bad arguments before any launch, naming the argument and the rule.

The device rules are checked last, so every other rule is tested here with CPU tensors and
needs neither a GPU nor the compiled extension.
"""

import pytest
import torch

from conftest import requires_gpu
from flash_attn2 import flash_attn_func

# Shapes avoid the sizes 4 and 256 so that a rule's number in a message is not confused with them.
Q_SHAPE, KV_SHAPE = (2, 8, 6, 64), (2, 16, 2, 64)


def randn(*shape, dtype=torch.float16, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def all_head_dim(head_dim):
    return dict(q=randn(*Q_SHAPE[:3], head_dim), k=randn(*KV_SHAPE[:3], head_dim),
                v=randn(*KV_SHAPE[:3], head_dim))


def every_arg_valid_but(device="cpu", **change):
    """Arguments for flash_attn_func, all valid on `device` but for `change`."""
    args = dict(q=randn(*Q_SHAPE, device=device), k=randn(*KV_SHAPE, device=device),
                v=randn(*KV_SHAPE, device=device))
    return {**args, **change}


def message(name, rule):
    """A pattern for a message with the argument `name` (not inside a word: `heads_q` counts
    for `q`) and the `rule` in it, in any order."""
    return rf"(?s)(?=.*(?<![A-Za-z]){name}(?![A-Za-z]))(?=.*(?:{rule}))"


F32, BF16 = torch.float32, torch.bfloat16
RANK, BATCH, HEAD_DIM, STRIDE = r"(?<!\d)4(?!\d)", "batch", "head_dim|head dim", "contiguous|stride"

# (id, changed arguments, exception, argument the message names, rule the message states)
BAD_INPUTS = [
    ("dropout-one", lambda: dict(dropout_p=1.0), ValueError, "dropout_p", r"\[0, 1\)"),
    ("window-below-unbounded", lambda: dict(window_size=(-2, 0)), ValueError, "window_size", ">= -1"),
    ("window-not-pair", lambda: dict(window_size=(4,)), TypeError, "window_size", "pair"),
    ("softcap-negative", lambda: dict(softcap=-30.0), ValueError, "softcap", ">= 0"),
    ("alibi-float16", lambda: dict(alibi_slopes=torch.ones(6, dtype=torch.float16)), TypeError, "alibi_slopes",
     "float32"),

    ("q-not-tensor", lambda: dict(q=randn(*Q_SHAPE).tolist()), TypeError, "q", "[Tt]ensor"),
    ("k-not-tensor", lambda: dict(k=randn(*KV_SHAPE).numpy()), TypeError, "k", "[Tt]ensor"),
    ("v-not-tensor", lambda: dict(v=None), TypeError, "v", "[Tt]ensor"),
    ("float32", lambda: dict(q=randn(*Q_SHAPE, dtype=F32), k=randn(*KV_SHAPE, dtype=F32),
                             v=randn(*KV_SHAPE, dtype=F32)), TypeError, "q", "float16|fp16|half"),
    ("k-dtype-differs", lambda: dict(k=randn(*KV_SHAPE, dtype=BF16)), TypeError, "k", "dtype"),
    ("v-dtype-differs", lambda: dict(v=randn(*KV_SHAPE, dtype=BF16)), TypeError, "v", "dtype"),

    ("q-3d", lambda: dict(q=randn(2, 8, 384)), ValueError, "q", RANK),
    ("k-5d", lambda: dict(k=randn(1, *KV_SHAPE)), ValueError, "k", RANK),
    ("v-3d", lambda: dict(v=randn(2, 16, 128)), ValueError, "v", RANK),

    ("batch-differs", lambda: dict(k=randn(3, 16, 2, 64), v=randn(3, 16, 2, 64)), ValueError,
     "k", BATCH),
    ("k-head-dim-differs", lambda: dict(k=randn(2, 16, 2, 32)), ValueError, "k", HEAD_DIM),
    ("v-head-dim-differs", lambda: dict(v=randn(2, 16, 2, 32)), ValueError, "v", HEAD_DIM),
    ("v-seqlen-differs", lambda: dict(v=randn(2, 12, 2, 64)), ValueError, "v", "seqlen|sequence"),
    ("v-heads-differ", lambda: dict(v=randn(2, 16, 1, 64)), ValueError, "v", "head"),
    ("heads-not-multiple", lambda: dict(k=randn(2, 16, 5, 64), v=randn(2, 16, 5, 64)), ValueError,
     "q", "multiple|divisible"),

    ("head-dim-264", lambda: all_head_dim(264), ValueError, "q", "256"),
    ("head-dim-0", lambda: all_head_dim(0), ValueError, "q", HEAD_DIM),

    ("q-stride", lambda: dict(q=randn(2, 8, 6, 128)[..., ::2]), ValueError, "q", STRIDE),
    ("k-stride", lambda: dict(k=randn(2, 16, 2, 128)[..., ::2]), ValueError, "k", STRIDE),
    ("v-stride", lambda: dict(v=randn(2, 16, 2, 64, 2)[..., 0]), ValueError, "v", STRIDE),

    ("scale-nan", lambda: dict(softmax_scale=float("nan")), ValueError, "softmax_scale", "finite"),
    ("scale-inf", lambda: dict(softmax_scale=float("inf")), ValueError, "softmax_scale", "finite"),
    ("scale-neg-inf", lambda: dict(softmax_scale=-float("inf")), ValueError, "softmax_scale",
     "finite"),

    ("cpu", lambda: dict(), ValueError, "q", "CUDA"),

    # Two faults at once: the rule checked earlier (features, types, ranks, shapes, head_dim,
    # strides, devices) must win.
    ("order-feature-type", lambda: dict(dropout_p=-0.1, q=randn(*Q_SHAPE, dtype=F32)),
     ValueError, "dropout_p", r"\[0, 1\)"),
    ("order-type-rank", lambda: dict(q=randn(2, 8, 384, dtype=F32)), TypeError, "q", "dtype|float"),
    ("order-rank-shape", lambda: dict(q=randn(2, 8, 384), v=randn(2, 12, 2, 64)), ValueError,
     "q", RANK),
    ("order-shape-head-dim", lambda: {**all_head_dim(264), "k": randn(3, 16, 2, 264)}, ValueError,
     "k", BATCH),
    ("order-head-dim-stride", lambda: {**all_head_dim(264), "q": randn(2, 8, 6, 528)[..., ::2]},
     ValueError, "q", "256"),
]


@pytest.mark.parametrize("change, error, name, rule", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input(change, error, name, rule):
    with pytest.raises(error, match=message(name, rule)):
        flash_attn_func(**every_arg_valid_but(**change()))


@requires_gpu
def test_cpu_tensor_beside_cuda():
    with pytest.raises(ValueError, match=message("k", "CUDA")):
        flash_attn_func(**every_arg_valid_but(device="cuda", k=randn(*KV_SHAPE)))


@requires_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_different_cuda_devices():
    with pytest.raises(ValueError, match=message("k", "device")):
        flash_attn_func(**every_arg_valid_but(device="cuda:0", k=randn(*KV_SHAPE, device="cuda:1")))

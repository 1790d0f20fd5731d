"""Variable-length batches and the packed entry points on the GPU (skipped without one): out, LSE and the
three gradients against the float32 reference run per sequence, by the forward's 2x and the backward's 3x
rule, into NaN-filled buffers; the public entries against the kernels they share with flash_attn_func (bit
for bit); and bad calls, each rejected without spoiling the next valid one.
"""

import contextlib

import pytest
import torch

from conftest import (KV_HEADS, forward_into_nan, on_kernel_grid, random_qkv, random_varlen, requires_ext,
                      requires_gpu, skip_unless_built, varlen_of)
from flash_attn2 import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                         flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func, set_value_checks)
from test_bad_inputs_gpu import moved_to_cuda
from test_bwd_gpu import DETERMINISTIC_RUNS, GRADS, backward_into_nan, check_bwd
from test_fwd_gpu import check_fwd
from test_input_checks import message
from test_varlen_input_checks import VARLEN_BAD_INPUTS, cu, varlen_args

pytestmark = [requires_gpu, requires_ext, pytest.mark.usefixtures("fwd_path", "bwd_path")]

INF = float("inf")
RESULTS = ("out", "lse", *GRADS)
HEADS_Q = 8  # heads_kv from conftest.KV_HEADS: 8 (MHA), 2 (GQA), 1 (MQA)

# (lengths_q, lengths_k), one pair per sequence. Each mix totals under 2,000 rows of q and of k, so that
# the grid (every dtype, head dim, mask and heads_kv) runs in seconds. The kernels' tiles are 64 and 128
# rows: lengths one either side of them leave a ragged last tile, or a full one.
LENGTH_MIXES = {
    # Empty and one-row sequences, tile edges, and one long sequence among short ones.
    "mixed": ([0, 1, 63, 65, 127, 129, 1000, 17, 2, 64, 128],) * 2,
    # seqlen_q != seqlen_k per sequence, both ways: more queries than keys (causal rows that see no key),
    # a sequence with no key (every row sees none) and one with no query (its keys get dK = dV = 0).
    "q-ne-k": ([1, 300, 200, 77, 0, 50, 129, 64, 513], [300, 1, 77, 200, 50, 0, 64, 129, 257]),
    "single": ([517], [1031]),
    "equal": ([128] * 8, [128] * 8),
}


def key_rows_without_queries(varlen):
    """A bool mask over k's rows: those of sequences with no query, which nothing attends to."""
    cu_q, cu_k = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
    mask = torch.zeros(cu_k[-1], dtype=torch.bool, device=varlen.cu_seqlens_k.device)
    for b in range(len(cu_q) - 1):
        if cu_q[b + 1] == cu_q[b]:
            mask[cu_k[b]:cu_k[b + 1]] = True
    return mask


@pytest.mark.parametrize("mix", LENGTH_MIXES)
@on_kernel_grid
def test_varlen(dtype, head_dim, causal, kv_heads, mix, deterministic):
    skip_unless_built(head_dim)
    q, k, v, varlen = random_varlen(*LENGTH_MIXES[mix], HEADS_Q, KV_HEADS[kv_heads](HEADS_Q), head_dim, dtype=dtype,
                                    device="cuda")
    dout = torch.randn_like(q)
    softmax_scale = head_dim ** -0.5
    out, lse = forward_into_nan(q, k, v, softmax_scale, causal, varlen)
    check_fwd(out, lse, q, k, v, softmax_scale, causal, varlen)
    grads = backward_into_nan(dout, q, k, v, out, lse, softmax_scale, causal, varlen, deterministic)
    check_bwd(grads, dout, q, k, v, softmax_scale, causal, varlen)
    unseen = key_rows_without_queries(varlen)
    for name, grad in zip(GRADS[1:], grads[1:]):
        assert (grad[unseen] == 0).all(), f"{name} must be 0 on the keys of sequences with no query"


def run(call, tensors, dout):
    """(out, lse, dq, dk, dv), or the gradient of each packed tensor, of call(*leaves) -> (out, lse, None)
    and autograd with dout, on leaves holding the values of tensors."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out, lse, _ = call(*leaves)
    return (out.detach(), lse, *torch.autograd.grad(out, leaves, dout))


def assert_equal(results, expected, names=RESULTS):
    assert len(results) == len(expected) <= len(names)
    for name, result, expect in zip(names, results, expected):
        assert result.shape == expect.shape, f"{name}: shape {tuple(result.shape)} != {tuple(expect.shape)}"
        assert torch.equal(result, expect), f"{name} differs"


@pytest.mark.parametrize("softmax_scale", [None, 0.3])
@pytest.mark.parametrize("head_dim", [40, 59, 128])
def test_flash_attn_varlen_func(head_dim, softmax_scale):
    # The public entry through autograd: odd head dims padded and their gradients sliced, the default
    # scale 1/sqrt(real head_dim), GQA, return_attn_probs giving (out, lse (heads, total_q), None).
    skip_unless_built(head_dim)
    q, k, v, varlen = random_varlen(*LENGTH_MIXES["q-ne-k"], HEADS_Q, 2, head_dim, dtype=torch.bfloat16,
                                    device="cuda")
    dout = torch.randn_like(q)

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, *varlen, softmax_scale=softmax_scale, causal=True,
                                      return_attn_probs=True, deterministic=True)

    out, lse, *grads = run(call, (q, k, v), dout)
    assert lse.shape == (HEADS_Q, q.shape[0]) and call(q, k, v)[2] is None
    scale = softmax_scale or head_dim ** -0.5
    check_fwd(out, lse, q, k, v, scale, True, varlen)
    check_bwd(grads, dout, q, k, v, scale, True, varlen)
    # Without return_attn_probs: out alone, the same bits.
    assert torch.equal(flash_attn_varlen_func(q, k, v, *varlen, softmax_scale=softmax_scale, causal=True), out)


def test_varlen_broadcast_dout():
    # A dout with stride 0 across rows and heads (what out.sum() and a broadcast loss give): the same
    # gradients as the contiguous dout of the same values.
    skip_unless_built(64)
    q, k, v, varlen = random_varlen(*LENGTH_MIXES["mixed"], HEADS_Q, 2, 64, dtype=torch.float16, device="cuda")
    dout = torch.randn(64, dtype=torch.float16, device="cuda").expand_as(q)

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, *varlen, causal=True, return_attn_probs=True, deterministic=True)

    assert_equal(run(call, (q, k, v), dout), run(call, (q, k, v), dout.contiguous()))


# The packed entries against the unpacked call on contiguous copies of the same values: the same kernels
# read the packed tensor through strided views, so every result must be bit-identical, and the gradient
# of a packed tensor must be the unpacked gradients stacked in its shape. GQA where k and v are packed
# apart from q; sequences of the varlen ones as in LENGTH_MIXES (an empty one, q != k).
VARLEN_LENGTHS_Q, VARLEN_LENGTHS_K = [0, 129, 64, 300, 1], [50, 77, 64, 255, 1]
PACKED = ("qkvpacked", "kvpacked", "varlen_qkvpacked", "varlen_kvpacked")


def packed_case(variant, head_dim, causal, dtype=torch.float16):
    """(packed tensors, the packed call, the same call unpacked): each call gives (out, lse, None) from
    its tensors, the unpacked one from (q, k, v)."""
    like = dict(dtype=dtype, device="cuda")
    options = dict(causal=causal, return_attn_probs=True, deterministic=True)
    if variant == "qkvpacked":
        return ([torch.randn(2, 200, 3, 4, head_dim, **like)], lambda qkv: flash_attn_qkvpacked_func(qkv, **options),
                lambda q, k, v: flash_attn_func(q, k, v, **options))
    if variant == "kvpacked":
        return ([torch.randn(2, 150, HEADS_Q, head_dim, **like), torch.randn(2, 230, 2, 2, head_dim, **like)],
                lambda q, kv: flash_attn_kvpacked_func(q, kv, **options),
                lambda q, k, v: flash_attn_func(q, k, v, **options))
    if variant == "varlen_qkvpacked":  # one cu_seqlens for q, k and v: seqlen_q == seqlen_k per sequence
        varlen = varlen_of(VARLEN_LENGTHS_K, VARLEN_LENGTHS_K, "cuda")
        cu_seqlens, max_seqlen = varlen.cu_seqlens_k, varlen.max_seqlen_k
        return ([torch.randn(cu_seqlens[-1].item(), 3, 4, head_dim, **like)],
                lambda qkv: flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, **options),
                lambda q, k, v: flash_attn_varlen_func(q, k, v, *varlen, **options))
    assert variant == "varlen_kvpacked"
    varlen = varlen_of(VARLEN_LENGTHS_Q, VARLEN_LENGTHS_K, "cuda")
    return ([torch.randn(sum(VARLEN_LENGTHS_Q), HEADS_Q, head_dim, **like),
             torch.randn(sum(VARLEN_LENGTHS_K), 2, 2, head_dim, **like)],
            lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, *varlen, **options),
            lambda q, k, v: flash_attn_varlen_func(q, k, v, *varlen, **options))


def unpacked(packed):
    """q, k, v as contiguous copies, from [qkv] or [q, kv] (packed in dim -3)."""
    if len(packed) == 1:
        views = packed[0].unbind(-3)
    else:
        views = (packed[0], *packed[1].unbind(-3))
    return [t.contiguous() for t in views]


def packed_grads(dq, dk, dv, count):
    """The gradients of the `count` packed tensors ([qkv] or [q, kv]), from the unpacked ones."""
    return [torch.stack((dq, dk, dv), dim=-3)] if count == 1 else [dq, torch.stack((dk, dv), dim=-3)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [59, 64])
@pytest.mark.parametrize("variant", PACKED)
def test_packed_equals_unpacked(variant, head_dim, causal):
    skip_unless_built(head_dim)
    packed, call, call_unpacked = packed_case(variant, head_dim, causal)
    dout = torch.randn_like(packed[0][..., 0, :, :] if len(packed) == 1 else packed[0])
    out, lse, *grads = run(call, packed, dout)
    out_u, lse_u, *grads_u = run(call_unpacked, unpacked(packed), dout)
    assert_equal((out, lse), (out_u, lse_u))
    names = ("dqkv",) if len(packed) == 1 else ("dq", "dkv")
    for name, grad, like in zip(names, grads, packed):
        assert grad.shape == like.shape and grad.dtype == like.dtype, f"{name}: the packed shape and dtype"
    assert_equal(grads, packed_grads(*grads_u, len(packed)), names)


@pytest.mark.parametrize("variant", PACKED)
def test_packed_forward_reads_in_place(variant):
    # A contiguous packed tensor whose head dim is a multiple of 8 is read through views: the forward
    # allocates out and lse and copies nothing (a copy of even the smallest of q, k, v would show).
    skip_unless_built(64)
    packed, call, _ = packed_case(variant, 64, causal=True)
    smallest_view = min(t.numel() * t.element_size() for t in unpacked(packed))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse, _ = call(*packed)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - before
    outputs = out.numel() * out.element_size() + lse.numel() * lse.element_size()
    assert growth < outputs + smallest_view, (f"the forward took {growth} bytes, more than out and lse "
                                              f"({outputs}): a copy of q, k or v?")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_dim", [59, 64, 128])
@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_equal_lengths_equal_flash_attn_func(kv_heads, head_dim, causal):
    # A varlen batch of equal lengths is flash_attn_func's batch flattened: on either forward path (the
    # module's fwd_path), the same tiles in the same order, the varlen kernel's rows past a sequence's end
    # masked or unused, so out, lse and the gradients are bit-identical (lse (batch, heads, seqlen) there,
    # (heads, batch * seqlen) here).
    skip_unless_built(head_dim)
    batch, seqlen_q, seqlen_k = 3, 200, 131
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, HEADS_Q, KV_HEADS[kv_heads](HEADS_Q), head_dim,
                         dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)
    options = dict(causal=causal, return_attn_probs=True, deterministic=True)
    fixed = run(lambda q, k, v: flash_attn_func(q, k, v, **options), (q, k, v), dout)
    varlen = varlen_of([seqlen_q] * batch, [seqlen_k] * batch, "cuda")
    flat = run(lambda q, k, v: flash_attn_varlen_func(q, k, v, *varlen, **options),
               [t.flatten(0, 1) for t in (q, k, v)], dout.flatten(0, 1))
    out, lse, dq, dk, dv = fixed
    assert_equal(flat, (out.flatten(0, 1), lse.transpose(0, 1).flatten(1, 2), dq.flatten(0, 1),
                        dk.flatten(0, 1), dv.flatten(0, 1)))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mix", ["mixed", "q-ne-k"])
def test_deterministic(mix, head_dim):
    # Bit-identical over 10 runs with deterministic=True, with GQA (dK and dV summed over each group in a
    # fixed order).
    skip_unless_built(head_dim)
    q, k, v, varlen = random_varlen(*LENGTH_MIXES[mix], HEADS_Q, 2, head_dim, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, *varlen, causal=True, return_attn_probs=True, deterministic=True)

    first = run(call, (q, k, v), dout)
    for _ in range(DETERMINISTIC_RUNS - 1):
        assert_equal(run(call, (q, k, v), dout), first)


@contextlib.contextmanager
def value_checks(enabled):
    """set_value_checks(enabled) for the block, then the setting from before (FLASH_ATTN2_CHECK_VALUES may
    have turned the checks on for the whole run)."""
    previous = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(previous)


@pytest.fixture
def value_checks_off():
    with value_checks(False):
        yield


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_rows_past_the_last_sequence(causal, value_checks_off, deterministic):
    # cu_seqlens that end before the tensors do (unchecked): the rows of the sequences are right, the
    # rows past them belong to no sequence (their results are unspecified), and nothing faults.
    skip_unless_built(64)
    q, k, v, varlen = random_varlen([100, 0, 37], [64, 20, 129], HEADS_Q, 2, 64, dtype=torch.float16, device="cuda")
    total_q, total_k = q.shape[0], k.shape[0]
    longer = [torch.cat([t, torch.randn(rows, *t.shape[1:], dtype=t.dtype, device="cuda")])
              for t, rows in ((q, 50), (k, 30), (v, 30))]
    dout = torch.randn_like(longer[0])

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, *varlen, causal=causal, return_attn_probs=True,
                                      deterministic=deterministic)

    out, lse, dq, dk, dv = run(call, longer, dout)
    torch.cuda.synchronize()
    check_fwd(out[:total_q], lse[:, :total_q], q, k, v, 0.125, causal, varlen)
    check_bwd((dq[:total_q], dk[:total_k], dv[:total_k]), dout[:total_q], q, k, v, 0.125, causal, varlen)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths_q, lengths_k", [([], []), ([0, 0, 0], [0, 0, 0]), ([0, 0, 0], [5, 0, 70]),
                                                  ([3, 0, 90], [0, 0, 0])],
                         ids=["batch-0", "all-empty", "no-queries", "no-keys"])
def test_empty_sequences(lengths_q, lengths_k, causal, deterministic):
    # Nothing attends to anything: out 0, lse +inf, every gradient 0, through the kernels into NaN-filled
    # buffers and through the public entry.
    skip_unless_built(64)
    q, k, v, varlen = random_varlen(lengths_q, lengths_k, HEADS_Q, 2, 64, dtype=torch.float16, device="cuda")
    dout = torch.randn_like(q)
    out, lse = forward_into_nan(q, k, v, 0.125, causal, varlen)
    grads = backward_into_nan(dout, q, k, v, out, lse, 0.125, causal, varlen, deterministic)

    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, *varlen, causal=causal, return_attn_probs=True,
                                      deterministic=deterministic)

    for path, (out_, lse_, *grads_) in (("kernels", (out, lse, *grads)), ("entry", run(call, (q, k, v), dout))):
        assert out_.shape == q.shape and lse_.shape == (HEADS_Q, q.shape[0]), path
        assert (out_ == 0).all() and (lse_ == INF).all(), path
        for name, grad, like in zip(GRADS, grads_, (q, k, v)):
            assert grad.shape == like.shape and (grad == 0).all(), f"{path}: {name} must be 0"


@pytest.mark.parametrize("extra", [1, 1000, 2 ** 20])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_max_seqlen_above_the_longest(causal, extra):
    # max_seqlen only sizes the grid: a larger one adds blocks that leave at once (2^20 is past every
    # tensor's rows), and gives the same bits.
    skip_unless_built(64)
    q, k, v, varlen = random_varlen(*LENGTH_MIXES["q-ne-k"], HEADS_Q, 2, 64, dtype=torch.float16, device="cuda")
    loose = varlen._replace(max_seqlen_q=varlen.max_seqlen_q + extra, max_seqlen_k=varlen.max_seqlen_k + extra)
    dout = torch.randn_like(q)

    def call(varlen):
        return lambda q, k, v: flash_attn_varlen_func(q, k, v, *varlen, causal=causal, return_attn_probs=True,
                                                      deterministic=True)

    results = run(call(loose), (q, k, v), dout)
    assert_equal(results, run(call(varlen), (q, k, v), dout))
    out, lse, *grads = results
    check_fwd(out, lse, q, k, v, 0.125, causal, varlen)
    check_bwd(grads, dout, q, k, v, 0.125, causal, varlen)


# Rejected calls with CUDA tensors: each names the argument, and a valid forward and backward right after
# it gives the same bits as before (see test_bad_inputs_gpu).
class ValidVarlenCall:
    """A causal GQA varlen forward and backward whose results must stay bit-identical after every rejected
    call (synchronizing first, so that a fault from the rejected call surfaces)."""

    def __init__(self):
        q, k, v, self.varlen = random_varlen(*LENGTH_MIXES["q-ne-k"], 6, 2, 64, dtype=torch.float16, device="cuda")
        self.qkv = (q, k, v)
        self.dout = torch.randn_like(q)
        self.expected = self.run()

    def run(self):
        def call(q, k, v):
            return flash_attn_varlen_func(q, k, v, *self.varlen, causal=True, return_attn_probs=True,
                                          deterministic=True)

        return run(call, self.qkv, self.dout)

    def check(self, after):
        torch.cuda.synchronize()
        for name, result, expected in zip(RESULTS, self.run(), self.expected):
            assert torch.equal(result, expected), f"{name} differs after {after}"


@pytest.fixture
def valid_call():
    skip_unless_built(64)
    with value_checks(False):  # the yardstick is computed unchecked, whatever the environment says
        return ValidVarlenCall()


def test_valid_call_is_right(valid_call):
    out, lse, *grads = valid_call.expected
    q, k, v = valid_call.qkv
    check_fwd(out, lse, q, k, v, 0.125, True, valid_call.varlen)
    check_bwd(grads, valid_call.dout, q, k, v, 0.125, True, valid_call.varlen)


# test_varlen_input_checks' rules on CUDA: every argument valid on CUDA but the change, moved there. Its
# "cpu" case (every tensor on the CPU) becomes one tensor left on the CPU beside CUDA ones.
CUDA_BAD_INPUTS = [(id_, moved_to_cuda(change), *expect) for id_, change, *expect in VARLEN_BAD_INPUTS
                   if id_ != "cpu"]
CUDA_BAD_INPUTS += [
    ("q-on-cpu", lambda: dict(q=varlen_args()["q"]), ValueError, "q", "CUDA"),
    ("v-on-cpu", lambda: dict(v=varlen_args()["v"]), ValueError, "v", "CUDA"),
    ("cu-q-on-cpu", lambda: dict(cu_seqlens_q=cu(0, 2, 8)), ValueError, "cu_seqlens_q", "CUDA"),
    ("cu-k-on-cpu", lambda: dict(cu_seqlens_k=cu(0, 7, 16)), ValueError, "cu_seqlens_k", "CUDA"),
]


def ids(cases):
    return [case[0] for case in cases]


@pytest.mark.parametrize("change, error, name, rule", [case[1:] for case in CUDA_BAD_INPUTS],
                         ids=ids(CUDA_BAD_INPUTS))
def test_bad_input_on_cuda(change, error, name, rule, valid_call):
    with pytest.raises(error, match=message(name, rule)):
        flash_attn_varlen_func(**varlen_args(device="cuda", **change()))
    valid_call.check(after="the rejected call")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cu_seqlens_on_another_gpu(valid_call):
    with pytest.raises(ValueError, match=message("cu_seqlens_k", "device")):
        flash_attn_varlen_func(**varlen_args(device="cuda:0", cu_seqlens_k=cu(0, 7, 16).to("cuda:1")))
    valid_call.check(after="the rejected call")


# With set_value_checks(True), cu_seqlens' values are read back and checked: from 0, never decreasing,
# ending at the tensor's rows, no sequence longer than max_seqlen. On varlen_args (sequences of 2 and 6
# queries, 7 and 9 keys): (id, changed arguments, argument the message names, rule the message states).
BAD_VALUES = [
    ("cu-q-starts-at-1", dict(cu_seqlens_q=[1, 2, 8]), "cu_seqlens_q", "start at 0"),
    ("cu-k-starts-negative", dict(cu_seqlens_k=[-1, 7, 16]), "cu_seqlens_k", "start at 0"),
    ("cu-q-decreases", dict(cu_seqlens_q=[0, 9, 8]), "cu_seqlens_q", "decrease"),
    ("cu-k-decreases", dict(cu_seqlens_k=[0, 17, 16]), "cu_seqlens_k", "decrease"),
    ("cu-q-ends-before-total", dict(cu_seqlens_q=[0, 2, 7]), "cu_seqlens_q", "end at total"),
    ("cu-k-ends-past-total", dict(cu_seqlens_k=[0, 7, 17]), "cu_seqlens_k", "end at total"),
    ("cu-q-longer-than-max", dict(max_seqlen_q=5), "cu_seqlens_q", "longer than max_seqlen_q"),
    ("cu-k-longer-than-max", dict(max_seqlen_k=8), "cu_seqlens_k", "longer than max_seqlen_k"),
]


def on_cuda_ints(change):
    return {name: cu(*value).cuda() if isinstance(value, list) else value for name, value in change.items()}


@pytest.mark.parametrize("change, name, rule", [case[1:] for case in BAD_VALUES], ids=ids(BAD_VALUES))
def test_bad_values_with_value_checks(change, name, rule, valid_call):
    with value_checks(True):
        with pytest.raises(ValueError, match=message(name, rule)):
            flash_attn_varlen_func(**varlen_args(device="cuda", **on_cuda_ints(change)))
        # Valid values pass the checks and give the unchecked call's bits.
        valid_call.check(after="the rejected call, with value checks on")


@pytest.mark.parametrize("variant", ["varlen_qkvpacked", "varlen_kvpacked"])
def test_bad_values_in_packed_entries(variant, valid_call):
    # The packed varlen entries check their cu_seqlens as flash_attn_varlen_func does (packed_case's
    # sequences: cu_seqlens_k 0, 50, 127, 191, 446, 447).
    packed, _, _ = packed_case(variant, 64, causal=True)
    with value_checks(True):
        if variant == "varlen_qkvpacked":
            decreasing = cu(0, 127, 50, 191, 446, 447).cuda()
            with pytest.raises(ValueError, match=message("cu_seqlens", "decrease")):
                flash_attn_varlen_qkvpacked_func(*packed, decreasing, max(VARLEN_LENGTHS_K))
        else:
            varlen = varlen_of(VARLEN_LENGTHS_Q, VARLEN_LENGTHS_K, "cuda")
            past_total = cu(0, 50, 127, 191, 446, 448).cuda()
            with pytest.raises(ValueError, match=message("cu_seqlens_k", "end at total")):
                flash_attn_varlen_kvpacked_func(*packed, varlen.cu_seqlens_q, past_total, *varlen[2:])
        valid_call.check(after="the rejected call, with value checks on")

"""dq, dk, dv against autograd through the float32 reference, on the GPU (skipped without one)."""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import (check_close, grid_qkv, on_kernel_grid, forward_into_nan, random_qkv, reference,
                      requires_ext, requires_gpu, skip_unless_built, strided_qkv)
from flash_attn2 import flash_attn_func
from flash_attn2.interface import _bwd

pytestmark = [requires_gpu, requires_ext, pytest.mark.usefixtures("fwd_path", "bwd_path")]

NAN = float("nan")
GRADS = ("dq", "dk", "dv")
# Gradients may be off by three times PyTorch's own error, not two as out: the backward chains five
# low-precision matmuls and rounds elsewhere than autograd does (dP stays fp32, D = rowsum(dO·O)
# reads the rounded O), so its error tracks PyTorch's less closely. flash_attn's tests allow 3x too.
GRAD_ERROR_FACTOR = 3


def backward_into_nan(dout, q, k, v, out, lse, softmax_scale, causal, varlen=None, deterministic=True):
    """Runs _bwd into NaN-filled dq, dk, dv, so that any element it leaves unwritten fails. Varlen
    where varlen (a conftest.Varlen) is given; deterministic: the backward's mode."""
    head_dim = q.shape[-1]
    dout, q, k, v, out = (F.pad(t, (0, -head_dim % 8)) for t in (dout, q, k, v, out))  # zeros
    grads = tuple(torch.full_like(t, NAN) for t in (q, k, v))
    _bwd(dout, q, k, v, out, lse, *grads, softmax_scale, causal, *(varlen or ()), deterministic=deterministic)
    for name, grad in zip(GRADS, grads):
        # dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO: in these columns K, Q and dO are 0.
        assert (grad[..., head_dim:] == 0).all(), f"padding columns of {name} must be 0"
    return tuple(grad[..., :head_dim] for grad in grads)


def reference_grads(dout, q, k, v, softmax_scale, causal, compute_dtype, varlen=None):
    """(dq, dk, dv) of the reference (per sequence where varlen is given) by autograd with leaves in
    compute_dtype, and its lse."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    out, lse = reference(*leaves, softmax_scale, causal, compute_dtype=compute_dtype, varlen=varlen)
    return torch.autograd.grad(out, leaves, dout.to(compute_dtype)), lse


def check_bwd(grads, dout, q, k, v, softmax_scale, causal, varlen=None):
    """dq, dk, dv against the fp32 reference by the 3x rule; rows that see no key get dq 0. Varlen (per
    sequence) where varlen, a conftest.Varlen, is given."""
    grads_ref, lse_ref = reference_grads(dout, q, k, v, softmax_scale, causal, torch.float32, varlen)
    grads_pt, _ = reference_grads(dout, q, k, v, softmax_scale, causal, q.dtype, varlen)
    for name, grad, like, ref, pt in zip(GRADS, grads, (q, k, v), grads_ref, grads_pt):
        assert grad.dtype == like.dtype and grad.shape == like.shape, f"{name}: dtype or shape"
        check_close(grad, ref, pt, name, factor=GRAD_ERROR_FACTOR)
    no_key = torch.isinf(lse_ref).transpose(-2, -1)  # (batch, seqlen_q, heads_q), or (total_q, heads_q)
    assert (grads[0][no_key] == 0).all(), "rows that see no key must give dq 0"


def random_qkv_with_grad(*shape, dtype):
    return [t.requires_grad_() for t in random_qkv(*shape, dtype=dtype, device="cuda")]


@on_kernel_grid
def test_bwd(dtype, head_dim, causal, kv_heads, seqlens, batch_heads, deterministic):
    q, k, v = grid_qkv(dtype, head_dim, kv_heads, seqlens, batch_heads)
    dout = torch.randn_like(q)
    softmax_scale = 1 / math.sqrt(head_dim)
    out, lse = forward_into_nan(q, k, v, softmax_scale, causal)
    grads = backward_into_nan(dout, q, k, v, out, lse, softmax_scale, causal, deterministic=deterministic)
    check_bwd(grads, dout, q, k, v, softmax_scale, causal)


def non_contiguous_dout(layout, out):
    """Random dout shaped like out, not contiguous."""
    batch, seqlen, heads, head_dim = out.shape
    like = dict(dtype=out.dtype, device=out.device)
    if layout == "heads-first":  # stored (batch, heads, seqlen, head_dim), as SDPA gives it
        return torch.randn(batch, heads, seqlen, head_dim, **like).transpose(1, 2)
    if layout == "broadcast":  # one row for every (batch, seqlen, head): strides (0, 0, 0, 1)
        return torch.randn(head_dim, **like).expand_as(out)
    assert layout == "scalar"  # what out.sum().backward() passes: every stride 0, the last one too
    return torch.ones((), **like).expand_as(out)


@pytest.mark.parametrize("dout_layout", ["heads-first", "broadcast", "scalar"])
@pytest.mark.parametrize("head_dim", [40, 59, 128])
def test_flash_attn_func_backward(head_dim, dout_layout, deterministic):
    # The public entry: autograd through the custom op, odd head dims padded and their gradients
    # sliced, GQA gradients summed per kv head, the default scale, and dout of any strides (the same
    # bits as a contiguous dout where the backward is deterministic).
    skip_unless_built(head_dim)
    qkv = random_qkv_with_grad(2, 150, 100, 8, 2, head_dim, dtype=torch.bfloat16)
    out = flash_attn_func(*qkv, causal=True, deterministic=deterministic)
    dout = non_contiguous_dout(dout_layout, out)
    assert not dout.is_contiguous()
    grads = torch.autograd.grad(out, qkv, dout, retain_graph=True)
    if deterministic:
        for grad, grad_expected in zip(grads, torch.autograd.grad(out, qkv, dout.contiguous())):
            assert torch.equal(grad, grad_expected)
    check_bwd(grads, dout, *qkv, 1 / math.sqrt(head_dim), causal=True)


@pytest.mark.parametrize("head_dim", [59, 64])
@pytest.mark.parametrize("layout", ["packed-qkv", "heads-first"])
def test_non_contiguous_inputs(layout, head_dim):
    # Gradients come back in the shapes of q, k, v and do not depend on their strides.
    skip_unless_built(head_dim)
    qkv = strided_qkv(layout, 2, 200, 4, head_dim, dtype=torch.float16, device="cuda")
    qkv = [t.detach().requires_grad_() for t in qkv]  # leaves that keep the strides
    assert not qkv[0].is_contiguous()
    dout = torch.randn(qkv[0].shape, dtype=torch.float16, device="cuda")
    grads = torch.autograd.grad(flash_attn_func(*qkv, causal=True, deterministic=True), qkv, dout)
    contiguous = [t.detach().contiguous().requires_grad_() for t in qkv]
    expected = torch.autograd.grad(flash_attn_func(*contiguous, causal=True, deterministic=True), contiguous, dout)
    for grad, grad_expected in zip(grads, expected):
        assert torch.equal(grad, grad_expected)


DETERMINISTIC_RUNS = 10


@contextlib.contextmanager
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) inside, the previous setting restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("asked_by", ["argument", "torch"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads_kv, causal, seqlen_q, seqlen_k",
                         [(8, False, 1024, 1024), (2, False, 1024, 1024), (2, True, 1500, 777)],
                         ids=["mha", "gqa", "gqa-causal-1500x777"])
def test_deterministic(heads_kv, causal, seqlen_q, seqlen_k, head_dim, asked_by):
    # Bit-identical results over 10 runs: no atomics, not even where dQ sums over key blocks or GQA sums
    # a kv head's gradients over its query heads. Asked for by deterministic=True, or by
    # torch.use_deterministic_algorithms(True), which must select the split backward over the
    # default deterministic=False.
    skip_unless_built(head_dim)
    qkv = random_qkv_with_grad(2, seqlen_q, seqlen_k, 8, heads_kv, head_dim, dtype=torch.bfloat16)
    dout = torch.randn_like(qkv[0])

    def run():
        out = flash_attn_func(*qkv, causal=causal, deterministic=asked_by == "argument")
        return (out.detach(), *torch.autograd.grad(out, qkv, dout))

    with deterministic_algorithms() if asked_by == "torch" else contextlib.nullcontext():
        first = run()
        for i in range(1, DETERMINISTIC_RUNS):
            for name, result, expected in zip(("out", *GRADS), run(), first):
                assert torch.equal(result, expected), f"{name} of run {i + 1} differs from run 1"
    check_bwd(first[1:], dout, *qkv, 1 / math.sqrt(head_dim), causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch, seqlen_q, seqlen_k", [(0, 8, 8), (2, 0, 8), (2, 8, 0), (2, 0, 0)])
def test_empty_inputs(batch, seqlen_q, seqlen_k, causal, deterministic):
    # No query or no key: nothing flows back, so every gradient is 0 (dk, dv too when seqlen_q = 0).
    skip_unless_built(64)
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, 8, 2, 64, dtype=torch.float16, device="cuda")
    out, lse = forward_into_nan(q, k, v, 0.125, causal)
    grads = backward_into_nan(torch.randn_like(q), q, k, v, out, lse, 0.125, causal, deterministic=deterministic)
    for name, grad in zip(GRADS, grads):
        assert (grad == 0).all(), f"{name} must be 0"


def test_runs_on_current_stream(deterministic):
    # Every launch, and in the atomic mode the fp32 dQ's zeroing and cast, on the caller's stream.
    skip_unless_built(64)
    q, k, v = random_qkv(2, 256, 256, 8, 2, 64, dtype=torch.float16, device="cuda")
    dout = torch.randn_like(q)
    out, lse = forward_into_nan(q, k, v, 0.125, causal=True)
    expected = backward_into_nan(dout, q, k, v, out, lse, 0.125, causal=True)
    dout_late = torch.full_like(dout, NAN)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # dout is written only after a ~50 ms spin on the side stream: a kernel launched on any
        # other stream would read the NaNs.
        torch.cuda._sleep(100_000_000)
        dout_late.copy_(dout)
        grads = backward_into_nan(dout_late, q, k, v, out, lse, 0.125, causal=True, deterministic=deterministic)
    torch.cuda.current_stream().wait_stream(side)
    if deterministic:
        for grad, grad_expected in zip(grads, expected):
            assert torch.equal(grad, grad_expected)
    else:  # the atomic dQ's order varies: its last bits may differ from the split backward's, NaN may not
        check_bwd(grads, dout, q, k, v, 0.125, causal=True)


def test_memory_linear_in_seqlen(deterministic):
    # Forward and backward keep O(seqlen) memory: out, lse, the gradients and fp32 scratch (the atomic
    # mode's dQ is 2 x q) come to a few times q's 64 MiB, while one fp32 seqlen x seqlen matrix per head would be 4 GiB.
    skip_unless_built(128)
    qkv = random_qkv_with_grad(1, 32768, 32768, 8, 8, 128, dtype=torch.bfloat16)
    dout = torch.randn_like(qkv[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(flash_attn_func(*qkv, deterministic=deterministic), qkv, dout)
    growth = torch.cuda.max_memory_allocated() - before
    q_bytes = qkv[0].numel() * qkv[0].element_size()
    assert growth <= 16 * q_bytes, f"forward + backward took {growth / 2**20:.0f} MiB > 16 x q"
    assert all(torch.isfinite(grad).all() for grad in grads)

"""The forward kernel against the float32 reference, on the GPU (skipped without one)."""

import math

import pytest
import torch

from conftest import (check_close, grid_qkv, on_kernel_grid, forward_into_nan, random_qkv, reference,
                      requires_ext, requires_gpu, skip_unless_built, strided_qkv)
from flash_attn2 import flash_attn_func

pytestmark = [requires_gpu, requires_ext, pytest.mark.usefixtures("fwd_path")]

NAN, INF = float("nan"), float("inf")


def check_fwd(out, lse, q, k, v, softmax_scale, causal, varlen=None):
    """out and lse against the fp32 reference by the 2x rule; rows that see no key: 0 and +inf.
    Varlen (per sequence) where varlen, a conftest.Varlen, is given."""
    out_ref, lse_ref = reference(q, k, v, softmax_scale, causal, varlen=varlen)
    out_pt, lse_pt = reference(q, k, v, softmax_scale, causal, compute_dtype=q.dtype, varlen=varlen)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    no_key = torch.isinf(lse_ref)  # (batch, heads_q, seqlen_q), or (heads_q, total_q)
    # out with its heads before its rows, (batch, heads_q, seqlen_q, head_dim) or (heads_q, total_q,
    # head_dim), to be indexed as lse is.
    assert (out.transpose(-3, -2)[no_key] == 0).all(), "rows that see no key must give out 0"
    assert (lse[no_key] == INF).all(), "rows that see no key must give lse +inf"
    check_close(out, out_ref, out_pt, "out")
    check_close(lse[~no_key], lse_ref[~no_key], lse_pt[~no_key], "lse")


@on_kernel_grid
def test_fwd(dtype, head_dim, causal, kv_heads, seqlens, batch_heads):
    q, k, v = grid_qkv(dtype, head_dim, kv_heads, seqlens, batch_heads)
    softmax_scale = 1 / math.sqrt(head_dim)
    out, lse = forward_into_nan(q, k, v, softmax_scale, causal)
    check_fwd(out, lse, q, k, v, softmax_scale, causal)


@pytest.mark.parametrize("softmax_scale", [None, 0.3])
@pytest.mark.parametrize("head_dim", [40, 59, 128])
def test_flash_attn_func(head_dim, softmax_scale):
    # The public entry: padding of odd head dims, the default scale 1/sqrt(real head_dim), and
    # return_attn_probs giving (out, lse, None).
    skip_unless_built(head_dim)
    q, k, v = random_qkv(2, 150, 100, 6, 2, head_dim, dtype=torch.bfloat16, device="cuda")
    out, lse, probs = flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=True,
                                      return_attn_probs=True)
    assert probs is None
    check_fwd(out, lse, q, k, v, softmax_scale or 1 / math.sqrt(head_dim), causal=True)
    assert torch.equal(flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=True), out)


@pytest.mark.parametrize("head_dim", [59, 64])
@pytest.mark.parametrize("layout", ["packed-qkv", "heads-first"])
def test_non_contiguous_inputs(layout, head_dim):
    skip_unless_built(head_dim)
    q, k, v = strided_qkv(layout, 2, 200, 4, head_dim, dtype=torch.float16, device="cuda")
    assert not q.is_contiguous()
    out = flash_attn_func(q, k, v, causal=True)
    q, k, v = (t.contiguous() for t in (q, k, v))
    assert torch.equal(out, flash_attn_func(q, k, v, causal=True))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch, seqlen_q, seqlen_k", [(0, 8, 8), (2, 0, 8), (2, 8, 0), (2, 0, 0)])
def test_empty_inputs(batch, seqlen_q, seqlen_k, causal):
    skip_unless_built(64)
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, 4, 2, 64, dtype=torch.float16, device="cuda")
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert lse.shape == (batch, 4, seqlen_q) and lse.dtype == torch.float32
    assert (out == 0).all() and (lse == INF).all()  # no key at all: out 0, lse +inf


def test_valid_call_after_each_rejected_call():
    # Rejected calls must leave nothing behind (state, a sticky CUDA error) that spoils the next.
    skip_unless_built(64)
    q, k, v = random_qkv(2, 64, 96, 4, 2, 64, dtype=torch.float16, device="cuda")
    expected = flash_attn_func(q, k, v, causal=True)
    bad_calls = [dict(dropout_p=1.5), dict(q=q.float()), dict(k=k[..., :32]), dict(v=v[:, :32]),
                 dict(q=q[..., ::2]), dict(softmax_scale=NAN), dict(k=k.cpu())]
    if torch.cuda.device_count() > 1:
        bad_calls.append(dict(k=k.to("cuda:1")))
    for bad in bad_calls:
        with pytest.raises((NotImplementedError, TypeError, ValueError)):
            flash_attn_func(**{"q": q, "k": k, "v": v, "causal": True, **bad})
        assert torch.equal(flash_attn_func(q, k, v, causal=True), expected), f"after {list(bad)}"


def test_runs_on_current_stream():
    skip_unless_built(64)
    q, k, v = random_qkv(2, 256, 256, 4, 4, 64, dtype=torch.float16, device="cuda")
    expected = flash_attn_func(q, k, v)
    q_late = torch.full_like(q, NAN)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # q is written only after a ~50 ms spin on the side stream: a kernel launched on any
        # other stream would read the NaNs.
        torch.cuda._sleep(100_000_000)
        q_late.copy_(q)
        out = flash_attn_func(q_late, k, v)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(out, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_another_gpu():
    # The kernel must run on the tensors' GPU, not on the current one.
    skip_unless_built(64)
    q, k, v = random_qkv(2, 128, 128, 4, 2, 64, dtype=torch.float16, device="cuda:0")
    expected = flash_attn_func(q, k, v, causal=True)
    out = flash_attn_func(q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1"), causal=True)
    assert out.device == torch.device("cuda:1") and torch.equal(out.cpu(), expected.cpu())



@pytest.mark.parametrize("offset", [0, 1], ids=["odd-stride", "odd-offset"])
def test_views_the_kernels_cannot_read_in_place(offset):
    # Head strides that are not a multiple of 8 elements, or a base that is not 16-byte aligned, would
    # break the kernels' 16-byte loads: flash_attn_func copies such views instead of faulting.
    skip_unless_built(64)
    wide = torch.randn(2, 100, 4, 3 * 65 + offset, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    q, k, v = (wide[..., offset + i * 65: offset + i * 65 + 64] for i in range(3))
    assert q.stride(2) % 8 != 0 and (offset == 0 or q.data_ptr() % 16 != 0)
    out = flash_attn_func(q, k, v, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = flash_attn_func(qc, kc, vc, causal=True)
    grads_c = torch.autograd.grad(out_c, (qc, kc, vc), dout)
    assert torch.equal(out, out_c)
    assert all(torch.equal(g, gc) for g, gc in zip(grads, grads_c))

"""How the kernels behave as part of a program: bit-identical results run after run, capture and
replay in a CUDA graph, and work ordered on the caller's current stream."""

import pytest
import torch

from conftest import DTYPES, random_qkv, requires_ext, requires_gpu, skip_unless_built
from flash_attn2 import flash_attn_func

pytestmark = [requires_gpu, requires_ext]

NAN = float("nan")
RESULTS = ("out", "lse", "dq", "dk", "dv")
REPEATS = 10


def forward_backward(qkv, dout, causal):
    """(out, lse, dq, dk, dv) of flash_attn_func and autograd; qkv are leaves that require grad. The
    deterministic backward: results are compared bit for bit."""
    out, lse, _ = flash_attn_func(*qkv, causal=causal, return_attn_probs=True, deterministic=True)
    return (out.detach(), lse, *torch.autograd.grad(out, qkv, dout))


def leaves(tensors):
    return [t.detach().requires_grad_() for t in tensors]


@pytest.mark.parametrize("batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, dtype", [
    (2, 1024, 1024, 8, 8, 64, False, "fp16"),
    (2, 1500, 777, 8, 2, 128, True, "bf16"),  # GQA, causal, rows that see no key
    (1, 777, 2049, 12, 3, 96, True, "fp16"),  # GQA, causal, seqlen_q < seqlen_k
    (3, 513, 1000, 8, 1, 59, True, "bf16"),  # MQA, a zero-padded head dim
    (1, 1100, 1100, 4, 2, 256, False, "bf16"),  # dK/dV split into column halves
], ids=["mha", "gqa-causal-1500x777", "gqa-causal-777x2049", "mqa-causal-d59", "gqa-d256"])
def test_deterministic(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, dtype):
    # No atomics anywhere, not where dQ sums over key blocks nor where GQA sums a kv head's gradients
    # over its query heads: every run gives the same bits.
    skip_unless_built(head_dim)
    qkv = leaves(random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype=DTYPES[dtype],
                            device="cuda"))
    dout = torch.randn_like(qkv[0])
    first = forward_backward(qkv, dout, causal)
    for run in range(1, REPEATS):
        for name, result, expected in zip(RESULTS, forward_backward(qkv, dout, causal), first):
            assert torch.equal(result, expected), f"{name} of run {run + 1} differs from run 1"


@pytest.mark.parametrize("head_dim, heads_kv, causal", [(64, 8, False), (128, 2, True), (59, 1, True)],
                         ids=["mha-d64", "gqa-causal-d128", "mqa-causal-d59"])
def test_cuda_graph(head_dim, heads_kv, causal):
    # Forward and backward captured once and replayed on new inputs copied into the static ones give
    # what eager calls give on those inputs, bit for bit.
    skip_unless_built(head_dim)
    shape = (2, 300, 513, 8, heads_kv, head_dim)
    static_qkv = leaves(random_qkv(*shape, dtype=torch.bfloat16, device="cuda"))
    static_dout = torch.randn_like(static_qkv[0])

    # Warm up on a side stream before capture, as PyTorch's CUDA graph notes ask.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward_backward(static_qkv, static_dout, causal)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_results = forward_backward(static_qkv, static_dout, causal)

    for replay in range(2):
        qkv = random_qkv(*shape, dtype=torch.bfloat16, device="cuda")
        dout = torch.randn_like(qkv[0])
        with torch.no_grad():
            for static, new in zip((*static_qkv, static_dout), (*qkv, dout)):
                static.copy_(new)
        graph.replay()
        expected = forward_backward(leaves(qkv), dout, causal)
        for name, result, eager in zip(RESULTS, static_results, expected):
            assert torch.equal(result, eager), f"{name} of replay {replay + 1} differs from eager"


@pytest.mark.parametrize("head_dim, heads_kv", [(64, 8), (59, 2)], ids=["mha-d64", "gqa-d59"])
def test_forward_backward_on_current_stream(head_dim, heads_kv):
    # Forward and backward through autograd, the padding, slicing and GQA sums included, all run on the
    # current stream: q and dout are written there only after a ~50 ms spin, so work launched on any
    # other stream would read their NaNs. (test_bwd_gpu tries the backward kernels alone.)
    skip_unless_built(head_dim)
    qkv = random_qkv(2, 256, 200, 8, heads_kv, head_dim, dtype=torch.float16, device="cuda")
    dout = torch.randn_like(qkv[0])
    expected = forward_backward(leaves(qkv), dout, causal=True)
    late = [torch.full_like(t, NAN) for t in (*qkv, dout)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        for tensor, value in zip(late, (*qkv, dout)):
            tensor.copy_(value)
        results = forward_backward(leaves(late[:3]), late[3], causal=True)
    torch.cuda.current_stream().wait_stream(side)
    for name, result, eager in zip(RESULTS, results, expected):
        assert torch.equal(result, eager), f"{name} differs when run on a side stream"

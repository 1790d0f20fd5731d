"""Inputs at the edges, through flash_attn_func and autograd: empty tensors give empty (or zero)
results, and a NaN or inf in one row of q or k reaches only what depends on that row, every other row,
head and batch element coming out bit-identical to the run on clean inputs."""

import pytest
import torch

from conftest import random_qkv, requires_ext, requires_gpu, skip_unless_built
from flash_attn2 import flash_attn_func, interface

pytestmark = [requires_gpu, requires_ext, pytest.mark.usefixtures("fwd_path", "bwd_path")]

NAN, INF = float("nan"), float("inf")
RESULTS = ("out", "lse", "dq", "dk", "dv")


def forward_backward(q, k, v, dout, causal):
    """(out, lse, dq, dk, dv) of flash_attn_func and autograd, the deterministic backward (compared bit for bit)."""
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_attn_func(*qkv, causal=causal, return_attn_probs=True, deterministic=True)
    return (out.detach(), lse, *torch.autograd.grad(out, qkv, dout))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim", [
    (0, 8, 8, 4, 2, 64), (2, 0, 8, 4, 2, 64), (2, 8, 0, 4, 2, 64), (2, 0, 0, 4, 2, 64),
    (2, 0, 8, 4, 2, 59), (2, 8, 0, 8, 1, 59),  # zero-padded head dims
    (2, 8, 8, 0, 2, 64),  # no query heads: out is empty, but k and v are not and get zero gradients
])
def test_empty(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal):
    skip_unless_built(head_dim)
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype=torch.float16,
                         device="cuda")
    out, lse, *grads = forward_backward(q, k, v, torch.randn_like(q), causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (batch, heads_q, seqlen_q) and lse.dtype == torch.float32
    assert (out == 0).all() and (lse == INF).all()  # no key at all: out 0, lse +inf
    for name, grad, like in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert grad.shape == like.shape and grad.dtype == like.dtype, name
        assert (grad == 0).all(), f"{name} must be 0: nothing attends to anything"


def test_no_query_heads_into_nan():
    # As above through interface._bwd into NaN-filled buffers, so that a gradient left unwritten fails
    # whatever the allocator hands out: with no query heads dk and dv are not empty and must be 0.
    skip_unless_built(64)
    q, k, v = random_qkv(2, 8, 8, 0, 2, 64, dtype=torch.float16, device="cuda")
    out, lse = torch.empty_like(q), torch.empty(2, 0, 8, dtype=torch.float32, device="cuda")
    interface._fwd(q, k, v, out, lse, 0.125, False)
    dq, dk, dv = (torch.full_like(t, NAN) for t in (q, k, v))
    interface._bwd(torch.randn_like(q), q, k, v, out, lse, dq, dk, dv, 0.125, False)
    assert (dk == 0).all() and (dv == 0).all()


# Non-finite rows: batch 2, 8 query heads on 2 kv heads, ragged seqlens, either one the longer.
# (Not named `seqlens`: conftest gives tests with that argument the shared grid.)
BATCH, HEADS_Q, HEADS_KV = 2, 8, 2
GROUP = HEADS_Q // HEADS_KV
SEQLENS = [(300, 200), (173, 391)]


def sees(seqlen_q, seqlen_k, causal):
    """(seqlen_q, seqlen_k) bool: query i sees key j (causal aligned bottom-right)."""
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device="cuda")
    return visible.tril(seqlen_k - seqlen_q) if causal else visible


def assert_split(name, result, clean, hit, must_be_nan, may_differ):
    """result equals clean bit for bit outside `may_differ`, and is NaN wherever `must_be_nan`.

    The masks index the leading dims of result (batch, seqlen, heads); must_be_nan lies in may_differ.
    """
    assert torch.equal(result[~may_differ], clean[~may_differ]), f"{name} changed where {hit} cannot reach"
    assert torch.isnan(result[must_be_nan]).all(), f"{name} is not NaN everywhere {hit} reaches"


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS, ids=["%dx%d" % s for s in SEQLENS])
@pytest.mark.parametrize("head_dim", [64, 59, 128])
def test_non_finite_query_row(head_dim, seqlen_q, seqlen_k, causal, value):
    # q[b, i, h] filled with NaN or inf: its scores are NaN (inf times keys of both signs), so out,
    # lse and dq of that row are NaN, as are dk and dv of the keys it sees (their gradients sum over
    # it). Nothing else reads the row: every other row of out, lse and dq, and dk, dv of the other batch
    # element and kv head, come out bit-identical. dk, dv of keys it does not see are left open: a
    # masked score still multiplies the row (0 * NaN) in a tile's matmul, as in autograd's.
    skip_unless_built(head_dim)
    q, k, v = random_qkv(BATCH, seqlen_q, seqlen_k, HEADS_Q, HEADS_KV, head_dim, dtype=torch.bfloat16,
                         device="cuda")
    dout = torch.randn_like(q)
    clean = forward_backward(q, k, v, dout, causal)
    b, i, h = 1, seqlen_q - 7, 5  # a row that sees keys, also when causal
    q[b, i, h] = value
    out, lse, dq, dk, dv = forward_backward(q, k, v, dout, causal)

    row = torch.zeros(BATCH, seqlen_q, HEADS_Q, dtype=torch.bool, device="cuda")
    row[b, i, h] = True
    hit = f"q[{b}, {i}, {h}] = {value}"
    assert_split("out", out, clean[0], hit, row, row)
    assert_split("lse", lse.transpose(1, 2), clean[1].transpose(1, 2), hit, row, row)
    assert_split("dq", dq, clean[2], hit, row, row)
    seen = torch.zeros(BATCH, seqlen_k, HEADS_KV, dtype=torch.bool, device="cuda")
    seen[b, :, h // GROUP] = sees(seqlen_q, seqlen_k, causal)[i]
    kv_head = torch.zeros_like(seen)
    kv_head[b, :, h // GROUP] = True
    assert_split("dk", dk, clean[3], hit, seen, kv_head)
    assert_split("dv", dv, clean[4], hit, seen, kv_head)


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", SEQLENS, ids=["%dx%d" % s for s in SEQLENS])
@pytest.mark.parametrize("head_dim", [64, 59, 128])
def test_non_finite_key_row(head_dim, seqlen_q, seqlen_k, causal, value):
    # k[b, j, kv] filled with NaN or inf: out and lse are NaN in the rows of the kv head's query heads
    # that see key j, and bit-identical in all others, the causally masked ones included (the mask must
    # replace the NaN score, not add to it). dk and dv of key j are NaN; the other gradients of batch b
    # in that group are left open (the NaN LSE of the rows that see j reaches every key they see, and a
    # masked score still multiplies k[j] in the dQ kernel's matmul); the rest stay bit-identical.
    skip_unless_built(head_dim)
    q, k, v = random_qkv(BATCH, seqlen_q, seqlen_k, HEADS_Q, HEADS_KV, head_dim, dtype=torch.float16,
                         device="cuda")
    dout = torch.randn_like(q)
    clean = forward_backward(q, k, v, dout, causal)
    b, j, kv = 1, seqlen_k - 20, 0  # seen by the last 20 query rows when causal, by every row when not
    k[b, j, kv] = value
    out, lse, dq, dk, dv = forward_backward(q, k, v, dout, causal)

    rows = torch.zeros(BATCH, seqlen_q, HEADS_Q, dtype=torch.bool, device="cuda")
    group = slice(kv * GROUP, (kv + 1) * GROUP)
    rows[b, :, group] = sees(seqlen_q, seqlen_k, causal)[:, j, None]
    assert causal == bool((~rows[b, :, group]).any()), "the key must be hidden from some rows iff causal"
    hit = f"k[{b}, {j}, {kv}] = {value}"
    assert_split("out", out, clean[0], hit, rows, rows)
    assert_split("lse", lse.transpose(1, 2), clean[1].transpose(1, 2), hit, rows, rows)
    group_rows = torch.zeros_like(rows)
    group_rows[b, :, group] = True
    assert_split("dq", dq, clean[2], hit, rows, group_rows)
    key = torch.zeros(BATCH, seqlen_k, HEADS_KV, dtype=torch.bool, device="cuda")
    key[b, j, kv] = True
    kv_head = torch.zeros_like(key)
    kv_head[b, :, kv] = True
    assert_split("dk", dk, clean[3], hit, key, kv_head)
    assert_split("dv", dv, clean[4], hit, key, kv_head)

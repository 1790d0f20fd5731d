"""The reference itself, on CPU, against attention written out one query row at a time; the varlen
reference against the fixed-length one run per sequence."""

import functools
import math

import pytest
import torch

import conftest
from flash_attn2.reference import attention_ref, attention_varlen_ref

INF = float("inf")


def naive_attention(q, k, v, softmax_scale, causal):
    """Attention one (batch, head, query) row at a time in float64, straight from the formula."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    out = torch.zeros(batch, seqlen_q, heads_q, head_dim, dtype=torch.float64)
    lse = torch.full((batch, heads_q, seqlen_q), INF, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads_q):
            kv_head = h // (heads_q // heads_kv)
            for i in range(seqlen_q):
                last = i + seqlen_k - seqlen_q if causal else seqlen_k - 1
                if last < 0:
                    continue  # this row sees no key
                keys = k[b, : last + 1, kv_head].double()
                scores = softmax_scale * (keys @ q[b, i, h].double())
                weights = scores.exp() / scores.exp().sum()
                out[b, i, h] = weights @ v[b, : last + 1, kv_head].double()
                lse[b, h, i] = scores.exp().sum().log()
    return out, lse


random_qkv = functools.partial(conftest.random_qkv, dtype=torch.float64, device="cpu")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(1, 1), (3, 7), (7, 3), (5, 5), (4, 0)])
@pytest.mark.parametrize("heads_q, heads_kv", [(2, 2), (6, 2), (3, 1)])
def test_matches_naive(seqlen_q, seqlen_k, causal, heads_q, heads_kv):
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, heads_q, heads_kv, 5)
    out_naive, lse_naive = naive_attention(q, k, v, 0.7, causal)
    for compute_dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        out, lse = attention_ref(q, k, v, 0.7, causal, compute_dtype)
        assert out.dtype == compute_dtype and lse.dtype == torch.float32
        torch.testing.assert_close(out.double(), out_naive, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, lse_naive.float())  # lse is always float32


def test_causal_is_bottom_right():
    # 3 queries, 5 keys: query i sees keys 0 .. i + 2, so the last query sees every key.
    q, k, v = random_qkv(1, 3, 5, 1, 1, 4)
    out, _ = attention_ref(q, k, v, causal=True, compute_dtype=torch.float64)
    for i in range(3):
        visible = slice(0, i + 3)
        row, _ = attention_ref(q[:, i : i + 1], k[:, visible], v[:, visible],
                               compute_dtype=torch.float64)
        torch.testing.assert_close(out[:, i : i + 1], row)


def test_rows_without_keys_give_zero_and_inf():
    # 5 queries, 3 keys: queries 0 and 1 see no key at all.
    q, k, v = random_qkv(2, 5, 3, 2, 2, 4)
    out, lse = attention_ref(q, k, v, causal=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :2] == 0).all() and (lse[..., :2] == INF).all()
    assert torch.isfinite(lse[..., 2:]).all() and (out[:, 2:] != 0).all()


def test_gqa_equals_repeated_heads():
    q, k, v = random_qkv(2, 4, 6, 8, 2, 4)
    out, lse = attention_ref(q, k, v, causal=True)
    k, v = (t.repeat_interleave(4, dim=2) for t in (k, v))  # kv head h // 4 for query head h
    out_mha, lse_mha = attention_ref(q, k, v, causal=True)
    assert torch.equal(out, out_mha) and torch.equal(lse, lse_mha)


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = random_qkv(2, 4, 6, 3, 3, 8)
    _, lse = attention_ref(q, k, v, compute_dtype=torch.float64)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8)  # default scale: 1/sqrt(head_dim)
    torch.testing.assert_close(lse, scores.logsumexp(-1).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_close_but_not_exact(dtype):
    q, k, v = (t.to(dtype) for t in random_qkv(2, 16, 24, 2, 2, 32))
    out_ref, lse_ref = attention_ref(q, k, v, causal=True)
    out_pt, lse_pt = attention_ref(q, k, v, causal=True, compute_dtype=dtype)
    assert out_pt.dtype == dtype and lse_pt.dtype == torch.float32
    torch.testing.assert_close(out_pt.float(), out_ref, atol=5e-2, rtol=0)
    torch.testing.assert_close(lse_pt, lse_ref, atol=5e-2, rtol=0)
    assert not torch.equal(out_pt.float(), out_ref)


def test_differentiable_with_rows_without_keys():
    # With 4 queries and 3 keys, query 0 sees no key: its gradients must be 0, not NaN.
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 3, 2, 1, 3))
    out_only = lambda q, k, v: attention_ref(q, k, v, causal=True, compute_dtype=torch.float64)[0]
    assert torch.autograd.gradcheck(out_only, (q, k, v))

    # lse is float32, too coarse for gradcheck: check that its gradients are finite.
    _, lse = attention_ref(q, k, v, causal=True, compute_dtype=torch.float64)
    lse[..., 1:].sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert (q.grad[:, 0] == 0).all()


# Varlen: (lengths_q, lengths_k), one pair per sequence: an empty sequence, no keys for some queries,
# no queries for some keys, and more queries than keys (causal rows with no key).
VARLEN_MIXES = {"ragged": ([3, 0, 7, 1, 5], [3, 0, 4, 6, 0]), "no-queries": ([0, 2], [5, 3]),
                "single": ([4], [9]), "all-empty": ([0, 0], [0, 0])}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mix", VARLEN_MIXES)
def test_varlen_matches_per_sequence(mix, causal):
    lengths_q, lengths_k = VARLEN_MIXES[mix]
    q, k, v, varlen = conftest.random_varlen(lengths_q, lengths_k, 6, 2, 5, dtype=torch.float64, device="cpu")
    bounds_q, bounds_k = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
    for compute_dtype in (torch.float64, torch.float32, torch.bfloat16):
        out, lse = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, 0.7, causal,
                                        compute_dtype)
        assert out.shape == q.shape and out.dtype == compute_dtype
        assert lse.shape == (6, q.shape[0]) and lse.dtype == torch.float32
        for b in range(len(lengths_q)):
            rows, keys = slice(*bounds_q[b:b + 2]), slice(*bounds_k[b:b + 2])
            out_b, lse_b = attention_ref(q[None, rows], k[None, keys], v[None, keys], 0.7, causal, compute_dtype)
            # The same arithmetic on the same rows: bit-identical, also in low precision.
            assert torch.equal(out[rows], out_b[0]) and torch.equal(lse[:, rows], lse_b[0])

    # And against the formula: each sequence on its own through naive_attention.
    out, lse = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, 0.7, causal,
                                    torch.float64)
    for b in range(len(lengths_q)):
        rows, keys = slice(*bounds_q[b:b + 2]), slice(*bounds_k[b:b + 2])
        out_naive, lse_naive = naive_attention(q[None, rows], k[None, keys], v[None, keys], 0.7, causal)
        torch.testing.assert_close(out[rows], out_naive[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[:, rows], lse_naive[0].float())


def test_varlen_rows_without_keys():
    # Sequence 0 has 2 queries and no key; in sequence 1 (4 queries, 2 keys) causal queries 0 and 1
    # see no key: out 0 and lse +inf there, never NaN.
    q, k, v, varlen = conftest.random_varlen([2, 4], [0, 2], 2, 1, 4, dtype=torch.float64, device="cpu")
    out, lse = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, causal=True)
    no_key = torch.tensor([True, True, True, True, False, False])
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[no_key] == 0).all() and (lse[:, no_key] == INF).all()
    assert torch.isfinite(lse[:, ~no_key]).all()


def test_varlen_empty_batch():
    # cu_seqlens of one entry: no sequence, no rows.
    q, k, v, varlen = conftest.random_varlen([], [], 4, 2, 8, dtype=torch.float32, device="cpu")
    out, lse = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, causal=True,
                                    compute_dtype=torch.float16)
    assert out.shape == (0, 4, 8) and out.dtype == torch.float16
    assert lse.shape == (4, 0) and lse.dtype == torch.float32


def test_varlen_default_scale():
    q, k, v, varlen = conftest.random_varlen([3, 5], [4, 2], 2, 2, 16, dtype=torch.float64, device="cpu")
    out, lse = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, compute_dtype=torch.float64)
    out_scaled, lse_scaled = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, 16 ** -0.5,
                                                  compute_dtype=torch.float64)
    assert torch.equal(out, out_scaled) and torch.equal(lse, lse_scaled)


def test_varlen_differentiable():
    # Through every sequence, the empty one and rows without keys too: gradients are the per-sequence
    # ones, and 0 (not NaN) where nothing is seen.
    q, k, v, varlen = conftest.random_varlen([2, 0, 3], [1, 2, 3], 2, 1, 3, dtype=torch.float64, device="cpu")
    leaves = [t.requires_grad_() for t in (q, k, v)]

    def out_only(q, k, v):
        return attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, causal=True,
                                    compute_dtype=torch.float64)[0]

    assert torch.autograd.gradcheck(out_only, leaves)
    dq, dk, dv = torch.autograd.grad(out_only(*leaves), leaves, torch.ones(5, 2, 3, dtype=torch.float64))
    assert (dq[0] == 0).all()  # causal, 2 queries on 1 key: query 0 sees none
    assert (dk[1:3] == 0).all() and (dv[1:3] == 0).all()  # the keys of the sequence with no query

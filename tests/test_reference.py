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


# ---- The variants of issue 11 (window, softcap, ALiBi, sink), each against a formulation of its own.

def loop_visible(seqlen_q, seqlen_k, causal, window_size):
    """The window by brute force, one (i, j) at a time: key j is visible to query i iff its offset from
    i's diagonal, j - (i + seqlen_k - seqlen_q), lies in [-left, right] (-1: unbounded; causal: right 0)."""
    left, right = window_size
    if causal:
        right = 0
    rows = []
    for i in range(seqlen_q):
        offsets = [j - (i + seqlen_k - seqlen_q) for j in range(seqlen_k)]
        rows.append([(left == -1 or -left <= o) and (right == -1 or o <= right) for o in offsets])
    return torch.tensor(rows, dtype=torch.bool).reshape(seqlen_q, seqlen_k)


def naive_variant_attention(q, k, v, softmax_scale, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                            s_aux=None):
    """Attention one (batch, head, query) row at a time in float64 with scalar math for the logits: the
    window from loop_visible, softcap by math.tanh, the ALiBi bias by hand, the sink as one more term of
    the denominator. Rows that see no key: out 0, lse +inf (s_aux[h] with a sink)."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    visible = loop_visible(seqlen_q, seqlen_k, causal, window_size)
    out = torch.zeros(batch, seqlen_q, heads_q, head_dim, dtype=torch.float64)
    lse = torch.full((batch, heads_q, seqlen_q), INF, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads_q):
            kv_head = h // (heads_q // heads_kv)
            slope = None
            if alibi_slopes is not None:
                slope = float(alibi_slopes[b, h] if alibi_slopes.dim() == 2 else alibi_slopes[h])
            for i in range(seqlen_q):
                logits, values = [], []
                for j in range(seqlen_k):
                    if not visible[i, j]:
                        continue
                    x = softmax_scale * float(q[b, i, h].double() @ k[b, j, kv_head].double())
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    if slope is not None:
                        x -= slope * abs(i + seqlen_k - seqlen_q - j)
                    logits.append(x)
                    values.append(v[b, j, kv_head].double())
                weights = [math.exp(x) for x in logits]
                denominator = sum(weights) + (math.exp(float(s_aux[h])) if s_aux is not None else 0.0)
                if denominator == 0:
                    continue  # no key and no sink
                lse[b, h, i] = math.log(denominator)
                for weight, value in zip(weights, values):
                    out[b, i, h] += weight / denominator * value
    return out, lse


def alibi(heads, batch=None):
    """ALiBi's geometric slopes 2^(-8 (h + 1) / heads), fp32; per (batch, head) scaled per sequence."""
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32)
    if batch is None:
        return slopes
    return slopes * torch.linspace(0.5, 2.0, batch, dtype=torch.float32)[:, None]


def sinks(heads):
    """Sink logits of either sign and far apart, fp32 (heads,)."""
    return torch.linspace(-2.0, 3.0, heads, dtype=torch.float32)


def keys_of(visible_rows):
    """A literal mask from strings of '1' and '.', one per query."""
    return torch.tensor([[c == "1" for c in row] for row in visible_rows], dtype=torch.bool)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window_size", [(-1, -1), (0, 0), (2, 0), (0, 2), (-1, 1), (3, -1), (1, 2), (20, 20)])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(5, 5), (3, 8), (8, 3), (1, 6), (6, 1), (4, 0)])
def test_visible_keys_match_the_loop(seqlen_q, seqlen_k, window_size, causal):
    from flash_attn2.reference import visible_keys

    expected = loop_visible(seqlen_q, seqlen_k, causal, window_size)
    assert torch.equal(visible_keys(seqlen_q, seqlen_k, causal, window_size), expected)


@pytest.mark.parametrize("seqlen_q, seqlen_k, causal, window_size, rows", [
    # 3 queries on 5 keys: the diagonal of query i is key i + 2.
    (3, 5, False, (1, 0), [".11..", "..11.", "...11"]),
    (3, 5, False, (0, 1), ["..11.", "...11", "....1"]),
    (3, 5, True, (0, 7), ["..1..", "...1.", "....1"]),  # causal: right forced to 0
    (3, 5, False, (-1, 0), ["111..", "1111.", "11111"]),  # (-1, 0) is causal
    # 5 queries on 2 keys: the diagonal of query i is key i - 3; queries 0 to 2 see no key with right 0.
    (5, 2, True, (-1, -1), ["..", "..", "..", "1.", "11"]),
    (5, 2, False, (0, 2), ["..", "1.", "11", "11", ".1"]),
    # A right bound as long as the keys still cuts when seqlen_q > seqlen_k (no normalisation).
    (5, 2, False, (-1, 2), ["..", "1.", "11", "11", "11"]),
])
def test_visible_keys_by_hand(seqlen_q, seqlen_k, causal, window_size, rows):
    from flash_attn2.reference import visible_keys

    assert torch.equal(visible_keys(seqlen_q, seqlen_k, causal, window_size), keys_of(rows))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window_size", [(0, 0), (2, 1), (-1, 1), (1, -1)])
def test_window_row_is_attention_on_its_keys(window_size, causal):
    # Each row of a windowed call is plain attention over the contiguous run of keys it sees.
    q, k, v = random_qkv(2, 6, 9, 4, 2, 5)
    out, lse = attention_ref(q, k, v, 0.6, causal, torch.float64, window_size=window_size)
    left, right = window_size
    for i in range(6):
        diagonal = i + 3
        first = 0 if left == -1 else max(0, diagonal - left)
        last = 8 if right == -1 and not causal else min(8, diagonal + (0 if causal else right))
        keys = slice(first, last + 1)
        row, row_lse = attention_ref(q[:, i:i + 1], k[:, keys], v[:, keys], 0.6, compute_dtype=torch.float64)
        torch.testing.assert_close(out[:, i:i + 1], row, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[..., i:i + 1], row_lse)


# (id, keyword arguments of attention_ref with tensors made for (batch, heads_q) = (2, 6)) for the
# comparisons against naive_variant_attention; causal is a parameter of its own.
VARIANTS = {
    "window": lambda: dict(window_size=(2, 1)),
    "window-left": lambda: dict(window_size=(1, -1)),
    "window-past-keys": lambda: dict(window_size=(50, 50)),
    "softcap": lambda: dict(softcap=0.9),
    "alibi-heads": lambda: dict(alibi_slopes=alibi(6)),
    "alibi-batch-heads": lambda: dict(alibi_slopes=alibi(6, batch=2)),
    "sink": lambda: dict(s_aux=sinks(6)),
    "sink-window": lambda: dict(s_aux=sinks(6), window_size=(1, 0)),
    "everything": lambda: dict(window_size=(3, 1), softcap=1.3, alibi_slopes=alibi(6, batch=2), s_aux=sinks(6)),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(4, 7), (7, 4), (5, 5), (3, 0)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_naive(variant, seqlen_q, seqlen_k, causal):
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, 6, 2, 5)
    options = VARIANTS[variant]()
    out_naive, lse_naive = naive_variant_attention(q, k, v, 0.8, causal, **options)
    for compute_dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        out, lse = attention_ref(q, k, v, 0.8, causal, compute_dtype, **options)
        assert out.dtype == compute_dtype and lse.dtype == torch.float32
        assert not out.isnan().any() and not lse.isnan().any()
        torch.testing.assert_close(out.double(), out_naive, atol=tol, rtol=tol)
        torch.testing.assert_close(lse, lse_naive.float())


@pytest.mark.parametrize("variant", [name for name in VARIANTS if name != "window-past-keys"])
def test_variants_change_the_result(variant):
    # So that test_variants_match_naive cannot pass with a variant ignored on both sides.
    q, k, v = random_qkv(2, 5, 7, 6, 2, 5)
    out, lse = attention_ref(q, k, v, 0.8, False, torch.float64, **VARIANTS[variant]())
    out_plain, lse_plain = attention_ref(q, k, v, 0.8, False, torch.float64)
    assert (out - out_plain).abs().max() > 1e-2 and (lse - lse_plain).abs().max() > 1e-2


def test_window_past_the_keys_is_no_window():
    q, k, v = random_qkv(2, 5, 7, 6, 2, 5)
    for causal in (False, True):
        expected = attention_ref(q, k, v, 0.8, causal, torch.float64)
        for window_size in [(7, 7), (100, -1), (-1, 100)]:
            got = attention_ref(q, k, v, 0.8, causal, torch.float64, window_size=window_size)
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), window_size


def test_off_values_are_the_plain_call():
    q, k, v = random_qkv(2, 5, 7, 6, 2, 5)
    for causal in (False, True):
        plain = attention_ref(q, k, v, 0.8, causal)
        off = attention_ref(q, k, v, 0.8, causal, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None)
        assert torch.equal(plain[0], off[0]) and torch.equal(plain[1], off[1])


def test_causal_forces_right_zero():
    # causal keeps left and replaces right by 0: (3, 5) causal is (3, 0) with or without causal.
    q, k, v = random_qkv(2, 6, 9, 4, 2, 5)
    expected = attention_ref(q, k, v, 0.6, False, torch.float64, window_size=(3, 0))
    for causal, window_size in [(True, (3, 5)), (True, (3, -1)), (True, (3, 0))]:
        got = attention_ref(q, k, v, 0.6, causal, torch.float64, window_size=window_size)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    causal = attention_ref(q, k, v, 0.6, True, torch.float64)
    unbounded_left = attention_ref(q, k, v, 0.6, False, torch.float64, window_size=(-1, 0))
    assert torch.equal(causal[0], unbounded_left[0])


def explicit_alibi_attention(q, k, v, softmax_scale, causal, slopes):
    """softmax(scale·QKᵀ + B)·V in float64 with an explicit (batch, heads, seqlen_q, seqlen_k) bias B
    built entry by entry, every query head given its kv head by repeat_interleave; seqlen_q <= seqlen_k,
    so that every row sees a key."""
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    bias = torch.zeros(batch, heads_q, seqlen_q, seqlen_k, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads_q):
            slope = float(slopes[b, h] if slopes.dim() == 2 else slopes[h])
            for i in range(seqlen_q):
                for j in range(seqlen_k):
                    bias[b, h, i, j] = -slope * abs(i + seqlen_k - seqlen_q - j)
                    if causal and j > i + seqlen_k - seqlen_q:
                        bias[b, h, i, j] = -INF
    k, v = (t.double().repeat_interleave(heads_q // k.shape[2], dim=2) for t in (k, v))
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * softmax_scale + bias
    out = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v)
    return out, logits.logsumexp(-1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", ["heads", "batch-heads"])
@pytest.mark.parametrize("seqlen_q, seqlen_k", [(4, 9), (6, 6), (1, 5)])
def test_alibi_matches_explicit_bias(seqlen_q, seqlen_k, shape, causal):
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, 6, 3, 4)
    slopes = alibi(6) if shape == "heads" else alibi(6, batch=2)
    out, lse = attention_ref(q, k, v, 0.5, causal, torch.float64, alibi_slopes=slopes)
    out_explicit, lse_explicit = explicit_alibi_attention(q, k, v, 0.5, causal, slopes)
    torch.testing.assert_close(out, out_explicit, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_explicit.float())


def with_sink_key(q, k, v, softmax_scale, s_aux):
    """q and k with one more head-dim column, k and v with one more key, such that plain attention on them
    is attention with the sink s_aux (MHA): q's new column is 1, the real keys' 0, and the extra key (the
    last) is 0 but for s_aux[h] / softmax_scale in that column, so its logit is s_aux[h]; its value is 0."""
    batch, seqlen_q, heads, head_dim = q.shape
    ones = torch.ones(batch, seqlen_q, heads, 1, dtype=q.dtype)
    sink_key = torch.cat([torch.zeros(batch, 1, heads, head_dim, dtype=k.dtype),
                          (s_aux.to(k.dtype) / softmax_scale).expand(batch, 1, heads)[..., None]], dim=-1)
    k_real = torch.cat([k, torch.zeros(*k.shape[:3], 1, dtype=k.dtype)], dim=-1)
    return (torch.cat([q, ones], dim=-1), torch.cat([k_real, sink_key], dim=1),
            torch.cat([v, torch.zeros(batch, 1, heads, head_dim, dtype=v.dtype)], dim=1))


@pytest.mark.parametrize("seqlen_q, seqlen_k", [(4, 6), (6, 3), (3, 0)])
def test_sink_is_an_extra_key_with_zero_value(seqlen_q, seqlen_k):
    q, k, v = random_qkv(2, seqlen_q, seqlen_k, 4, 4, 5)
    s_aux = sinks(4).double().requires_grad_()
    dout = torch.randn(2, seqlen_q, 4, 5, dtype=torch.float64)
    out, lse = attention_ref(q, k, v, 0.7, False, torch.float64, s_aux=s_aux)
    (ds_aux,) = torch.autograd.grad(out, s_aux, dout)

    leaf = s_aux.detach().requires_grad_()
    q_x, k_x, v_x = with_sink_key(q, k, v, 0.7, leaf)
    out_x, lse_x = attention_ref(q_x, k_x, v_x, 0.7, False, torch.float64)
    torch.testing.assert_close(out, out_x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_x)
    (ds_aux_x,) = torch.autograd.grad(out_x, leaf, dout)
    torch.testing.assert_close(ds_aux, ds_aux_x, atol=1e-12, rtol=1e-12)

    # And the contract's closed form: d s_aux[h] = -sum_rows exp(s_aux[h] - lse_i) · rowsum(dout_i ∘ out_i),
    # with lse in float64 from the scores written out.
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.7
    lse64 = torch.logaddexp(scores.logsumexp(-1), s_aux.detach()[None, :, None])  # (batch, heads, seqlen_q)
    rowsum = (dout * out.detach()).sum(-1).transpose(1, 2)  # (batch, heads, seqlen_q)
    closed = -(torch.exp(s_aux.detach()[None, :, None] - lse64) * rowsum).sum((0, 2))
    torch.testing.assert_close(ds_aux, closed, atol=1e-12, rtol=1e-12)
    if seqlen_k == 0:
        assert (lse == s_aux.detach().float()[None, :, None]).all() and (out == 0).all() and (ds_aux == 0).all()


def test_rows_without_keys_with_variants():
    # 6 queries on 3 keys, causal with window (1, 0): queries 0 to 2 see no key. Out 0 and lse +inf, or
    # lse s_aux[h] with a sink; gradients finite, and 0 for those rows' queries.
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 6, 3, 4, 2, 5))
    s_aux = sinks(4).double().requires_grad_()
    for options in (dict(softcap=0.8, alibi_slopes=alibi(4, batch=2)), dict(s_aux=s_aux, alibi_slopes=alibi(4))):
        out, lse = attention_ref(q, k, v, 0.7, True, torch.float64, window_size=(1, 0), **options)
        assert not out.isnan().any() and not lse.isnan().any()
        assert (out[:, :3] == 0).all() and torch.isfinite(lse[..., 3:]).all()
        expected = (s_aux.detach().float()[None, :, None] if "s_aux" in options else INF)
        assert (lse[..., :3] == expected).all()
        leaves = [q, k, v] + ([s_aux] if "s_aux" in options else [])
        grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][:, :3] == 0).all()


def test_softcap_gradcheck():
    # Softcap's derivative, 1 - tanh², through autograd, in float64 (with a row that sees no key).
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 3, 2, 1, 3))
    out_only = lambda q, k, v: attention_ref(q, k, v, 1.5, True, torch.float64, softcap=0.6)[0]
    assert torch.autograd.gradcheck(out_only, (q, k, v))


def test_sink_gradcheck_with_window():
    # q, k, v and s_aux together, causal with a window and GQA; query 0 sees no key (4 queries, 3 keys).
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 3, 4, 2, 3))
    s_aux = sinks(4).double().requires_grad_()

    def out_only(q, k, v, s_aux):
        return attention_ref(q, k, v, 0.9, True, torch.float64, window_size=(1, 0), alibi_slopes=alibi(4),
                             softcap=2.0, s_aux=s_aux)[0]

    assert torch.autograd.gradcheck(out_only, (q, k, v, s_aux))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_variants_close_but_not_exact(dtype):
    q, k, v = (t.to(dtype) for t in random_qkv(2, 16, 24, 4, 2, 32))
    options = dict(window_size=(5, 0), softcap=3.0, alibi_slopes=alibi(4, batch=2), s_aux=sinks(4))
    out_ref, lse_ref = attention_ref(q, k, v, None, True, **options)
    out_pt, lse_pt = attention_ref(q, k, v, None, True, compute_dtype=dtype, **options)
    assert out_pt.dtype == dtype and lse_pt.dtype == torch.float32
    torch.testing.assert_close(out_pt.float(), out_ref, atol=5e-2, rtol=0)
    torch.testing.assert_close(lse_pt, lse_ref, atol=5e-2, rtol=0)
    assert not torch.equal(out_pt.float(), out_ref)


VARLEN_VARIANTS = {
    "window-causal": lambda batch: dict(window_size=(1, 0)),
    "softcap-alibi-batch-heads": lambda batch: dict(softcap=0.9, alibi_slopes=alibi(6, batch=batch)),
    "sink-window": lambda batch: dict(s_aux=sinks(6), window_size=(2, 1), alibi_slopes=alibi(6)),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("variant", VARLEN_VARIANTS)
@pytest.mark.parametrize("mix", VARLEN_MIXES)
def test_varlen_variants_match_per_sequence(mix, variant, causal):
    lengths_q, lengths_k = VARLEN_MIXES[mix]
    q, k, v, varlen = conftest.random_varlen(lengths_q, lengths_k, 6, 2, 5, dtype=torch.float64, device="cpu")
    options = VARLEN_VARIANTS[variant](len(lengths_q))
    bounds_q, bounds_k = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
    slopes = options.get("alibi_slopes")

    def of_sequence(b):
        """options for sequence b alone: (batch, heads) slopes cut to its row."""
        if slopes is None or slopes.dim() == 1:
            return options
        return {**options, "alibi_slopes": slopes[b:b + 1]}

    for compute_dtype in (torch.float64, torch.bfloat16):
        out, lse = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, 0.7, causal,
                                        compute_dtype, **options)
        assert out.shape == q.shape and lse.shape == (6, q.shape[0])
        for b in range(len(lengths_q)):
            rows, keys = slice(*bounds_q[b:b + 2]), slice(*bounds_k[b:b + 2])
            out_b, lse_b = attention_ref(q[None, rows], k[None, keys], v[None, keys], 0.7, causal, compute_dtype,
                                         **of_sequence(b))
            assert torch.equal(out[rows], out_b[0]) and torch.equal(lse[:, rows], lse_b[0])
            if compute_dtype == torch.float64:
                out_n, lse_n = naive_variant_attention(q[None, rows], k[None, keys], v[None, keys], 0.7, causal,
                                                       **of_sequence(b))
                torch.testing.assert_close(out[rows], out_n[0], atol=1e-12, rtol=1e-12)
                torch.testing.assert_close(lse[:, rows], lse_n[0].float())


def test_varlen_sink_gradient_is_the_sum_over_sequences():
    # One s_aux serves every sequence: its gradient is the sum of the per-sequence ones.
    q, k, v, varlen = conftest.random_varlen([3, 0, 5], [4, 2, 1], 4, 2, 5, dtype=torch.float64, device="cpu")
    s_aux = sinks(4).double().requires_grad_()
    dout = torch.randn_like(q)
    out, _ = attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, 0.7, True, torch.float64,
                                  window_size=(2, 0), s_aux=s_aux)
    (ds_aux,) = torch.autograd.grad(out, s_aux, dout)
    bounds_q, bounds_k = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
    total = torch.zeros(4, dtype=torch.float64)
    for b in range(3):
        rows, keys = slice(*bounds_q[b:b + 2]), slice(*bounds_k[b:b + 2])
        leaf = s_aux.detach().requires_grad_()
        out_b, _ = attention_ref(q[None, rows], k[None, keys], v[None, keys], 0.7, True, torch.float64,
                                 window_size=(2, 0), s_aux=leaf)
        total += torch.autograd.grad(out_b, leaf, dout[None, rows], allow_unused=True)[0]
    torch.testing.assert_close(ds_aux, total, atol=1e-12, rtol=1e-12)

"""dropout_p is checked before any launch by every entry point, naming the argument: a real number (int or
float; bool not allowed, nor a tensor) else TypeError, finite and in [0, 1) else ValueError; it is the first
rule checked. Also, on CPU: the reference's Philox against the generator's published known-answer vectors,
and the reference's dropout semantics. No GPU and no extension needed: a valid call on CPU tensors meets
the device rule."""

import math

import pytest
import torch

from flash_attn2.reference import attention_ref, attention_varlen_ref, dropout_keep_mask_ref, philox4x32_10
from test_input_checks import message
from test_variants_input_checks import ENTRIES, call

INF, NAN = float("inf"), float("nan")

# (id, dropout_p, exception, what the message says)
BAD_DROPOUT = [
    ("str", "0.1", TypeError, "float"),
    ("none", None, TypeError, "float"),
    ("bool-true", True, TypeError, "float"),
    ("bool-false", False, TypeError, "float"),
    ("tensor", torch.tensor(0.1), TypeError, "float"),
    ("complex", 0.1j, TypeError, "float"),
    ("list", [0.1], TypeError, "float"),
    ("negative", -0.1, ValueError, r"\[0, 1\)"),
    ("negative-int", -1, ValueError, r"\[0, 1\)"),
    ("one", 1.0, ValueError, r"\[0, 1\)"),
    ("one-int", 1, ValueError, r"\[0, 1\)"),
    ("above-one", 1.5, ValueError, r"\[0, 1\)"),
    ("nan", NAN, ValueError, "finite"),
    ("inf", INF, ValueError, "finite"),
    ("neg-inf", -INF, ValueError, "finite"),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dropout_p, error, rule", [case[1:] for case in BAD_DROPOUT],
                         ids=[case[0] for case in BAD_DROPOUT])
def test_bad_dropout_p(entry, dropout_p, error, rule):
    with pytest.raises(error, match=message("dropout_p", rule)):
        call(entry, dropout_p=dropout_p)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dropout_p", [0, 0.0, 1e-9, 0.1, 0.5, 0.999999, math.nextafter(1.0, 0.0)])
def test_valid_dropout_p_reaches_the_device_rule(entry, dropout_p):
    # On CPU tensors only the device rule is left to fail: dropout_p itself passed.
    _, _, first = ENTRIES[entry]
    with pytest.raises(ValueError, match=message(first, "CUDA")):
        call(entry, dropout_p=dropout_p)


@pytest.mark.parametrize("entry", ENTRIES)
def test_dropout_is_checked_first(entry):
    # Two faults: a bad dropout_p and a float32 q (or qkv): the dropout rule comes first, as the other features'.
    name = "qkv" if entry.endswith("qkvpacked") else "q"
    bad_q = dict(call_args_with_float32(entry, name))
    with pytest.raises(ValueError, match=message("dropout_p", r"\[0, 1\)")):
        call(entry, dropout_p=2.0, **bad_q)


def call_args_with_float32(entry, name):
    _, arguments, _ = ENTRIES[entry]
    return {name: arguments()[name].float()}


# Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter, key -> output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32_10(counter, key)) == expected


def test_reference_keep_mask():
    # Deterministic in (seed, offset); another offset or seed gives another mask; about 1 - p kept; p -> 0 keeps
    # (nearly) all.
    mask = dropout_keep_mask_ref(7, 40, 0.3, 2, 3, 50, 70)
    assert mask.dtype == torch.bool and mask.shape == (2, 3, 50, 70)
    assert torch.equal(mask, dropout_keep_mask_ref(7, 40, 0.3, 2, 3, 50, 70))
    assert not torch.equal(mask, dropout_keep_mask_ref(7, 44, 0.3, 2, 3, 50, 70))
    assert not torch.equal(mask, dropout_keep_mask_ref(8, 40, 0.3, 2, 3, 50, 70))
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])
    n = mask.numel()
    assert abs(mask.float().mean().item() - 0.7) <= 4 * math.sqrt(0.21 / n)
    assert dropout_keep_mask_ref(7, 40, 0.0, 2, 3, 50, 70).all()


def test_reference_dropout_semantics():
    # out = (P * mask / (1 - p)) @ v, lse undropped: keeping everything scales out by 1 / (1 - p), dropping
    # everything gives 0, and a mask keeps exactly the columns of P it says.
    q, k, v = (torch.randn(2, 9, 4, 16, dtype=torch.float64) for _ in range(3))
    out, lse = attention_ref(q, k, v, causal=True, compute_dtype=torch.float64)
    keep_all = torch.ones(2, 4, 9, 9, dtype=torch.bool)
    out_all, lse_all = attention_ref(q, k, v, causal=True, compute_dtype=torch.float64, dropout_p=0.25,
                                     dropout_mask=keep_all)
    torch.testing.assert_close(out_all, out / 0.75)
    assert torch.equal(lse_all, lse)
    out_none, _ = attention_ref(q, k, v, causal=True, compute_dtype=torch.float64, dropout_p=0.25,
                                dropout_mask=~keep_all)
    assert (out_none == 0).all()
    mask = torch.rand(2, 4, 9, 9) < 0.6
    out_m, _ = attention_ref(q, k, v, causal=True, compute_dtype=torch.float64, dropout_p=0.4, dropout_mask=mask)
    scores = (q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)) / 4
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -INF)
    p = torch.softmax(scores, dim=-1) * mask / 0.6
    torch.testing.assert_close(out_m, (p @ v.transpose(1, 2)).transpose(1, 2))


def test_varlen_reference_takes_each_sequence_mask():
    # A (batch, heads, max_q, max_k) mask: sequence b uses its top-left corner, as the kernels index it.
    lengths_q, lengths_k = [3, 5], [4, 6]
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 4, 10], dtype=torch.int32)
    q, k, v = torch.randn(8, 2, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    mask = torch.rand(2, 2, 5, 6) < 0.5
    out, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, dropout_p=0.5, dropout_mask=mask)
    for b, (q0, k0) in enumerate([(0, 0), (3, 4)]):
        sq, sk = lengths_q[b], lengths_k[b]
        expected, _ = attention_ref(q[None, q0:q0 + sq], k[None, k0:k0 + sk], v[None, k0:k0 + sk], dropout_p=0.5,
                                    dropout_mask=mask[b:b + 1, :, :sq, :sk])
        torch.testing.assert_close(out[q0:q0 + sq], expected[0])

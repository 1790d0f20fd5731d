"""Attention dropout (issue 11) on the GPU (skipped without one).

- The keep mask: the debug kernel's (flash_attn2.dropout_keep_mask) equals, bit for bit, the scheme written
  independently in numpy (reference.dropout_keep_mask_ref); its kept fraction over a large tensor is within
  4 sigma of 1 - p, and entries that share a Philox call are uncorrelated.
- Forward and backward of the kernels against the float32 reference given that same mask (the 2x / 3x rule
  of test_variants_gpu), alone and with causal, window + causal + GQA, softcap, ALiBi + causal, sinks, every
  head dim, fixed-length and varlen: a kernel that dropped other entries than the mask says would be off by
  whole probabilities.
- return_attn_probs: the probabilities, negated where dropped, through flash_attn_func and the packed entry.
- Statistics of the output: its mean over many seeds approaches the dropout-free output.
- Reproducibility: torch.manual_seed gives bit-identical out and gradients, another seed other ones, two calls
  in a row differ; the backward with one rng_state is deterministic; CUDA graphs: replays differ from each
  other (the offset advances) and each matches eager runs with the replay's (seed, offset).
"""

import math

import pytest
import torch

from conftest import check_close, random_qkv, random_varlen, requires_ext, requires_gpu, skip_unless_built
from flash_attn2 import (dropout_keep_mask, flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func)
from flash_attn2._ops import _bwd_op, _fwd_op
from flash_attn2.reference import attention_ref, attention_scores, dropout_keep_mask_ref
from test_varlen_gpu import assert_equal, run
from test_variants_gpu import (BATCH, HEADS_Q, RESULTS, VARIANTS, VARLEN_MIX, Variant, check_results, options,
                               softmax_scale_of)

pytestmark = [requires_gpu, requires_ext, pytest.mark.usefixtures("fwd_path", "sm90_bwd_general")]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
P = 0.17  # not a multiple of 1/256 or 1/2^16: a threshold rounded the wrong way shows in the kept fraction

# The variants dropout is combined with here (test_variants_gpu's, by name), and plain attention.
DROPOUT_VARIANTS = {"plain": Variant(), "causal": Variant(causal=True), **{
    name: VARIANTS[name] for name in ("win-100-0-causal", "softcap-30", "softcap-30-win-causal",
                                      "alibi-heads-causal", "sink", "everything")}}


def op_call(q, k, v, variant, opts, softmax_scale, dropout_p, varlen=None):
    """(out, lse, rng_state) of the forward op, q, k, v unpacked (head dims multiples of 8)."""
    cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, 0, 0)
    left, right = opts["window_size"]
    return _fwd_op(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, variant.causal, left, right, opts["softcap"],
                   opts["alibi_slopes"], opts["s_aux"], dropout_p)


def op_backward(dout, q, k, v, out, lse, rng_state, variant, opts, softmax_scale, dropout_p, varlen=None,
                deterministic=True):
    """dq, dk, dv (and ds_aux with a sink) of the backward op with the forward's rng_state, in the backward mode
    deterministic."""
    cu_q, cu_k, max_q, max_k = varlen if varlen is not None else (None, None, 0, 0)
    left, right = opts["window_size"]
    return _bwd_op(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, variant.causal, left, right,
                   opts["softcap"], opts["alibi_slopes"], opts["s_aux"], dropout_p, rng_state, deterministic)


def mask_of(rng_state, q, k, varlen=None):
    """The kernels' keep mask for this forward: (batch, heads, seqlen_q, seqlen_k), per sequence for varlen."""
    if varlen is None:
        return dropout_keep_mask(rng_state, P, q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return dropout_keep_mask(rng_state, P, len(varlen.cu_seqlens_q) - 1, q.shape[1], varlen.max_seqlen_q,
                             varlen.max_seqlen_k)


def check_dropout_variant(q, k, v, variant, opts, varlen=None, deterministic=True):
    """Forward and backward with dropout P, against the reference with the kernels' own mask."""
    softmax_scale = softmax_scale_of(variant, q.shape[-1])
    out, lse, rng_state = op_call(q, k, v, variant, opts, softmax_scale, P, varlen)
    assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
    dout = torch.randn_like(q)
    grads = op_backward(dout, q, k, v, out, lse, rng_state, variant, opts, softmax_scale, P, varlen, deterministic)
    mask = mask_of(rng_state, q, k, varlen)
    # A tenth of the entries or more dropped: a kernel ignoring the mask fails (plain_must_differ).
    check_results((out, lse, *grads), dout, q, k, v, softmax_scale, variant,
                  {**opts, "dropout_p": P, "dropout_mask": mask}, varlen)


@pytest.mark.parametrize("shape", [(113, 203), (1023, 1024)], ids=lambda s: "%dx%d" % s)
@pytest.mark.parametrize("variant", DROPOUT_VARIANTS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))
def test_dropout(dtype, head_dim, variant, shape, deterministic):
    # GQA (8 query heads on 2 kv heads), as test_variants_gpu.
    skip_unless_built(head_dim)
    seqlen_q, seqlen_k = shape
    q, k, v = random_qkv(BATCH, seqlen_q, seqlen_k, HEADS_Q, 2, head_dim, dtype=dtype, device="cuda")
    variant = DROPOUT_VARIANTS[variant]
    check_dropout_variant(q, k, v, variant, options(variant, BATCH, HEADS_Q, seqlen_k), deterministic=deterministic)


@pytest.mark.parametrize("variant", ["causal", "everything"])
@pytest.mark.parametrize("head_dim", [32, 96, 192, 256])
def test_dropout_head_dims(head_dim, variant, deterministic):
    # 192 and 256: the dK/dV kernel's warps split the query columns (kWarpsN > 1), the mask's unpaired path.
    skip_unless_built(head_dim)
    q, k, v = random_qkv(BATCH, 217, 300, HEADS_Q, 2, head_dim, dtype=torch.bfloat16, device="cuda")
    variant = DROPOUT_VARIANTS[variant]
    check_dropout_variant(q, k, v, variant, options(variant, BATCH, HEADS_Q, 300), deterministic=deterministic)


@pytest.mark.parametrize("variant", ["plain", "causal", "everything"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dropout_varlen(head_dim, variant, deterministic):
    # Sequences with seqlen_q != seqlen_k both ways, an empty one, one without keys: each masked in its own
    # coordinates with its batch index.
    skip_unless_built(head_dim)
    q, k, v, varlen = random_varlen(*VARLEN_MIX, HEADS_Q, 2, head_dim, dtype=torch.float16, device="cuda")
    variant = DROPOUT_VARIANTS[variant]
    check_dropout_variant(q, k, v, variant, options(variant, len(VARLEN_MIX[0]), HEADS_Q, varlen.max_seqlen_k),
                          varlen, deterministic)


def rng_state_of(seed, offset):
    as_int64 = [s - 2 ** 64 if s >= 2 ** 63 else s for s in (seed, offset)]
    return torch.tensor(as_int64, dtype=torch.int64, device="cuda")


@pytest.mark.parametrize("seed, offset", [(0, 0), (2 ** 64 - 5, 2 ** 40 + 12), (123456789, 2 ** 32 - 2)])
def test_keep_mask_is_the_documented_scheme(seed, offset):
    # 77 x 45: ragged against the 16 x 16 units; offsets near 2^32 carry into the counter's top word.
    batch, heads, seqlen_q, seqlen_k = 2, 3, 77, 45
    keep = dropout_keep_mask(rng_state_of(seed, offset), P, batch, heads, seqlen_q, seqlen_k)
    expected = dropout_keep_mask_ref(seed, offset, P, batch, heads, seqlen_q, seqlen_k)
    assert keep.dtype == torch.bool and keep.shape == expected.shape
    assert torch.equal(keep.cpu(), expected), f"{(keep.cpu() != expected).sum().item()} entries differ"


@pytest.mark.parametrize("dropout_p", [0.1, P, 0.5, 0.9])
def test_kept_fraction(dropout_p):
    # 32M entries: 4 sigma is 1.6e-4 to 3.5e-4 here, below the 1/512 that an 8-bit threshold would be off by.
    rng_state = rng_state_of(torch.randint(0, 2 ** 62, ()).item(), 4 * torch.randint(0, 2 ** 30, ()).item())
    keep = dropout_keep_mask(rng_state, dropout_p, 4, 8, 1024, 1024)
    n = keep.numel()
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / n)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - dropout_p)) <= 4 * sigma, f"kept {kept:.6f}, expected {1 - dropout_p} +- {4 * sigma:.2g}"
    # Entries that one Philox call covers ((i, i + 8) x (j, j + 1, j + 8, j + 9)) and neighbours across calls:
    # each pair kept together with probability (1 - p)^2, each position in a 16 x 16 tile kept 1 - p of the time.
    k = keep.view(4, 8, 64, 16, 64, 16).float()  # (b, h, query tile, query in tile, key tile, key in tile)
    for name, a, b in [("keys j, j+1", k[..., 0::2], k[..., 1::2]), ("keys j, j+8", k[..., :8], k[..., 8:]),
                       ("queries i, i+8", k[:, :, :, :8], k[:, :, :, 8:]),
                       ("queries i, i+1", k[:, :, :, 0::2], k[:, :, :, 1::2])]:
        both = (a * b).mean().item()
        sigma_pair = math.sqrt((1 - dropout_p) ** 2 * (1 - (1 - dropout_p) ** 2) / a.numel())
        assert abs(both - (1 - dropout_p) ** 2) <= 4 * sigma_pair, f"{name}: kept together {both:.5f}"
    per_position = k.mean(dim=(0, 1, 2, 4))  # (16, 16)
    sigma_position = math.sqrt(dropout_p * (1 - dropout_p) / (n / 256))
    worst = (per_position - (1 - dropout_p)).abs().max().item()
    # 256 positions: 5 sigma for the largest of them.
    assert worst <= 5 * sigma_position, f"a position in the 16 x 16 tile is kept {worst:.2g} off 1 - p"


def test_return_attn_probs():
    # The probabilities: |probs| = exp(score - lse) (the kernel's lse, to fp32 round-off), negative where dropped,
    # about p of the visible entries; out is the reference with the mask that the signs give.
    skip_unless_built(64)
    q, k, v = random_qkv(2, 150, 230, 4, 2, 64, dtype=torch.float16, device="cuda")
    opts = dict(window_size=(100, 0), alibi_slopes=torch.rand(4, device="cuda") * 0.1)
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=P, causal=True, return_attn_probs=True, **opts)
    assert probs.dtype == torch.float32 and probs.shape == (2, 4, 150, 230)
    expected_out, expected_lse = attention_ref(q, k, v, None, True, **opts)
    torch.testing.assert_close(lse, expected_lse, atol=1e-4, rtol=1e-5)
    probs_ref = torch.exp(attention_scores(q, k, None, True, **opts) - expected_lse.unsqueeze(-1))
    torch.testing.assert_close(probs.abs(), probs_ref, atol=1e-6, rtol=1e-3)
    dropped, visible = probs < 0, probs_ref > 0
    kept_fraction = (~dropped)[visible].float().mean().item()
    assert abs(kept_fraction - (1 - P)) < 0.01, f"kept {kept_fraction:.3f} of the visible entries"
    ref = attention_ref(q, k, v, None, True, dropout_p=P, dropout_mask=~dropped, **opts)[0]
    low = attention_ref(q, k, v, None, True, torch.float16, dropout_p=P, dropout_mask=~dropped, **opts)[0]
    check_close(out, ref, low, "out")
    assert not torch.equal(expected_out.to(out.dtype), out)
    # Without dropout the third value stays None; varlen refuses probabilities with dropout.
    assert flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[2] is None
    q1, k1, v1, varlen = random_varlen([5, 9], [7, 9], 4, 2, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        flash_attn_varlen_func(q1, k1, v1, *varlen, dropout_p=P, return_attn_probs=True)


def test_packed_probs_give_the_packed_mask():
    # The qkvpacked entry takes the same path: its probabilities' signs are the mask its output used.
    skip_unless_built(64)
    qkv = torch.randn(2, 100, 3, 4, 64, dtype=torch.bfloat16, device="cuda")
    out, lse, probs = flash_attn_qkvpacked_func(qkv, dropout_p=P, return_attn_probs=True)
    q, k, v = qkv.unbind(2)
    ref = attention_ref(q, k, v, dropout_p=P, dropout_mask=probs >= 0)[0]
    low = attention_ref(q, k, v, compute_dtype=torch.bfloat16, dropout_p=P, dropout_mask=probs >= 0)[0]
    check_close(out, ref, low, "out")


def test_mean_over_seeds_is_the_dropout_free_output():
    # E[out] = out without dropout: the mean of 400 draws must be within 6 standard errors of it everywhere
    # (the largest |z| of 32k entries is about 4.3; 6 is passed by chance once in 10^4 runs). A kernel that
    # left out the 1 / (1 - p), applied it twice, or dropped entries from the row sums too is off by 20 or more.
    skip_unless_built(64)
    q, k, v = random_qkv(1, 64, 128, 8, 8, 64, dtype=torch.float16, device="cuda")
    q = q * 0.3  # flat attention: many keys share each row, so that dropping moves out a little at a time
    draws = 400
    outs = torch.stack([flash_attn_func(q, k, v, dropout_p=0.5).float() for _ in range(draws)])
    expected, _ = attention_ref(q, k, v)
    mean, stderr = outs.mean(0), outs.std(0) / math.sqrt(draws)
    z = ((mean - expected) / stderr).abs()
    assert z.max().item() <= 6, f"mean over seeds is {z.max().item():.1f} standard errors off the expected out"
    assert ((outs[0] - expected).abs() > 10 * stderr).any(), "single draws should be far from the mean"


def training_call(seed, q, k, v, dout, **kwargs):
    """out and gradients of flash_attn_func with dropout after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return run(lambda *t: flash_attn_func(*t, dropout_p=P, return_attn_probs=True, deterministic=True,
                                          **kwargs)[:2] + (None,),
               (q, k, v), dout)


def test_reproducible_with_a_seed():
    skip_unless_built(128)
    q, k, v = random_qkv(2, 300, 300, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    dout = torch.randn_like(q)
    first = training_call(1234, q, k, v, dout, causal=True)
    assert_equal(training_call(1234, q, k, v, dout, causal=True), first, RESULTS)
    other = training_call(1235, q, k, v, dout, causal=True)
    assert not torch.equal(other[0], first[0]), "another seed must drop other entries"
    torch.manual_seed(1234)
    a, b = flash_attn_func(q, k, v, dropout_p=P), flash_attn_func(q, k, v, dropout_p=P)
    assert not torch.equal(a, b), "two calls in a row must draw different masks"


def test_rng_state_advances():
    # Each forward moves the generator on by batch * heads (rounded up to 4) streams: consecutive calls never
    # share a Philox counter.
    skip_unless_built(64)
    q, k, v = random_qkv(3, 40, 40, 5, 5, 64, dtype=torch.float16, device="cuda")
    variant, opts = Variant(), options(Variant(), 3, 5, 40)
    torch.manual_seed(99)
    states = [op_call(q, k, v, variant, opts, 0.125, P)[2].tolist() for _ in range(3)]
    assert states[0][0] == states[1][0] == states[2][0], "one seed"
    increment = (3 * 5 + 3) // 4 * 4
    assert [s[1] - states[0][1] for s in states] == [0, increment, 2 * increment]


def test_backward_is_deterministic():
    skip_unless_built(128)
    q, k, v = random_qkv(2, 500, 700, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    variant = VARIANTS["everything"]
    opts = options(variant, 2, 8, 700)
    scale = softmax_scale_of(variant, 128)
    out, lse, rng_state = op_call(q, k, v, variant, opts, scale, P)
    dout = torch.randn_like(q)
    first = op_backward(dout, q, k, v, out, lse, rng_state, variant, opts, scale, P)
    second = op_backward(dout, q, k, v, out, lse, rng_state, variant, opts, scale, P)
    assert_equal(second, first, ("dq", "dk", "dv", "ds_aux"))


def test_cuda_graph_replays_draw_new_masks():
    # A graph of forward + backward with dropout: each replay reads the generator's new offset, so replays
    # differ; each is what eager calls give with that replay's (seed, offset) (the forward after setting the
    # generator there, the backward given the replay's rng_state).
    skip_unless_built(64)
    q, k, v = random_qkv(2, 200, 200, 4, 2, 64, dtype=torch.float16, device="cuda")
    dout = torch.randn_like(q)
    variant, opts = Variant(causal=True), options(Variant(causal=True), 2, 4, 200)

    def step():
        out, lse, rng_state = op_call(q, k, v, variant, opts, 0.125, P)
        return (out, lse, rng_state, *op_backward(dout, q, k, v, out, lse, rng_state, variant, opts, 0.125, P))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    replays = []
    for _ in range(2):
        graph.replay()
        replays.append([t.clone() for t in static])
    torch.cuda.synchronize()
    (out_a, *_), (out_b, *_) = replays
    assert not torch.equal(out_a, out_b), "replays must draw new masks"
    assert replays[0][2][1] != replays[1][2][1], "the offset must advance between replays"
    generator = torch.cuda.default_generators[q.device.index or 0]
    for out, lse, rng_state, *grads in replays:
        seed, offset = rng_state.tolist()
        generator.manual_seed(seed % 2 ** 64)
        generator.set_offset(offset)
        out_e, lse_e, rng_e = op_call(q, k, v, variant, opts, 0.125, P)
        assert torch.equal(rng_e, rng_state)
        assert_equal((out_e, lse_e), (out, lse), ("out", "lse"))
        grads_e = op_backward(dout, q, k, v, out, lse, rng_state, variant, opts, 0.125, P)
        assert_equal(grads_e, grads, ("dq", "dk", "dv"))

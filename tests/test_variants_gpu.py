"""The attention variants of issue 11 on the GPU (skipped without one): sliding window, softcap, ALiBi and
learnable sinks (s_aux), alone and in the combinations users run, against the float32 reference
(flash_attn2.reference with the same variant) by the forward's 2x and the backward's 3x rule, into
NaN-filled buffers; fixed-length and varlen; the sink's gradient through the public entries; the packed
entries bit for bit against the unpacked ones with a variant on; determinism; and every variant at its
'off' value giving the plain call's bits.

--large-grid adds head dims and shapes to the main grid, and every variant to test_heads_kv (MHA, MQA).
"""

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from conftest import (ERROR_FLOOR, KV_HEADS, check_close, lse_shape, random_qkv, random_varlen, requires_ext,
                      requires_gpu, skip_unless_built, varlen_of)
from flash_attn2 import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                         flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                         flash_attn_varlen_qkvpacked_func)
from flash_attn2.interface import _bwd, _fwd
from flash_attn2.reference import attention_ref, attention_varlen_ref, visible_keys
from test_bwd_gpu import GRAD_ERROR_FACTOR, GRADS
from test_varlen_gpu import (LENGTH_MIXES, VARLEN_LENGTHS_K, VARLEN_LENGTHS_Q, assert_equal, packed_grads, run,
                             unpacked)

pytestmark = [requires_gpu, requires_ext, pytest.mark.usefixtures("fwd_path", "sm90_bwd_general")]

NAN, INF = float("nan"), float("inf")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS = ("out", "lse", *GRADS, "ds_aux")
BATCH, HEADS_Q = 2, 8


class Variant(NamedTuple):
    """One setting of the score arguments; the tensors (slopes, sinks) are drawn per test by options()."""
    causal: bool = False
    window_size: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: str = ""  # "heads": slopes (heads,); "batch-heads": (batch, heads); "": none
    sink: bool = False


VARIANTS = {
    "win-0-0": Variant(window_size=(0, 0)),  # each query sees one key, its diagonal's
    "win-64-64": Variant(window_size=(64, 64)),
    "win-37-none": Variant(window_size=(37, -1)),
    "win-none-33": Variant(window_size=(-1, 33)),
    "win-none-0": Variant(window_size=(-1, 0)),  # causal, spelled as a window
    "win-100-0": Variant(window_size=(100, 0)),
    "win-100-0-causal": Variant(causal=True, window_size=(100, 0)),
    "win-50-9-causal": Variant(causal=True, window_size=(50, 9)),  # causal forces right to 0
    "win-past-keys": Variant(window_size=(5000, 5000)),  # cuts nothing
    "softcap-30": Variant(softcap=30.0),
    "softcap-50-causal": Variant(causal=True, softcap=50.0),
    "softcap-30-win-causal": Variant(causal=True, window_size=(70, 0), softcap=30.0),  # as Gemma 2
    "alibi-heads": Variant(alibi="heads"),
    "alibi-heads-causal": Variant(causal=True, alibi="heads"),
    "alibi-batch-heads": Variant(alibi="batch-heads"),
    "alibi-batch-heads-causal": Variant(causal=True, alibi="batch-heads"),
    "sink": Variant(sink=True),
    "sink-win-causal": Variant(causal=True, window_size=(90, 0), sink=True),  # as gpt-oss
    "everything": Variant(causal=True, window_size=(120, 0), softcap=30.0, alibi="batch-heads", sink=True),
}
# The few that the head-dim sweep, heads_kv and the packed entries try: every feature at least once.
SWEEP_VARIANTS = ["win-50-9-causal", "softcap-30-win-causal", "alibi-batch-heads-causal", "sink-win-causal",
                  "everything"]
SINK_VARIANTS = [name for name, variant in VARIANTS.items() if variant.sink]

# The main grid; --large-grid adds to each.
GRID_HEAD_DIMS, LARGE_HEAD_DIMS = [64, 128], [32, 96, 192, 256, 40, 59]
GRID_SEQLENS = [(113, 203), (217, 128), (1, 239), (1023, 1024)]
LARGE_SEQLENS = [(3, 5), (64, 64), (128, 217), (511, 1537), (1537, 511), (2048, 2048)]
KV_VARIANTS = ["win-100-0-causal", "alibi-batch-heads-causal", "sink-win-causal"]
SWEEP_HEAD_DIMS = [32, 96, 192, 256, 59]


def pytest_generate_tests(metafunc):
    """The main grid's head dims and shapes, and test_heads_kv's variants (names of their own, apart from
    conftest's grid): --large-grid adds to each."""
    large = metafunc.config.getoption("--large-grid")
    if "grid_head_dim" in metafunc.fixturenames:
        metafunc.parametrize("grid_head_dim", GRID_HEAD_DIMS + (LARGE_HEAD_DIMS if large else []))
    if "grid_seqlens" in metafunc.fixturenames:
        metafunc.parametrize("grid_seqlens", GRID_SEQLENS + (LARGE_SEQLENS if large else []),
                             ids=lambda s: "%dx%d" % s)
    if "kv_variant" in metafunc.fixturenames:
        metafunc.parametrize("kv_variant", list(VARIANTS) if large else KV_VARIANTS)


def on_dtypes(test):
    return pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES))(test)


def softmax_scale_of(variant, head_dim):
    """1/sqrt(head_dim), or with softcap one that spreads the scores of randn inputs over softcap/3 (their
    spread is scale·sqrt(head_dim)), so that the cap bends the largest and a kernel that skipped it would fail."""
    if variant.softcap > 0:
        return variant.softcap / (3 * math.sqrt(head_dim))
    return head_dim ** -0.5


def alibi_slopes(variant, batch, heads):
    """ALiBi's geometric slopes 2^(-8 (h + 1) / heads), fp32 on the GPU; (batch, heads) ones each scaled by a
    random factor in [0.5, 2], so that a kernel reading the wrong row or head fails."""
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32, device="cuda")
    if variant.alibi == "heads":
        return slopes
    assert variant.alibi == "batch-heads"
    return slopes * (0.5 + 1.5 * torch.rand(batch, heads, device="cuda"))


def sink_logits(heads, seqlen_k):
    """s_aux around a row's log-sum-exp (log seqlen_k for randn inputs), from far below (the sink barely
    matters) to far above it (the sink takes most of each row), in random order over the heads."""
    spread = torch.linspace(-4.0, 4.0, heads, device="cuda")[torch.randperm(heads, device="cuda")]
    return (math.log(seqlen_k + 1) + spread + 0.1 * torch.randn(heads, device="cuda")).float()


def options(variant, batch, heads, seqlen_k):
    """The score arguments of the public entries and of the reference for this variant, tensors drawn afresh:
    window_size, softcap, alibi_slopes, s_aux (batch: the number of sequences for varlen)."""
    return dict(window_size=variant.window_size, softcap=variant.softcap,
                alibi_slopes=alibi_slopes(variant, batch, heads) if variant.alibi else None,
                s_aux=sink_logits(heads, seqlen_k) if variant.sink else None)


def hook_options(opts):
    """The same, as interface._fwd and _bwd take them (window, not window_size)."""
    return dict(window=tuple(opts["window_size"]), softcap=opts["softcap"], alibi_slopes=opts["alibi_slopes"],
                s_aux=opts["s_aux"])


def reference(q, k, v, softmax_scale, causal, opts, compute_dtype=torch.float32, varlen=None):
    if varlen is None:
        return attention_ref(q, k, v, softmax_scale, causal, compute_dtype, **opts)
    return attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, softmax_scale, causal,
                                compute_dtype, **opts)


def rows_without_keys(lengths_q, lengths_k, causal, window_size):
    """bool (total query rows,): the rows that see no key, sequence by sequence."""
    rows = [~visible_keys(sq, sk, causal, window_size, "cuda").any(-1) for sq, sk in zip(lengths_q, lengths_k)]
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.bool, device="cuda")


def lengths_of(q, k, varlen):
    """(lengths_q, lengths_k), one pair per sequence (one for fixed length: each batch entry alike)."""
    if varlen is None:
        return [q.shape[1]], [k.shape[1]]
    cu_q, cu_k = varlen.cu_seqlens_q.tolist(), varlen.cu_seqlens_k.tolist()
    return [b - a for a, b in zip(cu_q, cu_q[1:])], [b - a for a, b in zip(cu_k, cu_k[1:])]


def row_slice(t, rows, varlen, heads_first=False):
    """The entries of those query rows: out and dq hold rows in dim 1 (fixed) or 0 (varlen), lse in dim 2 or 1."""
    dim = (1 if varlen is not None else 2) if heads_first else (0 if varlen is not None else 1)
    return t[(slice(None),) * dim + (rows,)]


def forward_into_nan(q, k, v, softmax_scale, causal, opts, varlen=None):
    """_fwd with the variant into NaN-filled out and lse (head dims padded to 8 with zeros, as the entries
    do), so that any element it leaves unwritten fails."""
    head_dim = q.shape[-1]
    q, k, v = (F.pad(t, (0, -head_dim % 8)) for t in (q, k, v))
    out = torch.full_like(q, NAN)
    lse = torch.full(lse_shape(q, varlen), NAN, dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, softmax_scale, causal, *(varlen or ()), **hook_options(opts))
    assert (out[..., head_dim:] == 0).all(), "padding columns of out must be 0 (v is 0 there)"
    return out[..., :head_dim], lse


def backward_into_nan(dout, q, k, v, out, lse, softmax_scale, causal, opts, varlen=None, deterministic=True):
    """_bwd with the variant into NaN-filled dq, dk, dv, in the backward mode deterministic."""
    head_dim = q.shape[-1]
    dout, q, k, v, out = (F.pad(t, (0, -head_dim % 8)) for t in (dout, q, k, v, out))
    grads = tuple(torch.full_like(t, NAN) for t in (q, k, v))
    _bwd(dout, q, k, v, out, lse, *grads, softmax_scale, causal, *(varlen or ()), **hook_options(opts),
         deterministic=deterministic)
    for name, grad in zip(GRADS, grads):
        assert (grad[..., head_dim:] == 0).all(), f"padding columns of {name} must be 0"
    return tuple(grad[..., :head_dim] for grad in grads)


def reference_with_grads(dout, q, k, v, softmax_scale, causal, opts, compute_dtype, varlen=None):
    """(out, lse, dq, dk, dv, ds_aux or None) of the reference by autograd, leaves in compute_dtype (s_aux
    stays fp32, as the kernels take it)."""
    leaves = [t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v)]
    if opts["s_aux"] is not None:
        opts = {**opts, "s_aux": opts["s_aux"].detach().clone().requires_grad_()}
        leaves.append(opts["s_aux"])
    out, lse = reference(*leaves[:3], softmax_scale, causal, opts, compute_dtype, varlen)
    grads = torch.autograd.grad(out, leaves, dout.to(compute_dtype), allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]  # no rows at all
    return (out.detach(), lse, *grads, *([None] * (4 - len(grads))))


def check_results(results, dout, q, k, v, softmax_scale, variant, opts, varlen=None, plain_must_differ=True):
    """results (out, lse, dq, dk, dv[, ds_aux]) against the fp32 reference by the 2x (out, lse) and 3x
    (gradients) rule; on rows that see no key: out 0, dq 0, and lse +inf (s_aux[h], to the error floor, with a
    sink). plain_must_differ: the variant must move the reference's out by more than the error bound, or a
    kernel ignoring it could pass."""
    causal = variant.causal
    expected = reference_with_grads(dout, q, k, v, softmax_scale, causal, opts, torch.float32, varlen)
    low = reference_with_grads(dout, q, k, v, softmax_scale, causal, opts, q.dtype, varlen)
    out, lse, *grads = results
    out_ref, lse_ref = expected[:2]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape

    no_key = rows_without_keys(*lengths_of(q, k, varlen), causal, variant.window_size)
    assert (row_slice(out, no_key, varlen) == 0).all(), "rows that see no key must give out 0"
    if opts["s_aux"] is None:
        assert (row_slice(lse, no_key, varlen, heads_first=True) == INF).all(), "rows that see no key: lse +inf"
    finite = torch.isfinite(lse_ref)
    check_close(out, out_ref, low[0], "out")
    check_close(lse[finite], lse_ref[finite], low[1][finite], "lse")
    names = GRADS + (("ds_aux",) if len(grads) == 4 else ())
    for name, grad, like, ref, pt in zip(names, grads, (q, k, v, opts["s_aux"]), expected[2:], low[2:]):
        assert grad.dtype == like.dtype and grad.shape == like.shape, f"{name}: dtype or shape"
        check_close(grad, ref, pt, name, factor=GRAD_ERROR_FACTOR)
    assert (row_slice(grads[0], no_key, varlen) == 0).all(), "rows that see no key must give dq 0"

    if plain_must_differ:
        plain, _ = reference(q, k, v, softmax_scale, causal, {}, varlen=varlen)
        bound = 2 * (low[0].double() - out_ref.double()).abs().max().item() + ERROR_FLOOR
        moved = (plain.double() - out_ref.double()).abs().max().item() if out.numel() else 0.0
        assert moved > bound, f"the variant moves out by {moved:.3g} only, within the error bound {bound:.3g}"


def changes_anything(variant, lengths_q, lengths_k):
    """Whether the variant should change the plain (same causal) result on these lengths."""
    if variant.softcap or variant.alibi or variant.sink:
        return True
    return any(not torch.equal(visible_keys(sq, sk, variant.causal, variant.window_size),
                               visible_keys(sq, sk, variant.causal)) for sq, sk in zip(lengths_q, lengths_k))


def check_variant(q, k, v, variant, opts, varlen=None, deterministic=True):
    """Forward and backward through the kernels into poisoned buffers, checked by check_results."""
    softmax_scale = softmax_scale_of(variant, q.shape[-1])
    dout = torch.randn_like(q)
    out, lse = forward_into_nan(q, k, v, softmax_scale, variant.causal, opts, varlen)
    grads = backward_into_nan(dout, q, k, v, out, lse, softmax_scale, variant.causal, opts, varlen, deterministic)
    check_results((out, lse, *grads), dout, q, k, v, softmax_scale, variant, opts, varlen,
                  plain_must_differ=changes_anything(variant, *lengths_of(q, k, varlen)))


@pytest.mark.parametrize("variant", VARIANTS)
@on_dtypes
def test_variant(dtype, grid_head_dim, variant, grid_seqlens, deterministic):
    # GQA (8 query heads on 2 kv heads), so that slopes or sinks read by the kv head would fail.
    skip_unless_built(grid_head_dim)
    seqlen_q, seqlen_k = grid_seqlens
    q, k, v = random_qkv(BATCH, seqlen_q, seqlen_k, HEADS_Q, 2, grid_head_dim, dtype=dtype, device="cuda")
    check_variant(q, k, v, VARIANTS[variant], options(VARIANTS[variant], BATCH, HEADS_Q, seqlen_k),
                  deterministic=deterministic)


@pytest.mark.parametrize("variant", SWEEP_VARIANTS)
@pytest.mark.parametrize("head_dim", SWEEP_HEAD_DIMS)
@on_dtypes
def test_head_dim_sweep(dtype, head_dim, variant):
    skip_unless_built(head_dim)
    q, k, v = random_qkv(BATCH, 113, 203, HEADS_Q, 2, head_dim, dtype=dtype, device="cuda")
    check_variant(q, k, v, VARIANTS[variant], options(VARIANTS[variant], BATCH, HEADS_Q, 203))


@pytest.mark.parametrize("kv_heads", ["mha", "mqa"])
@on_dtypes
def test_heads_kv(dtype, kv_heads, kv_variant):
    # Slopes and sinks are indexed by the query head, whatever heads_kv is (the grid runs GQA).
    skip_unless_built(128)
    variant = VARIANTS[kv_variant]
    q, k, v = random_qkv(BATCH, 217, 300, HEADS_Q, KV_HEADS[kv_heads](HEADS_Q), 128, dtype=dtype, device="cuda")
    check_variant(q, k, v, variant, options(variant, BATCH, HEADS_Q, 300))


# Bounds past the keys, by the contract's formula with no normalisation: with seqlen_q > seqlen_k a right
# bound as long as the keys still hides keys from the first queries (flash_attn 2.x would have treated it
# as unbounded), while a left bound that long never cuts anything.
PAST_KEYS = [(217, 128, False, (-1, 128)), (300, 100, False, (150, 150)), (300, 100, True, (100, 0)),
             (100, 300, False, (300, 300))]


@pytest.mark.parametrize("seqlen_q, seqlen_k, causal, window_size", PAST_KEYS,
                         ids=[f"{sq}x{sk}-{'causal' if c else 'full'}-win{w[0]}_{w[1]}" for sq, sk, c, w in PAST_KEYS])
def test_window_bounds_past_the_keys(seqlen_q, seqlen_k, causal, window_size):
    skip_unless_built(64)
    q, k, v = random_qkv(BATCH, seqlen_q, seqlen_k, HEADS_Q, 2, 64, dtype=torch.float16, device="cuda")
    variant = Variant(causal=causal, window_size=window_size)
    check_variant(q, k, v, variant, options(variant, BATCH, HEADS_Q, seqlen_k))
    left, right = window_size
    if seqlen_q > seqlen_k and right >= seqlen_k and not causal:
        # So that this case tells the formula from flash_attn's normalisation (right -> -1).
        assert not torch.equal(visible_keys(seqlen_q, seqlen_k, False, window_size),
                               visible_keys(seqlen_q, seqlen_k, False, (left, -1)))


# Varlen: sequences with seqlen_q != seqlen_k both ways, an empty one, one without keys and one without
# queries (test_varlen_gpu's "q-ne-k"); alibi (batch, heads) has a row per sequence.
VARLEN_MIX = LENGTH_MIXES["q-ne-k"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("head_dim", [64, 128])
@on_dtypes
def test_varlen_variant(dtype, head_dim, variant, deterministic):
    skip_unless_built(head_dim)
    q, k, v, varlen = random_varlen(*VARLEN_MIX, HEADS_Q, 2, head_dim, dtype=dtype, device="cuda")
    check_variant(q, k, v, VARIANTS[variant], options(VARIANTS[variant], len(VARLEN_MIX[0]), HEADS_Q,
                                                      varlen.max_seqlen_k), varlen, deterministic)


def public_call(entry_varlen, variant, opts, softmax_scale, deterministic=True):
    """A call (q, k, v, s_aux) -> (out, lse, None) of flash_attn_func or flash_attn_varlen_func (entry_varlen:
    a Varlen) with the variant, s_aux given as an argument so that autograd can differentiate it."""
    rest = {name: value for name, value in opts.items() if name != "s_aux"}

    def call(q, k, v, s_aux):
        kwargs = dict(softmax_scale=softmax_scale, causal=variant.causal, return_attn_probs=True, s_aux=s_aux,
                      deterministic=deterministic, **rest)
        if entry_varlen is None:
            return flash_attn_func(q, k, v, **kwargs)
        return flash_attn_varlen_func(q, k, v, *entry_varlen, **kwargs)

    return call


@pytest.mark.parametrize("layout", ["217x128", "1023x1024", "varlen"])
@pytest.mark.parametrize("variant", SINK_VARIANTS)
@pytest.mark.parametrize("head_dim", [64, 128])
@on_dtypes
def test_sink_gradient(dtype, head_dim, variant, layout, deterministic):
    # The public entries through autograd: dq, dk, dv and ds_aux, the sink's gradient summed over every row
    # (of every sequence) of its head, against autograd of the reference.
    skip_unless_built(head_dim)
    variant = VARIANTS[variant]
    if layout == "varlen":
        q, k, v, varlen = random_varlen(*VARLEN_MIX, HEADS_Q, 2, head_dim, dtype=dtype, device="cuda")
        opts = options(variant, len(VARLEN_MIX[0]), HEADS_Q, varlen.max_seqlen_k)
    else:
        seqlen_q, seqlen_k = map(int, layout.split("x"))
        q, k, v = random_qkv(BATCH, seqlen_q, seqlen_k, HEADS_Q, 2, head_dim, dtype=dtype, device="cuda")
        varlen, opts = None, options(variant, BATCH, HEADS_Q, seqlen_k)
    softmax_scale = softmax_scale_of(variant, head_dim)
    dout = torch.randn_like(q)
    results = run(public_call(varlen, variant, opts, softmax_scale, deterministic), (q, k, v, opts["s_aux"]), dout)
    assert results[-1].shape == opts["s_aux"].shape and results[-1].dtype == torch.float32
    check_results(results, dout, q, k, v, softmax_scale, variant, opts, varlen)


def packed_case(entry, head_dim, variant):
    """(tensors, the packed call, its tensors unpacked, the unpacked call): each call takes its tensors and
    then s_aux if the variant has a sink, and gives (out, lse, None)."""
    like = dict(dtype=torch.bfloat16, device="cuda")
    if entry == "qkvpacked":
        tensors, batch, heads, seqlen_k = [torch.randn(2, 200, 3, 4, head_dim, **like)], 2, 4, 200
        packed, plain, args = flash_attn_qkvpacked_func, flash_attn_func, ()
    elif entry == "kvpacked":
        tensors = [torch.randn(2, 150, HEADS_Q, head_dim, **like), torch.randn(2, 230, 2, 2, head_dim, **like)]
        batch, heads, seqlen_k = 2, HEADS_Q, 230
        packed, plain, args = flash_attn_kvpacked_func, flash_attn_func, ()
    elif entry == "varlen_qkvpacked":  # one cu_seqlens for q, k and v
        varlen = varlen_of(VARLEN_LENGTHS_K, VARLEN_LENGTHS_K, "cuda")
        tensors = [torch.randn(sum(VARLEN_LENGTHS_K), 3, 4, head_dim, **like)]
        batch, heads, seqlen_k = len(VARLEN_LENGTHS_K), 4, varlen.max_seqlen_k
        packed, plain = flash_attn_varlen_qkvpacked_func, flash_attn_varlen_func
        args = (varlen.cu_seqlens_k, varlen.max_seqlen_k), tuple(varlen)
    else:
        assert entry == "varlen_kvpacked"
        varlen = varlen_of(VARLEN_LENGTHS_Q, VARLEN_LENGTHS_K, "cuda")
        tensors = [torch.randn(sum(VARLEN_LENGTHS_Q), HEADS_Q, head_dim, **like),
                   torch.randn(sum(VARLEN_LENGTHS_K), 2, 2, head_dim, **like)]
        batch, heads, seqlen_k = len(VARLEN_LENGTHS_Q), HEADS_Q, varlen.max_seqlen_k
        packed, plain, args = flash_attn_varlen_kvpacked_func, flash_attn_varlen_func, tuple(varlen)
    packed_args, plain_args = args if entry == "varlen_qkvpacked" else (args, args)
    opts = options(variant, batch, heads, seqlen_k)
    sink = opts.pop("s_aux")

    def calling(function, count, extra):
        def call(*tensors):
            s_aux = tensors[count] if sink is not None else None
            return function(*tensors[:count], *extra, causal=variant.causal, return_attn_probs=True, s_aux=s_aux,
                            deterministic=True, **opts)
        return call

    sinks = [sink] if sink is not None else []
    return (tensors + sinks, calling(packed, len(tensors), packed_args), unpacked(tensors) + sinks,
            calling(plain, 3, plain_args))


@pytest.mark.parametrize("variant", ["win-50-9-causal", "alibi-batch-heads", "everything"])
@pytest.mark.parametrize("head_dim", [59, 128])
@pytest.mark.parametrize("entry", ["qkvpacked", "kvpacked", "varlen_qkvpacked", "varlen_kvpacked"])
def test_packed_equals_unpacked(entry, head_dim, variant):
    # The same kernels on the same values, read through strided views: bit-identical results, and the
    # packed gradient is the unpacked ones stacked (ds_aux the same tensor).
    skip_unless_built(head_dim)
    tensors, call, tensors_u, call_u = packed_case(entry, head_dim, VARIANTS[variant])
    dout = torch.randn_like(tensors_u[0])
    out, lse, *grads = run(call, tensors, dout)
    out_u, lse_u, *grads_u = run(call_u, tensors_u, dout)
    assert_equal((out, lse), (out_u, lse_u))
    count = 1 if entry.endswith("qkvpacked") else 2
    expected = packed_grads(*grads_u[:3], count) + grads_u[3:]
    names = (("dqkv",) if count == 1 else ("dq", "dkv")) + ("ds_aux",) * (len(grads) - count)
    assert_equal(grads, expected, names)


@pytest.mark.parametrize("layout", ["fixed", "varlen"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_deterministic(head_dim, layout):
    # Every feature on, GQA: bit-identical run to run with deterministic=True, ds_aux too.
    skip_unless_built(head_dim)
    variant = VARIANTS["everything"]
    if layout == "varlen":
        q, k, v, varlen = random_varlen(*VARLEN_MIX, HEADS_Q, 2, head_dim, dtype=torch.bfloat16, device="cuda")
        opts = options(variant, len(VARLEN_MIX[0]), HEADS_Q, varlen.max_seqlen_k)
    else:
        q, k, v = random_qkv(BATCH, 1023, 1024, HEADS_Q, 2, head_dim, dtype=torch.bfloat16, device="cuda")
        varlen, opts = None, options(variant, BATCH, HEADS_Q, 1024)
    call = public_call(varlen, variant, opts, softmax_scale_of(variant, head_dim))
    dout = torch.randn_like(q)
    assert_equal(run(call, (q, k, v, opts["s_aux"]), dout), run(call, (q, k, v, opts["s_aux"]), dout), RESULTS)


# Every variant at its 'off' value is the plain call: the same bits, forward and backward, through every
# entry. "spelled": the other spellings the contract allows (a list for the window, an int softcap).
OFF = {"explicit": dict(window_size=(-1, -1), softcap=0.0, alibi_slopes=None, s_aux=None),
       "spelled": dict(window_size=[-1, -1], softcap=0)}
ENTRIES = ("func", "qkvpacked", "kvpacked", "varlen", "varlen_qkvpacked", "varlen_kvpacked")


def plain_case(entry, head_dim):
    """(tensors, call(*tensors, **options) -> (out, lse, None)) for one entry, on GQA shapes where it can."""
    like = dict(dtype=torch.float16, device="cuda")
    if entry == "func":
        q, k, v = random_qkv(BATCH, 150, 230, HEADS_Q, 2, head_dim, dtype=torch.float16, device="cuda")
        return [q, k, v], flash_attn_func, ()
    if entry == "varlen":
        q, k, v, varlen = random_varlen(VARLEN_LENGTHS_Q, VARLEN_LENGTHS_K, HEADS_Q, 2, head_dim,
                                        dtype=torch.float16, device="cuda")
        return [q, k, v], flash_attn_varlen_func, tuple(varlen)
    tensors, _, _, _ = packed_case(entry, head_dim, Variant())
    tensors = [t.to(torch.float16) for t in tensors]
    if entry == "qkvpacked":
        return tensors, flash_attn_qkvpacked_func, ()
    if entry == "kvpacked":
        return tensors, flash_attn_kvpacked_func, ()
    if entry == "varlen_qkvpacked":
        varlen = varlen_of(VARLEN_LENGTHS_K, VARLEN_LENGTHS_K, "cuda")
        return tensors, flash_attn_varlen_qkvpacked_func, (varlen.cu_seqlens_k, varlen.max_seqlen_k)
    return tensors, flash_attn_varlen_kvpacked_func, tuple(varlen_of(VARLEN_LENGTHS_Q, VARLEN_LENGTHS_K, "cuda"))


@pytest.mark.parametrize("off", OFF)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_off_values_are_the_plain_call(entry, causal, off):
    skip_unless_built(64)
    tensors, function, args = plain_case(entry, 64)
    dout = torch.randn_like(tensors[0][..., 0, :, :] if entry.endswith("qkvpacked") else tensors[0])

    def call(**extra):
        return lambda *t: function(*t, *args, causal=causal, return_attn_probs=True, deterministic=True, **extra)

    assert_equal(run(call(**OFF[off]), tensors, dout), run(call(), tensors, dout))

"""flash_attn_with_kvcache on the GPU (skipped without one): out and LSE against the float32 reference over
the visible cache (each sequence's first cache_seqlens[b] rows, gathered here and run through attention_ref)
by the forward's 2x rule, into NaN-filled buffers; split against unsplit; the caches left untouched; the
public entry, torch.compile and a CUDA-graph captured decode step against eager calls."""

import pytest
import torch

from conftest import check_close, requires_ext, requires_gpu, skip_unless_built
from flash_attn2 import flash_attn_with_kvcache
from flash_attn2.kvcache import _fwd_kvcache, kvcache_num_splits
from flash_attn2.reference import attention_ref

pytestmark = [requires_gpu, requires_ext]

NAN, INF = float("nan"), float("inf")
HEADS_Q = 8
KV_HEADS = {"mha": 8, "gqa": 2}
SEQLEN_Q = [1, 2, 7, 64]
CAPACITY = 300  # rows of the cache: not a multiple of the 64- or 128-row key tiles
# Cache lengths per sequence (batch 5): every sequence empty, one row, ragged (tile edges, and more
# queries than keys: causal rows that see nothing), the whole cache.
LENGTHS = {"zero": [0] * 5, "one": [1] * 5, "ragged": [0, 1, 63, 129, 300], "full": [CAPACITY] * 5}
# 1: no split; 0: the heuristic's count (here, with few blocks, several); 5: forced, more than some
# sequences have key blocks (empty splits).
SPLITS = [1, 0, 5]


def skip_unless_decode_fused():
    from flash_attn2._extension import C
    if not getattr(C, "has_decode_fused", lambda: False)():
        pytest.skip("the fused split combine is built only with FLASH_ATTN2_BUILD_DECODE_FUSED=1")


@pytest.fixture(params=[False, True], ids=["combine-kernel", "combine-fused"])
def fused_combine(request, monkeypatch):
    """Split-KV's combine as a second kernel (the default) or folded into the split kernel's last block per
    tile (FLASH_ATTN2_DECODE_FUSED_COMBINE=1, read at each call, so the split count follows it too)."""
    if request.param:
        skip_unless_decode_fused()
        monkeypatch.setenv("FLASH_ATTN2_DECODE_FUSED_COMBINE", "1")
    else:
        monkeypatch.delenv("FLASH_ATTN2_DECODE_FUSED_COMBINE", raising=False)
    return request.param


def random_cache(batch, capacity, heads_kv, head_dim, dtype):
    k_cache = torch.randn(batch, capacity, heads_kv, head_dim, dtype=dtype, device="cuda")
    return k_cache, torch.randn_like(k_cache)


def kvcache_ref(q, k_cache, v_cache, lengths, compute_dtype=torch.float32, **scores):
    """attention_ref over each sequence's visible cache, rows [0, lengths[b]): (out, lse)."""
    outs, lses = [], []
    alibi = scores.pop("alibi_slopes", None)
    for b, n in enumerate(lengths):
        slopes = alibi[b] if alibi is not None and alibi.dim() == 2 else alibi
        out, lse = attention_ref(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], compute_dtype=compute_dtype,
                                 alibi_slopes=slopes, **scores)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def kvcache_into_nan(q, k_cache, v_cache, lengths, softmax_scale, causal=False, window=(-1, -1), softcap=0.0,
                     alibi_slopes=None, num_splits=0):
    """The kernel into NaN-filled out and lse, so that any element it leaves unwritten fails."""
    out = torch.full_like(q, NAN)
    lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), NAN, dtype=torch.float32, device="cuda")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    _fwd_kvcache(q, k_cache, v_cache, out, lse, seqlens, softmax_scale, causal, window, softcap, alibi_slopes,
                 num_splits)
    return out, lse


def check_kvcache(out, lse, q, k_cache, v_cache, lengths, **scores):
    """out and lse against the fp32 reference by the 2x rule; rows that see no key: 0 and +inf."""
    out_ref, lse_ref = kvcache_ref(q, k_cache, v_cache, lengths, **dict(scores))
    out_pt, lse_pt = kvcache_ref(q, k_cache, v_cache, lengths, compute_dtype=q.dtype, **dict(scores))
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == lse_ref.shape
    no_key = torch.isinf(lse_ref)  # (batch, heads, seqlen_q)
    assert (out.transpose(1, 2)[no_key] == 0).all(), "rows that see no key must give out 0"
    assert (lse[no_key] == INF).all(), "rows that see no key must give lse +inf"
    check_close(out, out_ref, out_pt, "out")
    check_close(lse[~no_key], lse_ref[~no_key], lse_pt[~no_key], "lse")


@pytest.mark.parametrize("num_splits", SPLITS, ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("seqlen_q", SEQLEN_Q, ids=lambda s: f"sq{s}")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kvcache(head_dim, seqlen_q, lengths, kv_heads, causal, num_splits):
    skip_unless_built(head_dim)
    lengths = LENGTHS[lengths]
    q = torch.randn(len(lengths), seqlen_q, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(len(lengths), CAPACITY, KV_HEADS[kv_heads], head_dim, torch.bfloat16)
    scale = head_dim ** -0.5
    out, lse = kvcache_into_nan(q, k_cache, v_cache, lengths, scale, causal, num_splits=num_splits)
    check_kvcache(out, lse, q, k_cache, v_cache, lengths, softmax_scale=scale, causal=causal)


@pytest.mark.parametrize("num_splits", [1, 0], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("head_dim", [32, 40, 64, 96, 128, 192, 256])
def test_kvcache_head_dims(head_dim, dtype, num_splits):
    # Every kernel head dim (40 runs in the 64 kernel), both dtypes, ragged lengths, GQA, causal, two queries.
    skip_unless_built(head_dim)
    lengths = LENGTHS["ragged"]
    q = torch.randn(len(lengths), 2, HEADS_Q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = random_cache(len(lengths), CAPACITY, 2, head_dim, dtype)
    scale = head_dim ** -0.5
    out, lse = kvcache_into_nan(q, k_cache, v_cache, lengths, scale, True, num_splits=num_splits)
    check_kvcache(out, lse, q, k_cache, v_cache, lengths, softmax_scale=scale, causal=True)


SCORES = {
    "window": dict(window=(40, 0), ref=dict(causal=True, window_size=(40, 0))),
    "window-both": dict(window=(100, 3), ref=dict(window_size=(100, 3))),
    "softcap": dict(softcap=5.0, ref=dict(softcap=5.0)),
    "alibi": dict(alibi=(HEADS_Q,), ref=dict()),
    "alibi-batch-causal": dict(alibi=(5, HEADS_Q), ref=dict(causal=True)),
}


@pytest.mark.parametrize("num_splits", [1, 0, 5], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("seqlen_q", [1, 7], ids=lambda s: f"sq{s}")
@pytest.mark.parametrize("variant", SCORES)
def test_kvcache_scores(variant, seqlen_q, num_splits):
    # Window, softcap and ALiBi with Sk = each sequence's cache length: aligned to the cache's end.
    head_dim = 128
    skip_unless_built(head_dim)
    case = SCORES[variant]
    lengths = LENGTHS["ragged"]
    q = torch.randn(len(lengths), seqlen_q, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(len(lengths), CAPACITY, 2, head_dim, torch.bfloat16)
    alibi = torch.rand(*case["alibi"], device="cuda") if "alibi" in case else None
    ref = dict(case["ref"])
    causal = ref.get("causal", False)
    window = case.get("window", (-1, -1))
    out, lse = kvcache_into_nan(q, k_cache, v_cache, lengths, 0.1, causal, window, case.get("softcap", 0.0), alibi,
                                num_splits)
    check_kvcache(out, lse, q, k_cache, v_cache, lengths, softmax_scale=0.1, alibi_slopes=alibi, **ref)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("length", [8192, 20000])
def test_split_against_unsplit(length, kv_heads, fused_combine):
    # One long sequence, where the heuristic splits: split and unsplit both within the 2x rule, and the
    # heuristic's count is > 1 here (batch x heads = 8 blocks cannot fill a GPU). Fused, the calls in turn
    # (1, the heuristic's, 128 splits) find the counts zero that the one before left.
    head_dim = 128
    skip_unless_built(head_dim)
    q = torch.randn(1, 1, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(1, length + 77, KV_HEADS[kv_heads], head_dim, torch.bfloat16)
    assert kvcache_num_splits(q, k_cache) > 1
    for splits in (1, 0, 128):
        out, lse = kvcache_into_nan(q, k_cache, v_cache, [length], head_dim ** -0.5, num_splits=splits)
        check_kvcache(out, lse, q, k_cache, v_cache, [length], softmax_scale=head_dim ** -0.5)


def test_heuristic_does_not_split_a_full_grid():
    q = torch.empty(64, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    k_cache = torch.empty(64, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
    assert kvcache_num_splits(q, k_cache) == 1
    assert kvcache_num_splits(q, k_cache, 3) == 3
    assert kvcache_num_splits(q[:1], k_cache[:1, :64], 50) == 1  # at most the key blocks


def test_heuristic_counts_the_packing_that_runs():
    # GQA decode packs its query heads into one block per kv head (8 blocks here), unless ALiBi or a window's
    # left edge forbid it: then the grid is MHA's (32 blocks), and so is the split count (the binding asks
    # pack_gqa_decode, as the call does; the counts themselves are pinned on CPU, tests/test_decode_plan.py).
    skip_unless_built(128)
    q = torch.empty(1, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    gqa = torch.empty(1, 8192, 8, 128, dtype=torch.bfloat16, device="cuda")
    mha = torch.empty(1, 8192, 32, 128, dtype=torch.bfloat16, device="cuda")
    eight = torch.empty(1, 8192, 8, 128, dtype=torch.bfloat16, device="cuda")
    q8 = torch.empty(1, 1, 8, 128, dtype=torch.bfloat16, device="cuda")
    packed, unpacked = kvcache_num_splits(q8, eight), kvcache_num_splits(q, mha)
    assert packed != unpacked  # else this test could not tell them apart
    assert kvcache_num_splits(q, gqa) == packed
    slopes = torch.rand(32, device="cuda")
    assert kvcache_num_splits(q, gqa, alibi_slopes=slopes) == unpacked
    assert kvcache_num_splits(q, gqa, window_size=(1024, -1)) == unpacked
    assert kvcache_num_splits(q, gqa, window_size=(8192, -1)) == packed  # a left edge that cuts nothing
    with pytest.raises(ValueError, match="num_splits"):
        kvcache_num_splits(q, gqa, -1)


def test_lengths_out_of_range_are_clamped(fused_combine):
    # cache_seqlens values are not checked on the host: below 0 reads as 0, past the cache as the whole cache.
    head_dim = 64
    skip_unless_built(head_dim)
    q = torch.randn(4, 3, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(4, CAPACITY, 2, head_dim, torch.bfloat16)
    for splits in (1, 4):
        out, lse = kvcache_into_nan(q, k_cache, v_cache, [-5, 2 ** 31 - 1, CAPACITY + 1, -2 ** 31], 0.125,
                                    num_splits=splits)
        clamped = [0, CAPACITY, CAPACITY, 0]
        expected, expected_lse = kvcache_into_nan(q, k_cache, v_cache, clamped, 0.125, num_splits=splits)
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
        check_kvcache(out, lse, q, k_cache, v_cache, clamped, softmax_scale=0.125)


def test_public_entry():
    # Defaults (scale 1/sqrt(head_dim)), an int and None for cache_seqlens, return_softmax_lse, GQA, strided
    # caches (heads-first storage, and a cache that is a slice of a longer one); the caches are untouched.
    head_dim = 128
    skip_unless_built(head_dim)
    q = torch.randn(3, 2, HEADS_Q, head_dim, dtype=torch.float16, device="cuda")
    k_store = torch.randn(3, 2, CAPACITY + 40, head_dim, dtype=torch.float16, device="cuda")
    v_store = torch.randn_like(k_store)
    k_cache, v_cache = (t.transpose(1, 2)[:, :CAPACITY] for t in (k_store, v_store))  # (3, 300, 2, 128), strided
    before = k_store.clone(), v_store.clone()
    seqlens = torch.tensor([5, 300, 77], dtype=torch.int32, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True,
                                       return_softmax_lse=True)
    check_kvcache(out, lse, q, k_cache, v_cache, [5, 300, 77], softmax_scale=head_dim ** -0.5, causal=True)
    assert torch.equal(k_store, before[0]) and torch.equal(v_store, before[1]), "the caches must be untouched"
    as_int = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=77)
    as_tensor = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.full_like(seqlens, 77))
    assert torch.equal(as_int, as_tensor)
    whole, whole_lse = flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True)  # None: the whole cache
    assert torch.equal(whole, flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=CAPACITY))
    check_kvcache(whole, whole_lse, q, k_cache, v_cache, [CAPACITY] * 3, softmax_scale=head_dim ** -0.5)


def test_empty_inputs():
    head_dim = 64
    skip_unless_built(head_dim)
    k_cache, v_cache = random_cache(2, 16, 2, head_dim, torch.bfloat16)
    q = torch.randn(2, 0, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    assert flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3).shape == q.shape
    q = torch.randn(2, 1, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k_cache[:, :0], v_cache[:, :0], return_softmax_lse=True)
    assert (out == 0).all() and (lse == INF).all()


def decode_step(q, k_cache, v_cache, seqlens):
    return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True, return_softmax_lse=True)


def test_torch_compile():
    head_dim = 64
    skip_unless_built(head_dim)
    q = torch.randn(2, 1, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(2, 1000, 2, head_dim, torch.bfloat16)
    seqlens = torch.tensor([999, 17], dtype=torch.int32, device="cuda")
    compiled = torch.compile(decode_step, fullgraph=True)
    for got, expected in zip(compiled(q, k_cache, v_cache, seqlens), decode_step(q, k_cache, v_cache, seqlens)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("case", ["contiguous", "append-rotary", "paged-append", "batch-idx-leftpad"])
def test_opcheck(case):
    # torch.library.opcheck of flash_attn2::fwd_kvcache (schema with the declared k_cache / v_cache mutation,
    # fake implementation, autograd registration, AOT dispatch with dynamic shapes). Repeated calls append the
    # same rows at the same cache_seqlens (the op does not advance them), so their results compare equal.
    head_dim, batch, heads_kv, capacity = 64, 2, 2, 320
    skip_unless_built(head_dim)
    dtype = torch.bfloat16
    q = torch.randn(batch, 3, HEADS_Q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = random_cache(batch, capacity, heads_kv, head_dim, dtype)
    seqlens = torch.tensor([200, 17], dtype=torch.int32, device="cuda")
    new_k, new_v = (torch.randn(batch, 3, heads_kv, head_dim, dtype=dtype, device="cuda") for _ in range(2))
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                cache_seqlens=seqlens, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                softmax_scale=head_dim ** -0.5, causal=True, window_left=-1, window_right=0, softcap=0.0,
                rotary_interleaved=False, alibi_slopes=None, num_splits=0)
    if case == "append-rotary":
        cos, sin = rotary_tables(capacity, 32, dtype)
        args.update(k=new_k, v=new_v, rotary_cos=cos, rotary_sin=sin)
    elif case == "paged-append":
        (k_pages, v_pages), table, _ = to_paged((k_cache, v_cache), 16, capacity // 16)
        args.update(k_cache=k_pages, v_cache=v_pages, block_table=table, k=new_k, v=new_v)
    elif case == "batch-idx-leftpad":
        k_cache, v_cache = random_cache(batch + 1, capacity, heads_kv, head_dim, dtype)
        args.update(k_cache=k_cache, v_cache=v_cache, cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32,
                    device="cuda"), cache_leftpad=torch.tensor([5, 0], dtype=torch.int32, device="cuda"))
    op = torch.ops.flash_attn2.fwd_kvcache.default
    names = [a.name for a in op._schema.arguments]
    assert sorted(names) == sorted(args), f"the test's arguments differ from the schema {op._schema}"
    results = torch.library.opcheck(op, tuple(args[n] for n in names), raise_exception=False)
    failed = {name: result for name, result in results.items() if result != "SUCCESS"}
    assert not failed, f"opcheck of {op}: {failed}"


def test_cuda_graph_replay_with_new_lengths(fused_combine):
    # A captured decode step replayed after cache_seqlens (and q) change in place: the same bits as eager calls
    # (fused: the counts zero again after each replay, with no memset node in the graph).
    head_dim = 128
    skip_unless_built(head_dim)
    q = torch.randn(3, 1, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(3, 4000, 2, head_dim, torch.bfloat16)
    seqlens = torch.tensor([10, 3999, 1], dtype=torch.int32, device="cuda")
    assert kvcache_num_splits(q, k_cache, causal=True) > 1  # the split path, which the combine is part of
    decode_step(q, k_cache, v_cache, seqlens)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = decode_step(q, k_cache, v_cache, seqlens)
    for lengths in ([11, 4000, 2], [0, 2048, 3000], [1234, 1, 77]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        q.copy_(torch.randn_like(q))
        graph.replay()
        expected, expected_lse = decode_step(q, k_cache, v_cache, seqlens)
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
        check_kvcache(out, lse, q, k_cache, v_cache, lengths, softmax_scale=head_dim ** -0.5, causal=True)


# ---- Appending new keys and values (k, v), with and without rotary

def rotary_ref(x, cos, sin, positions, interleaved):
    """x (batch, seqlen, heads, head_dim) rotated at positions (batch, seqlen), in x's dtype (so: fp32 for
    the reference, the input dtype for PyTorch's own low-precision result); dims past rotary_dim pass."""
    rotary_dim = 2 * cos.shape[1]
    c, s = (t.to(x.dtype)[positions].unsqueeze(2) for t in (cos, sin))  # (batch, seqlen, 1, rotary_dim / 2)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([rotated, x_pass], dim=-1)


def rotary_tables(seqlen_ro, rotary_dim, dtype):
    """cos and sin of position * theta_i, RoPE's frequencies."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, device="cuda", dtype=torch.float32) / rotary_dim))
    angles = torch.arange(seqlen_ro, device="cuda", dtype=torch.float32)[:, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


APPEND_LENGTHS = [0, 1, 63, 129, 250]  # before the append; + seqlen_new <= CAPACITY = 300


@pytest.mark.parametrize("num_splits", [1, 0], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_new", [1, 2, 7, 50])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_append(head_dim, seqlen_new, causal, num_splits):
    # The new rows land at cache_seqlens[b] + j, every other cache entry is bit-identical, and the attention
    # sees the old and new keys (seqlen_q = seqlen_new: the new tokens attend to themselves).
    skip_unless_built(head_dim)
    batch, dtype = len(APPEND_LENGTHS), torch.bfloat16
    q = torch.randn(batch, seqlen_new, HEADS_Q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = random_cache(batch, CAPACITY, 2, head_dim, dtype)
    k_new, v_new = (torch.randn(batch, seqlen_new, 2, head_dim, dtype=dtype, device="cuda") for _ in "kv")
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(APPEND_LENGTHS):
        expected_k[b, n:n + seqlen_new], expected_v[b, n:n + seqlen_new] = k_new[b], v_new[b]
    seqlens = torch.tensor(APPEND_LENGTHS, dtype=torch.int32, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, causal=causal,
                                       num_splits=num_splits, return_softmax_lse=True)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert seqlens.tolist() == APPEND_LENGTHS, "cache_seqlens is the caller's: not advanced"
    lengths = [n + seqlen_new for n in APPEND_LENGTHS]
    check_kvcache(out, lse, q, k_cache, v_cache, lengths, softmax_scale=head_dim ** -0.5, causal=causal)


def test_append_rows_past_the_cache_are_dropped():
    # A tensor cache_seqlens is not read on the host: rows that would fall past the cache are not written,
    # and the attention sees the cache up to its end.
    head_dim = 64
    skip_unless_built(head_dim)
    q = torch.randn(2, 4, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(2, CAPACITY, 2, head_dim, torch.bfloat16)
    k_new, v_new = (torch.randn(2, 4, 2, head_dim, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_k[0, CAPACITY - 2:], expected_v[0, CAPACITY - 2:] = k_new[0, :2], v_new[0, :2]
    seqlens = torch.tensor([CAPACITY - 2, CAPACITY + 1000], dtype=torch.int32, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                       return_softmax_lse=True)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    check_kvcache(out, lse, q, k_cache, v_cache, [CAPACITY, CAPACITY], softmax_scale=head_dim ** -0.5)


@pytest.mark.parametrize("rotary_dim", [32, 128])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_append_rotary(dtype, causal, interleaved, rotary_dim):
    # The new keys are stored rotated at cache_seqlens[b] + j; q is rotated at cache_seqlens[b] + i (causal)
    # or cache_seqlens[b] (not); both against rotary_ref by the 2x rule, then the attention over them.
    head_dim, seqlen_new = 128, 5
    skip_unless_built(head_dim)
    batch = len(APPEND_LENGTHS)
    q = torch.randn(batch, seqlen_new, HEADS_Q, head_dim, dtype=dtype, device="cuda")
    k_cache, v_cache = random_cache(batch, CAPACITY, 2, head_dim, dtype)
    k_new, v_new = (torch.randn(batch, seqlen_new, 2, head_dim, dtype=dtype, device="cuda") for _ in "kv")
    cos, sin = rotary_tables(CAPACITY + 11, rotary_dim, dtype)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    starts = torch.tensor(APPEND_LENGTHS, dtype=torch.int32, device="cuda")
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=starts,
                                       causal=causal, rotary_interleaved=interleaved, return_softmax_lse=True)
    rows = torch.arange(seqlen_new, device="cuda")
    k_positions = starts.long()[:, None] + rows
    q_positions = k_positions if causal else starts.long()[:, None].expand(-1, seqlen_new)
    k_ref, k_pt = (rotary_ref(k_new.to(t), cos, sin, k_positions, interleaved) for t in (torch.float32, dtype))
    q_ref, q_pt = (rotary_ref(q.to(t), cos, sin, q_positions, interleaved) for t in (torch.float32, dtype))
    stored = torch.stack([k_cache[b, n:n + seqlen_new] for b, n in enumerate(APPEND_LENGTHS)])
    check_close(stored, k_ref, k_pt, "stored k")
    expected_k, expected_v = before_k.clone(), before_v.clone()  # everything else untouched; v stored as given
    for b, n in enumerate(APPEND_LENGTHS):
        expected_k[b, n:n + seqlen_new], expected_v[b, n:n + seqlen_new] = k_cache[b, n:n + seqlen_new], v_new[b]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    lengths = [n + seqlen_new for n in APPEND_LENGTHS]
    scale = head_dim ** -0.5
    out_ref, lse_ref = kvcache_ref(q_ref, k_cache, v_cache, lengths, softmax_scale=scale, causal=causal)
    out_pt, lse_pt = kvcache_ref(q_pt, k_cache, v_cache, lengths, compute_dtype=dtype, softmax_scale=scale,
                                 causal=causal)
    check_close(out, out_ref, out_pt, "out")
    check_close(lse, lse_ref, lse_pt, "lse")


def test_decode_loop_with_append_matches_full_attention():
    # Greedy-decoding shape: a prompt appended in one call, then one token per call; each step's out equals
    # attention over everything appended so far (2x rule), and the cache equals the tokens in order.
    head_dim, steps = 128, 6
    skip_unless_built(head_dim)
    batch, dtype, prompt = 2, torch.bfloat16, 37
    k_cache, v_cache = (torch.zeros(batch, 64, 2, head_dim, dtype=dtype, device="cuda") for _ in "kv")
    ks, vs = [], []
    for step in range(steps):
        rows = prompt if step == 0 else 1
        start = 0 if step == 0 else prompt + step - 1
        q = torch.randn(batch, rows, HEADS_Q, head_dim, dtype=dtype, device="cuda")
        k_new, v_new = (torch.randn(batch, rows, 2, head_dim, dtype=dtype, device="cuda") for _ in "kv")
        ks.append(k_new)
        vs.append(v_new)
        out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=start, causal=True,
                                           return_softmax_lse=True)
        k_all, v_all = torch.cat(ks, 1), torch.cat(vs, 1)
        assert torch.equal(k_cache[:, :start + rows], k_all) and torch.equal(v_cache[:, :start + rows], v_all)
        out_ref, lse_ref = attention_ref(q, k_all, v_all, causal=True)
        out_pt, lse_pt = attention_ref(q, k_all, v_all, causal=True, compute_dtype=dtype)
        check_close(out, out_ref, out_pt, f"out at step {step}")
        check_close(lse, lse_ref, lse_pt, f"lse at step {step}")


# ---- Paged caches (block_table)

def to_paged(caches, page_size, max_pages, spare_pages=3):
    """Contiguous caches (batch, capacity, heads_kv, head_dim) as pages in one shuffled order, with spare
    random pages among them: ([pages (num_pages, page_size, heads_kv, head_dim)], block_table (batch,
    max_pages) int32, bool mask of the spare pages)."""
    batch, capacity = caches[0].shape[:2]
    num_pages = batch * max_pages + spare_pages
    table = torch.randperm(num_pages, device="cuda")[:batch * max_pages].view(batch, max_pages).int()
    spare = torch.ones(num_pages, dtype=torch.bool, device="cuda")
    spare[table.flatten().long()] = False
    paged = []
    for cache in caches:
        pages = torch.randn(num_pages, page_size, *cache.shape[2:], dtype=cache.dtype, device="cuda")
        rows = torch.randn(batch, max_pages * page_size, *cache.shape[2:], dtype=cache.dtype, device="cuda")
        rows[:, :capacity] = cache
        pages[table.flatten().long()] = rows.view(batch * max_pages, page_size, *cache.shape[2:])
        paged.append(pages)
    return paged, table, spare


def gathered(pages, table, capacity):
    """The paged cache back as a contiguous (batch, capacity, ...) one."""
    return pages[table.long()].flatten(1, 2)[:, :capacity]


@pytest.mark.parametrize("num_splits", [1, 3], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlen_q", [1, 7], ids=lambda s: f"sq{s}")
@pytest.mark.parametrize("page_size", [16, 64, 256])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_paged_equals_contiguous(head_dim, page_size, seqlen_q, causal, num_splits):
    # The same bits as the contiguous cache (the same tiles reach shared memory), whatever the page order,
    # with out-of-range page ids past each sequence's last page (never dereferenced); and within the 2x rule.
    # 3 splits: the count is capped by the capacity's key blocks (300 rows: 3 at D = 64), which paging rounds up.
    skip_unless_built(head_dim)
    lengths = LENGTHS["ragged"]
    batch = len(lengths)
    q = torch.randn(batch, seqlen_q, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(batch, CAPACITY, 2, head_dim, torch.bfloat16)
    max_pages = -(-CAPACITY // page_size)
    (k_pages, v_pages), table, _ = to_paged((k_cache, v_cache), page_size, max_pages)
    for b, n in enumerate(lengths):
        used = -(-n // page_size)
        table[b, used:] = torch.tensor([-7, 10 ** 6] * max_pages, dtype=torch.int32)[:max_pages - used]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    kwargs = dict(cache_seqlens=seqlens, causal=causal, num_splits=num_splits, return_softmax_lse=True)
    out, lse = flash_attn_with_kvcache(q, k_pages, v_pages, block_table=table, **kwargs)
    expected, expected_lse = flash_attn_with_kvcache(q, k_cache, v_cache, **kwargs)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    check_kvcache(out, lse, q, k_cache, v_cache, lengths, softmax_scale=head_dim ** -0.5, causal=causal)


@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_paged_append_equals_contiguous(page_size, rotary):
    # The append writes through the block table: the gathered pages equal the contiguous cache after the
    # same append (new rows crossing page boundaries), the spare pages are untouched, out is the same bits.
    head_dim, seqlen_new = 128, 21
    skip_unless_built(head_dim)
    batch = len(APPEND_LENGTHS)
    q = torch.randn(batch, seqlen_new, HEADS_Q, head_dim, dtype=torch.float16, device="cuda")
    k_cache, v_cache = random_cache(batch, CAPACITY, 2, head_dim, torch.float16)
    max_pages = -(-CAPACITY // page_size)
    (k_pages, v_pages), table, spare = to_paged((k_cache, v_cache), page_size, max_pages)
    k_spare, v_spare = k_pages[spare].clone(), v_pages[spare].clone()
    k_new, v_new = (torch.randn(batch, seqlen_new, 2, head_dim, dtype=torch.float16, device="cuda") for _ in "kv")
    tables = rotary_tables(max_pages * page_size, 64, torch.float16) if rotary else (None, None)
    seqlens = torch.tensor(APPEND_LENGTHS, dtype=torch.int32, device="cuda")
    kwargs = dict(cache_seqlens=seqlens, causal=True, num_splits=1, return_softmax_lse=True)
    out, lse = flash_attn_with_kvcache(q, k_pages, v_pages, k_new, v_new, *tables, block_table=table, **kwargs)
    expected, expected_lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, *tables, **kwargs)
    assert torch.equal(gathered(k_pages, table, CAPACITY), k_cache)
    assert torch.equal(gathered(v_pages, table, CAPACITY), v_cache)
    assert torch.equal(k_pages[spare], k_spare) and torch.equal(v_pages[spare], v_spare)
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


def test_paged_ids_out_of_range_are_clamped():
    # Page ids are not checked on the host: below 0 reads page 0, past the last page reads the last page.
    head_dim, page_size = 64, 16
    skip_unless_built(head_dim)
    q = torch.randn(2, 3, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_pages, v_pages = (torch.randn(6, page_size, 2, head_dim, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    table = torch.tensor([[-3, 2, 10 ** 6], [5, 2 ** 31 - 1, -2 ** 31]], dtype=torch.int32, device="cuda")
    clamped = torch.tensor([[0, 2, 5], [5, 5, 0]], dtype=torch.int32, device="cuda")
    for splits in (1, 2):
        kwargs = dict(cache_seqlens=3 * page_size, num_splits=splits, return_softmax_lse=True)
        out, lse = flash_attn_with_kvcache(q, k_pages, v_pages, block_table=table, **kwargs)
        expected, expected_lse = flash_attn_with_kvcache(q, k_pages, v_pages, block_table=clamped, **kwargs)
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse)


# ---- cache_batch_idx and cache_leftpad

@pytest.mark.parametrize("num_splits", [1, 0], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("seqlen_new", [0, 3])
def test_cache_batch_idx(seqlen_new, num_splits):
    # Sequence b reads (and appends to) cache row idx[b] of a larger cache; the other rows are untouched.
    head_dim = 128
    skip_unless_built(head_dim)
    idx, lengths = [5, 0, 6, 2], [0, 17, 200, 64]
    q = torch.randn(len(idx), 4, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(7, CAPACITY, 2, head_dim, torch.bfloat16)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    new = {}
    if seqlen_new:
        new = dict(k=torch.randn(len(idx), seqlen_new, 2, head_dim, dtype=torch.bfloat16, device="cuda"))
        new["v"] = torch.randn_like(new["k"])
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, **new, cache_seqlens=torch.tensor(lengths, dtype=torch.int32,
                                       device="cuda"), cache_batch_idx=torch.tensor(idx, dtype=torch.int32,
                                       device="cuda"), causal=True, num_splits=num_splits, return_softmax_lse=True)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    for b, (row, n) in enumerate(zip(idx, lengths)):
        if seqlen_new:
            expected_k[row, n:n + seqlen_new], expected_v[row, n:n + seqlen_new] = new["k"][b], new["v"][b]
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    rows = torch.tensor(idx, device="cuda")
    check_kvcache(out, lse, q, k_cache[rows], v_cache[rows], [n + seqlen_new for n in lengths],
                  softmax_scale=head_dim ** -0.5, causal=True)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("seqlen_new", [0, 3])
@pytest.mark.parametrize("seqlen_q", [1, 7], ids=lambda s: f"sq{s}")
def test_cache_leftpad(seqlen_q, seqlen_new, rotary):
    # Sequence b's keys start at row leftpad[b]: the same bits as a cache that starts there (a slice), positions
    # (causal, rotary) counted from it; within the 2x rule of the reference over rows [leftpad, length).
    head_dim = 128
    skip_unless_built(head_dim)
    if rotary and not seqlen_new:
        pytest.skip("rotary needs new keys")
    leftpad, lengths = [0, 3, 50, 10], [5, 40, 200, 10]
    batch = len(lengths)
    q = torch.randn(batch, seqlen_q, HEADS_Q, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(batch, CAPACITY, 2, head_dim, torch.bfloat16)
    k_new, v_new = (torch.randn(batch, seqlen_new, 2, head_dim, dtype=torch.bfloat16, device="cuda") for _ in "kv")
    tables = rotary_tables(CAPACITY, 32, torch.bfloat16) if rotary else (None, None)
    new = dict(k=k_new, v=v_new) if seqlen_new else {}
    slices = [(k_cache[b:b + 1, p:].clone(), v_cache[b:b + 1, p:].clone()) for b, p in enumerate(leftpad)]
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, **new, rotary_cos=tables[0], rotary_sin=tables[1],
                                       cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device="cuda"),
                                       cache_leftpad=torch.tensor(leftpad, dtype=torch.int32, device="cuda"),
                                       causal=True, num_splits=1, return_softmax_lse=True)
    for b, (p, n) in enumerate(zip(leftpad, lengths)):
        k_slice, v_slice = slices[b]
        one = {name: t[b:b + 1] for name, t in new.items()}
        expected, expected_lse = flash_attn_with_kvcache(
            q[b:b + 1], k_slice, v_slice, **one, rotary_cos=tables[0], rotary_sin=tables[1], cache_seqlens=n - p,
            causal=True, num_splits=1, return_softmax_lse=True)
        assert torch.equal(out[b:b + 1], expected) and torch.equal(lse[b:b + 1], expected_lse)
        assert torch.equal(k_cache[b:b + 1, p:], k_slice) and torch.equal(v_cache[b:b + 1, p:], v_slice)
    if not rotary:
        keys = [(k_cache[b:b + 1, p:], v_cache[b:b + 1, p:], n - p + seqlen_new)
                for b, (p, n) in enumerate(zip(leftpad, lengths))]
        for b, (k_b, v_b, n) in enumerate(keys):
            check_kvcache(out[b:b + 1], lse[b:b + 1], q[b:b + 1], k_b, v_b, [n], softmax_scale=head_dim ** -0.5,
                          causal=True)


# ---- GQA decode packing (one query: the query heads of a kv head are the rows of one block)

@pytest.mark.parametrize("softcap", [0.0, 7.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("num_splits", [1, 0], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("heads_kv", [1, 4, 8])
def test_gqa_decode(heads_kv, num_splits, softcap, fused_combine):
    # 32 query heads over 1 (32 rows per block), 4 or 8 kv heads: the packed rows against the reference, and
    # against the same call with K/V repeated per query head (MHA, not packed), causal (a no-op for one query).
    head_dim = 128
    skip_unless_built(head_dim)
    lengths = [1, 777, 4999, 4096]
    q = torch.randn(len(lengths), 1, 32, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(len(lengths), 5000, heads_kv, head_dim, torch.bfloat16)
    out, lse = kvcache_into_nan(q, k_cache, v_cache, lengths, 0.09, True, softcap=softcap, num_splits=num_splits)
    check_kvcache(out, lse, q, k_cache, v_cache, lengths, softmax_scale=0.09, causal=True, softcap=softcap)
    k_mha, v_mha = (t.repeat_interleave(32 // heads_kv, dim=2) for t in (k_cache, v_cache))
    out_mha, lse_mha = kvcache_into_nan(q, k_mha, v_mha, lengths, 0.09, True, softcap=softcap, num_splits=num_splits)
    check_kvcache(out_mha, lse_mha, q, k_cache, v_cache, lengths, softmax_scale=0.09, causal=True, softcap=softcap)


def test_fused_combine_on_two_streams(monkeypatch):
    # FLASH_ATTN2_DECODE_FUSED_COMBINE=1 keeps one buffer of counts per stream: split calls in flight at once on
    # two streams give the bits of the same calls one after the other.
    skip_unless_decode_fused()
    monkeypatch.setenv("FLASH_ATTN2_DECODE_FUSED_COMBINE", "1")
    head_dim = 128
    skip_unless_built(head_dim)
    q = torch.randn(1, 1, 32, head_dim, dtype=torch.bfloat16, device="cuda")
    k_cache, v_cache = random_cache(1, 8192, 8, head_dim, torch.bfloat16)
    lengths = [[8192], [5000]]
    expected = [decode_step(q, k_cache, v_cache, torch.tensor(n, dtype=torch.int32, device="cuda")) for n in lengths]
    seqlens = [torch.tensor(n, dtype=torch.int32, device="cuda") for n in lengths]
    streams = [torch.cuda.Stream() for _ in lengths]
    torch.cuda.synchronize()
    results = [[], []]
    for _ in range(20):
        for i, stream in enumerate(streams):
            with torch.cuda.stream(stream):
                results[i].append(decode_step(q, k_cache, v_cache, seqlens[i]))
    torch.cuda.synchronize()
    for i, runs in enumerate(results):
        for out, lse in runs:
            assert torch.equal(out, expected[i][0]) and torch.equal(lse, expected[i][1])

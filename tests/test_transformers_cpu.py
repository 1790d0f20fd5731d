"""The transformers integration on CPU: its argument mapping as pure functions, then whole tiny models whose
attention calls go to a CPU stand-in for flash_attn_func / flash_attn_varlen_func (the contract's semantics
written out in plain PyTorch, checking every argument it is given), against transformers' own SDPA or eager
attention. That covers everything but the kernels themselves: tests/test_transformers_gpu.py runs those."""

import itertools
import math

import pytest
import torch

import flash_attn2
import hf_models
from flash_attn2.integrations import transformers as fa2_hf
from hf_models import KINDS, SIZES, twin_models


# ---- the pure mapping

@pytest.mark.parametrize("name", ["flash_attn2", "my_flash", "sdpa2", "flex_attention_x", "org/repo", "a:b",
                                  "paged|x", "eager", ""])
def test_names_transformers_would_misread_are_refused(name):
    with pytest.raises(ValueError, match="attention implementation name"):
        fa2_hf.check_name(name)


def test_default_name_is_allowed():
    assert fa2_hf.check_name(fa2_hf.NAME) == fa2_hf.NAME
    assert "flash" not in fa2_hf.NAME


def test_unpad_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1],    # left-padded
                         [1, 1, 1, 0, 0],    # right-padded
                         [1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 0]])   # nothing kept
    unpadded = fa2_hf.unpad(mask)
    assert unpadded.indices.tolist() == [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14]
    assert unpadded.cu_seqlens.dtype == torch.int32
    assert unpadded.cu_seqlens.tolist() == [0, 3, 6, 11, 11]
    assert unpadded.max_seqlen == 5 and isinstance(unpadded.max_seqlen, int)


def test_unpad_bool_mask():
    unpadded = fa2_hf.unpad(torch.tensor([[True, False, True]]))
    assert unpadded.indices.tolist() == [0, 2] and unpadded.cu_seqlens.tolist() == [0, 2]


def test_plan_prefill_drops_padded_queries_with_their_keys():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)
    plan = fa2_hf.plan_padded(mask, query_length=3)
    assert plan.q_indices.tolist() == plan.k.indices.tolist() == [1, 2, 3, 4, 5]
    assert plan.cu_seqlens_q.tolist() == plan.k.cu_seqlens.tolist() == [0, 2, 5]
    assert plan.max_seqlen_q == plan.k.max_seqlen == 3


def test_plan_decode_keeps_every_query():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)  # 4 cached keys + this token
    plan = fa2_hf.plan_padded(mask, query_length=1)
    assert plan.q_indices is None
    assert plan.cu_seqlens_q.dtype == torch.int32 and plan.cu_seqlens_q.tolist() == [0, 1, 2]
    assert plan.max_seqlen_q == 1
    assert plan.k.cu_seqlens.tolist() == [0, 3, 8] and plan.k.max_seqlen == 5


def test_plan_chunk_of_queries_after_a_cache():
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 0] = False
    plan = fa2_hf.plan_padded(mask, query_length=2)
    assert plan.q_indices is None and plan.cu_seqlens_q.tolist() == [0, 2, 4, 6] and plan.max_seqlen_q == 2
    assert plan.k.cu_seqlens.tolist() == [0, 5, 11, 17]


def test_plan_more_queries_than_keys_is_an_error():
    with pytest.raises(ValueError, match="fewer than the 4 queries"):
        fa2_hf.plan_padded(torch.ones(1, 3, dtype=torch.bool), query_length=4)


@pytest.mark.parametrize("position_ids, batch, packed", [
    (None, 1, False),
    (torch.tensor([[0, 1, 2, 3]]), 1, False),
    (torch.tensor([[5, 6, 7]]), 1, False),          # a chunk after a cache: one sequence
    (torch.tensor([[0, 1, 0, 1, 2]]), 1, True),
    (torch.tensor([[2, 3, 2]]), 1, True),
    (torch.tensor([[7]]), 1, False),                 # a decode step
    (torch.tensor([[0, 1, 0], [0, 1, 2]]), 2, False),  # only single rows are read, as transformers' flash path
    (torch.arange(4).expand(3, 1, 4), 1, False),      # multimodal RoPE's (3, batch, seqlen) positions
])
def test_is_packed(position_ids, batch, packed):
    assert fa2_hf.is_packed(position_ids, batch) is packed


@pytest.mark.parametrize("positions, cu_seqlens, max_seqlen", [
    ([0, 1, 2, 0, 1, 0], [0, 3, 5, 6], 3),
    ([2, 3, 4, 2, 3], [0, 3, 5], 3),                 # sequences that count from 2 (RoBERTa-like)
    ([3, 4, 5, 0, 1], [0, 3, 5], 3),                 # the first one continues an earlier chunk
    ([0, 0, 0], [0, 1, 2, 3], 1),
    ([0, 1, 2, 3], [0, 4], 4),
])
def test_varlen_from_position_ids(positions, cu_seqlens, max_seqlen):
    cu, longest = fa2_hf.varlen_from_position_ids(torch.tensor([positions]))
    assert cu.dtype == torch.int32 and cu.tolist() == cu_seqlens
    assert longest == max_seqlen and isinstance(longest, int)


@pytest.mark.parametrize("sliding_window, causal, key_length, window", [
    (None, True, 100, (-1, -1)),
    (4096, True, 100, (-1, -1)),       # the window cuts nothing: the kernels' plain path
    (4096, True, 4096, (-1, -1)),
    (4, True, 5, (3, 0)),              # 4 keys counting the query itself
    (4, False, 5, (3, 3)),             # bidirectional: as transformers' flash path sets it
    (1, True, 2, (0, 0)),
])
def test_window_size(sliding_window, causal, key_length, window):
    assert fa2_hf.window_size(sliding_window, causal, key_length) == window


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_window_size_rejects_bad_windows(bad):
    with pytest.raises(ValueError, match="sliding_window"):
        fa2_hf.window_size(bad, True, 10)


def test_softcap_value():
    assert fa2_hf.softcap_value(None) == 0.0
    assert fa2_hf.softcap_value(50) == 50.0 and isinstance(fa2_hf.softcap_value(50), float)


def test_padding_mask():
    ones = torch.ones(2, 6, dtype=torch.bool)
    assert fa2_hf.padding_mask(2, 6, 6, attention_mask=None) is None
    assert fa2_hf.padding_mask(2, 6, 6, attention_mask=ones) is None  # no padding: the fixed-length path
    padded = ones.clone()
    padded[0, 0] = False
    assert torch.equal(fa2_hf.padding_mask(2, 6, 6, attention_mask=padded), padded)
    # A sliding-window cache layer sees only the last kv_length keys: the mask is cut to them.
    assert fa2_hf.padding_mask(2, 1, 3, attention_mask=padded) is None  # the padding lies outside the window
    padded[1, 4] = False
    assert torch.equal(fa2_hf.padding_mask(2, 1, 3, attention_mask=padded), padded[:, -3:])


def test_padding_mask_refuses_a_static_cache():
    with pytest.raises(NotImplementedError, match="StaticCache"):
        fa2_hf.padding_mask(1, 1, 16, q_offset=torch.tensor(5), attention_mask=None)


@pytest.mark.parametrize("kwarg, env, expected", [(None, None, False), (None, "1", True), (None, "0", False),
                                                   (True, None, True), (False, "1", False)])
def test_deterministic_backward(monkeypatch, kwarg, env, expected):
    # transformers' rule: its deterministic kwarg, else FLASH_ATTENTION_DETERMINISTIC=1.
    if env is None:
        monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    else:
        monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", env)
    assert fa2_hf.deterministic_backward(kwarg) is expected


def test_target_dtype():
    bf16_model = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16))
    fp32_model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    fp32 = torch.zeros(1)
    assert fa2_hf.target_dtype(fp32.bfloat16(), bf16_model) is None
    assert fa2_hf.target_dtype(fp32, bf16_model) == torch.bfloat16  # PEFT's fp32 norms: back to the weights' dtype
    assert fa2_hf.target_dtype(fp32, fp32_model) is None            # left to flash_attn2's dtype error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fa2_hf.target_dtype(fp32, fp32_model) == torch.bfloat16


# ---- whole models, with the kernels replaced by the contract written out in PyTorch

# (These need transformers: the `recorder` fixture skips them without it; the tests above run regardless.)

def attention_contract(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, s_aux=None,
                       dropout_p=0.0):
    """One sequence batch of flash_attn_func's semantics (the variants contract), float64, differentiable:
    q (batch, Sq, heads, d), k and v (batch, Sk, heads_kv, d). Dropout with torch's own mask (the kernels'
    Philox mask is theirs: only the semantics, drop P's entries and scale the rest, are the contract's)."""
    seqlen_q, seqlen_k, heads = q.shape[1], k.shape[1], q.shape[2]
    groups = heads // k.shape[2]
    q64, k64, v64 = (t.double().transpose(1, 2) for t in (q, k, v))
    k64, v64 = (t.repeat_interleave(groups, dim=1) for t in (k64, v64))
    scores = (q64 @ k64.transpose(-1, -2)) * (softmax_scale or q.shape[-1] ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    left, right = window_size
    right = 0 if causal else right
    i = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    j = torch.arange(seqlen_k)[None, :]
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    if left >= 0:
        visible &= j >= i - left
    if right >= 0:
        visible &= j <= i + right
    scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    if s_aux is not None:  # the sink joins every row's denominator
        lse = torch.logaddexp(lse, s_aux.double().view(1, heads, 1, 1))
    lse = lse.masked_fill(torch.isneginf(lse), 0.0)  # a row that sees nothing: P = 0, out = 0
    out = torch.nn.functional.dropout(torch.exp(scores - lse), dropout_p) @ v64
    return out.transpose(1, 2).to(q.dtype)


class Recorder:
    """Stand-ins for flash_attn_func and flash_attn_varlen_func that check what the integration passes
    (types, layouts, cu_seqlens values) and compute attention_contract; `calls` lists which ran."""

    def __init__(self):
        self.calls = []
        self.deterministic = []  # what each call passed as deterministic

    @staticmethod
    def _check_options(kw):
        assert set(kw) <= {"softmax_scale", "causal", "window_size", "softcap", "s_aux", "dropout_p",
                           "deterministic"}, kw
        assert type(kw.pop("deterministic")) is bool  # always passed: the backward's mode (not the contract's)
        if "dropout_p" in kw:
            assert isinstance(kw["dropout_p"], float) and 0 < kw["dropout_p"] < 1
        assert isinstance(kw["causal"], bool)
        left, right = kw["window_size"]
        assert type(left) is int and type(right) is int and left >= -1 and right >= -1
        assert isinstance(kw["softcap"], float) and kw["softcap"] >= 0
        if kw.get("s_aux") is not None:
            assert kw["s_aux"].dtype == torch.float32 and kw["s_aux"].dim() == 1 and kw["s_aux"].stride() == (1,)

    def func(self, q, k, v, **kw):
        self.deterministic.append(kw.get("deterministic"))
        self._check_options(kw)
        assert q.dim() == k.dim() == v.dim() == 4 and q.shape[-1] == k.shape[-1] == v.shape[-1]
        assert q.shape[0] == k.shape[0] and q.shape[2] % k.shape[2] == 0
        self.calls.append(("func", kw))
        return attention_contract(q, k, v, **kw)

    def varlen(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kw):
        self.deterministic.append(kw.get("deterministic"))
        self._check_options(kw)
        assert q.dim() == k.dim() == v.dim() == 3
        for cu, rows, longest in ((cu_seqlens_q, q, max_seqlen_q), (cu_seqlens_k, k, max_seqlen_k)):
            assert cu.dtype == torch.int32 and cu.is_contiguous() and cu.device == q.device
            assert type(longest) is int  # never a tensor: the kernels' grid is sized on the host
            bounds = cu.tolist()
            assert bounds[0] == 0 and bounds[-1] == rows.shape[0] and bounds == sorted(bounds)
            assert max(b - a for a, b in zip(bounds, bounds[1:])) == longest
        assert cu_seqlens_q.numel() == cu_seqlens_k.numel()
        self.calls.append(("varlen", kw))
        bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = [attention_contract(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **kw)[0]
                for (q0, q1), (k0, k1) in zip(itertools.pairwise(bq), itertools.pairwise(bk))]
        return torch.cat(outs)

    def paths(self):
        return [name for name, _ in self.calls]


@pytest.fixture
def recorder(monkeypatch):
    pytest.importorskip("transformers", reason="transformers is not installed")
    fa2_hf.register()
    rec = Recorder()
    monkeypatch.setattr(flash_attn2, "flash_attn_func", rec.func)
    monkeypatch.setattr(flash_attn2, "flash_attn_varlen_func", rec.varlen)
    return rec


VOCAB = SIZES["cpu"]["vocab_size"]


def assert_close(ours, theirs, where=None):
    if where is not None:
        ours, theirs = ours[where], theirs[where]
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def padded_batch(lengths, total, side):
    return hf_models.padded_batch(lengths, total, side, VOCAB)


@pytest.mark.parametrize("kind", KINDS)
def test_unpadded_batch(recorder, kind):
    ours, theirs = twin_models(kind)
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits)
    assert set(recorder.paths()) == {"func"}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch(recorder, kind, side):
    ours, theirs = twin_models(kind)
    ids, mask = padded_batch([12, 7, 1], 12, side)
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits, mask.bool())
    assert set(recorder.paths()) == {"varlen"}  # never the fixed-length kernel over padding


@pytest.mark.parametrize("kind", KINDS)
def test_packed_by_position_ids(recorder, kind):
    ours, theirs = twin_models(kind)
    lengths = [6, 9, 1, 4]
    ids = torch.randint(1, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(ids, position_ids=position_ids, use_cache=False).logits
        # The yardstick runs each sequence alone: nothing may leak from one packed sequence into the next.
        bounds = [0, *itertools.accumulate(lengths)]
        alone = torch.cat([theirs(ids[:, a:b]).logits for a, b in itertools.pairwise(bounds)], dim=1)
    assert_close(packed, alone)
    assert set(recorder.paths()) == {"varlen"}


def test_packed_by_flattening_collator(recorder):
    from transformers import DataCollatorWithFlattening

    ours, theirs = twin_models("llama")
    lengths = [5, 8, 3]
    features = [{"input_ids": torch.randint(1, VOCAB, (n,)).tolist()} for n in lengths]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(features)
    assert "cu_seq_lens_q" in batch and "position_ids" not in batch  # the kwargs alone must split the batch
    batch.pop("labels")
    with torch.no_grad():
        packed = ours(**batch, use_cache=False).logits
        alone = torch.cat([theirs(torch.tensor([f["input_ids"]])).logits for f in features], dim=1)
    assert_close(packed, alone)
    assert set(recorder.paths()) == {"varlen"}


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("kind", KINDS)
def test_generation_through_the_kv_cache(recorder, kind, padded):
    ours, theirs = twin_models(kind)
    ids, mask = padded_batch([8, 5] if padded else [8, 8], 8, "left")
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0)
    ours_out, theirs_out = ours.generate(**args), theirs.generate(**args)
    # Past the sliding window (5) within the 18 tokens, so the sliding layers' cache is cut to it as well.
    assert torch.equal(ours_out.sequences, theirs_out.sequences)
    for ours_step, theirs_step in zip(ours_out.logits, theirs_out.logits):
        assert_close(ours_step, theirs_step)
    paths = recorder.paths()
    if not padded:
        assert set(paths) == {"func"}
    elif kind == "llama":
        assert set(paths) == {"varlen"}
    else:  # a sliding layer's mask drops the padding once the cache holds only the window: fixed-length again
        assert paths[0] == "varlen" and "func" in paths


def test_gradients_of_a_padded_training_step(recorder):
    ours, theirs = twin_models("gemma2")
    ids, mask = padded_batch([10, 6], 10, "right")
    labels = ids.masked_fill(mask == 0, -100)
    for model in (ours, theirs):
        model.train()
        model(ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("env, expected", [(None, False), ("1", True)], ids=["default", "env"])
def test_backward_mode_reaches_the_kernels(recorder, monkeypatch, env, expected):
    # flash_attn's default (the atomic backward) unless FLASH_ATTENTION_DETERMINISTIC=1, on every call.
    if env is None:
        monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    else:
        monkeypatch.setenv("FLASH_ATTENTION_DETERMINISTIC", env)
    ours, _ = twin_models("llama")
    ids, mask = padded_batch([8, 5], 8, "left")
    with torch.no_grad():
        ours(torch.randint(1, VOCAB, (2, 8)))
        ours(ids, attention_mask=mask)
    assert set(recorder.paths()) == {"func", "varlen"}
    assert recorder.deterministic and set(recorder.deterministic) == {expected}


def test_sinks_get_their_gradient(recorder):
    ours, theirs = twin_models("gpt_oss")
    ids = torch.randint(1, VOCAB, (2, 9))
    for model in (ours, theirs):
        model.train()
        model(ids, labels=ids).loss.backward()
    sinks = [(a.self_attn.sinks.grad, b.self_attn.sinks.grad) for a, b in zip(ours.model.layers, theirs.model.layers)]
    for g_ours, g_theirs in sinks:
        assert g_ours is not None and g_ours.abs().sum() > 0
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-7, rtol=1e-4)


def test_attention_dropout_reaches_the_kernels_while_training(recorder):
    ours, _ = twin_models("llama", attention_dropout=0.1)
    ids = torch.randint(1, VOCAB, (1, 4))
    with torch.no_grad():
        ours(ids)  # eval: no dropout asked for
        assert all("dropout_p" not in kw for _, kw in recorder.calls)
        recorder.calls.clear()
        ours.train()(ids)
    assert recorder.calls and all(kw.get("dropout_p") == 0.1 for _, kw in recorder.calls)


def test_static_cache_is_refused(recorder):
    ours, _ = twin_models("llama")
    with pytest.raises(NotImplementedError, match="StaticCache"):
        ours.generate(torch.randint(1, VOCAB, (1, 4)), max_new_tokens=3, do_sample=False,
                      cache_implementation="static", disable_compile=True)


def test_switching_a_loaded_model(recorder):
    _, theirs = twin_models("llama")
    ids = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        expected = theirs(ids).logits
        theirs.set_attn_implementation(fa2_hf.register())
        assert theirs.config._attn_implementation == fa2_hf.NAME
        assert_close(theirs(ids).logits, expected)
    assert recorder.paths() == ["func", "func"]

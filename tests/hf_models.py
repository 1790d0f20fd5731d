"""Tiny transformers models for the integration tests (test_transformers_cpu, test_transformers_gpu): built
from configs with random weights, never downloaded. Importing this needs transformers only when a model is
built."""

import copy

import torch

from flash_attn2.integrations import transformers as fa2_hf

# Where transformers has no SDPA path (softcap, sinks), eager attention is the yardstick.
YARDSTICK = {"llama": "sdpa", "mistral": "sdpa", "gemma2": "eager", "gpt_oss": "eager"}
KINDS = list(YARDSTICK)
# What each model asks of the kernels beyond causal GQA (tests skip a model whose variants are not built).
VARIANTS = {"llama": (), "mistral": ("window",), "gemma2": ("window", "softcap"), "gpt_oss": ("window", "sinks")}

# Sizes: 2 layers, GQA 4:2. initializer_range is large enough for scores of order 1 to 10, so that the
# softcap, the sinks and the window change the outputs (at transformers' 0.02 they would hardly matter).
SIZES = {
    "cpu": dict(vocab_size=96, hidden_size=64, intermediate_size=96, head_dim=16, sliding_window=5,
                max_position_embeddings=128, initializer_range=0.1, softcap=2.0),
    "gpu": dict(vocab_size=512, hidden_size=256, intermediate_size=512, head_dim=64, sliding_window=48,
                max_position_embeddings=1024, initializer_range=0.05, softcap=5.0),
}


def tiny_config(kind, size="cpu", **overrides):
    import transformers as tf

    s = dict(SIZES[size])
    window, softcap, head_dim = s.pop("sliding_window"), s.pop("softcap"), s.pop("head_dim")
    common = dict(s, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  pad_token_id=0, eos_token_id=None, bos_token_id=None)
    if kind == "llama":
        config = tf.LlamaConfig(**common)
    elif kind == "mistral":  # every layer slides
        config = tf.MistralConfig(**common, sliding_window=window)
    elif kind == "gemma2":   # softcap everywhere; sliding and full layers alternate
        config = tf.Gemma2Config(**common, sliding_window=window, attn_logit_softcapping=softcap,
                                 query_pre_attn_scalar=head_dim)
    elif kind == "gpt_oss":  # sinks; sliding and full layers alternate; every token through both experts (a
        # top-k choice would flip between bf16 and fp32 and make logits jump)
        # (its own max_position_embeddings: YaRN's scaling is set up for it)
        del common["max_position_embeddings"]
        config = tf.GptOssConfig(**{**common, "intermediate_size": common["hidden_size"]}, sliding_window=window,
                                 num_local_experts=2, num_experts_per_tok=2)
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build(config, implementation, dtype=torch.float32, device="cpu", state=None):
    """A causal LM of `config` (copied: a model keeps its implementation in its config) on `implementation`,
    in eval mode; with `state`, those weights."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def twin_models(kind, size="cpu", dtype=torch.float32, device="cpu", seed=0, **overrides):
    """(ours, theirs): one set of random weights under flash_attn2 and under the kind's yardstick."""
    torch.manual_seed(seed)
    config = tiny_config(kind, size, **overrides)
    ours = build(config, fa2_hf.register(), dtype, device)
    theirs = build(config, YARDSTICK[kind], dtype, device, state=ours.state_dict())
    return ours, theirs


def padded_batch(lengths, total, side, vocab, device="cpu"):
    """Random tokens (batch, total) and the long mask of sequences of `lengths` padded on `side` to `total`."""
    columns = torch.arange(total, device=device)[None, :]
    lengths = torch.tensor(lengths, device=device)[:, None]
    mask = (columns >= total - lengths) if side == "left" else (columns < lengths)
    ids = torch.randint(1, vocab, mask.shape, device=device).masked_fill(~mask, 0)  # 0 is the pad token
    return ids, mask.long()


def cache_kwarg(model):
    """The name under which this transformers version's forward takes the KV cache."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def teacher_forced_tokens(model, ids, mask, forced):
    """Greedy next tokens along a given continuation, one decode step at a time through a DynamicCache:
    the prompt (ids, mask: (batch, prompt)) is prefilled, then forced[:, t] is fed at step t. Returns
    (batch, steps): the model's argmax after the prompt and after each forced token but the last."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded prompts
    step = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    chosen = []
    for t in range(forced.shape[1]):
        logits = model(**step, **{cache_kwarg(model): cache}).logits[:, -1]
        chosen.append(logits.argmax(-1))
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        step = dict(input_ids=forced[:, t:t + 1], attention_mask=mask, position_ids=positions, use_cache=True)
    return torch.stack(chosen, dim=1)

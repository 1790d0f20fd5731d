"""HF transformers 5.x models with their attention on flash_attn2, in one line.

    import flash_attn2.integrations.transformers as fa2_hf

    model = AutoModelForCausalLM.from_config(config, attn_implementation=fa2_hf.register(), dtype=torch.bfloat16)
    model.set_attn_implementation(fa2_hf.register())   # or: switch a model that is already loaded

register() adds an attention function and its mask function to transformers' AttentionInterface and
AttentionMaskInterface under the name NAME ("fa2_cute") and returns that name. The name holds no "flash":
transformers 5.x treats every implementation whose name contains "flash" as a FlashAttention package or a
Hub kernel to download, and "sdpa" or "flex_attention" in it would trigger those backends' checks.

What it covers, as transformers' own flash_attention_2 path does, through flash_attn_func and
flash_attn_varlen_func:
- unpadded batches: flash_attn_func, causal aligned bottom-right, which is also what a decode step with a
  KV cache needs (queries are the last tokens of their sequences);
- padded batches (a 2-D attention_mask, left or right padding): padding tokens are dropped and the rest goes
  through flash_attn_varlen_func; the outputs at padded positions are 0. Nothing attends to padding;
- padding-free packed batches: the cu_seq_lens_q/k and max_length_q/k kwargs of DataCollatorWithFlattening
  (return_flash_attn_kwargs=True), or, failing those, position_ids that restart (batch of one row, as
  transformers' flash path reads them);
- GQA/MQA (k and v are never repeated), sliding-window layers (window_size), logit softcapping (Gemma 2)
  and attention sinks (gpt-oss's s_aux), passed per flash_attn2's contract;
- the backward's mode: the deterministic kwarg, else FLASH_ATTENTION_DETERMINISTIC=1, as transformers reads them;
- attention dropout while training (the model's attention_dropout, as dropout_p);
- generation with the default DynamicCache, padded or not.
Not covered: output_attentions (no weights are returned, as with flash_attention_2), and StaticCache
(cache_implementation="static": transformers keeps the padding mask for static caches only under names
holding "flash", so the attention would read the cache's empty slots; the mask function refuses it loudly).

The argument mapping (unpad indices, cu_seqlens from an attention_mask or from position_ids, window and
softcap translation) is in pure functions below, testable on CPU tensors.
"""

import functools
import os
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

import flash_attn2
from flash_attn2._checks import SUPPORTED_DTYPES

NAME = "fa2_cute"

# Substrings that make transformers treat an implementation name as something else (see register()).
_RESERVED = ("flash", "sdpa", "flex_attention", "/", ":", "paged|")


def check_name(name):
    """name, if transformers will dispatch it to the function registered under it; else ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"attention implementation name must be a non-empty str, got {name!r}")
    clash = [s for s in _RESERVED if s in name]
    if clash or name == "eager":
        raise ValueError(f"attention implementation name {name!r} cannot hold {clash or ['eager']}: transformers 5.x "
                         "reads 'flash' as a FlashAttention package or Hub kernel to load, 'sdpa' and "
                         "'flex_attention' as those backends, 'org/repo' and ':' as a Hub kernel, 'paged|' as a prefix")
    return name


def register(name=NAME):
    """Registers flash_attn2 with transformers under `name` and returns it, for attn_implementation=...

    Safe to call more than once. Raises ImportError if transformers is not installed.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    check_name(name)
    AttentionInterface.register(name, attention_forward)
    # Without a mask function under the same name, transformers' mask creation returns None for an unknown
    # implementation, and padded batches would silently attend to their padding.
    AttentionMaskInterface.register(name, padding_mask)
    return name


# ---- the mapping, in pure functions (CPU tensors are fine)

class Unpadded(NamedTuple):
    """Where the tokens a 2-D mask keeps lie once packed: rows `indices` of the (batch * seqlen) flattened
    tensor, sequence b at rows cu_seqlens[b]:cu_seqlens[b + 1] of the packed one."""
    indices: torch.Tensor   # int64 (kept tokens,)
    cu_seqlens: torch.Tensor  # int32 (batch + 1,)
    max_seqlen: int


def unpad(mask):
    """The Unpadded of a (batch, seqlen) mask, nonzero where a token is kept (left, right or any padding).

    Reads the lengths back to the host once (max_seqlen must be a Python int for flash_attn_varlen_func,
    and the number of kept tokens sizes the packed tensors)."""
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    return Unpadded(indices, cu_seqlens, int(lengths.max()) if lengths.numel() else 0)


def uniform_varlen(batch, seqlen, device):
    """cu_seqlens of `batch` sequences of `seqlen` rows each, back to back: [0, seqlen, 2 * seqlen, ...]."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


class VarlenPlan(NamedTuple):
    """How a padded batch goes through flash_attn_varlen_func: the queries packed by q_indices (None: every
    query row is kept, in order), the keys and values by k.indices, each with its cu_seqlens."""
    q_indices: Optional[torch.Tensor]
    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    k: Unpadded


def plan_padded(mask, query_length):
    """The VarlenPlan for queries of query_length tokens attending keys under a (batch, kv_length) mask.

    query_length == kv_length (training, or a prefill without cache): queries are the same tokens as the
    keys, and padded queries are dropped with them. query_length < kv_length (a step with a KV cache): the
    queries are the last query_length tokens of their rows and are all kept; the kernels' bottom-right causal
    alignment then puts query t of row b after exactly the kept keys before it (with left padding every key
    right of the first kept one is kept), so nothing needs dropping. Padding among those queries (a second
    chunk of a left-padded prompt) gets rows whose output is ignored, as every padded position's is.
    """
    batch, kv_length = mask.shape
    k = unpad(mask)
    if query_length == kv_length:
        return VarlenPlan(k.indices, k.cu_seqlens, k.max_seqlen, k)
    if query_length > kv_length:
        raise ValueError(f"attention_mask covers {kv_length} keys, fewer than the {query_length} queries")
    return VarlenPlan(None, uniform_varlen(batch, query_length, mask.device), query_length, k)


def is_packed(position_ids, batch):
    """Whether position_ids mark several sequences packed in one row: positions that do not go up by one
    somewhere. As transformers' flash path, only a single row of more than one token is read (a sync);
    other batches count as unpacked without a look, so ordinary batches cost nothing here."""
    if position_ids is None or batch != 1 or position_ids.dim() != 2 or position_ids.shape[-1] <= 1:
        return False  # (3-D ones are multimodal RoPE sections, not sequence boundaries)
    return bool((position_ids.reshape(-1).diff() != 1).any())


def varlen_from_position_ids(position_ids):
    """(cu_seqlens int32 (sequences + 1,), max_seqlen) of the sequences packed in position_ids (1, total):
    a sequence starts at the first token and wherever a position does not follow the one before by one.

    That is the rule of transformers' packed-sequence masks for SDPA and eager (find_packed_sequence_indices),
    so both sides split a batch alike; its flash path's "restarts at the smallest position" agrees with it on
    every batch whose sequences count up from one start position."""
    positions = position_ids.reshape(-1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = positions.diff() != 1
    bounds = torch.nonzero(starts).flatten().to(torch.int32)
    total = torch.tensor([positions.numel()], dtype=torch.int32, device=positions.device)
    cu_seqlens = torch.cat([bounds, total])
    return cu_seqlens, int(cu_seqlens.diff().max()) if positions.numel() else 0


def window_size(sliding_window, causal, key_length):
    """flash_attn2's (left, right) window for transformers' sliding_window: a query sees sliding_window keys
    counting itself (transformers' masks: key j visible iff i - sliding_window < j <= i), so left is
    sliding_window - 1; right is 0 with causal, else symmetric as transformers' flash path sets it.
    (-1, -1) where no window cuts anything: no sliding_window, or no more keys than it."""
    if sliding_window is None or key_length <= sliding_window:
        return (-1, -1)
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
    left = sliding_window - 1
    return (left, 0 if causal else left)


def softcap_value(softcap):
    """flash_attn2's softcap for transformers' (None: no capping; Gemma 2 passes attn_logit_softcapping)."""
    return 0.0 if softcap is None else float(softcap)


def deterministic_backward(deterministic=None):
    """flash_attn2's deterministic for transformers' kwarg of that name; unset, FLASH_ATTENTION_DETERMINISTIC=1
    in the environment asks for it, as in transformers' own flash_attention_2 path. (The global
    torch.use_deterministic_algorithms(True) selects the deterministic backward either way.)"""
    if deterministic is None:
        return os.environ.get("FLASH_ATTENTION_DETERMINISTIC", "0") == "1"
    return bool(deterministic)


def target_dtype(query, module):
    """The dtype to run attention in when the model hands over fp32 (PEFT keeps norms in fp32): autocast's
    dtype, else the model's half-precision Linear weights', as transformers' flash path does. None keeps
    the query's dtype (flash_attn2 then says which dtypes it takes)."""
    if query.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear) and layer.weight.dtype in SUPPORTED_DTYPES:
            return layer.weight.dtype
    return None


# ---- what transformers calls

def padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """The mask transformers builds for this implementation: the 2-D (batch, kv_length) padding mask sliced to
    the keys the layer sees (the last kv_length: sliding-window caches keep fewer), or None where nothing is
    padded. Causality and windows are the kernels' arguments, not mask entries."""
    if isinstance(q_offset, torch.Tensor):  # only a StaticCache's layers count their tokens in a tensor
        raise NotImplementedError(
            f"flash_attn2's transformers integration ({NAME}) does not support StaticCache "
            "(cache_implementation='static'): transformers drops the padding mask of an unpadded batch, and the "
            "attention would read the cache's empty slots. Use the default DynamicCache.")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):  # one sync per forward, not per layer
        return None
    return attention_mask


def _varlen_kwargs(kwargs):
    """The padding-free kwargs (cu_seq_lens_q/k, max_length_q/k) if all four were passed, else None."""
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    values = [kwargs.get(n) for n in names]
    return None if any(v is None for v in values) else values


def _as_cu_seqlens(cu, device):
    return cu.to(device=device, dtype=torch.int32).contiguous()


def _as_int(n):
    return int(n)  # a tensor (transformers computes some on the device) is read back: the varlen API takes ints


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention-function protocol: query (batch, heads, q_len, head_dim), key and value
    (batch, heads_kv, kv_len, head_dim), attention_mask from padding_mask; returns (out (batch, q_len, heads,
    head_dim_v), None)."""
    if kwargs.get("output_attentions"):
        _warn_output_attentions()
    batch, _, q_len, head_dim = query.shape
    # flash_attn2 takes (batch, seqlen, heads, head_dim) at any strides: these transposes are views.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if (dtype := target_dtype(q, module)) is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    v_head_dim = v.shape[-1]
    if v_head_dim != head_dim:  # MLA-style smaller value heads: flash_attn2 needs one head dim; cropped below
        v = F.pad(v, (0, head_dim - v_head_dim))
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    options = dict(softmax_scale=scaling, causal=causal, window_size=window_size(sliding_window, causal, k.shape[1]),
                   softcap=softcap_value(softcap))
    if s_aux is not None:  # only where the model has sinks: keeps the call valid for builds without s_aux
        options["s_aux"] = s_aux.float()
    if dropout:  # transformers passes the config's attention_dropout while training, 0.0 in eval
        options["dropout_p"] = float(dropout)
    options["deterministic"] = deterministic_backward(kwargs.get("deterministic"))

    if attention_mask is not None:
        out = _padded(q, k, v, attention_mask, options)
    elif (varlen := _varlen_kwargs(kwargs)) is not None:
        cu_q, cu_k, max_q, max_k = varlen
        out = flash_attn2.flash_attn_varlen_func(
            q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
            _as_cu_seqlens(cu_q, q.device), _as_cu_seqlens(cu_k, q.device), _as_int(max_q), _as_int(max_k), **options)
        out = out.view(batch, q_len, *out.shape[1:])
    elif is_packed(kwargs.get("position_ids"), batch):
        cu_seqlens, max_seqlen = varlen_from_position_ids(kwargs["position_ids"].to(q.device))
        out = flash_attn2.flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                 **options)[None]
    else:
        out = flash_attn2.flash_attn_func(q, k, v, **options)
    return (out[..., :v_head_dim] if v_head_dim != head_dim else out), None


def _padded(q, k, v, attention_mask, options):
    """Attention of a padded batch through flash_attn_varlen_func: (batch, q_len, heads, head_dim)."""
    batch, q_len = q.shape[:2]
    if attention_mask.dim() != 2:  # a caller's own 4-D mask reaches attention untouched (transformers passes it on)
        raise ValueError(f"{NAME} takes a 2-D (batch, kv_length) padding mask, got attention_mask of shape "
                         f"{tuple(attention_mask.shape)}; arbitrary 4-D masks need attn_implementation='sdpa' or 'eager'")
    mask = attention_mask.to(device=q.device, dtype=torch.bool)
    if k.shape[1] > mask.shape[1]:  # keys past the mask's end are not the sequence's (transformers slices too)
        k, v = k[:, :mask.shape[1]], v[:, :mask.shape[1]]
    plan = plan_padded(mask, q_len)
    k_rows, v_rows = (t.reshape(-1, *t.shape[2:]).index_select(0, plan.k.indices) for t in (k, v))
    q_rows = q.reshape(-1, *q.shape[2:])
    if plan.q_indices is not None:
        q_rows = q_rows.index_select(0, plan.q_indices)
    out = flash_attn2.flash_attn_varlen_func(q_rows, k_rows, v_rows, plan.cu_seqlens_q, plan.k.cu_seqlens,
                                             plan.max_seqlen_q, plan.k.max_seqlen, **options)
    if plan.q_indices is not None:  # padded query rows get 0
        out = out.new_zeros(batch * q_len, *out.shape[1:]).index_copy(0, plan.q_indices, out)
    return out.view(batch, q_len, *out.shape[1:])


@functools.cache  # once per process, as transformers' warning_once
def _warn_output_attentions():
    warnings.warn(f"{NAME} returns no attention weights (output_attentions=True is ignored), as flash_attention_2")

"""Speed of the attention variants of issue 11 (sliding window, softcap, ALiBi, learnable sinks, dropout), in
three parts (--parts), all in one process and one run:

flex: flash_attn2 against FlexAttention (torch.compile'd torch.nn.attention.flex_attention with the same
  score_mod, and a block mask from create_block_mask for causal and windowed masks; a sink as FlexAttention
  users add it, rescaling out by sigmoid(lse - s_aux)) where the variants are used: window (4096, 0) causal
  at S=16k and (1024, 0) causal at S=8k, softcap 50 causal and not, ALiBi causal, and sink + window (1024, 0)
  + causal, the last three at --flex-seqlen. Beside them the plain causal flash_attn2 kernel at the same S,
  the reference point: a window's TFLOP/s count only the entries it sees, and its efficiency is that over the
  plain causal kernel's TFLOP/s.
cost: each variant against the plain kernel (the same causal) at the paper grid's points (S 1k..16k,
  batch = tokens // S, heads = hidden // head_dim): slowdown = variant ms / plain ms, and for the window its
  efficiency as above.
dropout: flash_attn2 with dropout_p = --dropout-p (0.1) against SDPA's flash backend with the same dropout
  (torch.nn.functional.scaled_dot_product_attention(dropout_p=...) under sdpa_kernel(FLASH_ATTENTION)) on the
  same grid: speedup = SDPA ms / ours ms; and dropout's cost, ours with it over ours without.

Every implementation of a point is timed alternately on the same values (common.time_ms); forward under
no_grad, forward + backward by autograd. seqlen_q = seqlen_k and heads_kv = heads throughout. FlexAttention
compiles once per point and pass before it is timed (the first run, which also gives the out/dq diffs).
"""

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from common import (DTYPES, Impl, add_grid_args, add_output_args, csv_of, describe, fmt, geomean, grid_causals,
                    grid_dtype_head_dims, markdown_table, pass_flops, progress, run_meta, tflops, time_ms, timed_call,
                    unavailable, write_outputs)

PARTS = ("flex", "cost", "dropout")
DEVICE = "cuda"  # one name for every tensor made here, so that a dry run can put them elsewhere
PASSES = {"fwd": "Forward", "fwdbwd": "Forward + backward"}
# What FlexAttention raises where it cannot compile or run a point (out of memory is a RuntimeError).
FLEX_REFUSALS = (RuntimeError, ValueError, TypeError, AssertionError, NotImplementedError)


class Variant(NamedTuple):
    causal: bool
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False
    sink: bool = False

    @property
    def windowed(self):
        return self.window != (-1, -1)


# The flex part: (name, seqlen, variant); seqlen None means --flex-seqlen.
FLEX_POINTS = [
    ("window-4096", 16384, Variant(causal=True, window=(4096, 0))),
    ("window-1024", 8192, Variant(causal=True, window=(1024, 0))),
    ("softcap-50-causal", None, Variant(causal=True, softcap=50.0)),
    ("softcap-50", None, Variant(causal=False, softcap=50.0)),
    ("alibi-causal", None, Variant(causal=True, alibi=True)),
    ("sink-window-1024", None, Variant(causal=True, window=(1024, 0), sink=True)),
]
# The cost part's variants, each on both masks (--causal) but the window, which is causal only.
COST_VARIANTS = {
    "softcap-50": lambda causal: Variant(causal, softcap=50.0),
    "alibi": lambda causal: Variant(causal, alibi=True),
    "sink": lambda causal: Variant(causal, sink=True),
    "window-1024": lambda causal: Variant(causal, window=(1024, 0)) if causal else None,
    "all": lambda causal: Variant(causal, window=(1024, 0) if causal else (-1, -1), softcap=50.0, alibi=True,
                                  sink=True),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=csv_of(choices=PARTS), default=",".join(PARTS))
    parser.add_argument("--passes", type=csv_of(choices=PASSES), default="fwd,fwdbwd",
                        help="comma-separated, from fwd, fwdbwd")
    add_grid_args(parser)  # --seqlens and --causal are the cost part's; --dtypes, --head-dims, --tokens, --hidden both
    parser.set_defaults(dtypes="bf16", head_dims="128,64", seqlens="1024,2048,4096,8192,16384")
    parser.add_argument("--flex-seqlen", type=int, default=8192,
                        help="flex: S of the softcap, ALiBi and sink points (the windows have their own)")
    parser.add_argument("--variants", type=csv_of(choices=COST_VARIANTS), default=",".join(COST_VARIANTS),
                        help="cost: the variants, from " + ",".join(COST_VARIANTS))
    parser.add_argument("--dropout-p", type=float, default=0.1, help="dropout: the dropout probability")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per implementation and pass")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before them")
    parser.add_argument("--out", metavar="DIR", help="write DIR/bench_variants.md and DIR/bench_variants.json "
                                                     "(--markdown and --json, where given, win)")
    add_output_args(parser)
    args = parser.parse_args()
    if args.out:
        args.markdown = args.markdown or str(Path(args.out) / "bench_variants.md")
        args.json = args.json or str(Path(args.out) / "bench_variants.json")
    return args


# ---- FLOPs of a window: the entries it sees

def visible_entries(seqlen_q, seqlen_k, causal, window):
    """How many (query, key) pairs are visible: query i sees keys d - left .. d + right, d = i + seqlen_k -
    seqlen_q its diagonal, -1 unbounded, causal forcing right = 0 (the contract's formula, row by row)."""
    left, right = window
    if causal:
        right = 0
    diagonal = torch.arange(seqlen_q, dtype=torch.int64) + (seqlen_k - seqlen_q)
    first = (diagonal - left).clamp(min=0) if left >= 0 else torch.zeros_like(diagonal)
    last = (diagonal + right).clamp(max=seqlen_k - 1) if right >= 0 else torch.full_like(diagonal, seqlen_k - 1)
    return int((last - first + 1).clamp(min=0).sum())


def variant_flops(batch, heads, seqlen, head_dim, variant):
    """FLOPs of each pass: common.pass_flops's count (causal: half of S²), or with a window 4·D per visible
    entry per head in the forward and 2.5 times that in the backward, as common.attention_flops counts."""
    if not variant.windowed:
        return pass_flops(batch, heads, seqlen, head_dim, variant.causal)
    fwd = 4 * batch * heads * head_dim * visible_entries(seqlen, seqlen, variant.causal, variant.window)
    return {"fwd": fwd, "bwd": fwd * 5 // 2, "fwdbwd": fwd + fwd * 5 // 2}


# ---- the implementations

def alibi_slopes(heads):
    """ALiBi's geometric slopes 2^(-8 (h + 1) / heads), fp32 (heads,)."""
    return torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], dtype=torch.float32, device=DEVICE)


def sink_logits(heads, seqlen):
    """Sinks about as large as a row's log-sum-exp for randn inputs, so that they take a real share."""
    return (math.log(seqlen) + torch.linspace(-2.0, 2.0, heads, device=DEVICE)).float()


def variant_tensors(variant, heads, seqlen):
    return alibi_slopes(heads) if variant.alibi else None, sink_logits(heads, seqlen) if variant.sink else None


def leaves(tensors, requires_grad):
    return [t.detach().requires_grad_(requires_grad) for t in tensors]


def ours(q, k, v, dout, variant, slopes, s_aux, requires_grad):
    """flash_attn_func with the variant, on (batch, seqlen, heads, head_dim) leaves."""
    from flash_attn2 import flash_attn_func

    qkv = leaves((q, k, v), requires_grad)
    forward = functools.partial(flash_attn_func, *qkv, causal=variant.causal, window_size=variant.window,
                                softcap=variant.softcap, alibi_slopes=slopes, s_aux=s_aux)
    return Impl(forward, qkv, dout, lambda t: t)


def ours_dropout(q, k, v, dout, causal, dropout_p, requires_grad):
    """flash_attn_func with dropout (and nothing else), on (batch, seqlen, heads, head_dim) leaves."""
    from flash_attn2 import flash_attn_func

    qkv = leaves((q, k, v), requires_grad)
    return Impl(functools.partial(flash_attn_func, *qkv, causal=causal, dropout_p=dropout_p), qkv, dout, lambda t: t)


def sdpa_flash_dropout(q, k, v, dout, causal, dropout_p, requires_grad):
    """SDPA's FlashAttention-2 backend with dropout, on (batch, heads, seqlen, head_dim) contiguous copies."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = [t.detach().transpose(1, 2).contiguous().requires_grad_(requires_grad) for t in (q, k, v)]

    def forward():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(*qkv, dropout_p=dropout_p, is_causal=causal)

    return Impl(forward, qkv, dout.transpose(1, 2).contiguous(), lambda t: t.transpose(1, 2))


def allow_recompiles():
    """Every point compiles FlexAttention afresh (its score_mod, block mask and shapes are guarded on): lift
    dynamo's limit of 8 recompiles of one function, past which it would fall back to eager flex_attention,
    which materializes S x S."""
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 1024))


def flex_forward(q, k, v, score_mod, block_mask, s_aux):
    """FlexAttention, with a sink where s_aux is given: out · Σexp / (Σexp + exp(s_aux)) = out ·
    sigmoid(lse - s_aux), fused by the same compile. (batch, heads, seqlen, head_dim) in and out."""
    from torch.nn.attention.flex_attention import flex_attention

    if s_aux is None:
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                  return_aux=AuxRequest(lse=True))
        lse = aux.lse
    except ImportError:  # torch before AuxRequest
        out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, return_lse=True)
    return (out.float() * torch.sigmoid(lse - s_aux[:, None]).unsqueeze(-1)).to(out.dtype)


@functools.cache
def compiled_flex_forward():
    return torch.compile(flex_forward, dynamic=False)


def flex_mods(variant, seqlen, slopes):
    """(score_mod or None, block mask or None) for the variant on seqlen_q = seqlen_k = seqlen (so a query's
    diagonal is its own index): the contract's logits and window."""
    from torch.nn.attention.flex_attention import create_block_mask

    score_mod = None
    if variant.softcap or variant.alibi:
        softcap = variant.softcap

        def score_mod(score, b, h, q_idx, kv_idx):
            if softcap > 0:
                score = softcap * torch.tanh(score / softcap)
            if slopes is not None:
                score = score - slopes[h] * (q_idx - kv_idx).abs()
            return score

    left, right = variant.window
    if variant.causal:
        right = 0
    if left < 0 and right < 0:
        return score_mod, None

    def mask_mod(b, h, q_idx, kv_idx):
        visible = []
        if left >= 0:
            visible.append(q_idx - kv_idx <= left)
        if right >= 0:
            visible.append(kv_idx - q_idx <= right)
        return visible[0] if len(visible) == 1 else visible[0] & visible[1]

    return score_mod, create_block_mask(mask_mod, None, None, seqlen, seqlen, device=DEVICE)


def flex(q, k, v, dout, variant, seqlen, slopes, s_aux, requires_grad):
    """FlexAttention with the variant, on (batch, heads, seqlen, head_dim) contiguous copies."""
    score_mod, block_mask = flex_mods(variant, seqlen, slopes)
    qkv = [t.detach().transpose(1, 2).contiguous().requires_grad_(requires_grad) for t in (q, k, v)]
    forward = functools.partial(compiled_flex_forward(), *qkv, score_mod, block_mask, s_aux)
    return Impl(forward, qkv, dout.transpose(1, 2).contiguous(), lambda t: t.transpose(1, 2))


def run_once(impl, backward, refusals=()):
    """[out, dq or None] in our layout from one call (which also compiles), or None where the implementation
    raises one of `refusals`."""
    try:
        out = impl.forward()
        dq = torch.autograd.grad(out, impl.qkv[0], impl.dout)[0] if backward else None
    except refusals as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        print(f"  refused: {type(error).__name__}: {first_line}", file=sys.stderr)
        return None
    return [None if t is None else impl.to_ours(t) for t in (out, dq)]


def max_diff(a, b):
    return None if a is None or b is None else (a.float() - b.float()).abs().max().item()


def compile_passes(impl, passes, refusals):
    """Runs every pass once (FlexAttention compiles a graph for no_grad and one for autograd); False where
    one is refused."""
    try:
        for pass_ in passes:
            timed_call(pass_, impl)()
        torch.cuda.synchronize()
    except refusals as error:
        print(f"  refused: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}",
              file=sys.stderr)
        return False
    return True


def inputs(dtype, batch, seqlen, heads, head_dim):
    return [torch.randn(batch, seqlen, heads, head_dim, dtype=DTYPES[dtype], device=DEVICE) for _ in range(4)]


def needs_backward(args):
    return args.passes != ["fwd"]


# ---- flex: flash_attn2 against FlexAttention where the variants are used

def flex_point(args, dtype, head_dim, name, seqlen, variant):
    batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
    backward = needs_backward(args)
    q, k, v, dout = inputs(dtype, batch, seqlen, heads, head_dim)
    slopes, s_aux = variant_tensors(variant, heads, seqlen)
    torch._dynamo.reset()  # nothing from the previous point's compiles is used again
    impls = {"ours": ours(q, k, v, dout, variant, slopes, s_aux, backward),
             "plain": ours(q, k, v, dout, Variant(causal=True), None, None, backward),
             "flex": flex(q, k, v, dout, variant, seqlen, slopes, s_aux, backward)}
    results = {"ours": run_once(impls["ours"], backward)}  # ours: errors raise
    results["flex"] = run_once(impls["flex"], backward, FLEX_REFUSALS)
    if results["flex"] is None or not compile_passes(impls["flex"], args.passes, FLEX_REFUSALS):
        del impls["flex"]
    diffs = {f"{what}_max_diff": max_diff(ours_, flex_) for what, ours_, flex_ in
             zip(("out", "dq"), results["ours"], results["flex"] or (None, None))}

    flops, plain_flops = (variant_flops(batch, heads, seqlen, head_dim, variant),
                          pass_flops(batch, heads, seqlen, head_dim, True))
    rows = []
    for pass_ in args.passes:
        ms = time_ms({key: timed_call(pass_, impl) for key, impl in impls.items()}, args.reps, args.warmup)
        row = {"dtype": dtype, "pass": pass_, "head_dim": head_dim, "point": name, "seqlen": seqlen, "batch": batch,
               "heads": heads, "variant": variant._asdict(), "flops": flops[pass_], "plain_flops": plain_flops[pass_],
               **diffs, **{f"{key}_ms": ms.get(key) for key in ("ours", "flex", "plain")}}
        for key, work in (("ours", flops), ("flex", flops), ("plain", plain_flops)):
            row[f"{key}_tflops"] = tflops(work[pass_], ms[key]) if key in ms else None
        row["ours/flex"] = ms["flex"] / ms["ours"] if "flex" in ms else None
        row["ours_efficiency"] = row["ours_tflops"] / row["plain_tflops"]
        row["flex_efficiency"] = row["flex_tflops"] / row["plain_tflops"] if row["flex_tflops"] else None
        rows.append(row)
    return rows


def flex_table(header, rows):
    columns = ["D", "point:", "S", "B", "H", "pass:", "ours ms", "flex ms", "ours/flex", "ours TFLOP/s", "flex TFLOP/s",
               "plain causal ms", "plain causal TFLOP/s", "ours eff.", "flex eff.", "out diff", "dq diff"]
    cells = [[r["head_dim"], r["point"], r["seqlen"], r["batch"], r["heads"], r["pass"], fmt(r["ours_ms"], ".3f"),
              fmt(r["flex_ms"], ".3f"), fmt(r["ours/flex"], ".2f"), fmt(r["ours_tflops"], ".1f"),
              fmt(r["flex_tflops"], ".1f"), fmt(r["plain_ms"], ".3f"), fmt(r["plain_tflops"], ".1f"),
              fmt(r["ours_efficiency"], ".2f"), fmt(r["flex_efficiency"], ".2f"), fmt(r["out_max_diff"], ".1e"),
              fmt(r["dq_max_diff"], ".1e")] for r in rows]
    notes = ("flex: torch.compile'd flex_attention, the window as a block mask, softcap and ALiBi as score_mod, the "
             "sink as out·sigmoid(lse - s_aux). ours/flex: speed ratio (flex ms / ours ms). TFLOP/s of a window count "
             "the visible entries only (4·D per entry and head, fwdbwd 3.5x); plain causal: "
             "flash_attn_func(causal=True) at the same S, counted as common.pass_flops does (S²/2). eff.: TFLOP/s "
             "over plain causal's. Diffs: max abs of ours from flex in out and dq.")
    return "\n".join([header, "", notes, "", *markdown_table(columns, cells)]) + "\n"


# ---- cost: each variant against the plain kernel on the paper grid

def cost_point(args, dtype, head_dim, causal, seqlen):
    batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
    backward = needs_backward(args)
    q, k, v, dout = inputs(dtype, batch, seqlen, heads, head_dim)
    plain = Variant(causal)
    variants = {name: variant for name in args.variants if (variant := COST_VARIANTS[name](causal)) is not None}
    impls = {"plain": ours(q, k, v, dout, plain, None, None, backward)}
    for name, variant in variants.items():
        impls[name] = ours(q, k, v, dout, variant, *variant_tensors(variant, heads, seqlen), backward)
    for impl in impls.values():
        run_once(impl, backward)  # ours: errors raise

    plain_flops = variant_flops(batch, heads, seqlen, head_dim, plain)
    rows = []
    for pass_ in args.passes:
        ms = time_ms({name: timed_call(pass_, impl) for name, impl in impls.items()}, args.reps, args.warmup)
        plain_tflops = tflops(plain_flops[pass_], ms["plain"])
        for name, variant in variants.items():
            flops = variant_flops(batch, heads, seqlen, head_dim, variant)[pass_]
            rows.append({"dtype": dtype, "pass": pass_, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
                         "batch": batch, "heads": heads, "variant": name, "flops": flops, "ms": ms[name],
                         "plain_ms": ms["plain"], "slowdown": ms[name] / ms["plain"],
                         "tflops": tflops(flops, ms[name]), "plain_tflops": plain_tflops,
                         "efficiency": tflops(flops, ms[name]) / plain_tflops})
    return rows


def cost_table(header, rows):
    columns = ["D", "causal", "S", "B", "H", "pass:", "variant:", "plain ms", "variant ms", "slowdown", "TFLOP/s",
               "plain TFLOP/s", "efficiency"]
    cells = [[r["head_dim"], r["causal"], r["seqlen"], r["batch"], r["heads"], r["pass"], r["variant"],
              fmt(r["plain_ms"], ".3f"), fmt(r["ms"], ".3f"), fmt(r["slowdown"], ".3f"), fmt(r["tflops"], ".1f"),
              fmt(r["plain_tflops"], ".1f"), fmt(r["efficiency"], ".3f")] for r in rows]
    notes = ("slowdown: variant ms / plain ms (the same causal, no variant), above 1 is slower. TFLOP/s of a window "
             "count the visible entries only; efficiency: TFLOP/s over the plain kernel's (for the variants without "
             "a window, 1 / slowdown). all: softcap 50, ALiBi, sink and, causal, window (1024, 0).")
    return "\n".join([header, "", notes, "", *markdown_table(columns, cells)]) + "\n"


def cost_summary(rows, passes):
    """Per variant and pass: geometric mean and worst of the slowdown over the grid."""
    cells = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        for pass_ in passes:
            mine = [r for r in rows if r["variant"] == name and r["pass"] == pass_]
            if not mine:
                continue
            worst = max(mine, key=lambda r: r["slowdown"])
            cells.append([name, pass_, len(mine), fmt(geomean(r["slowdown"] for r in mine), ".3f"),
                          fmt(geomean(r["efficiency"] for r in mine), ".3f"), fmt(worst["slowdown"], ".3f"),
                          f"{worst['dtype']} D={worst['head_dim']} causal={worst['causal']} S={worst['seqlen']}"])
    columns = ["variant:", "pass:", "points", "geomean slowdown", "geomean efficiency", "worst slowdown", "worst at:"]
    return "\n".join(["Cost of each variant over the plain kernel", "", *markdown_table(columns, cells)]) + "\n"


# ---- dropout: flash_attn2 against SDPA-flash, both with dropout, on the paper grid

def dropout_point(args, dtype, head_dim, causal, seqlen):
    batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
    backward = needs_backward(args)
    q, k, v, dout = inputs(dtype, batch, seqlen, heads, head_dim)
    impls = {"ours": ours_dropout(q, k, v, dout, causal, args.dropout_p, backward),
             "sdpa-flash": sdpa_flash_dropout(q, k, v, dout, causal, args.dropout_p, backward),
             "ours-plain": ours(q, k, v, dout, Variant(causal), None, None, backward)}
    for impl in impls.values():
        run_once(impl, backward)  # both raise their errors: SDPA-flash takes every point of the grid
    flops = pass_flops(batch, heads, seqlen, head_dim, causal)
    rows = []
    for pass_ in args.passes:
        ms = time_ms({name: timed_call(pass_, impl) for name, impl in impls.items()}, args.reps, args.warmup)
        rows.append({"dtype": dtype, "pass": pass_, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
                     "batch": batch, "heads": heads, "dropout_p": args.dropout_p, "flops": flops[pass_],
                     "ms": ms["ours"], "sdpa_ms": ms["sdpa-flash"], "plain_ms": ms["ours-plain"],
                     "speedup": ms["sdpa-flash"] / ms["ours"], "cost": ms["ours"] / ms["ours-plain"],
                     "tflops": tflops(flops[pass_], ms["ours"]), "sdpa_tflops": tflops(flops[pass_], ms["sdpa-flash"])})
    return rows


def dropout_table(header, rows):
    columns = ["D", "causal", "S", "B", "H", "pass:", "ours ms", "SDPA-flash ms", "speedup", "ours TFLOP/s",
               "SDPA-flash TFLOP/s", "ours without dropout ms", "dropout cost"]
    cells = [[r["head_dim"], r["causal"], r["seqlen"], r["batch"], r["heads"], r["pass"], fmt(r["ms"], ".3f"),
              fmt(r["sdpa_ms"], ".3f"), fmt(r["speedup"], ".3f"), fmt(r["tflops"], ".1f"), fmt(r["sdpa_tflops"], ".1f"),
              fmt(r["plain_ms"], ".3f"), fmt(r["cost"], ".3f")] for r in rows]
    notes = (f"dropout_p {rows[0]['dropout_p']} on both sides. speedup: SDPA-flash ms / ours ms, above 1 is faster; "
             "dropout cost: ours with dropout ms / ours without, above 1 is slower. TFLOP/s of the attention FLOPs "
             "(dropout adds none).")
    return "\n".join([header, "", notes, "", *markdown_table(columns, cells)]) + "\n"


def dropout_summary(rows, passes):
    """Per pass: geometric mean of the speedup over SDPA-flash and of dropout's cost, and the worst point."""
    cells = []
    for pass_ in passes:
        mine = [r for r in rows if r["pass"] == pass_]
        if not mine:
            continue
        worst = min(mine, key=lambda r: r["speedup"])
        cells.append([pass_, len(mine), fmt(geomean(r["speedup"] for r in mine), ".3f"),
                      fmt(geomean(r["cost"] for r in mine), ".3f"), fmt(worst["speedup"], ".3f"),
                      f"{worst['dtype']} D={worst['head_dim']} causal={worst['causal']} S={worst['seqlen']}"])
    columns = ["pass:", "points", "geomean speedup over SDPA-flash", "geomean dropout cost", "worst speedup",
               "worst at:"]
    return "\n".join(["Dropout against SDPA-flash with dropout", "", *markdown_table(columns, cells)]) + "\n"


def main():
    args = parse_args()
    if (code := unavailable()) is not None:
        return code
    meta = run_meta(reps=args.reps, warmup=args.warmup)
    torch.manual_seed(0)
    rows = {part: [] for part in PARTS}
    if "flex" in args.parts:
        allow_recompiles()

    def report():
        tables = []
        for dtype in args.dtypes:
            if mine := [r for r in rows["flex"] if r["dtype"] == dtype]:
                tables.append(flex_table(f"Variants against FlexAttention, {dtype}, tokens {args.tokens}, hidden "
                                         f"{args.hidden}; {describe(meta)}", mine))
            if mine := [r for r in rows["cost"] if r["dtype"] == dtype]:
                tables.append(cost_table(f"Cost of each variant, {dtype}, tokens {args.tokens}, hidden {args.hidden}; "
                                         f"{describe(meta)}", mine))
            if mine := [r for r in rows["dropout"] if r["dtype"] == dtype]:
                tables.append(dropout_table(f"Dropout against SDPA-flash, {dtype}, tokens {args.tokens}, hidden "
                                            f"{args.hidden}; {describe(meta)}", mine))
        if rows["cost"]:
            tables.append(cost_summary(rows["cost"], args.passes))
        if rows["dropout"]:
            tables.append(dropout_summary(rows["dropout"], args.passes))
        text = "\n".join(tables)
        write_outputs(args, text, dict(meta=dict(meta, passes=args.passes, parts=args.parts), **rows))
        return text

    started = time.perf_counter()
    for dtype, head_dim in grid_dtype_head_dims(args):
        if "flex" in args.parts:
            for name, seqlen, variant in FLEX_POINTS:
                rows["flex"] += progress(flex_point(args, dtype, head_dim, name, seqlen or args.flex_seqlen, variant),
                                         started)
                report()  # so that a run cut short still leaves what it measured
        if "cost" in args.parts:
            for causal in grid_causals(args):
                for seqlen in args.seqlens:
                    rows["cost"] += progress(cost_point(args, dtype, head_dim, causal, seqlen), started)
            report()
        if "dropout" in args.parts:
            for causal in grid_causals(args):
                for seqlen in args.seqlens:
                    rows["dropout"] += progress(dropout_point(args, dtype, head_dim, causal, seqlen), started)
            report()
        torch.cuda.empty_cache()
    print("\n" + report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of flash_attn_varlen_func, in two parts (--parts):

equal: varlen against the fixed-length flash_attn_func on the same data, every sequence of one length S:
  (batch, S, heads, head_dim) for the one, (batch·S, heads, head_dim) with cu_seqlens = 0, S, 2S, ... for
  the other; batch = tokens // S, heads = hidden // head_dim. The goal is varlen/fixed speed >= 0.97 in
  the forward and the forward + backward.
mix: a packed batch of lengths drawn from a lognormal, clipped to [--min-len, --max-len] and summing to
  exactly --mix-tokens, against PyTorch's FA2 on the same packed data (SDPA on nested jagged tensors, else
  aten._flash_attention_forward directly) and cuDNN SDPA on the batch right-padded to its longest sequence
  (the padding is wasted work and counts in its time); tokens/s counts the real tokens only.

Every implementation of a point is timed alternately on the same values (common.time_ms). --causal, where
given, applies to both parts; by default equal runs both and mix causal only.
"""

import argparse
import functools
import math
import random
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (unavailable, DTYPES, Impl, add_grid_args, add_output_args, csv_of, describe, fmt,
                    geomean, grid_dtype_head_dims, markdown_table, pass_flops, progress, run_meta, sdpa, tflops,
                    time_ms, timed_call, write_outputs)

PARTS = ("equal", "mix")
PASSES = {"fwd": "Forward", "bwd": "Backward", "fwdbwd": "Forward + backward"}
GOAL = 0.97  # the bar for varlen/fixed speed, in fwd and fwdbwd
FLASH_PATHS = ("auto", "njt", "aten")
MIX_PEERS = ("sdpa-flash-varlen", "cudnn-padded")
# What a peer raises when it refuses the inputs (NJT SDPA also raises ValueError and TypeError).
REFUSALS = (RuntimeError, ValueError, TypeError)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=csv_of(choices=PARTS), default="equal,mix")
    parser.add_argument("--passes", type=csv_of(choices=PASSES), default="fwd,fwdbwd",
                        help="comma-separated, from fwd, bwd, fwdbwd")
    add_grid_args(parser)  # --seqlens and --tokens are equal's; --dtypes, --head-dims, --hidden both parts'
    parser.set_defaults(dtypes="bf16", head_dims="64,128", causal=None)
    parser.add_argument("--mix-tokens", type=int, default=32768, help="mix: tokens in the packed batch")
    parser.add_argument("--min-len", type=int, default=64, help="mix: shortest sequence")
    parser.add_argument("--max-len", type=int, default=8192, help="mix: longest sequence")
    parser.add_argument("--len-median", type=float, default=1024, help="mix: median of the lognormal")
    parser.add_argument("--len-sigma", type=float, default=1.0, help="mix: sigma of the lognormal (of ln length)")
    parser.add_argument("--seed", type=int, default=0, help="mix: seed of the lengths")
    parser.add_argument("--flash-path", choices=FLASH_PATHS, default="auto",
                        help="mix: how PyTorch's FA2 is called: njt (SDPA on nested jagged tensors), aten "
                             "(aten._flash_attention_forward), auto (njt, else aten)")
    parser.add_argument("--deterministic", action="store_true",
                        help="pass deterministic=True (the split backward); without it deterministic=False, which "
                             "runs the split one too unless FLASH_ATTN2_ATOMIC_BWD=1")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per implementation and pass")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before them")
    add_output_args(parser)
    args = parser.parse_args()
    if not (2 * args.min_len <= args.max_len and args.min_len <= args.mix_tokens):
        parser.error("need 2 * --min-len <= --max-len and --min-len <= --mix-tokens")
    return args


def causals(args, part):
    if args.causal is None:
        return [False, True] if part == "equal" else [True]
    return {"both": [False, True], "true": [True], "false": [False]}[args.causal]


def leaves(tensors, requires_grad):
    return [t.detach().requires_grad_(requires_grad) for t in tensors]


def run_once(impl, backward, refusals=REFUSALS):
    """[out, dq or None] in the packed (total, heads, head_dim) layout from one call, or None where the
    implementation refuses the inputs (returns None or raises one of `refusals`: out of memory included)."""
    try:
        out = impl.forward()
        if out is None:
            return None
        dq = torch.autograd.grad(out, impl.qkv[0], impl.dout)[0] if backward else None
    except refusals:
        return None
    return [None if t is None else impl.to_ours(t) for t in (out, dq)]


def max_diff(a, b):
    return None if a is None or b is None else (a.float() - b.float()).abs().max().item()


def time_passes(args, impls):
    """pass -> name -> median ms, every implementation timed alternately within a pass."""
    return {pass_: time_ms({name: timed_call(pass_, impl) for name, impl in impls.items()}, args.reps, args.warmup)
            for pass_ in args.passes}


def needs_backward(args):
    return args.passes != ["fwd"]


# ---- equal: varlen against fixed length, every sequence of one length

def equal_point(args, dtype, head_dim, causal, seqlen):
    from flash_attn2 import flash_attn_func, flash_attn_varlen_func

    batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
    backward = needs_backward(args)
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, dtype=DTYPES[dtype], device="cuda")
                     for _ in range(4))
    packed = lambda t: t.reshape(batch * seqlen, heads, head_dim)  # a view: the same values, packed
    cu_seqlens = torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32, device="cuda")
    fixed_qkv, varlen_qkv = leaves((q, k, v), backward), leaves(map(packed, (q, k, v)), backward)
    mode = dict(causal=causal, deterministic=args.deterministic)
    impls = {"fixed": Impl(functools.partial(flash_attn_func, *fixed_qkv, **mode), fixed_qkv, dout, packed),
             "varlen": Impl(functools.partial(flash_attn_varlen_func, *varlen_qkv, cu_seqlens, cu_seqlens, seqlen,
                                              seqlen, **mode), varlen_qkv, packed(dout), lambda t: t)}
    fixed, varlen = (run_once(impl, backward, refusals=()) for impl in impls.values())  # ours: errors raise
    diffs = {f"{what}_max_diff": max_diff(a, b) for what, a, b in zip(("out", "dq"), varlen, fixed)}

    flops = pass_flops(batch, heads, seqlen, head_dim, causal)
    rows = []
    for pass_, ms in time_passes(args, impls).items():
        rows.append({"dtype": dtype, "pass": pass_, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
                     "batch": batch, "heads": heads, "flops": flops[pass_], **diffs,
                     **{f"{name}_ms": ms[name] for name in impls},
                     **{f"{name}_tflops": tflops(flops[pass_], ms[name]) for name in impls},
                     "ratio": ms["fixed"] / ms["varlen"]})
    return rows


def equal_table(header, rows):
    columns = ["D", "causal", "S", "B", "H", "fixed ms", "varlen ms", "fixed TFLOP/s", "varlen TFLOP/s",
               "varlen/fixed", "max abs diff out", "max abs diff dq"]
    cells = [[r["head_dim"], r["causal"], r["seqlen"], r["batch"], r["heads"], fmt(r["fixed_ms"], ".3f"),
              fmt(r["varlen_ms"], ".3f"), fmt(r["fixed_tflops"], ".1f"), fmt(r["varlen_tflops"], ".1f"),
              fmt(r["ratio"], ".3f"), fmt(r["out_max_diff"], ".1e"), fmt(r["dq_max_diff"], ".1e")] for r in rows]
    notes = ("varlen/fixed: speed of flash_attn_varlen_func over flash_attn_func (fixed ms / varlen ms) on the "
             "same values; the max abs diffs are of varlen from fixed, which should be 0 or nearly.")
    return "\n".join([header, "", notes, "", *markdown_table(columns, cells)]) + "\n"


def equal_summary(rows, passes):
    """Per pass: geometric mean and minimum of varlen/fixed, and whether the goal is met."""
    cells = []
    for pass_ in passes:
        mine = [r for r in rows if r["pass"] == pass_]
        if not mine:
            continue
        worst = min(mine, key=lambda r: r["ratio"])
        mean = geomean(r["ratio"] for r in mine)
        cells.append([pass_, len(mine), fmt(mean, ".3f"), fmt(worst["ratio"], ".3f"),
                      f"{worst['dtype']} D={worst['head_dim']} causal={worst['causal']} S={worst['seqlen']}",
                      "yes" if mean >= GOAL and worst["ratio"] >= GOAL else "no"])
    columns = ["pass:", "points", "geomean", "min", "min at:", f"all >= {GOAL}:"]
    return "\n".join([f"varlen/fixed speed, equal lengths (goal: >= {GOAL} in fwd and fwdbwd)", "",
                      *markdown_table(columns, cells)]) + "\n"


# ---- mix: a realistic packed batch, against PyTorch's FA2 varlen and padded cuDNN

def draw_lengths(args):
    """Lognormal lengths clipped to [min_len, max_len] and summing to exactly mix_tokens."""
    rng = random.Random(args.seed)
    lengths, left = [], args.mix_tokens
    while left:
        n = min(max(round(rng.lognormvariate(math.log(args.len_median), args.len_sigma)), args.min_len),
                args.max_len)
        if left - n < args.min_len:  # too few tokens would be left for another sequence: take them all,
            n = left if left <= args.max_len else left - args.min_len  # or leave exactly one short one
        lengths.append(n)
        left -= n
    return lengths


def flash_njt(q, k, v, offsets, min_len, max_len, causal):
    """PyTorch's FA2 through SDPA on nested jagged tensors, (total, heads, head_dim) values in and out.

    The nested tensors are views of q, k, v built per call (their seqlen bounds given, so that none is
    read back from the GPU); SDPA runs on (batch, heads, j, head_dim), j the ragged length.
    """
    def nested(t):
        return torch.nested.nested_tensor_from_jagged(t, offsets, min_seqlen=min_len,
                                                      max_seqlen=max_len).transpose(1, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), is_causal=causal)
    return out.transpose(1, 2).values()


def flash_aten(q, k, v, cu_seqlens, max_len, causal):
    """PyTorch's FA2 varlen kernel called directly; it has an autograd formula, so the backward works."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0,
                                                   causal, False, scale=q.shape[-1] ** -0.5)[0]


def flash_peer(args, qkv, dout, cu_seqlens, lengths, causal, backward):
    """(Impl, path, its result from run_once, why others failed) for PyTorch's FA2 on the packed data, by
    the first of --flash-path's paths that takes the inputs; Impl and path are None where none does."""
    failed = []
    for path in (("njt", "aten") if args.flash_path == "auto" else (args.flash_path,)):
        if path == "njt":
            forward = functools.partial(flash_njt, *qkv, cu_seqlens.long(), min(lengths), max(lengths), causal)
        else:
            forward = functools.partial(flash_aten, *qkv, cu_seqlens, max(lengths), causal)
        impl = Impl(forward, qkv, dout, lambda t: t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NJT is a prototype and says so
            try:
                result = run_once(impl, backward, refusals=())
            except REFUSALS as error:
                first_line = (str(error).strip().splitlines() or [""])[0][:200]
                failed.append(f"{path}: {type(error).__name__}: {first_line}")
                continue
        if result is None:
            failed.append(f"{path}: returned None")
            continue
        return impl, path, result, failed
    return None, None, None, failed


def cudnn_padded(q, k, v, causal, key_mask):
    """cuDNN SDPA on (batch, heads, max_len, head_dim), each sequence right-padded with zeros.

    Causal needs no mask: padding comes after a sequence's real tokens, so they never see it. Without
    causal the padded keys are masked out. None where cuDNN refuses.
    """
    if causal:
        return sdpa(q, k, v, True, SDPBackend.CUDNN_ATTENTION)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        except RuntimeError:
            return None


def mix_point(args, lengths, dtype, head_dim, causal):
    from flash_attn2 import flash_attn_varlen_func

    batch, total, max_len, heads = len(lengths), sum(lengths), max(lengths), args.hidden // head_dim
    backward = needs_backward(args)
    q, k, v, dout = (torch.randn(total, heads, head_dim, dtype=DTYPES[dtype], device="cuda") for _ in range(4))
    lens = torch.tensor(lengths, device="cuda")
    cu_seqlens = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)  # (batch + 1,): 0, then the ends

    ours_qkv = leaves((q, k, v), backward)
    impls = {"ours": Impl(functools.partial(flash_attn_varlen_func, *ours_qkv, cu_seqlens, cu_seqlens, max_len,
                                            max_len, causal=causal, deterministic=args.deterministic), ours_qkv,
                          dout, lambda t: t)}
    results = {"ours": run_once(impls["ours"], backward, refusals=())}  # ours: errors raise

    flash_qkv = leaves((q, k, v), backward)
    flash, path, results["sdpa-flash-varlen"], failed = flash_peer(args, flash_qkv, dout, cu_seqlens, lengths,
                                                                   causal, backward)
    for line in failed:
        print(f"sdpa-flash-varlen, D={head_dim} causal={causal}: {line}", file=sys.stderr)
    if flash is not None:
        impls["sdpa-flash-varlen"] = flash

    real = torch.arange(max_len, device="cuda") < lens[:, None]  # (batch, max_len): which are real tokens

    def padded(t):  # (total, heads, head_dim) -> (batch, heads, max_len, head_dim), zeros after each sequence
        out = t.new_zeros(batch, max_len, heads, head_dim)
        out[real] = t
        return out.transpose(1, 2).contiguous()
    cudnn_qkv = leaves(map(padded, (q, k, v)), backward)
    cudnn = Impl(functools.partial(cudnn_padded, *cudnn_qkv, causal, real[:, None, None, :]), cudnn_qkv,
                 padded(dout), lambda t: t.transpose(1, 2)[real])
    results["cudnn-padded"] = run_once(cudnn, backward)
    if results["cudnn-padded"] is not None:
        impls["cudnn-padded"] = cudnn
    torch.cuda.empty_cache()

    diffs = {f"{what}_max_diff_{peer}": max_diff(ours, theirs)
             for peer in MIX_PEERS if results[peer] is not None
             for what, ours, theirs in zip(("out", "dq"), results["ours"], results[peer])}
    flops = {pass_: sum(pass_flops(1, heads, n, head_dim, causal)[pass_] for n in lengths) for pass_ in PASSES}
    rows = []
    for pass_, ms in time_passes(args, impls).items():
        row = {"dtype": dtype, "pass": pass_, "head_dim": head_dim, "causal": causal, "heads": heads,
               "seqs": batch, "tokens": total, "max_len": max_len, "flops": flops[pass_], "flash_path": path,
               **diffs}
        for name in ("ours", *MIX_PEERS):
            row[f"{name}_ms"] = ms.get(name)
            row[f"{name}_mtoks"] = total / ms[name] / 1e3 if name in ms else None  # million tokens/s
            row[f"{name}_tflops"] = tflops(flops[pass_], ms[name]) if name in ms else None  # real work only
            if name != "ours":
                row[f"ours/{name}"] = ms[name] / ms["ours"] if name in ms else None
        rows.append(row)
    return rows


def mix_table(header, rows):
    columns = ["D", "causal", "pass:", "ours ms", "ours M tok/s", "ours TFLOP/s", "flash-varlen M tok/s",
               "cudnn-padded M tok/s", "ours/flash-varlen", "ours/cudnn-padded", "out diff flash",
               "dq diff flash", "out diff cudnn"]
    cells = [[r["head_dim"], r["causal"], r["pass"], fmt(r["ours_ms"], ".3f"), fmt(r["ours_mtoks"], ".1f"),
              fmt(r["ours_tflops"], ".1f"), fmt(r["sdpa-flash-varlen_mtoks"], ".1f"),
              fmt(r["cudnn-padded_mtoks"], ".1f"), fmt(r["ours/sdpa-flash-varlen"], ".3f"),
              fmt(r["ours/cudnn-padded"], ".3f"), fmt(r.get("out_max_diff_sdpa-flash-varlen"), ".1e"),
              fmt(r.get("dq_max_diff_sdpa-flash-varlen"), ".1e"), fmt(r.get("out_max_diff_cudnn-padded"), ".1e")]
             for r in rows]
    paths = sorted({r["flash_path"] for r in rows if r["flash_path"]})
    how = {"njt": "SDPA on nested jagged tensors under sdpa_kernel(FLASH_ATTENTION)",
           "aten": f"{torch.ops.aten._flash_attention_forward.default._schema}, called directly"}
    notes = (f"flash-varlen: PyTorch's FA2 on the packed batch, via {'; '.join(how[p] for p in paths) or '-'}. "
             "cudnn-padded: cuDNN SDPA on the batch right-padded to its longest sequence (without causal, the "
             "padded keys masked out). M tok/s counts real tokens; TFLOP/s the real sequences' matmuls "
             "(4·H·L²·D each, half if causal, bwd 2.5x). ours/peer: speed ratio (peer ms / ours ms). Diffs: max "
             "abs of ours from the peer on the real tokens.")
    return "\n".join([header, "", notes, "", *markdown_table(columns, cells)]) + "\n"


def describe_lengths(args, lengths):
    padded = len(lengths) * max(lengths)
    return (f"{len(lengths)} sequences, {sum(lengths)} tokens, lengths lognormal (median {args.len_median:g}, "
            f"sigma {args.len_sigma:g}, seed {args.seed}) clipped to [{args.min_len}, {args.max_len}]: min "
            f"{min(lengths)}, median {statistics.median(lengths):g}, max {max(lengths)}; padded to the longest, "
            f"{1 - sum(lengths) / padded:.0%} of cudnn-padded's tokens are padding")


def main():
    args = parse_args()
    if (code := unavailable()) is not None:
        return code
    meta = run_meta(reps=args.reps, warmup=args.warmup, deterministic=args.deterministic)
    lengths = draw_lengths(args)
    torch.manual_seed(0)
    rows = {part: [] for part in PARTS}

    def report():
        tables = []
        for dtype in args.dtypes:
            for p in args.passes:
                if mine := [r for r in rows["equal"] if r["pass"] == p and r["dtype"] == dtype]:
                    tables.append(equal_table(f"Equal lengths, {PASSES[p]}, {dtype}, tokens {args.tokens}, "
                                              f"hidden {args.hidden}; {describe(meta)}", mine))
        if rows["equal"]:
            tables.append(equal_summary(rows["equal"], args.passes))
        for dtype in args.dtypes:
            if mine := [r for r in rows["mix"] if r["dtype"] == dtype]:
                tables.append(mix_table(f"Mix, {dtype}, hidden {args.hidden}: {describe_lengths(args, lengths)}; "
                                        f"{describe(meta)}", mine))
        text = "\n".join(tables)
        write_outputs(args, text, dict(meta=dict(meta, passes=args.passes, lengths=lengths), **rows))
        return text

    for dtype, head_dim in grid_dtype_head_dims(args):
        if "equal" in args.parts:
            for causal in causals(args, "equal"):
                for seqlen in args.seqlens:
                    rows["equal"] += progress(equal_point(args, dtype, head_dim, causal, seqlen))
        if "mix" in args.parts:
            for causal in causals(args, "mix"):
                rows["mix"] += progress(mix_point(args, lengths, dtype, head_dim, causal))
        report()  # so that a run cut short still leaves what it measured
    print("\n" + report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory against sequence length: torch.cuda.max_memory_allocated during one forward (no graph, as
inference) and one forward + backward, minus what was allocated before (the inputs), for flash_attn2,
SDPA-flash, SDPA-cuDNN and plain PyTorch attention (math, up to --math-max-gib per S x S matrix).
flash_attn2 must grow linearly in S: peak / S is printed per S, and flagged where it grows.
"""

import argparse
import sys

import torch

from common import (unavailable, DTYPES, add_output_args, csv_of, describe, fmt, make_impls,
                    markdown_table, math_matrix_bytes, run_meta, timed_call, write_outputs)

PASSES = {"fwd": "fwd", "fwdbwd": "fwd+bwd"}
IMPLS = ["ours", "sdpa-flash", "cudnn", "math"]
# peak / S may fall as fixed costs are spread over more tokens; growing by more than this is not linear.
LINEAR_SLACK = 1.10


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=csv_of(int), default=",".join(str(2**i) for i in range(10, 18)))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--causal", choices=["true", "false"], default="true")
    parser.add_argument("--impls", type=csv_of(choices=IMPLS), default=",".join(IMPLS))
    parser.add_argument("--math-max-gib", type=float, default=8.0,
                        help="skip math where one float32 S x S matrix would be larger")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of peak memory against S")
    add_output_args(parser)
    return parser.parse_args()


def peak_bytes(fn):
    """Peak bytes allocated while fn runs, over what was allocated before it; None if it runs out of
    memory or an SDPA backend refuses the inputs."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        if fn() is None:
            return None
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        return None
    return torch.cuda.max_memory_allocated() - before


def measure(args, seqlen):
    """name -> pass -> peak bytes (None where refused, out of memory or skipped) at one seqlen."""
    shape = (args.batch, seqlen, args.heads, args.head_dim)
    q, k, v, dout = (torch.randn(shape, dtype=DTYPES[args.dtype], device="cuda") for _ in range(4))
    too_big = math_matrix_bytes(args.batch, args.heads, seqlen, seqlen) > args.math_max_gib * 2**30
    names = [name for name in args.impls if not (name == "math" and too_big)]
    impls = make_impls(names, q, k, v, dout, args.causal == "true", requires_grad=True)
    peaks = {name: dict.fromkeys(PASSES) for name in args.impls}
    for name, impl in impls.items():
        for pass_ in PASSES:  # fwd first: where it fails, fwd+bwd is not tried
            peaks[name][pass_] = peak_bytes(timed_call(pass_, impl))
            if peaks[name][pass_] is None:
                break
    return peaks


def scaled(x, unit):
    return None if x is None else x / unit


def growth(rows, name, pass_):
    """(S, g): g is peak/S at the largest S measured over its smallest at any S, about 1 (or less, as
    fixed costs spread) where memory grows linearly."""
    per_token = [(r["seqlen"], r[name][pass_] / r["seqlen"]) for r in rows if r[name][pass_]]
    if not per_token:
        return None, None
    return per_token[-1][0], per_token[-1][1] / min(ratio for _, ratio in per_token)


def tables(header, rows, impls):
    keys = [(name, pass_) for name in impls for pass_ in PASSES]
    columns = ["S", *(f"{name} {PASSES[pass_]}" for name, pass_ in keys)]
    peak = [[r["seqlen"], *(fmt(scaled(r[name][p], 2**20), ".1f") for name, p in keys)] for r in rows]
    per_token = [[r["seqlen"], *(fmt(scaled(r[name][p], r["seqlen"] * 2**10), ".2f") for name, p in keys)]
                 for r in rows]
    growths, verdicts = {}, []
    for name, pass_ in keys:
        seqlen, g = growth(rows, name, pass_)
        growths[f"{name} {pass_}"] = g
        if g is not None:
            verdicts.append(f"- {name} {PASSES[pass_]}: peak/S at S={seqlen} is {g:.2f}x its smallest: "
                            + ("linear" if g <= LINEAR_SLACK else "GROWS FASTER THAN LINEAR"))
    text = "\n".join([header, "", "Peak memory over the inputs, MiB", "", *markdown_table(columns, peak), "",
                      "Peak / S, KiB per token (constant where memory grows linearly)", "",
                      *markdown_table(columns, per_token), "", *verdicts]) + "\n"
    return text, growths


def plot(path, meta, rows, impls):
    import plots
    if plots.plt is None:
        print("matplotlib is not installed: no plot")
        return
    fig, axes = plots.panels_figure(f"Peak memory over the inputs, {meta['dtype']}, B={meta['batch']}, "
                                    f"H={meta['heads']}, D={meta['head_dim']}, {meta['gpu']}", 1, len(PASSES))
    seqlens = [r["seqlen"] for r in rows]
    for ax, (pass_, title) in zip(axes[0], PASSES.items()):
        series = {name: (seqlens, [scaled(r[name][pass_], 2**30) for r in rows]) for name in impls}
        plots.line_panel(ax, title, series, "sequence length", "GiB")
    plots.save(fig, path)


def main():
    args = parse_args()
    if (code := unavailable()) is not None:
        return code
    meta = run_meta(dtype=args.dtype, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                    causal=args.causal)
    torch.manual_seed(0)
    measure(args, min(args.seqlens))  # first calls set up cuBLAS and cuDNN state that would count as peak
    rows = []
    for seqlen in sorted(args.seqlens):
        rows.append({"seqlen": seqlen, **measure(args, seqlen)})
        print(rows[-1], file=sys.stderr, flush=True)  # progress
    text, growths = tables(f"Memory; {describe(meta)}", rows, args.impls)
    print("\n" + text)
    write_outputs(args, text, dict(meta=meta, rows=rows, growth=growths))
    if args.plot:
        plot(args.plot, meta, rows, args.impls)
    return 0


if __name__ == "__main__":
    sys.exit(main())

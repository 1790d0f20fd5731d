"""Speed of flash_attn2 against PyTorch SDPA's flash, cuDNN and memory-efficient backends and plain
PyTorch attention ("math": flash_attn2.reference.attention_ref in the input dtype), on one GPU.

Passes: forward, backward (on a graph built once), forward + backward, every implementation timed
alternately on the same values. Each point has batch = tokens // seqlen and heads = hidden // head_dim,
seqlen_q = seqlen_k. Math is skipped where its S x S matrix in float32 would pass --math-max-gib.
"ours" is flash_attn_func as called by default (deterministic=False: today the split backward, the faster),
"ours-det" deterministic=True, "ours-atomic" the atomic-dQ backward (FLASH_ATTN2_ATOMIC_BWD=1, as SDPA-flash's):
`--impls ours,ours-atomic,sdpa-flash` compares the modes in one run.
"""

import argparse
import sys

import torch

from common import (unavailable, DTYPES, IMPLS, add_grid_args, add_output_args, csv_of, describe,
                    fmt, geomean, grid_causals, grid_dtype_head_dims, make_impls, markdown_table,
                    math_matrix_bytes, pass_flops, progress, run_meta, tflops, time_ms, timed_call, write_outputs)

PASSES = {"fwd": "Forward", "bwd": "Backward", "fwdbwd": "Forward + backward"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=csv_of(choices=PASSES), default="fwd,bwd,fwdbwd",
                        help="comma-separated, from fwd, bwd, fwdbwd")
    parser.add_argument("--impls", type=csv_of(choices=IMPLS), default=",".join(IMPLS),
                        help="comma-separated, from " + ",".join(IMPLS) + " (ours is always timed)")
    add_grid_args(parser)
    parser.add_argument("--reps", type=int, default=30, help="timed calls per implementation and pass")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before them")
    parser.add_argument("--math-max-gib", type=float, default=8.0,
                        help="skip math where one float32 S x S matrix would be larger")
    add_output_args(parser)
    args = parser.parse_args()
    args.impls = ["ours", *(name for name in args.impls if name != "ours")]
    return args


def spot_check(impls, backward):
    """Max abs differences of ours from SDPA-flash (else cuDNN) in out and dq, from one run of each, so
    that a fast but wrong kernel shows in the table. An implementation that refuses the inputs (None, an
    error, out of memory) is dropped from `impls`."""
    results = {}  # name -> (out, dq or None), in our layout
    for name, impl in list(impls.items()):
        try:
            out = impl.forward()
            if out is None:
                raise RuntimeError(f"{name} refused the inputs")
            dq = torch.autograd.grad(out, impl.qkv[0], impl.dout)[0] if backward else None
        except RuntimeError:  # torch.cuda.OutOfMemoryError included
            if name == "ours":
                raise
            del impls[name]
            continue
        results[name] = [None if t is None else impl.to_ours(t) for t in (out, dq)]
    baseline = results.get("sdpa-flash", results.get("cudnn", (None, None)))
    return {f"{what}_max_diff": None if theirs is None else (ours - theirs).abs().max().item()
            for what, ours, theirs in zip(("out", "dq"), results["ours"], baseline)}


def bench_point(args, dtype, head_dim, causal, seqlen):
    """One row per pass, with every implementation timed alternately on the same values."""
    batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
    names = [name for name in args.impls
             if name != "math" or math_matrix_bytes(batch, heads, seqlen, seqlen) <= args.math_max_gib * 2**30]
    backward = args.passes != ["fwd"]
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, dtype=DTYPES[dtype], device="cuda")
                     for _ in range(4))
    impls = make_impls(names, q, k, v, dout, causal, requires_grad=backward)
    diffs = spot_check(impls, backward)
    torch.cuda.empty_cache()  # math's S x S buffers go back before they are needed again

    flops = pass_flops(batch, heads, seqlen, head_dim, causal)
    rows = []
    for pass_ in args.passes:
        ms = time_ms({name: timed_call(pass_, impl) for name, impl in impls.items()}, args.reps, args.warmup)
        row = {"dtype": dtype, "pass": pass_, "head_dim": head_dim, "causal": causal, "seqlen": seqlen,
               "batch": batch, "heads": heads, "flops": flops[pass_], **diffs}
        for name in IMPLS:
            row[f"{name}_ms"] = ms.get(name)
            row[f"{name}_tflops"] = tflops(flops[pass_], ms[name]) if name in ms else None
        rows.append(row)
    return rows


# The peers ours is compared with: PyTorch's FA2, and cuDNN (SDPA's default on Hopper).
PEERS = {"flash": "sdpa-flash", "cudnn": "cudnn"}


# Ours in each backward mode (common.IMPLS): ratios to the peers for each that ran.
OURS = ("ours", "ours-det", "ours-atomic", "ours-mma-bwd")


def ratio(row, peer="flash", ours="ours"):
    mine, theirs = row.get(f"{ours}_tflops"), row[f"{PEERS[peer]}_tflops"]
    return mine / theirs if mine and theirs else None


def table(header, rows, impls):
    ours = [name for name in OURS if name in impls]
    pairs = [(name, peer) for name in ours for peer in PEERS]
    columns = ["D", "causal", "S", "B", "H", *(f"{name} TFLOP/s" for name in impls),
               *(f"{name}/{peer}" for name, peer in pairs), "max abs diff out", "max abs diff dq"]
    cells = [[row["head_dim"], row["causal"], row["seqlen"], row["batch"], row["heads"],
              *(fmt(row[f"{name}_tflops"], ".1f") for name in impls),
              *(fmt(ratio(row, peer, name), ".3f") for name, peer in pairs),
              fmt(row["out_max_diff"], ".1e"), fmt(row["dq_max_diff"], ".1e")] for row in rows]
    lines = [header, "", *markdown_table(columns, cells)]
    for name, peer in pairs:
        if mean := geomean(ratio(r, peer, name) for r in rows):
            lines += ["", f"Geometric mean of {name}/{peer}, {rows[0]['pass']}, {rows[0]['dtype']}, over "
                          f"{sum(1 for r in rows if ratio(r, peer, name))} points: {mean:.3f}"]
    return "\n".join(lines) + "\n"


def summary(rows, passes):
    """Geometric means of ours/peer: a row per (peer, pass), a column per (dtype, D), and one over all."""
    groups = list(dict.fromkeys((r["dtype"], r["head_dim"]) for r in rows))
    columns = ["ours/peer, pass:", *(f"{dtype} D={d}" for dtype, d in groups), "all"]
    cells = []
    for name in OURS:
        if not any(r.get(f"{name}_tflops") for r in rows):
            continue
        for peer in PEERS:
            for pass_ in passes:
                mine = [r for r in rows if r["pass"] == pass_]
                cells.append([f"{name}/{peer}, {pass_}",
                              *(fmt(geomean(ratio(r, peer, name) for r in mine if (r["dtype"], r["head_dim"]) == g),
                                    ".3f") for g in groups), fmt(geomean(ratio(r, peer, name) for r in mine), ".3f")])
    return "\n".join(["Geometric means of ours/peer (TFLOP/s ratio; > 1 is faster than the peer)", "",
                      *markdown_table(columns, cells)]) + "\n"


def main():
    args = parse_args()
    if (code := unavailable()) is not None:
        return code
    meta = run_meta(tokens=args.tokens, hidden=args.hidden, reps=args.reps, warmup=args.warmup)

    torch.manual_seed(0)
    rows = []

    def report():
        present = [name for name in IMPLS if any(r[f"{name}_tflops"] is not None for r in rows)]
        tables = [table(f"{PASSES[p]}, {dtype}; {describe(meta)}", mine, present)
                  for dtype in args.dtypes for p in args.passes
                  if (mine := [r for r in rows if r["pass"] == p and r["dtype"] == dtype])]
        text = "\n".join([*tables, summary(rows, args.passes)])
        write_outputs(args, text, dict(meta=dict(meta, impls=present, passes=args.passes), rows=rows))
        return text

    for dtype, head_dim in grid_dtype_head_dims(args):
        for causal in grid_causals(args):
            for seqlen in args.seqlens:
                rows += progress(bench_point(args, dtype, head_dim, causal, seqlen))
        report()  # so that a run cut short still leaves what it measured
    print("\n" + report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

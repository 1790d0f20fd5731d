"""A/B of two builds of the extension in one process: milliseconds per launch of each kernel (forward,
backward preprocess, dQ, dK/dV; `_C.time_kernels`, a C++ launch loop) of a base build and a new one on
the same inputs, to show that a change keeps the fixed-length path's speed.

  python3 benchmarks/ab_kernels.py --base BASE/_C.cpython-312-x86_64-linux-gnu.so --new NEW/_C...so

The builds are called alternately, --rounds times per point (the order flipped each round, so neither
always runs on a GPU just warmed by the other), and each kernel's median over the rounds is compared;
fwd+bwd is the median over rounds of the four kernels' sum. Once per point the two builds' out and lse
are compared bit for bit. Grid as bench.py: batch = tokens // seqlen, heads = hidden // head_dim.
"""

import argparse
import hashlib
import importlib.util
import os
import statistics
import sys

import torch

from common import (unavailable, DTYPES, add_grid_args, add_output_args, describe, fmt, geomean, grid_causals,
                    grid_dtype_head_dims, markdown_table, progress, run_meta, write_outputs)

BUILDS = ("base", "new")
KERNELS = ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv")
COLUMNS = {"fwd": "fwd", "bwd_preprocess": "pre", "bwd_dq": "dQ", "bwd_dkdv": "dK/dV", "fwdbwd": "fwd+bwd"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="path of the base build's _C extension module")
    parser.add_argument("--new", required=True, help="path of the new build's _C extension module")
    add_grid_args(parser)
    parser.set_defaults(dtypes="bf16", head_dims="64,128")
    parser.add_argument("--rounds", type=int, default=5, help="alternating time_kernels calls per build and point")
    parser.add_argument("--reps", type=int, default=20, help="launches per kernel in each time_kernels call")
    add_output_args(parser)
    return parser.parse_args()


def load_build(label, path):
    """The extension at `path`, imported as module `fa2_<label>._C` so that two builds live side by side.

    The init function is found by the last component of the module name (PyInit__C), so that must stay
    `_C`; the parent package need not exist. Neither build registers anything with torch.library.
    """
    spec = importlib.util.spec_from_file_location(f"fa2_{label}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def serves(module, head_dim):
    return head_dim % 8 == 0 and any(d >= head_dim for d in module.built_head_dims())


def bench_point(args, builds, dtype, head_dim, causal, seqlen):
    batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, dtype=DTYPES[dtype], device="cuda")
                     for _ in range(4))
    # Each build writes its own out and lse (time_kernels runs the forward first, so the backward kernels
    # read that build's own results); they are compared after the last round.
    outputs = {label: (torch.empty_like(q), torch.empty(batch, heads, seqlen, dtype=torch.float32, device="cuda"))
               for label in builds}
    times = {label: [] for label in builds}  # label -> one {kernel: ms} per round
    for round_ in range(args.rounds):
        for label in (BUILDS if round_ % 2 == 0 else BUILDS[::-1]):
            ms = builds[label].time_kernels(dout, q, k, v, *outputs[label], head_dim ** -0.5, causal, args.reps)
            times[label].append(dict(ms, fwdbwd=sum(ms[name] for name in KERNELS)))
    row = {"dtype": dtype, "head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": batch, "heads": heads,
           "out_equal": torch.equal(outputs["base"][0], outputs["new"][0]),
           "lse_equal": torch.equal(outputs["base"][1], outputs["new"][1])}
    for name in COLUMNS:
        for label in BUILDS:
            row[f"{name}_{label}_ms"] = statistics.median(t[name] for t in times[label])
        row[f"{name}_ratio"] = row[f"{name}_new_ms"] / row[f"{name}_base_ms"]
    return row


def table(header, rows):
    columns = ["D", "causal", "S", *(f"{COLUMNS[n]} {what}" for n in COLUMNS for what in ("base ms", "new ms",
                                                                                            "new/base")),
               "out equal", "lse equal"]
    cells = [[r["head_dim"], r["causal"], r["seqlen"],
              *(fmt(r[f"{n}_{what}"], spec) for n in COLUMNS
                for what, spec in (("base_ms", ".3f"), ("new_ms", ".3f"), ("ratio", ".3f"))),
              "yes" if r["out_equal"] else "NO", "yes" if r["lse_equal"] else "NO"] for r in rows]
    notes = ("new/base: time ratio (< 1: new is faster), of medians over the rounds. fwd+bwd: the sum of all "
             "four kernels. out/lse equal: the two builds' forward results, bit for bit.")
    return "\n".join([header, "", notes, "", *markdown_table(columns, cells)]) + "\n"


def summary(rows):
    """Geometric mean and largest new/base per kernel and for fwd+bwd, per dtype."""
    cells = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dtype]
        cells.append([dtype, len(mine), *(f"{geomean(r[f'{n}_ratio'] for r in mine):.3f} "
                                          f"(max {max(r[f'{n}_ratio'] for r in mine):.3f})" for n in COLUMNS),
                      f"{sum(r['out_equal'] for r in mine)}/{len(mine)}"])
    columns = ["dtype:", "points", *(f"{COLUMNS[n]} new/base" for n in COLUMNS), "out equal"]
    return "\n".join(["Geometric means of new/base time (largest in brackets; < 1: new is faster)", "",
                      *markdown_table(columns, cells)]) + "\n"


def main():
    args = parse_args()
    if (code := unavailable(need_extension=False)) is not None:
        return code
    if missing := [f"--{label} {getattr(args, label)}" for label in BUILDS if not os.path.isfile(getattr(args, label))]:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    builds = {label: load_build(label, getattr(args, label)) for label in BUILDS}
    meta = run_meta(tokens=args.tokens, hidden=args.hidden, rounds=args.rounds, reps=args.reps,
                    **{label: f"{getattr(args, label)} (sha256 {file_digest(getattr(args, label))})"
                       for label in BUILDS})
    torch.manual_seed(0)
    rows = []
    grid = grid_dtype_head_dims(args, serves=lambda d: all(serves(module, d) for module in builds.values()),
                                why="time_kernels needs a multiple of 8 that both builds serve")
    for dtype, head_dim in grid:
        for causal in grid_causals(args):
            for seqlen in args.seqlens:
                rows += progress([bench_point(args, builds, dtype, head_dim, causal, seqlen)])
    tables = [table(f"A/B per kernel, {dtype}; {describe(meta)}", mine)
              for dtype in args.dtypes if (mine := [r for r in rows if r["dtype"] == dtype])]
    text = "\n".join([*tables, summary(rows)] if rows else ["no point to time"])
    print("\n" + text)
    write_outputs(args, text, dict(meta=meta, rows=rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

"""Bar charts shaped like FlashAttention-2's figures, from bench.py's JSON: TFLOP/s against seqlen, a group
of bars per seqlen with one bar per implementation, one panel per head dim x causal, one PNG per
(dtype, pass). Needs no GPU.

    python3 benchmarks/plots.py bench_out/bench.json [--out-dir DIR]
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

PASS_TITLES = {"fwd": "Forward", "bwd": "Backward", "fwdbwd": "Forward + backward"}
COLORS = {"ours": "tab:red", "ours-det": "tab:pink", "ours-atomic": "tab:purple", "sdpa-flash": "tab:blue", "cudnn": "tab:green",
          "efficient": "tab:orange", "math": "tab:gray"}


def panels_figure(title, rows, columns):
    """A figure and its rows x columns of axes (a list of lists)."""
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    fig.suptitle(title)
    return fig, axes


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(path)


def seqlen_label(s):
    return f"{s // 1024}k" if s >= 1024 else str(s)


def bar_panel(ax, title, groups, series, ylabel):
    """Grouped bars: `groups` label the x positions, `series` is name -> one value (or None) per group."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [0 if v is None else v for v in values]
        bars = ax.bar(xs, heights, width, label=name, color=COLORS.get(name))
        ax.bar_label(bars, labels=["" if v is None else f"{v:.0f}" for v in values], fontsize=6, rotation=90,
                     padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_title(title)
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)
    ax.legend(fontsize=7)


def line_panel(ax, title, series, xlabel, ylabel):
    """Log-log lines: `series` is name -> (xs, ys), None where there is no value."""
    for name, (xs, ys) in series.items():
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name, color=COLORS.get(name))
    ax.set_xscale("log", base=2)
    xs = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(xs, [seqlen_label(x) for x in xs])
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_bench(data, out_dir):
    """One PNG per (dtype, pass) of bench.py's results; returns the paths written."""
    meta, rows = data["meta"], data["rows"]
    impls = meta["impls"]
    paths = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        for pass_ in dict.fromkeys(r["pass"] for r in rows):
            mine = [r for r in rows if r["dtype"] == dtype and r["pass"] == pass_]
            causals = sorted({r["causal"] for r in mine})
            head_dims = sorted({r["head_dim"] for r in mine})
            fig, axes = panels_figure(f"{PASS_TITLES[pass_]}, {dtype}, {meta['gpu']}", len(causals), len(head_dims))
            for (i, causal), (j, head_dim) in itertools.product(enumerate(causals), enumerate(head_dims)):
                ax = axes[i][j]
                panel = [r for r in mine if (r["head_dim"], r["causal"]) == (head_dim, causal)]
                seqlens = sorted({r["seqlen"] for r in panel})
                by_seqlen = {r["seqlen"]: r for r in panel}
                series = {name: [by_seqlen[s][f"{name}_tflops"] for s in seqlens] for name in impls}
                bar_panel(ax, f"head dim {head_dim}, {'causal' if causal else 'not causal'}",
                          [seqlen_label(s) for s in seqlens], series, "TFLOP/s")
            path = Path(out_dir) / f"bench_{dtype}_{pass_}.png"
            save(fig, path)
            paths.append(path)
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="bench.py --json output")
    parser.add_argument("--out-dir", help="where the PNGs go (default: beside the JSON)")
    args = parser.parse_args()
    if plt is None:
        print("matplotlib is not installed: no plots")
        return 0
    path = Path(args.json)
    if not path.exists():
        print(f"{path} does not exist: run bench.py --json {path} first", file=sys.stderr)
        return 1
    out_dir = Path(args.out_dir or path.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_bench(json.loads(path.read_text()), out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

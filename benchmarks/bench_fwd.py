"""Forward speed of flash_attn2 against PyTorch SDPA's flash and cuDNN backends, on one GPU.

Each point has batch = tokens // seqlen and heads = hidden // head_dim, seqlen_q = seqlen_k.
"""

import argparse
import datetime
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from common import SDPA_BACKENDS, attention_flops, sdpa, tflops, time_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ["ours", *SDPA_BACKENDS]


def int_list(text):
    return [int(x) for x in text.split(",")]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--head-dims", type=int_list, default="64,128")
    parser.add_argument("--seqlens", type=int_list, default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the printed table to a file")
    return parser.parse_args()


def git_commit():
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent)
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def bench_point(flash_attn_func, dtype, head_dim, causal, seqlen, batch, heads):
    # Each side gets its preferred contiguous layout with the same values: ours
    # (batch, seqlen, heads, head_dim), SDPA (batch, heads, seqlen, head_dim).
    shape = (batch, seqlen, heads, head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, device="cuda") for _ in "qkv")
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    fns = {"ours": functools.partial(flash_attn_func, q, k, v, causal=causal)}
    outs = {"ours": fns["ours"]()}
    for name, backend in SDPA_BACKENDS.items():
        out = sdpa(q_t, k_t, v_t, causal, backend)
        if out is not None:
            outs[name] = out.transpose(1, 2)
            fns[name] = functools.partial(sdpa, q_t, k_t, v_t, causal, backend)

    ms = time_ms(fns)
    flops = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal)
    row = dict(head_dim=head_dim, causal=causal, seqlen=seqlen, batch=batch, heads=heads)
    for name in IMPLS:
        row[f"{name}_tflops"] = tflops(flops, ms[name]) if name in ms else None
    # A spot check of correctness, so that a fast but wrong kernel shows in the table.
    baseline = outs.get("sdpa-flash", outs.get("cudnn"))
    row["max_diff"] = None if baseline is None else (outs["ours"] - baseline).abs().max().item()
    return row


def ratio(row):
    ours, flash = row["ours_tflops"], row["sdpa-flash_tflops"]
    return ours / flash if flash else None


def markdown(header, rows):
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    columns = ["D", "causal", "S", "B", "H", *(f"{name} TFLOP/s" for name in IMPLS),
               "ours/flash", "max abs diff"]
    table = [columns, ["---:"] * len(columns)]
    for row in rows:
        table.append([row["head_dim"], row["causal"], row["seqlen"], row["batch"], row["heads"],
                      *(fmt(row[f"{name}_tflops"], ".1f") for name in IMPLS),
                      fmt(ratio(row), ".3f"), fmt(row["max_diff"], ".1e")])
    lines = [header, "", *("| " + " | ".join(map(str, cells)) + " |" for cells in table)]
    ratios = [r for r in map(ratio, rows) if r]
    if ratios:
        lines += ["", f"Geometric mean of ours/flash over {len(ratios)} points: "
                      f"{statistics.geometric_mean(ratios):.3f}"]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to benchmark")
        return 0
    from flash_attn2 import flash_attn_func
    from flash_attn2.interface import built_head_dims

    if not built_head_dims():
        print("flash_attn2._C is not built: nothing to benchmark", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                dtype=args.dtype, date=datetime.datetime.now().isoformat(timespec="minutes"),
                commit=git_commit())
    header = ("Forward, " + ", ".join(f"{key} {value}" for key, value in meta.items())
              + f"; tokens {args.tokens}, hidden {args.hidden}")

    torch.manual_seed(0)
    rows = []
    for head_dim in args.head_dims:
        # Kernel head dims are multiples of 8, so this is "some kernel serves head_dim".
        if not any(d >= head_dim for d in built_head_dims()):
            print(f"skipping head_dim {head_dim}: no kernel built for it", file=sys.stderr)
            continue
        for causal in causals:
            for seqlen in args.seqlens:
                batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
                rows.append(bench_point(flash_attn_func, dtype, head_dim, causal, seqlen,
                                        batch, heads))
                print(rows[-1], file=sys.stderr, flush=True)  # progress

    table = markdown(header, rows)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

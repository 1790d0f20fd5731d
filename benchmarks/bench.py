"""Speed of flash_attn2 against PyTorch SDPA's flash and cuDNN backends, on one GPU.

Passes: forward, backward (on a graph built once), forward + backward. Each point has
batch = tokens // seqlen and heads = hidden // head_dim, seqlen_q = seqlen_k.
"""

import argparse
import datetime
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from common import SDPA_BACKENDS, attention_flops, sdpa, tflops, time_ms

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ["ours", *SDPA_BACKENDS]
PASSES = {"fwd": "Forward", "bwd": "Backward", "fwdbwd": "Forward + backward"}


def int_list(text):
    return [int(x) for x in text.split(",")]


def pass_list(text):
    passes = text.split(",")
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown pass {unknown}; choose from {','.join(PASSES)}")
    return [p for p in PASSES if p in passes]  # table order, duplicates dropped


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=pass_list, default="fwd,bwd,fwdbwd",
                        help="comma-separated, from fwd, bwd, fwdbwd")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--head-dims", type=int_list, default="64,128")
    parser.add_argument("--seqlens", type=int_list, default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the printed tables to a file")
    return parser.parse_args()


def git_commit():
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent)
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


class Impl(NamedTuple):
    forward: Callable  # returns out, or None where an SDPA backend refuses the inputs
    qkv: list          # the leaves that gradients are taken for
    dout: torch.Tensor
    to_ours: Callable  # its layout of out and dq -> ours


def timed_call(pass_, impl):
    """The call that time_ms times for one pass of one implementation."""
    if pass_ == "fwd":
        return torch.no_grad()(impl.forward)  # as inference runs it: no graph, nothing saved
    if pass_ == "bwd":
        out = impl.forward()  # one graph, kept for every call
        return lambda: torch.autograd.grad(out, impl.qkv, impl.dout, retain_graph=True)
    return lambda: torch.autograd.grad(impl.forward(), impl.qkv, impl.dout)


def bench_point(flash_attn_func, passes, dtype, head_dim, causal, seqlen, batch, heads):
    """One row per pass, with every implementation timed alternately on the same values."""
    backward = passes != ["fwd"]
    # Each side gets its preferred contiguous layout: ours (batch, seqlen, heads, head_dim), SDPA
    # (batch, heads, seqlen, head_dim).
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, dout = (torch.randn(shape, dtype=dtype, device="cuda") for _ in range(4))
    ours_qkv = [t.requires_grad_(backward) for t in (q, k, v)]
    sdpa_qkv = [t.detach().transpose(1, 2).contiguous().requires_grad_(backward) for t in (q, k, v)]
    impls = {"ours": Impl(functools.partial(flash_attn_func, *ours_qkv, causal=causal), ours_qkv,
                          dout, lambda t: t)}
    for name, backend in SDPA_BACKENDS.items():
        impls[name] = Impl(functools.partial(sdpa, *sdpa_qkv, causal, backend), sdpa_qkv,
                           dout.transpose(1, 2).contiguous(), lambda t: t.transpose(1, 2))

    # One run of each for a spot check of correctness, so that a fast but wrong kernel shows in the
    # table; an SDPA backend that refuses the inputs (None or an error) drops out.
    results = {}  # name -> (out, dq or None), in our layout
    for name, impl in list(impls.items()):
        try:
            out = impl.forward()
            if out is None:
                raise RuntimeError(f"{name} refused the inputs")
            dq = torch.autograd.grad(out, impl.qkv[0], impl.dout)[0] if backward else None
        except RuntimeError:
            if name == "ours":
                raise
            del impls[name]
            continue
        results[name] = [None if t is None else impl.to_ours(t) for t in (out, dq)]
    baseline = results.get("sdpa-flash", results.get("cudnn", (None, None)))
    diffs = {f"{what}_max_diff": None if theirs is None else (ours - theirs).abs().max().item()
             for what, ours, theirs in zip(("out", "dq"), results["ours"], baseline)}

    flops_fwd = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal)
    flops_bwd = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, backward=True)
    flops = {"fwd": flops_fwd, "bwd": flops_bwd, "fwdbwd": flops_fwd + flops_bwd}
    rows = []
    for pass_ in passes:
        ms = time_ms({name: timed_call(pass_, impl) for name, impl in impls.items()})
        row = dict(head_dim=head_dim, causal=causal, seqlen=seqlen, batch=batch, heads=heads)
        for name in IMPLS:
            row[f"{name}_tflops"] = tflops(flops[pass_], ms[name]) if name in ms else None
        rows.append({"pass": pass_, **row, **diffs})
    return rows


def ratio(row):
    ours, flash = row["ours_tflops"], row["sdpa-flash_tflops"]
    return ours / flash if flash else None


def markdown(header, rows):
    fmt = lambda x, spec: "-" if x is None else format(x, spec)
    columns = ["D", "causal", "S", "B", "H", *(f"{name} TFLOP/s" for name in IMPLS),
               "ours/flash", "max abs diff out", "max abs diff dq"]
    table = [columns, ["---:"] * len(columns)]
    for row in rows:
        table.append([row["head_dim"], row["causal"], row["seqlen"], row["batch"], row["heads"],
                      *(fmt(row[f"{name}_tflops"], ".1f") for name in IMPLS),
                      fmt(ratio(row), ".3f"), fmt(row["out_max_diff"], ".1e"),
                      fmt(row["dq_max_diff"], ".1e")])
    lines = [header, "", *("| " + " | ".join(map(str, cells)) + " |" for cells in table)]
    ratios = [r for r in map(ratio, rows) if r]
    if ratios:
        lines += ["", f"Geometric mean of ours/flash, {rows[0]['pass']}, over {len(ratios)} "
                      f"points: {statistics.geometric_mean(ratios):.3f}"]
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
    setting = (", ".join(f"{key} {value}" for key, value in meta.items())
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
                point = bench_point(flash_attn_func, args.passes, dtype, head_dim, causal, seqlen,
                                    batch, heads)
                for row in point:
                    print(row, file=sys.stderr, flush=True)  # progress
                rows += point

    tables = "\n".join(markdown(f"{PASSES[p]}, {setting}", [r for r in rows if r["pass"] == p])
                       for p in args.passes)
    print("\n" + tables)
    if args.markdown:
        Path(args.markdown).write_text(tables)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

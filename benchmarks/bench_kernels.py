"""Each kernel on its own: milliseconds per launch of the forward, backward preprocess, dQ and dK/dV
kernels (and, where built, the Hopper dQ and dK/dV kernels), timed from a C++ launch loop
(flash_attn2._C.time_kernels, back to back, no L2 flush), against the Python-level forward and backward (flash_attn_func and autograd,
timed the same way), so that what launching from Python costs shows as the difference.

Grid as bench.py: batch = tokens // seqlen, heads = hidden // head_dim, seqlen_q = seqlen_k.
"""

import argparse
import statistics
import sys

import torch

from common import (unavailable, DTYPES, add_grid_args, add_output_args, describe, fmt, grid_causals,
                    grid_dtype_head_dims, kernel_serves, loop_times_ms, make_impls, markdown_table, pass_flops,
                    progress, run_meta, tflops, timed_call, write_outputs)

KERNELS = ("fwd", "bwd_preprocess", "bwd_dq", "bwd_dkdv")  # the deterministic backward's, in order
ATOMIC = "bwd_dkdv_atomic_dq"  # the atomic backward's one kernel after the preprocess (timed where built)
HOPPER = "bwd_dkdv_sm90"  # the Hopper dK/dV kernel (built with sm_90a; timed where built, on sm_90)
HOPPER_DQ = "bwd_dq_sm90"  # and its dQ kernel (the same build switch)
HOPPER_ATOMIC = "bwd_dkdv_atomic_dq_sm90"  # the Hopper dK/dV kernel with the atomic dQ (both switches; unverified)
# The deterministic backward does its matmuls as 3 in the dQ kernel and 4 in the dK/dV kernel; each kernel
# is credited with its share of the backward's FLOPs (2.5x the forward's). The atomic kernel does all five.
BWD_SHARE = {"bwd_dq": 3 / 7, "bwd_dkdv": 4 / 7, ATOMIC: 1.0, HOPPER_DQ: 3 / 7, HOPPER: 4 / 7,
             HOPPER_ATOMIC: 1.0}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_args(parser)
    parser.add_argument("--reps", type=int, default=20, help="launches timed per kernel and per Python call")
    add_output_args(parser)
    return parser.parse_args()


def bench_point(args, dtype, head_dim, causal, seqlen):
    from flash_attn2 import _C

    batch, heads = max(1, args.tokens // seqlen), args.hidden // head_dim
    q, k, v, dout = (torch.randn(batch, seqlen, heads, head_dim, dtype=DTYPES[dtype], device="cuda")
                     for _ in range(4))
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seqlen, dtype=torch.float32, device="cuda")
    # The forward is timed first, so out and lse hold its results when the backward kernels run.
    ms = _C.time_kernels(dout, q, k, v, out, lse, head_dim ** -0.5, causal, args.reps)
    ours = make_impls(["ours-det"], q, k, v, dout, causal, requires_grad=True)["ours-det"]  # the kernels above
    python_ms = {pass_: statistics.median(loop_times_ms(timed_call(pass_, ours), args.reps))
                 for pass_ in ("fwd", "bwd")}

    flops = pass_flops(batch, heads, seqlen, head_dim, causal)
    kernel_flops = {"fwd": flops["fwd"], **{name: flops["bwd"] * share for name, share in BWD_SHARE.items()}}
    read_bytes = 2 * q.numel() * q.element_size()  # the preprocess reads O and dO
    bwd_kernels_ms = sum(ms[name] for name in KERNELS[1:])
    return {"dtype": dtype, "head_dim": head_dim, "causal": causal, "seqlen": seqlen, "batch": batch,
            "heads": heads, **{f"{name}_ms": ms.get(name) for name in (*KERNELS, ATOMIC, HOPPER_DQ, HOPPER,
                                                                 HOPPER_ATOMIC)},
            **{f"{name}_tflops": tflops(f, ms[name]) if name in ms else None for name, f in kernel_flops.items()},
            "bwd_preprocess_gbs": read_bytes / ms["bwd_preprocess"] / 1e6,
            "python_fwd_ms": python_ms["fwd"], "python_bwd_ms": python_ms["bwd"],
            "bwd_kernels_ms": bwd_kernels_ms, "bwd_overhead_ms": python_ms["bwd"] - bwd_kernels_ms}


def table(header, rows):
    columns = ["D", "causal", "S", "fwd ms", "fwd TFLOP/s", "Python fwd ms", "pre ms", "pre GB/s", "dQ ms",
               "dQ TFLOP/s", "dK/dV ms", "dK/dV TFLOP/s", "bwd kernels ms", "Python bwd ms", "bwd overhead ms",
               "atomic dK/dV/dQ ms", "atomic TFLOP/s", "Hopper dQ ms", "Hopper dQ TFLOP/s", "Hopper dK/dV ms",
               "Hopper dK/dV TFLOP/s", "Hopper atomic ms", "Hopper atomic TFLOP/s"]
    cells = [[r["head_dim"], r["causal"], r["seqlen"], fmt(r["fwd_ms"], ".3f"), fmt(r["fwd_tflops"], ".1f"),
              fmt(r["python_fwd_ms"], ".3f"), fmt(r["bwd_preprocess_ms"], ".3f"), fmt(r["bwd_preprocess_gbs"], ".0f"),
              fmt(r["bwd_dq_ms"], ".3f"), fmt(r["bwd_dq_tflops"], ".1f"), fmt(r["bwd_dkdv_ms"], ".3f"),
              fmt(r["bwd_dkdv_tflops"], ".1f"), fmt(r["bwd_kernels_ms"], ".3f"), fmt(r["python_bwd_ms"], ".3f"),
              fmt(r["bwd_overhead_ms"], ".3f"), fmt(r[f"{ATOMIC}_ms"], ".3f"), fmt(r[f"{ATOMIC}_tflops"], ".1f"),
              fmt(r[f"{HOPPER_DQ}_ms"], ".3f"), fmt(r[f"{HOPPER_DQ}_tflops"], ".1f"),
              fmt(r[f"{HOPPER}_ms"], ".3f"), fmt(r[f"{HOPPER}_tflops"], ".1f"),
              fmt(r[f"{HOPPER_ATOMIC}_ms"], ".3f"), fmt(r[f"{HOPPER_ATOMIC}_tflops"], ".1f")]
             for r in rows]
    notes = ("TFLOP/s: fwd counts 4·B·H·S²·D (half if causal); dQ is credited 3/7 and dK/dV 4/7 of the "
             "backward's 2.5x that (ours splits the backward's matmuls 3 + 4). pre GB/s: bytes of O and dO "
             "read by the preprocess. bwd kernels = pre + dQ + dK/dV from the C++ loop; bwd overhead = Python bwd "
             "(autograd.grad back to back, by CUDA events, deterministic=True) minus that. atomic: the "
             "atomic backward's dK/dV kernel with dQ by atomics (all five matmuls: credited the whole backward; "
             "it runs after the same preprocess, and dQ's zeroing and cast are not in it; '-' where it is not built). "
             "Hopper dQ, dK/dV: the wgmma dQ and dK/dV kernels (built with sm_90a) on the same inputs, "
             "credited as dQ and dK/dV ('-' where not built or not on sm_90); Hopper atomic: its dK/dV kernel "
             "with the atomic dQ, credited as atomic.")
    overhead = statistics.median(r["bwd_overhead_ms"] / r["python_bwd_ms"] for r in rows)
    return "\n".join([header, "", notes, "", *markdown_table(columns, cells), "",
                      f"Backward overhead over its kernels, {rows[0]['dtype']}: median {overhead:.1%} of the "
                      f"Python bwd, largest {max(r['bwd_overhead_ms'] for r in rows):.3f} ms"]) + "\n"


def main():
    args = parse_args()
    if (code := unavailable()) is not None:
        return code
    meta = run_meta(tokens=args.tokens, hidden=args.hidden, reps=args.reps)
    torch.manual_seed(0)
    rows = []
    grid = grid_dtype_head_dims(args, serves=lambda d: d % 8 == 0 and kernel_serves(d),
                                why="time_kernels needs a multiple of 8 with a kernel built")
    for dtype, head_dim in grid:
        for causal in grid_causals(args):
            for seqlen in args.seqlens:
                rows += progress([bench_point(args, dtype, head_dim, causal, seqlen)])
    text = "\n".join(table(f"Kernels, {dtype}; {describe(meta)}", [r for r in rows if r["dtype"] == dtype])
                     for dtype in args.dtypes if any(r["dtype"] == dtype for r in rows))
    print("\n" + text)
    write_outputs(args, text, dict(meta=meta, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Decoding speed of flash_attn_with_kvcache: one query token per sequence (seqlen_q = 1) against a full
contiguous KV cache, over batch x cache length x heads (MHA 32:32 and GQA 32:8), bf16, D = 128 by default.

Decoding is memory-bound, so the figure is the achieved bandwidth: bytes of the visible K and V (plus q and
out) / time, against a device-copy ceiling measured in the same run (a torch copy of a large tensor: read +
write bytes / time). Beside ours, PyTorch SDPA's flash and cuDNN backends on the same cache (a transposed
view, (batch, heads_kv, seqlen, head_dim), no copy); "-" where a backend refuses the inputs. Points whose
cache does not fit --mem-fraction of the GPU's memory are skipped. --splits times ours at several
num_splits (0: the heuristic's count, shown in the table) to check the heuristic. --page-sizes times ours
on the same cache seen as pages of that size (a view, no copy) in shuffled order through block_table
(the issue's goal: >= 0.9x the contiguous cache with 16-token pages). --fused-splits times ours with
the split-KV combine folded into the split kernel (FLASH_ATTN2_DECODE_FUSED_COMBINE=1, set around each of its
calls and "0" around the others', so both run in one process; its heuristic's count in the table too) at
those num_splits, beside ours-splits (the combine kernel).

Two timings of every implementation, as two tables (--timing picks): "eager", one call at a time with L2
flushed before each (common.time_ms): a batch-1 step at 8k moves 34-134 MB, 8-31 us at the ceiling, the
size of the Python dispatch and kernel launches, so this includes host overhead (between our two kernels,
split and combine, too); and "graph", the time per call of a CUDA graph of --graph-calls calls replayed,
as serving runs decoding: kernel time, launch overhead removed (fewer calls where a replay would stream
more than GRAPH_BYTES: one at 64 x 128k). The graph's calls rotate over copies of the cache, enough that
the bytes read between two calls on one copy are 5x the L2 (L2_FLUSH_BYTES), so no call finds its cache
in L2. A peer that cannot be captured shows "n/c" (the error is printed below the table). The goal is
judged on the graph table where it is timed.

    python3 benchmarks/bench_decode.py [--splits 0,1] [--fused-splits 0] [--timing eager,graph]
                                       [--markdown results/decode.md --json results/decode.json]
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend

from common import (DTYPES, L2_FLUSH_BYTES, add_output_args, csv_of, describe, fmt, markdown_table, progress,
                    run_meta, sdpa, time_ms, unavailable, write_outputs)

PEERS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
GOAL = 0.8  # the bar: >= 80% of the copy ceiling wherever the cache is >= 8k tokens
TIMINGS = ("eager", "graph")
GRAPH_BYTES = 4 * 2**30  # a graph replay streams at most about this much cache (a few ms on an H200)
FUSED_COMBINE = "FLASH_ATTN2_DECODE_FUSED_COMBINE"


def with_fused_combine(fn, on):
    """fn with FLASH_ATTN2_DECODE_FUSED_COMBINE set to 1 or 0 around its call (the binding reads it at each
    call, so also while a graph is captured), and the caller's setting back after."""
    def call():
        before = os.environ.get(FUSED_COMBINE)
        os.environ[FUSED_COMBINE] = "1" if on else "0"
        try:
            return fn()
        finally:
            if before is None:
                os.environ.pop(FUSED_COMBINE)
            else:
                os.environ[FUSED_COMBINE] = before
    return call


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=csv_of(int), default="1,8,32,64")
    parser.add_argument("--cache-lens", type=csv_of(int), default="1024,8192,32768,131072")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=csv_of(int), default="32,8", help="32: MHA, 8: GQA 32:8")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--splits", type=csv_of(int), default="0", help="num_splits values for ours (0: heuristic)")
    parser.add_argument("--fused-splits", type=csv_of(int), default=[],
                        help="num_splits values for ours with the combine fused (FLASH_ATTN2_DECODE_FUSED_COMBINE=1)")
    parser.add_argument("--page-sizes", type=csv_of(int), default="16",
                        help="paged runs of ours (num_splits 0) at these page sizes")
    parser.add_argument("--peers", type=csv_of(choices=PEERS), default=",".join(PEERS))
    parser.add_argument("--mem-fraction", type=float, default=0.6, help="largest cache, as a share of GPU memory")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the tensor the ceiling copies")
    parser.add_argument("--timing", type=csv_of(choices=TIMINGS), default=",".join(TIMINGS),
                        help="eager: one call at a time; graph: a CUDA graph of --graph-calls calls replayed")
    parser.add_argument("--graph-calls", type=int, default=20,
                        help="calls per captured graph (a multiple of the cache copies; fewer on caches of GBs)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    add_output_args(parser)
    return parser.parse_args()


def copy_ceiling_tbs(gib, reps, warmup):
    """Device-copy bandwidth in TB/s (read + write bytes / time) of a torch copy of a gib-GiB tensor."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms({"copy": lambda: dst.copy_(src)}, reps=reps, warmup=warmup)["copy"]
    return 2 * gib * 2**30 / ms / 1e9


def point(args, batch, cache_len, heads_kv, ceiling):
    from flash_attn2 import flash_attn_with_kvcache
    from flash_attn2.kvcache import kvcache_num_splits

    dtype, d, heads = DTYPES[args.dtype], args.head_dim, args.heads
    q = torch.randn(batch, 1, heads, d, dtype=dtype, device="cuda")
    k_cache = torch.randn(batch, cache_len, heads_kv, d, dtype=dtype, device="cuda")
    cache_bytes = 2 * k_cache.numel() * k_cache.element_size()
    # The graph's calls rotate over copies of the cache (the first is the one eager timing reads): between
    # two calls on one copy the others read at least L2_FLUSH_BYTES (a cache that large evicts itself).
    small = "graph" in args.timing and cache_bytes < L2_FLUSH_BYTES
    copies = 1 + math.ceil(L2_FLUSH_BYTES / cache_bytes) if small else 1
    caches = [(k_cache, torch.randn_like(k_cache))] + [(torch.randn_like(k_cache), torch.randn_like(k_cache))
                                                       for _ in range(copies - 1)]
    # --graph-calls calls (a multiple of the copies), fewer where a replay would stream more than GRAPH_BYTES:
    # on a cache that large the one launch per replay is noise already.
    rounds = min(math.ceil(args.graph_calls / copies), math.ceil(GRAPH_BYTES / (copies * cache_bytes)))
    graph_calls = copies * max(rounds, 1)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    nbytes = cache_bytes + 2 * q.numel() * q.element_size()  # K, V, q, out

    def ours(s, kv, fused):
        call = lambda: flash_attn_with_kvcache(q, *kv, cache_seqlens=seqlens, num_splits=s)  # noqa: E731
        return with_fused_combine(call, fused)

    fns = {f"ours-splits{s}": [ours(s, kv, False) for kv in caches] for s in args.splits}
    fns.update({f"ours-fused-splits{s}": [ours(s, kv, True) for kv in caches] for s in args.fused_splits})
    for page_size in args.page_sizes:
        if cache_len % page_size == 0:
            table = torch.randperm(batch * cache_len // page_size, device="cuda").int().view(batch, -1)
            fns[f"ours-paged{page_size}"] = [  # the same bytes as pages, in shuffled order
                with_fused_combine(lambda kv=kv: flash_attn_with_kvcache(
                    q, *(t.view(-1, page_size, heads_kv, d) for t in kv), cache_seqlens=seqlens, block_table=table),
                    False) for kv in caches]
    qt = q.transpose(1, 2)
    sdpa_caches = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in caches]  # (batch, heads_kv, seqlen, d) views
    for name in args.peers:
        if sdpa(qt, *sdpa_caches[0], False, PEERS[name]) is not None:
            fns[name] = [lambda name=name, kv=kv: sdpa(qt, *kv, False, PEERS[name]) for kv in sdpa_caches]
    chosen = lambda fused: with_fused_combine(lambda: kvcache_num_splits(q, k_cache, 0), fused)()  # noqa: E731
    row = dict(batch=batch, cache_len=cache_len, heads=heads, heads_kv=heads_kv, head_dim=d, bytes=nbytes,
               ceiling_tbs=ceiling, splits_chosen=chosen(False), splits_chosen_fused=chosen(True),
               graph_calls=graph_calls,
               cache_copies=copies, failures={})
    missing = [f"ours-paged{p}" for p in args.page_sizes] + list(args.peers)
    for timing in args.timing:
        failures = {}
        ms = time_ms(fns, reps=args.reps, warmup=args.warmup, graph_calls=graph_calls if timing == "graph" else 0,
                     failures=failures)
        row["failures"].update({f"{name} ({timing})": why for name, why in failures.items()})
        for name in [*fns, *(p for p in missing if p not in fns)]:
            t = ms.get(name)
            row[f"{name}_{timing}_ms"] = t
            row[f"{name}_{timing}_tbs"] = None if t is None else nbytes / t / 1e9
            row[f"{name}_{timing}_state"] = "ok" if t is not None else "n/c" if name in failures else "refused"
    return row


def timing_table(args, rows, timing, ceiling):
    """The markdown lines of one timing's table, its goal line and the peers it could not capture."""
    ours = [f"ours-splits{s}" for s in args.splits] + [f"ours-fused-splits{s}" for s in args.fused_splits]
    names = ours + [f"ours-paged{p}" for p in args.page_sizes] + list(args.peers)
    fused = ["fused splits (0 picks)"] if args.fused_splits else []
    columns = ["batch", "cache", "heads:kv", "splits (0 picks)", *fused, *[f"{n} TB/s" for n in names],
               *[f"{n} % ceiling" for n in ours]]

    def cell(r, n):
        return "n/c" if r[f"{n}_{timing}_state"] == "n/c" else fmt(r[f"{n}_{timing}_tbs"], ".2f")

    table = [[r["batch"], r["cache_len"], f"{r['heads']}:{r['heads_kv']}", r["splits_chosen"],
              *([r["splits_chosen_fused"]] if fused else []), *[cell(r, n) for n in names],
              *[fmt(None if r[f"{n}_{timing}_tbs"] is None else 100 * r[f"{n}_{timing}_tbs"] / ceiling, ".0f")
                for n in ours]] for r in rows]
    how = {"eager": "one call at a time, L2 flushed before each; includes host dispatch and the gaps between "
                    "a call's launches",
           "graph": f"per call of a CUDA graph of up to {args.graph_calls}+ calls replayed (cache copies that L2 cannot "
                    "hold); kernel time, no launch overhead"}[timing]
    lines = [f"## {timing}: {how}", "", *markdown_table(columns, table)]
    first = f"ours-splits{args.splits[0]}_{timing}_tbs"
    long_rows = [r for r in rows if r["cache_len"] >= 8192 and r[first] is not None]
    if long_rows:
        worst = min(r[first] / ceiling for r in long_rows)
        share = statistics.mean(r[first] / ceiling >= GOAL for r in long_rows)
        lines += ["", f"Caches >= 8k, ours (num_splits={args.splits[0]}, {timing}): worst {100 * worst:.0f}% of "
                      f"the ceiling; {100 * share:.0f}% of points at or above the {100 * GOAL:.0f}% goal."]
    failures = sorted({f"{name}: {why}" for r in rows for name, why in r["failures"].items()
                       if name.endswith(f"({timing})")})
    if failures:
        lines += ["", "n/c: could not be captured in a CUDA graph:", *[f"- {f}" for f in failures]]
    return lines


def main():
    args = parse_args()
    code = unavailable()
    if code is not None:
        return code
    started = time.perf_counter()
    ceiling = copy_ceiling_tbs(args.copy_gib, args.reps, args.warmup)
    print(f"device copy ceiling: {ceiling:.2f} TB/s", file=sys.stderr)
    limit = args.mem_fraction * torch.cuda.get_device_properties(0).total_memory
    rows = []
    for heads_kv in args.kv_heads:
        for batch in args.batches:
            for cache_len in args.cache_lens:
                cache_bytes = 2 * batch * cache_len * heads_kv * args.head_dim * DTYPES[args.dtype].itemsize
                if cache_bytes > limit:
                    print(f"skipping batch {batch} x cache {cache_len} x {heads_kv} kv heads: "
                          f"{cache_bytes / 2**30:.0f} GiB of cache", file=sys.stderr)
                    continue
                rows += progress([point(args, batch, cache_len, heads_kv, ceiling)], started)
                torch.cuda.empty_cache()

    meta = run_meta(dtype=args.dtype, head_dim=args.head_dim, ceiling_tbs=round(ceiling, 3))
    lines = [f"# Decode (seqlen_q = 1), {describe(meta)}", "",
             f"Achieved bandwidth: bytes of K, V, q and out / time; device-copy ceiling {ceiling:.2f} TB/s."]
    for timing in args.timing:
        lines += ["", *timing_table(args, rows, timing, ceiling)]
    text = "\n".join(lines) + "\n"
    print(text)
    write_outputs(args, text, dict(meta=meta, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

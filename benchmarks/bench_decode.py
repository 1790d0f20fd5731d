"""Decoding speed of flash_attn_with_kvcache: one query token per sequence (seqlen_q = 1) against a full
contiguous KV cache, over batch x cache length x heads (MHA 32:32 and GQA 32:8), bf16, D = 128 by default.

Decoding is memory-bound, so the figure is the achieved bandwidth: bytes of the visible K and V (plus q and
out) / time, against a device-copy ceiling measured in the same run (a torch copy of a large tensor: read +
write bytes / time). Beside ours, PyTorch SDPA's flash and cuDNN backends on the same cache (a transposed
view, (batch, heads_kv, seqlen, head_dim), no copy); "-" where a backend refuses the inputs. Points whose
cache does not fit --mem-fraction of the GPU's memory are skipped. --splits times ours at several
num_splits (0: the heuristic's count, shown in the table) to check the heuristic. --page-sizes times ours
on the same cache seen as pages of that size (a view, no copy) in shuffled order through block_table
(the issue's goal: >= 0.9x the contiguous cache with 16-token pages).

    python3 benchmarks/bench_decode.py [--splits 0,1] [--markdown results/decode.md --json results/decode.json]
"""

import argparse
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend

from common import (DTYPES, add_output_args, csv_of, describe, fmt, markdown_table, progress, run_meta, sdpa,
                    time_ms, unavailable, write_outputs)

PEERS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
GOAL = 0.8  # the bar: >= 80% of the copy ceiling wherever the cache is >= 8k tokens


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=csv_of(int), default="1,8,32,64")
    parser.add_argument("--cache-lens", type=csv_of(int), default="1024,8192,32768,131072")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=csv_of(int), default="32,8", help="32: MHA, 8: GQA 32:8")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--splits", type=csv_of(int), default="0", help="num_splits values for ours (0: heuristic)")
    parser.add_argument("--page-sizes", type=csv_of(int), default="16",
                        help="paged runs of ours (num_splits 0) at these page sizes")
    parser.add_argument("--peers", type=csv_of(choices=PEERS), default=",".join(PEERS))
    parser.add_argument("--mem-fraction", type=float, default=0.6, help="largest cache, as a share of GPU memory")
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the tensor the ceiling copies")
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
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    nbytes = (k_cache.numel() + v_cache.numel() + 2 * q.numel()) * k_cache.element_size()  # K, V, q, out

    fns = {f"ours-splits{s}": (lambda s=s: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                                   num_splits=s)) for s in args.splits}
    for page_size in args.page_sizes:
        if cache_len % page_size == 0:
            pages = [t.view(-1, page_size, heads_kv, d) for t in (k_cache, v_cache)]  # the same bytes, as pages
            table = torch.randperm(pages[0].shape[0], device="cuda").int().view(batch, -1)
            fns[f"ours-paged{page_size}"] = (lambda p=pages, t=table: flash_attn_with_kvcache(
                q, *p, cache_seqlens=seqlens, block_table=t))
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    for name in args.peers:
        if sdpa(qt, kt, vt, False, PEERS[name]) is not None:
            fns[name] = lambda name=name: sdpa(qt, kt, vt, False, PEERS[name])
    ms = time_ms(fns, reps=args.reps, warmup=args.warmup)
    row = dict(batch=batch, cache_len=cache_len, heads=heads, heads_kv=heads_kv, head_dim=d, bytes=nbytes,
               ceiling_tbs=ceiling, splits_chosen=kvcache_num_splits(q, k_cache, 0))
    missing = [f"ours-paged{p}" for p in args.page_sizes] + list(args.peers)
    for name in [*fns, *(p for p in missing if p not in fns)]:
        t = ms.get(name)
        row[f"{name}_ms"] = t
        row[f"{name}_tbs"] = None if t is None else nbytes / t / 1e9
    return row


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

    names = [f"ours-splits{s}" for s in args.splits] + [f"ours-paged{p}" for p in args.page_sizes] + list(args.peers)
    columns = ["batch", "cache", "heads:kv", "splits (0 picks)", *[f"{n} TB/s" for n in names],
               *[f"{n} % ceiling" for n in names[:len(args.splits)]]]
    table = [[r["batch"], r["cache_len"], f"{r['heads']}:{r['heads_kv']}", r["splits_chosen"],
              *[fmt(r[f"{n}_tbs"], ".2f") for n in names],
              *[fmt(None if r[f"{n}_tbs"] is None else 100 * r[f"{n}_tbs"] / ceiling, ".0f")
                for n in names[:len(args.splits)]]] for r in rows]
    meta = run_meta(dtype=args.dtype, head_dim=args.head_dim, ceiling_tbs=round(ceiling, 3))
    lines = [f"# Decode (seqlen_q = 1), {describe(meta)}", "",
             f"Achieved bandwidth: bytes of K, V, q and out / time; device-copy ceiling {ceiling:.2f} TB/s.", "",
             *markdown_table(columns, table)]
    first = f"ours-splits{args.splits[0]}_tbs"
    long_rows = [r for r in rows if r["cache_len"] >= 8192 and r[first] is not None]
    if long_rows:
        worst = min(r[first] / ceiling for r in long_rows)
        share = statistics.mean(r[first] / ceiling >= GOAL for r in long_rows)
        lines += ["", f"Caches >= 8k, ours (num_splits={args.splits[0]}): worst {100 * worst:.0f}% of the ceiling; "
                      f"{100 * share:.0f}% of points at or above the {100 * GOAL:.0f}% goal."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_outputs(args, text, dict(meta=meta, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

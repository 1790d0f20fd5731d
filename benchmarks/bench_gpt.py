"""End to end: training steps of a GPT-style model (pre-LayerNorm blocks, GELU MLP, tied embedding,
bf16 parameters, AdamW, random tokens) whose causal attention is flash_attn2, SDPA-flash or SDPA-cuDNN;
tokens/s and model FLOPs utilisation as the FlashAttention-2 paper reports them.

Each model is built from the same seed and trained on the same batch, so the first step's losses must
agree; a batch that runs out of memory is halved.
"""

import argparse
import gc
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from common import (unavailable, SDPA_BACKENDS, add_output_args, csv_of, describe, fmt,
                    loop_times_ms, markdown_table, run_meta, sdpa, write_outputs)

# ours: flash_attn_func's default backward (deterministic=False: the split one unless FLASH_ATTN2_ATOMIC_BWD=1);
# ours-det: deterministic=True (not run by default).
IMPLS = ["ours", "ours-det", "sdpa-flash", "cudnn"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=csv_of(int), default="2048,8192")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per step: batch = tokens // seqlen")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--impls", type=csv_of(choices=IMPLS), default="ours,sdpa-flash,cudnn")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps, the first included")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss-rtol", type=float, default=1e-2,
                        help="largest relative difference of a first-step loss from ours that counts as close")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator: H100 SXM dense bf16")
    parser.add_argument("--cublas-tflops", type=float, default=759.0,
                        help="second MFU denominator: cuBLAS bf16 GEMM as measured on the H100")
    add_output_args(parser)
    return parser.parse_args()


def attention(name):
    """(q, k, v) -> out, all (batch, seqlen, heads, head_dim), causal, by implementation `name`."""
    if name in ("ours", "ours-det"):
        from flash_attn2 import flash_attn_func
        return lambda q, k, v: flash_attn_func(q, k, v, causal=True, deterministic=name == "ours-det")

    def attend(q, k, v):
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True, SDPA_BACKENDS[name])
        if out is None:
            raise RuntimeError(f"{name} refused the inputs")
        return out.transpose(1, 2)
    return attend


class Block(nn.Module):
    def __init__(self, hidden, heads, attend):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * hidden, hidden))

    def forward(self, x):  # (batch, seqlen, hidden)
        batch, seqlen, hidden = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seqlen, 3, self.heads, hidden // self.heads).unbind(2)
        x = x + self.proj(self.attend(q, k, v).reshape(batch, seqlen, hidden))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, args, seqlen, attend):
        super().__init__()
        self.embed = nn.Embedding(args.vocab, args.hidden)  # also the output layer
        self.pos = nn.Parameter(torch.empty(seqlen, args.hidden))
        self.blocks = nn.ModuleList(Block(args.hidden, args.heads, attend) for _ in range(args.layers))
        self.norm = nn.LayerNorm(args.hidden)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def matmul_params(self):
        """N of 6N: every parameter but the position table, which is added, not multiplied."""
        return sum(p.numel() for p in self.parameters()) - self.pos.numel()

    def forward(self, tokens, targets):  # (batch, seqlen) each
        x = self.embed(tokens) + self.pos[:tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def flops_per_token(args, n_params, seqlen):
    """6N + 12·L·H·Q·T (PaLM, appendix B): the matmuls' forward and backward, and attention with its
    full S x S counted, causal or not, as the FlashAttention papers count it."""
    return 6 * n_params + 12 * args.layers * args.hidden * seqlen  # H·Q = hidden


def train(args, name, seqlen, batch):
    """Timed training steps of a freshly seeded model; returns its measurements."""
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = GPT(args, seqlen, attention(name)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True)
    torch.manual_seed(args.seed + 1)
    tokens = torch.randint(args.vocab, (batch, seqlen + 1), device="cuda")

    def step():
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    torch.cuda.reset_peak_memory_stats()
    first_loss = step().item()
    step_ms = statistics.median(loop_times_ms(step, args.steps, args.warmup - 1))
    return dict(first_loss=first_loss, last_loss=step().item(), step_ms=step_ms, n_params=model.matmul_params(),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def train_fitting(args, name, seqlen):
    """train() at batch tokens // seqlen, halved while it runs out of memory."""
    batch = max(1, args.tokens // seqlen)
    while True:
        try:
            return dict(batch=batch, **train(args, name, seqlen, batch))
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        gc.collect()  # the failed attempt's model and optimizer
        torch.cuda.empty_cache()
        print(f"{name}, seqlen {seqlen}: out of memory at batch {batch}; halving it", file=sys.stderr)
        batch //= 2


def report(args, meta, rows):
    n_params = next(r["n_params"] for r in rows if "n_params" in r)
    lines = [f"GPT training step; {describe(meta)}", "",
             f"Model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, "
             f"N = {n_params / 1e6:.1f}M parameters (tied embedding counted once, position table not), bf16 "
             "parameters, AdamW, causal attention.",
             f"Model FLOPs per token = 6·N + 12·L·H·Q·T (PaLM appendix B, as the FlashAttention papers count "
             f"it; L layers, H heads, Q head dim, T seqlen; attention counted in full, not halved for causal). "
             f"MFU = model FLOP/s over {args.peak_tflops:g} TFLOP/s (H100 SXM dense bf16 peak) and over "
             f"{args.cublas_tflops:g} TFLOP/s (measured cuBLAS bf16 GEMM). Median of {args.steps} steps after "
             f"{args.warmup} warm-up steps, by CUDA events.", ""]
    columns = ["T", "attention:", "B", "tokens/step", "step ms", "tokens/s", "vs sdpa-flash", "model TFLOP/s",
               f"MFU ({args.peak_tflops:g})", f"MFU ({args.cublas_tflops:g})", "first loss",
               f"loss at step {args.warmup + args.steps + 1}", "peak GiB"]
    cells, notes = [], []
    for row in rows:
        if "error" in row:
            notes.append(f"- T={row['seqlen']}, {row['impl']}: failed: {row['error']}")
            continue
        peers = {r["impl"]: r for r in rows if r["seqlen"] == row["seqlen"] and "error" not in r}
        flash = peers.get("sdpa-flash")
        vs_flash = row["tokens_per_s"] / flash["tokens_per_s"] if flash else None
        model_tflops = row["tokens_per_s"] * row["flops_per_token"] / 1e12
        cells.append([row["seqlen"], row["impl"], row["batch"], row["batch"] * row["seqlen"],
                      fmt(row["step_ms"], ".1f"), fmt(row["tokens_per_s"], ",.0f"),
                      fmt(vs_flash, ".3f"), fmt(model_tflops, ".1f"),
                      fmt(model_tflops / args.peak_tflops, ".1%"), fmt(model_tflops / args.cublas_tflops, ".1%"),
                      fmt(row["first_loss"], ".5f"), fmt(row["last_loss"], ".5f"), fmt(row["peak_gib"], ".1f")])
        ours = peers.get("ours")
        if ours and row is not ours:
            diff = abs(row["first_loss"] - ours["first_loss"]) / abs(ours["first_loss"])
            same = "" if row["batch"] == ours["batch"] else " (batches differ: not comparable)"
            notes.append(f"- T={row['seqlen']}, {row['impl']}: first-step loss differs from ours by {diff:.2e} "
                          f"(relative): {'close' if diff <= args.loss_rtol else 'NOT CLOSE'}{same}")
    return "\n".join([*lines, *markdown_table(columns, cells), "",
                      "Sanity check (same seed, same batch, so the first step's losses must agree; a later "
                      "loss far below the others would point at a leak through the causal mask):", *notes]) + "\n"


def main():
    args = parse_args()
    if (code := unavailable(need_extension=any(name.startswith("ours") for name in args.impls))) is not None:
        return code
    meta = run_meta(tokens_per_step=args.tokens, layers=args.layers, hidden=args.hidden, heads=args.heads)
    rows = []
    for seqlen in args.seqlens:
        for name in args.impls:
            try:
                row = dict(seqlen=seqlen, impl=name, **train_fitting(args, name, seqlen))
            except RuntimeError as error:  # a backend that refuses, or out of memory at batch 1
                row = dict(seqlen=seqlen, impl=name, error=f"{type(error).__name__}: {error}")
            else:
                row["flops_per_token"] = flops_per_token(args, row["n_params"], seqlen)
                row["tokens_per_s"] = row["batch"] * seqlen / row["step_ms"] * 1e3
            print(row, file=sys.stderr, flush=True)  # progress
            rows.append(row)
            gc.collect()
            torch.cuda.empty_cache()
    if not any("error" not in r for r in rows):
        print("every run failed:", *(r["error"] for r in rows), sep="\n  ")
        return 1
    text = report(args, meta, rows)
    print("\n" + text)
    write_outputs(args, text, dict(meta=meta, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

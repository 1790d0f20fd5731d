"""End to end: train a small GPT for a few hundred steps with its attention on flash_attn2, SDPA-flash and
SDPA-cuDNN, and compare speed (tokens/s, MFU) and loss curves.

    python3 examples/train_gpt.py                     # about 1-2 minutes on an H200
    python3 examples/train_gpt.py --steps 500 --seqlen 4096 --out bench_out/train_gpt

The model, its FLOP count and the attention implementations are benchmarks/bench_gpt.py's (pre-LayerNorm
blocks, GELU MLP, tied embedding, bf16 parameters, fused AdamW): this script adds a learning-rate schedule,
data with something to learn, and the loss curves. Each implementation trains from the same seed on the same
batches, so the curves must agree: bf16 rounding lets them drift apart slowly, but a gap that opens early
points at an attention that is wrong.

The data: every sequence is a segment of --period tokens repeated to fill it, the segment drawn from a fixed
random Markov chain in which every token has --branching possible successors. A model first learns the chain
(the loss falls from ln(vocab) towards ln(branching)), then that every token past the first period is the one
a period earlier, which only attention can look up (the loss falls further, towards the first period's
share).

Writes to --out: loss.csv (every step, one column per implementation), loss.png (matplotlib, if installed)
and summary.md (the table printed at the end).
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_gpt import GPT, IMPLS, attention, flops_per_token  # noqa: E402
from common import csv_of, describe, fmt, markdown_table, run_meta, unavailable  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", type=csv_of(choices=IMPLS), default=",".join(IMPLS),
                        help="attention implementations, from " + ",".join(IMPLS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8, help="head dim = hidden / heads")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--period", type=int, default=256, help="length of the repeated segment in the data")
    parser.add_argument("--branching", type=int, default=4, help="successors of each token in the data's chain")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warm-up, cosine decay)")
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps of the learning rate")
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator: H100/H200 dense bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "train_gpt", help="output folder")
    args = parser.parse_args(argv)
    if args.seqlen % args.period or args.seqlen < 2 * args.period:
        parser.error("--seqlen must be a multiple of --period, at least two periods")
    if args.skip >= args.steps:
        parser.error("--skip must be below --steps")
    return args


def make_data(args, device="cuda"):
    """Every step's tokens, (steps, batch, seqlen + 1), made up front (so that timing sees none of it) from a
    seeded generator: the same for every implementation."""
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    rows = args.steps * args.batch
    successors = torch.randint(args.vocab, (args.vocab, args.branching), device=device, generator=generator)
    segment = torch.empty(rows, args.period, dtype=torch.long, device=device)
    segment[:, 0] = torch.randint(args.vocab, (rows,), device=device, generator=generator)
    for i in range(1, args.period):
        choice = torch.randint(args.branching, (rows,), device=device, generator=generator)
        segment[:, i] = successors[segment[:, i - 1], choice]
    repeats = -(-(args.seqlen + 1) // args.period)
    return segment.repeat(1, repeats)[:, :args.seqlen + 1].view(args.steps, args.batch, args.seqlen + 1)


def loss_levels(args):
    """(the chain's entropy per token: a model that knows the chain but cannot copy; a perfect copier's loss),
    both averaged over a sequence's predicted tokens."""
    predicted = args.seqlen
    chain = (math.log(args.vocab) + (predicted - 1) * math.log(args.branching)) / predicted
    copier = (math.log(args.vocab) + (args.period - 1) * math.log(args.branching)) / predicted
    return chain, copier


def learning_rate(args, step):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(args, name, data):
    """Trains a freshly seeded model on `data`; the losses of every step and the timing."""
    torch.manual_seed(args.seed)
    with torch.device("cuda"):
        model = GPT(args, args.seqlen, attention(name)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    losses = []  # on the GPU: reading each back would stall the step it times
    start = None
    for step in range(args.steps):
        if step == args.skip:  # the first steps pay for cuBLAS/cuDNN set-up and the allocator's growth
            torch.cuda.synchronize()
            start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, step)
        tokens = data[step]
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = (args.steps - args.skip) * args.batch * args.seqlen / seconds
    return dict(losses=torch.stack(losses).float().tolist(), tokens_per_s=tokens_per_s,
                step_ms=seconds / (args.steps - args.skip) * 1e3, n_params=model.matmul_params(),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def write_csv(path, impls, runs):
    lines = ["step," + ",".join(impls)]
    for step in range(len(next(iter(runs.values()))["losses"])):
        lines.append(f"{step}," + ",".join(f"{runs[i]['losses'][step]:.6f}" for i in impls))
    path.write_text("\n".join(lines) + "\n")


def plot(path, args, impls, runs):
    """loss.png: the curves overlaid, and each one's difference from the first implementation's."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from plots import COLORS
    except ImportError:
        return False
    fig, (curves, diffs) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw=dict(height_ratios=[3, 1]))
    base = runs[impls[0]]["losses"]
    for name in impls:
        losses = runs[name]["losses"]
        curves.plot(losses, label=name, color=COLORS.get(name), linewidth=1)
        diffs.plot([a - b for a, b in zip(losses, base)], color=COLORS.get(name), linewidth=1)
    chain, copier = loss_levels(args)
    curves.axhline(chain, color="gray", linestyle="--", linewidth=0.8, label="knows the chain, cannot copy")
    curves.axhline(copier, color="gray", linestyle=":", linewidth=0.8, label="copies perfectly")
    curves.set_ylabel("training loss")
    curves.set_title(f"GPT, {args.layers} layers, hidden {args.hidden}, seqlen {args.seqlen}, "
                     f"{args.batch * args.seqlen} tokens/step")
    curves.legend()
    diffs.set_ylabel(f"minus {impls[0]}")
    diffs.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary(args, meta, impls, runs):
    flops = flops_per_token(args, runs[impls[0]]["n_params"], args.seqlen)
    tail = max(1, args.steps // 10)
    columns = ["attention:", "step ms", "tokens/s", "vs sdpa-flash", "model TFLOP/s", f"MFU ({args.peak_tflops:g})",
               "first loss", f"mean loss, last {tail} steps", "largest loss gap to the first", "peak GiB"]
    flash = runs.get("sdpa-flash")
    rows = []
    for name in impls:
        run = runs[name]
        tflops = run["tokens_per_s"] * flops / 1e12
        drift = max(abs(a - b) for a, b in zip(run["losses"], runs[impls[0]]["losses"]))
        rows.append([name, fmt(run["step_ms"], ".1f"), fmt(run["tokens_per_s"], ",.0f"),
                     fmt(run["tokens_per_s"] / flash["tokens_per_s"] if flash else None, ".3f"), fmt(tflops, ".1f"),
                     fmt(tflops / args.peak_tflops, ".1%"), fmt(run["losses"][0], ".4f"),
                     fmt(statistics.mean(run["losses"][-tail:]), ".4f"), fmt(drift, ".3g"), fmt(run["peak_gib"], ".1f")])
    head = [f"GPT training, {describe(meta)}", "",
            f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, "
            f"N = {runs[impls[0]]['n_params'] / 1e6:.1f}M; batch {args.batch} x seqlen {args.seqlen}, {args.steps} "
            f"steps (timed after the first {args.skip}); data: {args.period}-token segments of a Markov chain with "
            f"{args.branching} successors per token, repeated: loss ln(vocab) = {math.log(args.vocab):.3f} at first, "
            f"{loss_levels(args)[0]:.3f} knowing the chain, {loss_levels(args)[1]:.3f} copying perfectly. Model "
            "FLOPs per token 6N + 12·L·H·Q·T (bench_gpt.py).", ""]
    return "\n".join([*head, *markdown_table(columns, rows)]) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if (code := unavailable(need_extension="ours" in args.impls)) is not None:
        return code
    meta = run_meta(steps=args.steps, tokens_per_step=args.batch * args.seqlen)
    data = make_data(args)
    runs, failed = {}, {}
    for name in args.impls:
        try:
            runs[name] = train(args, name, data)
        except RuntimeError as error:  # a backend that refuses the shapes, or out of memory
            failed[name] = f"{type(error).__name__}: {error}"
            print(f"{name}: failed: {failed[name]}", file=sys.stderr)
        else:
            run = runs[name]
            print(f"{name}: {run['tokens_per_s']:,.0f} tokens/s, loss {run['losses'][0]:.3f} -> "
                  f"{run['losses'][-1]:.3f}", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    if not runs:
        return 1
    impls = [name for name in args.impls if name in runs]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "loss.csv", impls, runs)
    text = summary(args, meta, impls, runs) + "".join(f"\n- {n}: {e}" for n, e in failed.items())
    (args.out / "summary.md").write_text(text)
    print("\n" + text)
    plotted = plot(args.out / "loss.png", args, impls, runs)
    print(f"wrote {args.out / 'loss.csv'}, {args.out / 'summary.md'}"
          + (f", {args.out / 'loss.png'}" if plotted else " (matplotlib is not installed: no loss.png)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

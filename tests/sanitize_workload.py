"""A small workload for compute-sanitizer (tests/run_sanitizer.sh runs it under each tool): forward and
backward of every built head dim, both dtypes, causal and not, on ragged and tile-sized seqlens with GQA
and MHA, so that every kernel instantiation runs at least once on shapes that leave partial tiles.

Shapes are tiny: the sanitizers slow kernels down 100x and more. Run alone, without the sanitizer, it
also checks each result against the float32 reference (--no-check skips that, as the driver does, so
that the sanitizers see our kernels and little of PyTorch's).

    python3 tests/sanitize_workload.py [--dtypes fp16 bf16] [--head-dims 64 128] [--no-check]
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's flash_attn2
from flash_attn2 import flash_attn_func  # noqa: E402
from flash_attn2.interface import built_head_dims  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (batch, seqlen_q, seqlen_k, heads_q, heads_kv): ragged both ways with GQA (and a batch stride), and
# a tile-sized MHA one.
SHAPES = [(2, 113, 203, 2, 1), (1, 217, 128, 4, 2), (1, 128, 64, 2, 2)]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=None,
                        help="head dims to run (default: every kernel built); 59 runs the zero-padded path")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the reference")
    return parser.parse_args()


def run_case(shape, head_dim, dtype, causal, check):
    """One forward and backward; returns what check_fwd or check_bwd found wrong, or None."""
    batch, seqlen_q, seqlen_k, heads_q, heads_kv = shape
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype, device="cuda")
    k, v = (torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device="cuda") for _ in "kv")
    dout = torch.randn_like(q)
    qkv = [t.requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_attn_func(*qkv, causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, qkv, dout)
    torch.cuda.synchronize()
    if not check:
        return None
    from test_bwd_gpu import check_bwd  # this script's folder is on sys.path
    from test_fwd_gpu import check_fwd

    try:
        detached = [t.detach() for t in qkv]
        check_fwd(out.detach(), lse, *detached, head_dim ** -0.5, causal)
        check_bwd(grads, dout, *detached, head_dim ** -0.5, causal)
    except AssertionError as error:
        return str(error).splitlines()[0]
    return None


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("sanitize_workload: no CUDA GPU")
    head_dims = args.head_dims or list(built_head_dims())
    if not head_dims:
        sys.exit("flash_attn2._C has no kernels built")
    torch.manual_seed(0)
    failures, cases = [], 0
    for head_dim, dtype, causal, shape in itertools.product(head_dims, args.dtypes, (False, True), SHAPES):
        error = run_case(shape, head_dim, DTYPES[dtype], causal, check=not args.no_check)
        cases += 1
        if error:
            failures.append(f"d{head_dim} {dtype} {'causal' if causal else 'full'} {shape}: {error}")
    print(f"sanitize_workload: {cases} forward+backward cases, head dims {head_dims}, {' '.join(args.dtypes)}"
          + ("" if args.no_check else f", {len(failures)} wrong"))
    for failure in failures:
        print("  WRONG", failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

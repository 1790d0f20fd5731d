"""A small workload for compute-sanitizer (tests/run_sanitizer.sh runs it under each tool): forward and
backward of every built head dim, both dtypes, causal and not, on ragged and tile-sized seqlens with GQA
and MHA, so that every kernel instantiation runs at least once on shapes that leave partial tiles.

Varlen batches too, through flash_attn_varlen_func: a ragged mix with an empty sequence and GQA, and
cu_seqlens with bad values (decreasing, negative, past the tensors' rows, not starting at 0, sequences
longer than max_seqlen) that value checks would refuse and that, unchecked, must give wrong rows but no
access outside the tensors. --varlen-only runs the varlen cases alone.

Shapes are tiny: the sanitizers slow kernels down 100x and more. Run alone, without the sanitizer, it
also checks each result of a valid call against the float32 reference (--no-check skips that, as the
driver does, so that the sanitizers see our kernels and little of PyTorch's; the bad cu_seqlens are
never checked, their results are garbage by design).

    python3 tests/sanitize_workload.py [--dtypes fp16 bf16] [--head-dims 64 128] [--no-check] [--varlen-only]
                                       [--deterministic]
                                       [--variants] [--kvcache]
"""

import argparse
import os
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's flash_attn2
from flash_attn2 import flash_attn_func, flash_attn_varlen_func, set_value_checks  # noqa: E402
from flash_attn2._extension import C  # noqa: E402
from flash_attn2.interface import built_head_dims  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (batch, seqlen_q, seqlen_k, heads_q, heads_kv): ragged both ways with GQA (and a batch stride), and
# a tile-sized MHA one.
SHAPES = [(2, 113, 203, 2, 1), (1, 217, 128, 4, 2), (1, 128, 64, 2, 2)]

# Varlen: (lengths_q, lengths_k, heads_q, heads_kv), one length each per sequence. Empty sequences, one
# with no key, one with more queries than keys (causal rows that see none), ragged tiles; GQA.
VARLEN_SHAPES = [([0, 113, 1, 65, 40], [0, 203, 7, 0, 129], 4, 2), ([130], [64], 2, 2)]
# Bad cu_seqlens for q (TOTAL_Q rows) and k (TOTAL_K rows), with max_seqlen_q and max_seqlen_k: (name,
# cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k). Each pair has one entry more than the batch.
TOTAL_Q, TOTAL_K = 150, 200
INT32_MAX = 2 ** 31 - 1
BAD_CU_SEQLENS = [
    ("decreasing", [0, 100, 40, 150], [0, 150, 30, 200], 150, 150),
    ("past-total", [0, 60, 400, 100_000], [0, 250, 300, 1_000_000], 100_000, 1_000_000),
    ("negative", [0, -50, 70, 150], [-100, -20, 150, 200], 150, 250),
    ("not-from-0", [30, 80, 150], [50, 120, 200], 70, 80),
    ("longer-than-max", [0, 150], [0, 200], 64, 100),
    ("int32-extremes", [-2 ** 31, INT32_MAX, INT32_MAX], [0, INT32_MAX, -2 ** 31], 150, 200),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=None,
                        help="head dims to run (default: every kernel built); 59 runs the zero-padded path")
    parser.add_argument("--no-check", action="store_true", help="skip the comparison with the reference")
    parser.add_argument("--varlen-only", action="store_true", help="run the varlen cases alone")
    parser.add_argument("--deterministic", action="store_true",
                        help="the split backward (deterministic=True) even where the atomic one is built (which "
                             "is opted into then)")
    parser.add_argument("--kvcache", action="store_true",
                        help="run flash_attn_with_kvcache's cases alone (bad lengths and page ids included), unchecked")
    parser.add_argument("--variants", action="store_true",
                        help="run the score variants (window, softcap, ALiBi, sinks, dropout) alone, unchecked")
    return parser.parse_args()


# The backward's mode: the atomic one (FLASH_ATTN2_ATOMIC_BWD=1, set in main) where it is built (opt-in,
# FLASH_ATTN2_BUILD_ATOMIC_BWD=1) and --deterministic is not given; else the split one, the default build's.
DETERMINISTIC = False


def forward_backward(qkv, causal, varlen=None, **scores):
    """out, lse (detached), dout and the gradients of flash_attn_func, or of flash_attn_varlen_func where
    varlen (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) is given, on leaves with qkv's values.
    scores: window_size, softcap, alibi_slopes, s_aux, dropout_p (varlen with dropout gives no lse: None;
    fixed-length with dropout also runs the dropout mask's debug kernel, for return_attn_probs)."""
    leaves = [t.detach().requires_grad_() for t in qkv]
    scores = {**scores, "deterministic": DETERMINISTIC}
    if varlen is None:
        out, lse, _ = flash_attn_func(*leaves, causal=causal, return_attn_probs=True, **scores)
    elif scores.get("dropout_p"):  # varlen gives no attention probabilities
        out, lse = flash_attn_varlen_func(*leaves, *varlen, causal=causal, **scores), None
    else:
        out, lse, _ = flash_attn_varlen_func(*leaves, *varlen, causal=causal, return_attn_probs=True, **scores)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    torch.cuda.synchronize()
    return out.detach(), lse, dout, grads


def checked(qkv, causal, results, varlen=None):
    """What check_fwd or check_bwd found wrong in results (forward_backward's), or None."""
    from test_bwd_gpu import check_bwd  # this script's folder is on sys.path
    from test_fwd_gpu import check_fwd

    out, lse, dout, grads = results
    softmax_scale = qkv[0].shape[-1] ** -0.5
    try:
        check_fwd(out, lse, *qkv, softmax_scale, causal, varlen)
        check_bwd(grads, dout, *qkv, softmax_scale, causal, varlen)
    except AssertionError as error:
        return str(error).splitlines()[0]
    return None


def run_case(shape, head_dim, dtype, causal, check):
    """One forward and backward; returns what check_fwd or check_bwd found wrong, or None."""
    batch, seqlen_q, seqlen_k, heads_q, heads_kv = shape
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype, device="cuda")
    k, v = (torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device="cuda") for _ in "kv")
    results = forward_backward((q, k, v), causal)
    return checked((q, k, v), causal, results) if check else None


def run_varlen_case(shape, head_dim, dtype, causal, check):
    """One varlen forward and backward on valid cu_seqlens; returns what the checks found wrong, or None."""
    from conftest import random_varlen

    lengths_q, lengths_k, heads_q, heads_kv = shape
    *qkv, varlen = random_varlen(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype=dtype, device="cuda")
    results = forward_backward(qkv, causal, varlen)
    return checked(qkv, causal, results, varlen) if check else None


def run_bad_cu_seqlens(bad, head_dim, dtype, causal):
    """One varlen forward and backward on bad cu_seqlens, value checks off: the results are garbage (rows
    outside every sequence are never written) and are not looked at; only the sanitizer's verdict counts.
    q, k, v are random, not torch.empty: the kernels read every row that a clamped sequence covers, and
    initcheck would report uninitialized inputs. MHA: with GQA the per-query-head dK, dV that the binding
    sums hold unwritten rows here, and initcheck would report PyTorch's sum reading them."""
    _, cu_q, cu_k, max_q, max_k = bad
    q = torch.randn(TOTAL_Q, 2, head_dim, dtype=dtype, device="cuda")
    k, v = (torch.randn(TOTAL_K, 2, head_dim, dtype=dtype, device="cuda") for _ in "kv")
    varlen = (torch.tensor(cu_q, dtype=torch.int32, device="cuda"),
              torch.tensor(cu_k, dtype=torch.int32, device="cuda"), max_q, max_k)
    forward_backward((q, k, v), causal, varlen)


# (name, causal, score arguments given heads and batch): every kernel path the variants add (the window's
# two edges, softcap's tanh and its derivative, ALiBi's per-element bias, the sink in the softmax and LSE).
VARIANTS = [
    ("window (17, 5)", False, lambda heads, batch: dict(window_size=(17, 5))),
    ("window (40, 0) causal", True, lambda heads, batch: dict(window_size=(40, 0))),
    ("softcap 30", False, lambda heads, batch: dict(softcap=30.0)),
    ("softcap + window causal", True, lambda heads, batch: dict(softcap=30.0, window_size=(33, 0))),
    ("alibi (heads,)", True, lambda heads, batch: dict(alibi_slopes=torch.rand(heads, device="cuda"))),
    ("alibi (batch, heads)", False, lambda heads, batch: dict(alibi_slopes=torch.rand(batch, heads, device="cuda"))),
    ("sink + window causal", True, lambda heads, batch: dict(s_aux=torch.randn(heads, device="cuda"),
                                                               window_size=(25, 0))),
    # Dropout: the Philox mask in the forward, dQ and dK/dV (the transposed layout's lane shuffles), the
    # rng_state the forward writes and the backward reads.
    ("dropout 0.2", False, lambda heads, batch: dict(dropout_p=0.2)),
    ("dropout + softcap + sink causal", True, lambda heads, batch: dict(dropout_p=0.3, softcap=30.0,
                                                                          s_aux=torch.randn(heads, device="cuda"))),
]


def run_variant(scores, causal, shape, head_dim, dtype, varlen_shape):
    """One forward and backward of a variant on a fixed-length or varlen shape; unchecked."""
    from conftest import random_varlen

    if varlen_shape:
        lengths_q, lengths_k, heads_q, heads_kv = shape
        *qkv, varlen = random_varlen(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype=dtype, device="cuda")
        batch = len(lengths_q)
    else:
        batch, seqlen_q, seqlen_k, heads_q, heads_kv = shape
        qkv = [torch.randn(batch, n, h, head_dim, dtype=dtype, device="cuda")
               for n, h in ((seqlen_q, heads_q), (seqlen_k, heads_kv), (seqlen_k, heads_kv))]
        varlen = None
    forward_backward(qkv, causal, varlen, **scores(heads_q, batch))


# flash_attn_with_kvcache: (name, cache_seqlens, paged page size or None, seqlen_new, rotary, num_splits, and
# cache_batch_idx / cache_leftpad values or None). Lengths past the cache and negative ones, page ids, cache
# rows and left pads out of range: clamped in the kernels, never an access outside.
KVCACHE_CASES = [
    ("contiguous ragged split", [0, 1, 77, 200], None, 0, False, 0, None, None),
    ("contiguous append rotary", [0, 5, 150, 190], None, 7, True, 1, None, None),
    ("bad lengths", [-5, 2 ** 31 - 1, 199, -2 ** 31], None, 3, False, 3, None, None),
    ("paged 16 append split", [0, 17, 100, 200], 16, 5, True, 4, None, None),
    ("paged 64 bad lengths", [2 ** 31 - 1, -1, 64, 3], 64, 2, False, 0, None, None),
    ("bad batch idx append", [3, 50, 100, 7], None, 2, False, 2, [-4, 2, 2 ** 31 - 1, 1], None),
    ("bad leftpad append rotary", [30, 50, 100, 7], None, 2, True, 0, None, [-1, 60, 2 ** 31 - 1, 3]),
]


def run_kvcache(case, head_dim, dtype):
    """One flash_attn_with_kvcache call (contiguous or paged, with an append) on random values; unchecked.
    Paged: page ids past the used pages and some used ones out of range."""
    from flash_attn2 import flash_attn_with_kvcache

    _, lengths, page_size, seqlen_new, rotary, splits, batch_idx, leftpad = case
    batch, capacity, heads_q, heads_kv = len(lengths), 200, 4, 2
    q = torch.randn(batch, 3, heads_q, head_dim, dtype=dtype, device="cuda")
    extra = {}
    if page_size:
        max_pages = -(-capacity // page_size)
        shape = (batch * max_pages + 2, page_size, heads_kv, head_dim)
        table = torch.randperm(batch * max_pages + 2, device="cuda")[:batch * max_pages].view(batch, max_pages).int()
        table[0, -1], table[-1, 0] = -9, 10 ** 6
        extra["block_table"] = table
    else:
        shape = (batch, capacity, heads_kv, head_dim)
    k_cache, v_cache = (torch.randn(shape, dtype=dtype, device="cuda") for _ in "kv")
    k, v = ((torch.randn(batch, seqlen_new, heads_kv, head_dim, dtype=dtype, device="cuda") for _ in "kv")
            if seqlen_new else (None, None))
    if rotary:
        angles = torch.rand(capacity + (page_size or 0), 8 * min(4, head_dim // 16), device="cuda")
        extra.update(rotary_cos=angles.cos().to(dtype), rotary_sin=angles.sin().to(dtype))
    for name, values in (("cache_batch_idx", batch_idx), ("cache_leftpad", leftpad)):
        if values is not None:
            extra[name] = torch.tensor(values, dtype=torch.int32, device="cuda")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, causal=True, num_splits=splits, **extra)
    torch.cuda.synchronize()


def cases(args, head_dims):
    """(description, run(check)) for every case the arguments ask for."""
    if args.kvcache:
        for head_dim, dtype, case in itertools.product(head_dims, args.dtypes, KVCACHE_CASES):
            yield (f"d{head_dim} {dtype} kvcache {case[0]}",
                   lambda check, a=(case, head_dim, DTYPES[dtype]): run_kvcache(*a))
        return
    if args.variants:
        for head_dim, dtype, (name, causal, scores) in itertools.product(head_dims, args.dtypes, VARIANTS):
            for shape, is_varlen in [(s, False) for s in SHAPES] + [(s, True) for s in VARLEN_SHAPES]:
                yield (f"d{head_dim} {dtype} {name} {shape}",
                       lambda check, a=(scores, causal, shape, head_dim, DTYPES[dtype], is_varlen): run_variant(*a))
        return
    product = itertools.product(head_dims, args.dtypes, (False, True))
    for head_dim, dtype, causal in product:
        what = f"d{head_dim} {dtype} {'causal' if causal else 'full'}"
        like = (head_dim, DTYPES[dtype], causal)
        if not args.varlen_only:
            for shape in SHAPES:
                yield f"{what} {shape}", lambda check, shape=shape, like=like: run_case(shape, *like, check)
        for shape in VARLEN_SHAPES:
            yield f"{what} varlen {shape}", lambda check, shape=shape, like=like: run_varlen_case(shape, *like, check)
        for bad in BAD_CU_SEQLENS:
            yield f"{what} bad cu_seqlens {bad[0]}", lambda check, bad=bad, like=like: run_bad_cu_seqlens(bad, *like)


def main():
    global DETERMINISTIC
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("sanitize_workload: no CUDA GPU")
    DETERMINISTIC = args.deterministic or not C.has_atomic_bwd()
    os.environ["FLASH_ATTN2_ATOMIC_BWD"] = "0" if DETERMINISTIC else "1"
    head_dims = args.head_dims or list(built_head_dims())
    if not head_dims:
        sys.exit("flash_attn2._C has no kernels built")
    torch.manual_seed(0)
    set_value_checks(False)  # the bad cu_seqlens must reach the kernels, whatever FLASH_ATTN2_CHECK_VALUES says
    failures, count = [], 0
    for what, run in cases(args, head_dims):
        error = run(check=not args.no_check)
        count += 1
        if error:
            failures.append(f"{what}: {error}")
    print(f"sanitize_workload: {count} forward+backward cases{' (varlen only)' if args.varlen_only else ''}, "
          f"{'deterministic' if DETERMINISTIC else 'atomic'} backward, "
          f"head dims {head_dims}, {' '.join(args.dtypes)}" + ("" if args.no_check else f", {len(failures)} wrong"))
    for failure in failures:
        print("  WRONG", failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

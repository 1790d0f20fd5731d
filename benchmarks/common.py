"""Timing, FLOP counting, the implementations under test and table output, shared by the benchmarks."""

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Written between timed calls so that no input is still in L2 from the call before; five times
# the largest L2 in use (50 MB on H100, 60 MB on H200).
L2_FLUSH_BYTES = 256 * 2**20

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}
# "ours" is flash_attn_func as called by default (deterministic=False, which takes the split backward unless
# the atomic one is opted into: flash_attn2/_ops.py), "ours-det" with deterministic=True (the split backward,
# no atomics), "ours-atomic" the atomic-dQ backward (FLASH_ATTN2_ATOMIC_BWD=1, as flash_attn's and SDPA-flash's);
# "ours-mma" is ours with the forward forced onto the mma.sync kernels (FLASH_ATTN2_FORCE_SM80: on Hopper
# the A/B of the two paths); "math" is attention_ref in the input dtype: PyTorch attention as written by
# hand, S x S in memory.
# "ours-mma-bwd" is ours with the backward on the mma.sync kernels (FLASH_ATTN2_SM90_BWD=0: on Hopper the A/B
# of the two backward paths; left out where the Hopper ones are not built or the GPU is not sm_90).
IMPLS = ["ours", "ours-det", "ours-atomic", "ours-mma", "ours-mma-bwd", *SDPA_BACKENDS, "math"]


def with_env(f, name, value):
    """f with the environment variable `name` set to value during each call (flash_attn2's switches are read
    when the kernels run)."""
    def call(*args, **kwargs):
        before = os.environ.get(name)
        os.environ[name] = value
        try:
            return f(*args, **kwargs)
        finally:
            if before is None:
                del os.environ[name]
            else:
                os.environ[name] = before
    return call


def atomic_backward_built():
    """Whether this build of flash_attn2 has the atomic-dQ backward (FLASH_ATTN2_BUILD_ATOMIC_BWD=1)."""
    from flash_attn2._extension import C
    return C is not None and C.has_atomic_bwd()


def hopper_backward_built():
    """Whether this build has the Hopper dQ and dK/dV kernels and this GPU runs them."""
    from flash_attn2._extension import C
    return (C is not None and getattr(C, "has_sm90_bwd", lambda: False)()
            and torch.cuda.get_device_capability() == (9, 0))


def on_mma_sync(f):
    """f with flash_attn2's forward forced onto the mma.sync kernels; the binding reads the switch at each call."""
    return with_env(f, "FLASH_ATTN2_FORCE_SM80", "1")


def cuda_ready():
    """True on a machine with a CUDA GPU; otherwise says so, for the caller to exit 0."""
    if torch.cuda.is_available():
        return True
    print("no CUDA GPU: nothing to benchmark")
    return False


def extension_ready():
    """True if flash_attn2's kernels are built; otherwise says so, for the caller to exit 1."""
    from flash_attn2.interface import built_head_dims
    if built_head_dims():
        return True
    print("flash_attn2._C is not built: run benchmarks/run_gpu.sh or `pip install -e .` first")
    return False


def unavailable(need_extension=True):
    """None if the benchmark can run; else the exit code for main() to return (0: no GPU, 1: not built)."""
    if not cuda_ready():
        return 0
    if need_extension and not extension_ready():
        return 1
    return None


def kernel_serves(head_dim):
    """Whether some built kernel head dim (a multiple of 8) serves head_dim."""
    from flash_attn2.interface import built_head_dims
    return any(d >= head_dim for d in built_head_dims())


# ---- command lines

def csv_of(kind=str, choices=None):
    """An argparse type for a comma-separated list, kept in the order given, duplicates dropped."""
    def parse(text):
        items = list(dict.fromkeys(kind(x) for x in text.split(",")))
        unknown = [x for x in items if choices is not None and x not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {','.join(map(str, choices))}")
        return items
    return parse


def add_grid_args(parser):
    """The paper's grid: batch = tokens // seqlen, heads = hidden // head_dim, seqlen_q = seqlen_k."""
    parser.add_argument("--dtypes", "--dtype", type=csv_of(choices=DTYPES), default="bf16,fp16")
    parser.add_argument("--head-dims", type=csv_of(int), default="64,128,256")
    parser.add_argument("--seqlens", type=csv_of(int), default="512,1024,2048,4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=16384, help="batch = tokens // seqlen")
    parser.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both")


def grid_causals(args):
    return {"both": [False, True], "true": [True], "false": [False]}[args.causal]


def grid_dtype_head_dims(args, serves=kernel_serves, why="no kernel built for it"):
    """(dtype, head_dim) for each of --dtypes x --head-dims, dtype outermost; a head dim that `serves` refuses
    is skipped, saying `why` on stderr."""
    for dtype in args.dtypes:
        for head_dim in args.head_dims:
            if serves(head_dim):
                yield dtype, head_dim
            else:
                print(f"skipping head_dim {head_dim}: {why}", file=sys.stderr)


def add_output_args(parser):
    parser.add_argument("--json", metavar="PATH", help="write every number as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the printed tables to a file")


def git_commit():
    """The commit the numbers come from: FLASH_ATTN2_COMMIT where set (the GPU machine's copy of the tree
    carries a stale .git, whose HEAD would be wrong); else HEAD's hash where this tree is a git checkout,
    with "+dirty" where `git status --porcelain` shows changes (untracked files included); else "unknown"."""
    if os.environ.get("FLASH_ATTN2_COMMIT"):
        return os.environ["FLASH_ATTN2_COMMIT"]

    def git(*words):
        try:
            result = subprocess.run(["git", *words], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    # A copy placed inside some other checkout would otherwise report that checkout's HEAD.
    top = git("rev-parse", "--show-toplevel")
    head = git("rev-parse", "HEAD") if top and Path(top).resolve() == REPO_ROOT else None
    status = git("status", "--porcelain") if head else None
    if status is not None:
        return head + ("+dirty" if status else "")
    return "unknown"


def run_meta(**extra):
    """Where and when the numbers were taken, for table headers and JSON."""
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now().isoformat(timespec="minutes"), commit=git_commit(), **extra)


def progress(rows, started=None):
    """Prints `rows` (dicts) to stderr as they are measured, floats to 4 places, after the seconds since
    `started` (a time.perf_counter()) where given. Returns `rows`, for `all_rows += progress(point(...))`."""
    if started is not None:
        print(f"[{time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
    for row in rows:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, file=sys.stderr, flush=True)
    return rows


def describe(meta):
    return ", ".join(f"{key} {','.join(map(str, v)) if isinstance(v, list) else v}" for key, v in meta.items())


def write_outputs(args, text, data):
    """Write the tables to --markdown and the numbers to --json, where given."""
    for path, content in ((args.markdown, text), (args.json, json.dumps(data, indent=1) + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown_table(columns, rows):
    """Lines of a markdown table; columns whose name ends in ':' are left-aligned (the ':' is dropped)."""
    names = [c.rstrip(":") for c in columns]
    rule = ["---" if c.endswith(":") else "---:" for c in columns]
    return ["| " + " | ".join(map(str, cells)) + " |" for cells in (names, rule, *rows)]


def geomean(values):
    values = [v for v in values if v]
    return statistics.geometric_mean(values) if values else None


# ---- timing

def time_ms(fns, reps=30, warmup=5, graph_calls=0, failures=None):
    """Median milliseconds per call of each function in `fns` (name -> callable), by CUDA events.

    The calls alternate (a, b, c, a, b, c, ...) so that clock and temperature drift hits all of
    them alike. L2 is flushed before each call; the flush also keeps the GPU busy while Python
    launches the call, so launch overhead is not timed on short problems, but only until the call's
    first kernel: a call of several kernels (or one shorter than its own host work) still shows the
    host's time between them.

    graph_calls > 0 removes the host altogether, as serving does for decoding: each entry is captured
    once as a CUDA graph of graph_calls calls, and a timed rep is one replay of it (after the flush),
    its time divided by graph_calls. An entry may then be a list of callables, called in turn (on
    copies of the inputs, say, so that no call finds its inputs in L2 from the one before); eager timing
    calls the first. An entry that cannot be captured is left out of the result, with its error in
    failures[name] where a dict is given (capture fails with RuntimeError on a call that synchronises
    or copies to the host).
    """
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    calls = {name: list(fn) if isinstance(fn, (list, tuple)) else [fn] for name, fn in fns.items()}
    runs = {}
    for name, fn in calls.items():
        if not graph_calls:
            for _ in range(warmup):
                fn[0]()
            runs[name] = fn[0]
            continue
        try:
            runs[name] = cuda_graph(fn, graph_calls, warmup).replay
        except RuntimeError as error:
            if failures is not None:
                failures[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    per_run = max(graph_calls, 1)
    new_event = lambda: torch.cuda.Event(enable_timing=True)
    events = {name: [(new_event(), new_event()) for _ in range(reps)] for name in runs}
    for rep in range(reps):
        for name, run in runs.items():
            flush.zero_()
            start, end = events[name][rep]
            start.record()
            run()
            end.record()
    torch.cuda.synchronize()
    return {name: statistics.median(start.elapsed_time(end) for start, end in pairs) / per_run
            for name, pairs in events.items()}


def cuda_graph(fns, calls, warmup=3):
    """A CUDA graph of `calls` calls of the callables `fns` in turn, warmed up first on a side stream (as
    torch.cuda.graph asks: lazy initialisation, workspaces and autotuning happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return graph


def loop_times_ms(fn, reps=10, warmup=2):
    """Milliseconds of each of `reps` back-to-back calls, by CUDA events, with no L2 flush.

    Unlike time_ms, nothing keeps the GPU busy while Python launches a call: where launching is
    slower than the kernels, the GPU waits inside the timed span and the overhead shows.
    """
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


# ---- FLOPs

def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, backward=False):
    """Matmul FLOPs: Q·Kᵀ and P·V, 2·Sq·Sk·D each per head; causal does half of them.

    The backward does five such matmuls to the forward's two: 2.5 times the work.
    """
    flops = 4 * batch * heads * seqlen_q * seqlen_k * head_dim // (2 if causal else 1)
    return flops * 5 // 2 if backward else flops


def pass_flops(batch, heads, seqlen, head_dim, causal):
    """FLOPs of each pass, "fwd", "bwd" and "fwdbwd" (3.5 times the forward), seqlen_q = seqlen_k."""
    fwd = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal)
    bwd = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, backward=True)
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


def tflops(flops, ms):
    return flops / ms / 1e9


# ---- the implementations under test

def sdpa(q, k, v, causal, backend):
    """PyTorch SDPA restricted to `backend`, on (batch, heads, seqlen, head_dim) tensors.

    Returns None where that backend refuses the inputs. SDPA aligns causal masks top-left, so
    it matches flash_attn2 only when seqlen_q == seqlen_k.
    """
    with sdpa_kernel(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusing backend warns why before it raises
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        except RuntimeError:
            return None


def math_matrix_bytes(batch, heads, seqlen_q, seqlen_k):
    """Bytes of one S x S matrix of "math" (attention_ref takes the softmax in float32); it holds
    several at once, more with autograd."""
    return batch * heads * seqlen_q * seqlen_k * 4


class Impl(NamedTuple):
    forward: Callable  # returns out, or None where an SDPA backend refuses the inputs
    qkv: list          # the leaves that gradients are taken for
    dout: torch.Tensor
    to_ours: Callable  # its layout of out and dq -> ours
    env: tuple = ()    # (name, value) switches set around each timed call, backward included (the atomic or
                       # Hopper backward is opted into that way)


def make_impls(names, q, k, v, dout, causal, requires_grad):
    """name -> Impl for each of `names` (from IMPLS), on copies of q, k, v, dout in (b, s, h, d).

    Each side gets its preferred contiguous layout: ours and math (batch, seqlen, heads, head_dim),
    SDPA (batch, heads, seqlen, head_dim).
    """
    from flash_attn2 import flash_attn_func
    from flash_attn2.reference import attention_ref

    ours_qkv = [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]
    impls = {}
    if "ours" in names:
        impls["ours"] = Impl(functools.partial(flash_attn_func, *ours_qkv, causal=causal, deterministic=False),
                             ours_qkv, dout, lambda t: t)
    if "ours-det" in names:
        det_qkv = [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]
        impls["ours-det"] = Impl(functools.partial(flash_attn_func, *det_qkv, causal=causal, deterministic=True),
                                 det_qkv, dout, lambda t: t)
    if "ours-atomic" in names and atomic_backward_built():  # not in a build without it: left out
        atomic_qkv = [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]
        impls["ours-atomic"] = Impl(functools.partial(flash_attn_func, *atomic_qkv, causal=causal, deterministic=False),
                                    atomic_qkv, dout, lambda t: t, env=(("FLASH_ATTN2_ATOMIC_BWD", "1"),))
    if "ours-mma-bwd" in names and hopper_backward_built():
        m_qkv = [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]
        impls["ours-mma-bwd"] = Impl(functools.partial(flash_attn_func, *m_qkv, causal=causal, deterministic=False),
                                     m_qkv, dout, lambda t: t, env=(("FLASH_ATTN2_SM90_BWD", "0"),))
    if "ours-mma" in names:
        mma_qkv = [t.detach().requires_grad_(requires_grad) for t in (q, k, v)]
        impls["ours-mma"] = Impl(on_mma_sync(functools.partial(flash_attn_func, *mma_qkv, causal=causal,
                                                               deterministic=False)), mma_qkv, dout, lambda t: t)
    if "math" in names:
        impls["math"] = Impl(lambda: attention_ref(*ours_qkv, causal=causal, compute_dtype=q.dtype)[0],
                             ours_qkv, dout, lambda t: t)
    sdpa_names = [name for name in SDPA_BACKENDS if name in names]
    if sdpa_names:
        sdpa_qkv = [t.detach().transpose(1, 2).contiguous().requires_grad_(requires_grad) for t in (q, k, v)]
        sdpa_dout = dout.transpose(1, 2).contiguous()
        for name in sdpa_names:
            impls[name] = Impl(functools.partial(sdpa, *sdpa_qkv, causal, SDPA_BACKENDS[name]), sdpa_qkv,
                               sdpa_dout, lambda t: t.transpose(1, 2))
    return impls


def timed_call(pass_, impl):
    """The call that is timed (or measured) for one pass of one implementation."""
    if impl.env:
        (name, value), rest = impl.env[0], impl.env[1:]
        return with_env(timed_call(pass_, impl._replace(env=rest)), name, value)
    if pass_ == "fwd":
        return torch.no_grad()(impl.forward)  # as inference runs it: no graph, nothing saved
    if pass_ == "bwd":
        out = impl.forward()  # one graph, kept for every call
        return lambda: torch.autograd.grad(out, impl.qkv, impl.dout, retain_graph=True)
    return lambda: torch.autograd.grad(impl.forward(), impl.qkv, impl.dout)

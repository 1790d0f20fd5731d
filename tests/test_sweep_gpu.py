"""A random sweep over shapes, head dims, dtypes, masks and memory layouts: out, LSE and all three
gradients of flash_attn_func against the float32 reference, by the forward's 2x and the backward's
3x rule.

The shapes are drawn once, from SWEEP_SEED (printed with every case and overridable with
FLASH_ATTN2_SWEEP_SEED), so a case is the same on every run and its id names it: rerun a failure with
`pytest tests/test_sweep_gpu.py --sweep -k case123` and the data seed it printed (FLASH_ATTN2_SEED).
The default run takes the first QUICK_CASES cases; --sweep takes all SWEEP_CASES.

Varlen cases (test_sweep_varlen) are drawn apart, from their own generator seeded with the same seed, so
that adding them left every fixed-length case as it was: batches of 1 to 8 sequences of random lengths
(empty ones, primes and tile edges among them), seqlen_q != seqlen_k per sequence, through
flash_attn_varlen_func against the reference run per sequence. Rerun one with `-k varlen012`; the default
run takes the first QUICK_VARLEN_CASES of VARLEN_CASES.
"""

import bisect
import math
import os
import random
from dataclasses import dataclass

import pytest
import torch

from conftest import DTYPES, requires_ext, requires_gpu, skip_unless_built, varlen_of
from flash_attn2 import flash_attn_func, flash_attn_varlen_func
from test_bwd_gpu import check_bwd
from test_fwd_gpu import check_fwd

SWEEP_SEED = int(os.environ.get("FLASH_ATTN2_SWEEP_SEED") or 20240611)
SWEEP_CASES, QUICK_CASES = 520, 40

KERNEL_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
ODD_HEAD_DIMS = tuple(d for d in range(1, 256) if d % 8)  # zero-padded to a multiple of 8 first
TILES = (64, 128)  # the kernels' block sizes: masks go wrong at a tile's edge, or one row either side
MAX_SEQLEN, MAX_BATCH, MAX_HEADS = 8192, 8, 16
# The fp32 reference keeps a few (batch, heads_q, seqlen_q, seqlen_k) float32 tensors alive for
# autograd: at 2^26 elements that is 256 MiB each and a few GiB in all, milliseconds on an H100.
# MAX_SEQLEN^2 fits, so seqlens are drawn freely and batch and heads fill what is left.
MAX_SCORES = 2 ** 26
assert MAX_SEQLEN ** 2 <= MAX_SCORES


def _primes_up_to(n):
    sieve = bytearray([1]) * (n + 1)
    sieve[:2] = b"\0\0"
    for p in range(2, math.isqrt(n) + 1):
        if sieve[p]:
            sieve[p * p::p] = bytearray(len(range(p * p, n + 1, p)))
    return [p for p in range(n + 1) if sieve[p]]


PRIMES = _primes_up_to(MAX_SEQLEN)

# How each of q, k, v and dout is laid out. All keep the last dim contiguous, as flash_attn_func asks,
# and other strides a multiple of 8 elements (16 bytes) where the head dim is one.
LAYOUTS = "ctps"


def laid_out(layout, shape, dtype):
    """A random tensor of `shape`, (batch, seqlen, heads, head_dim) or varlen (total, heads, head_dim),
    laid out as `layout` says."""
    *outer, seqlen, heads, head_dim = shape
    like = dict(dtype=dtype, device="cuda")
    if layout == "c":  # contiguous
        return torch.randn(shape, **like)
    if layout == "t":  # stored (batch, heads, seqlen, head_dim), as SDPA takes it
        return torch.randn(*outer, heads, seqlen, head_dim, **like).transpose(-3, -2)
    if layout == "p":  # padded: head_dim + 8 elements between heads
        return torch.randn(*outer, seqlen, heads, head_dim + 8, **like)[..., :head_dim]
    assert layout == "s"  # a window of a longer sequence: a storage offset, and a batch stride to match
    return torch.randn(*outer, seqlen + 3, heads, head_dim, **like).narrow(-3, 2, seqlen)


@dataclass(frozen=True)
class Case:
    index: int
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str  # a key of DTYPES
    causal: bool
    layouts: str  # a LAYOUTS letter each for q, k, v, dout

    def __str__(self):
        return (f"case{self.index:03d}-b{self.batch}-{self.seqlen_q}x{self.seqlen_k}"
                f"-h{self.heads_q}kv{self.heads_kv}-d{self.head_dim}-{self.dtype}"
                f"-{'causal' if self.causal else 'full'}-{self.layouts}")


def draw_seqlen(rng, max_seqlen=MAX_SEQLEN):
    """1 to max_seqlen, half log-uniform (short ones are cheap and ragged) and half uniform; in 7 of
    10 draws moved to the next prime (the last one below max_seqlen at most) or to the nearest multiple
    of a tile, or one off it."""
    if rng.random() < 0.5:
        size = round(2 ** rng.uniform(0, math.log2(max_seqlen)))
    else:
        size = rng.randint(1, max_seqlen)
    kind = rng.random()
    if kind < 0.35:
        primes = PRIMES[:bisect.bisect_right(PRIMES, max_seqlen)]
        return primes[min(bisect.bisect_left(primes, size), len(primes) - 1)]
    if kind < 0.7:
        tile = rng.choice(TILES)
        return min(max(1, round(size / tile)) * tile + rng.choice((-1, 0, 1)), max_seqlen)
    return size


def draw_case(rng, index):
    """Case `index`. Head dims and dtypes cycle, so that any 24 consecutive cases starting at a multiple
    of 24 hold every kernel head dim in both dtypes; odd cases take a head dim that is not a multiple of 8.
    """
    seqlen_q, seqlen_k = draw_seqlen(rng), draw_seqlen(rng)
    budget = MAX_SCORES // (seqlen_q * seqlen_k)
    batch = rng.randint(1, min(MAX_BATCH, budget))
    heads_q = rng.randint(1, min(MAX_HEADS, budget // batch))
    heads_kv = rng.choice([d for d in range(1, heads_q + 1) if heads_q % d == 0])
    if index % 2 == 0:
        head_dim = KERNEL_HEAD_DIMS[index // 2 % len(KERNEL_HEAD_DIMS)]
    else:
        head_dim = rng.choice(ODD_HEAD_DIMS)
    dtype = list(DTYPES)[index // (2 * len(KERNEL_HEAD_DIMS)) % len(DTYPES)]
    causal = rng.random() < 0.5
    layouts = "cccc" if rng.random() < 0.3 else "".join(rng.choice(LAYOUTS) for _ in "qkvd")
    return Case(index, batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, causal, layouts)


def draw_sweep(seed, cases):
    rng = random.Random(seed)
    return [draw_case(rng, index) for index in range(cases)]


SWEEP = draw_sweep(SWEEP_SEED, SWEEP_CASES)


def pytest_generate_tests(metafunc):
    """Gives test_sweep the first QUICK_CASES cases and test_sweep_varlen the first QUICK_VARLEN_CASES, or
    all of them with --sweep."""
    full = metafunc.config.getoption("--sweep")
    if "sweep_case" in metafunc.fixturenames:
        metafunc.parametrize("sweep_case", SWEEP if full else SWEEP[:QUICK_CASES], ids=str)
    if "varlen_case" in metafunc.fixturenames:
        metafunc.parametrize("varlen_case", VARLEN_SWEEP if full else VARLEN_SWEEP[:QUICK_VARLEN_CASES], ids=str)


@requires_gpu
@requires_ext
@pytest.mark.usefixtures("fwd_path", "bwd_path")
def test_sweep(sweep_case, seed):
    case = sweep_case
    skip_unless_built(case.head_dim)
    print(f"{case}: shapes from FLASH_ATTN2_SWEEP_SEED={SWEEP_SEED}, data from FLASH_ATTN2_SEED={seed}")
    dtype = DTYPES[case.dtype]
    q_shape = (case.batch, case.seqlen_q, case.heads_q, case.head_dim)
    kv_shape = (case.batch, case.seqlen_k, case.heads_kv, case.head_dim)
    q, k, v, dout = (laid_out(layout, shape, dtype)
                     for layout, shape in zip(case.layouts, (q_shape, kv_shape, kv_shape, q_shape)))
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]  # leaves that keep the strides
    out, lse, _ = flash_attn_func(*qkv, causal=case.causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, qkv, dout)
    softmax_scale = case.head_dim ** -0.5
    check_fwd(out.detach(), lse, q, k, v, softmax_scale, case.causal)
    check_bwd(grads, dout, q, k, v, softmax_scale, case.causal)


# Varlen cases: up to VARLEN_MAX_BATCH sequences of up to VARLEN_MAX_SEQLEN rows each; the reference runs
# sequence by sequence, so its cost is the sum of seqlen_q * seqlen_k over them, far below MAX_SCORES.
VARLEN_CASES, QUICK_VARLEN_CASES = 240, 24
VARLEN_MAX_BATCH, VARLEN_MAX_SEQLEN = 8, 2048
VARLEN_LAYOUTS = "ctp"  # "s" (a window of a longer sequence) is "c" again without a batch dim


@dataclass(frozen=True)
class VarlenCase:
    index: int
    lengths_q: tuple  # one per sequence; 0 for an empty one
    lengths_k: tuple
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: str  # a key of DTYPES
    causal: bool
    layouts: str  # a VARLEN_LAYOUTS letter each for q, k, v, dout

    def __str__(self):
        return (f"varlen{self.index:03d}-b{len(self.lengths_q)}-q{sum(self.lengths_q)}k{sum(self.lengths_k)}"
                f"-h{self.heads_q}kv{self.heads_kv}-d{self.head_dim}-{self.dtype}"
                f"-{'causal' if self.causal else 'full'}-{self.layouts}")


def draw_varlen_seqlen(rng):
    """0 (an empty sequence) in 1 of 10 draws, else as draw_seqlen up to VARLEN_MAX_SEQLEN."""
    return 0 if rng.random() < 0.1 else draw_seqlen(rng, VARLEN_MAX_SEQLEN)


def draw_varlen_case(rng, index):
    """Varlen case `index`; head dims and dtypes cycle as draw_case's do, so that the first 24 cases hold
    every kernel head dim in both dtypes. Per sequence seqlen_k is seqlen_q's in half the draws, else a
    draw of its own."""
    batch = rng.randint(1, VARLEN_MAX_BATCH)
    lengths_q = tuple(draw_varlen_seqlen(rng) for _ in range(batch))
    lengths_k = tuple(length if rng.random() < 0.5 else draw_varlen_seqlen(rng) for length in lengths_q)
    heads_q = rng.randint(1, MAX_HEADS)
    heads_kv = rng.choice([d for d in range(1, heads_q + 1) if heads_q % d == 0])
    if index % 2 == 0:
        head_dim = KERNEL_HEAD_DIMS[index // 2 % len(KERNEL_HEAD_DIMS)]
    else:
        head_dim = rng.choice(ODD_HEAD_DIMS)
    dtype = list(DTYPES)[index // (2 * len(KERNEL_HEAD_DIMS)) % len(DTYPES)]
    causal = rng.random() < 0.5
    layouts = "cccc" if rng.random() < 0.3 else "".join(rng.choice(VARLEN_LAYOUTS) for _ in "qkvd")
    return VarlenCase(index, lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, causal, layouts)


def draw_varlen_sweep(seed, cases):
    rng = random.Random(f"varlen-{seed}")  # a generator of their own: SWEEP's draws stay as they were
    return [draw_varlen_case(rng, index) for index in range(cases)]


VARLEN_SWEEP = draw_varlen_sweep(SWEEP_SEED, VARLEN_CASES)


@requires_gpu
@requires_ext
@pytest.mark.usefixtures("bwd_path")
def test_sweep_varlen(varlen_case, seed):
    case = varlen_case
    skip_unless_built(case.head_dim)
    print(f"{case}: lengths_q {list(case.lengths_q)}, lengths_k {list(case.lengths_k)}; shapes from "
          f"FLASH_ATTN2_SWEEP_SEED={SWEEP_SEED}, data from FLASH_ATTN2_SEED={seed}")
    dtype = DTYPES[case.dtype]
    q_shape = (sum(case.lengths_q), case.heads_q, case.head_dim)
    kv_shape = (sum(case.lengths_k), case.heads_kv, case.head_dim)
    q, k, v, dout = (laid_out(layout, shape, dtype)
                     for layout, shape in zip(case.layouts, (q_shape, kv_shape, kv_shape, q_shape)))
    varlen = varlen_of(case.lengths_q, case.lengths_k, "cuda")
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]  # leaves that keep the strides
    out, lse, _ = flash_attn_varlen_func(*qkv, *varlen, causal=case.causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, qkv, dout)
    softmax_scale = case.head_dim ** -0.5
    check_fwd(out.detach(), lse, q, k, v, softmax_scale, case.causal, varlen)
    check_bwd(grads, dout, q, k, v, softmax_scale, case.causal, varlen)


def test_sweep_draw():
    # The draw keeps its promises: bounds, divisibility, the work cap, and the mix it is biased toward.
    assert len(SWEEP) >= 500 and len({str(case) for case in SWEEP}) == len(SWEEP)
    for case in SWEEP:
        assert 1 <= case.batch <= MAX_BATCH and 1 <= case.heads_q <= MAX_HEADS, case
        assert 1 <= case.seqlen_q <= MAX_SEQLEN and 1 <= case.seqlen_k <= MAX_SEQLEN, case
        assert case.heads_q % case.heads_kv == 0, case
        assert case.batch * case.heads_q * case.seqlen_q * case.seqlen_k <= MAX_SCORES, case
        assert 1 <= case.head_dim <= 256 and (case.head_dim in KERNEL_HEAD_DIMS or case.head_dim % 8), case
    seqlens = [s for case in SWEEP for s in (case.seqlen_q, case.seqlen_k)]
    primes = sum(s in PRIMES for s in seqlens)
    near_tile = sum(any((s + d) % tile == 0 for tile in TILES for d in (-1, 0, 1)) for s in seqlens)
    assert primes > len(seqlens) // 4 and near_tile > len(seqlens) // 4
    assert max(seqlens) > MAX_SEQLEN // 2 and min(seqlens) == 1

    quick = SWEEP[:QUICK_CASES]
    every_kernel = {(head_dim, dtype) for head_dim in KERNEL_HEAD_DIMS for dtype in DTYPES}
    assert {(case.head_dim, case.dtype) for case in quick} >= every_kernel
    assert {case.causal for case in quick} == {False, True}
    assert any(case.head_dim % 8 for case in quick) and any(case.layouts != "cccc" for case in quick)
    assert any(1 < case.heads_kv < case.heads_q for case in quick)  # GQA
    assert any(case.seqlen_q != case.seqlen_k and case.causal for case in quick)


def test_varlen_sweep_draw():
    # The varlen draw keeps its promises, and its quick part holds the mix the default run relies on.
    assert len({str(case) for case in VARLEN_SWEEP}) == len(VARLEN_SWEEP) == VARLEN_CASES
    for case in VARLEN_SWEEP:
        assert 1 <= len(case.lengths_q) == len(case.lengths_k) <= VARLEN_MAX_BATCH, case
        assert all(0 <= s <= VARLEN_MAX_SEQLEN for s in case.lengths_q + case.lengths_k), case
        assert case.heads_q % case.heads_kv == 0 and 1 <= case.heads_q <= MAX_HEADS, case
        assert 1 <= case.head_dim <= 256 and (case.head_dim in KERNEL_HEAD_DIMS or case.head_dim % 8), case
        assert set(case.layouts) <= set(VARLEN_LAYOUTS) and len(case.layouts) == 4, case
    seqlens = [s for case in VARLEN_SWEEP for s in case.lengths_q + case.lengths_k]
    assert sum(s in PRIMES for s in seqlens) > len(seqlens) // 5
    assert sum(any((s + d) % tile == 0 for tile in TILES for d in (-1, 0, 1)) for s in seqlens if s) > len(seqlens) // 5

    quick = VARLEN_SWEEP[:QUICK_VARLEN_CASES]
    every_kernel = {(head_dim, dtype) for head_dim in KERNEL_HEAD_DIMS for dtype in DTYPES}
    assert {(case.head_dim, case.dtype) for case in quick} >= every_kernel
    assert {case.causal for case in quick} == {False, True}
    assert any(case.head_dim % 8 for case in quick) and any(case.layouts != "cccc" for case in quick)
    assert any(1 < case.heads_kv < case.heads_q for case in quick)  # GQA
    assert any(0 in case.lengths_q + case.lengths_k for case in quick)  # an empty sequence
    assert any(len(case.lengths_q) == 1 for case in quick) and any(len(case.lengths_q) > 4 for case in quick)
    # Per sequence seqlen_q != seqlen_k, with causal: some rows see fewer keys, or none.
    assert any(case.causal and any(sq > sk for sq, sk in zip(case.lengths_q, case.lengths_k)) for case in quick)
    assert max(max(case.lengths_q + case.lengths_k) for case in quick) > VARLEN_MAX_SEQLEN // 2

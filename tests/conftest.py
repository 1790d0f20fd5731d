"""Shared markers, options and helpers; test modules import them with `from conftest import ...`."""

import importlib
import itertools
import os
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from flash_attn2.interface import _fwd
from flash_attn2.reference import attention_ref, attention_varlen_ref

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def _extension_built():
    try:
        importlib.import_module("flash_attn2._C")
    except ImportError:
        return False
    return True


requires_ext = pytest.mark.skipif(not _extension_built(), reason="flash_attn2._C is not built")


def pytest_addoption(parser):
    parser.addoption("--large-grid", action="store_true", default=False,
                     help="run the GPU tests over the large grid of shapes (slow)")
    parser.addoption("--sweep", action="store_true", default=False,
                     help="run the whole random sweep of test_sweep_gpu (500+ shapes), not its first 40")
    parser.addoption("--huge", action="store_true", default=False,
                     help="run the tests marked huge (a 2^31-element q, seqlen 128k: ~10 GiB of GPU memory)")


def pytest_configure(config):
    config.addinivalue_line("markers", "huge: needs ~10 GiB of GPU memory; skipped unless --huge is given")


def pytest_collection_modifyitems(config, items):
    """Skips the tests marked huge unless --huge is given."""
    if config.getoption("--huge"):
        return
    skip_huge = pytest.mark.skip(reason="huge: pass --huge to run")
    for item in items:
        if "huge" in item.keywords:
            item.add_marker(skip_huge)


# The GPU tests' grid, shared by the forward and backward tests.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Every kernel head dim, and two others: 40 runs in the 64 kernel, 59 is zero-padded to 64 first.
HEAD_DIMS = [32, 64, 96, 128, 192, 256, 40, 59]
SEQLENS = [(1, 1), (1, 239), (113, 203), (128, 217), (217, 128), (256, 512), (1023, 1024),
           (2048, 2048)]
LARGE_SEQLENS = [(3, 5), (64, 64), (511, 1537), (1537, 511), (1, 4096), (4096, 4096)]
BATCH_HEADS = [(2, 8)]  # (batch, heads_q)
LARGE_BATCH_HEADS = [(1, 16), (3, 12)]
# heads_kv from heads_q: a kv head per query head, one per four query heads (with heads_q = 8 that
# is 2, apart from MQA), one for all.
KV_HEADS = {"mha": lambda heads_q: heads_q, "gqa": lambda heads_q: heads_q // 4,
            "mqa": lambda heads_q: 1}


def pytest_generate_tests(metafunc):
    """Gives the tests that take `seqlens` or `batch_heads` the grid; --large-grid adds to it. Tests that
    use the fixture `fwd_path` run once per forward path, those that use `bwd_path` once per dK/dV path, and
    those that use `sm90_bwd_general` with and without the Hopper backward's general variant."""
    if "fwd_path" in metafunc.fixturenames:
        metafunc.parametrize("fwd_path", FWD_PATHS, indirect=True)
    if "bwd_path" in metafunc.fixturenames:
        metafunc.parametrize("bwd_path", BWD_PATHS, indirect=True)
    if "sm90_bwd_general" in metafunc.fixturenames:
        metafunc.parametrize("sm90_bwd_general", SM90_BWD_GENERAL, indirect=True)
    large = metafunc.config.getoption("--large-grid")
    if "seqlens" in metafunc.fixturenames:
        seqlens = SEQLENS + (LARGE_SEQLENS if large else [])
        metafunc.parametrize("seqlens", seqlens, ids=lambda s: "%dx%d" % s)
    if "batch_heads" in metafunc.fixturenames:
        batch_heads = BATCH_HEADS + (LARGE_BATCH_HEADS if large else [])
        metafunc.parametrize("batch_heads", batch_heads, ids=lambda bh: "b%dh%d" % bh)


# The forward's two paths on an sm_90 GPU: the mma.sync kernels (csrc/sm80) and the Hopper kernel
# (csrc/sm90), which takes the calls it covers unless FLASH_ATTN2_FORCE_SM80=1. Elsewhere only the first.
FWD_PATHS = ("mma_sync", "hopper")


def hopper_path_available():
    if not (torch.cuda.is_available() and _extension_built()):
        return False
    from flash_attn2._extension import C
    return C.has_sm90() and torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture
def fwd_path(request, monkeypatch):
    """Runs the test with the forward on one path; a module opts in with
    `pytestmark = pytest.mark.usefixtures("fwd_path")`. On the Hopper path, calls it does not cover
    (head dims <= 32) still run on mma.sync."""
    if request.param == "hopper":
        if not hopper_path_available():
            pytest.skip("the Hopper forward needs an sm_90 GPU and a build with FLASH_ATTN2_CUDA_ARCHS including 90a")
        monkeypatch.setenv("FLASH_ATTN2_FORCE_SM80", "0")
    else:
        monkeypatch.setenv("FLASH_ATTN2_FORCE_SM80", "1")
    return request.param


# The split backward's dQ and dK/dV steps on an sm_90 GPU: the mma.sync kernels, and the Hopper ones
# (csrc/sm90/bwd_dq_kernel.h, bwd_dkdv_kernel.h; built with sm_90a unless FLASH_ATTN2_BUILD_SM90_BWD=0, and
# taken by default: FLASH_ATTN2_SM90_BWD=0 turns them off), which take the calls they cover (head dims 64 and
# 128: plain, causal, GQA, varlen) and leave the rest on mma.sync.
BWD_PATHS = ("mma_sync", "hopper")


def hopper_bwd_available():
    if not hopper_path_available():
        return False
    from flash_attn2._extension import C
    return getattr(C, "has_sm90_bwd", lambda: False)()


@pytest.fixture
def bwd_path(request, monkeypatch):
    """Runs the test with the split backward's dQ and dK/dV on one path; a module opts in with
    `pytestmark = pytest.mark.usefixtures("bwd_path")`. The atomic mode (deterministic=False with its opt-in)
    follows the same switch: on "hopper" its Hopper dK/dV kernel with the atomic dQ takes the calls the Hopper
    backward covers, where the build has it (FLASH_ATTN2_BUILD_ATOMIC_BWD=1 with the Hopper backward), else
    the mma.sync one."""
    if request.param == "hopper":
        if not hopper_bwd_available():
            pytest.skip("the Hopper backward kernels need an sm_90 GPU and a build with them (not FLASH_ATTN2_BUILD_SM90_BWD=0) "
                        "and FLASH_ATTN2_CUDA_ARCHS including 90a")
        monkeypatch.setenv("FLASH_ATTN2_SM90_BWD", "1")
    else:
        monkeypatch.setenv("FLASH_ATTN2_SM90_BWD", "0")
    return request.param


# The score-mod calls' backward (softcap, ALiBi, a window's left edge, dropout): on the mma.sync kernels
# (FLASH_ATTN2_SM90_BWD_GENERAL=0), and on the Hopper kernels' general variant (built and taken by default with
# the Hopper backward, flash_api.cpp hopper_bwd).
SM90_BWD_GENERAL = ("off", "on")


def sm90_bwd_general_missing():
    """Why the Hopper backward's general variant cannot run here, or None where it can."""
    if not hopper_bwd_available():
        return "the Hopper backward kernels need an sm_90 GPU and a build with them and with sm_90a"
    from flash_attn2._extension import C
    if not getattr(C, "has_sm90_bwd_general", lambda: False)():
        return "the Hopper backward's general variant is not in this build (FLASH_ATTN2_BUILD_SM90_BWD_GENERAL=0)"
    return None


@pytest.fixture
def sm90_bwd_general(request, monkeypatch):
    """Runs the test with FLASH_ATTN2_SM90_BWD_GENERAL off, and on where the build has the general variant and
    the GPU is sm_90; a module opts in with `pytest.mark.usefixtures("sm90_bwd_general")`. The atomic mode
    keeps the mma.sync kernels for score-mod calls either way."""
    on = request.param == "on"
    missing = sm90_bwd_general_missing() if on else None
    if missing:
        pytest.skip(missing)
    monkeypatch.setenv("FLASH_ATTN2_SM90_BWD_GENERAL", "1" if on else "0")
    return request.param


# The backward's two modes: the split backward, bit-identical from run to run (deterministic=True), and the
# atomic one (dQ added up by fp32 atomics in the dK/dV kernel: deterministic=False with its opt-in set, _ops).
BWD_MODES = {"deterministic": True, "atomic": False}


@pytest.fixture(params=list(BWD_MODES.values()), ids=list(BWD_MODES))
def deterministic(request, monkeypatch):
    """A test that takes it runs once per backward mode: the value to pass as deterministic (the atomic mode's
    opt-in is set for the test; its kernels are built only with FLASH_ATTN2_BUILD_ATOMIC_BWD=1)."""
    if not request.param and _extension_built():
        from flash_attn2._extension import C
        if not C.has_atomic_bwd():
            pytest.skip("the atomic backward is not in this build (FLASH_ATTN2_BUILD_ATOMIC_BWD=1 builds it)")
    monkeypatch.setenv("FLASH_ATTN2_ATOMIC_BWD", "0" if request.param else "1")
    return request.param


def on_kernel_grid(test):
    """Parametrizes a forward or backward test over the grid's dtype x head dim x causal x heads_kv;
    seqlens and batch_heads come from pytest_generate_tests."""
    for mark in (pytest.mark.parametrize("dtype", DTYPES.values(), ids=list(DTYPES)),
                 pytest.mark.parametrize("head_dim", HEAD_DIMS),
                 pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"]),
                 pytest.mark.parametrize("kv_heads", KV_HEADS)):
        test = mark(test)
    return test


def grid_qkv(dtype, head_dim, kv_heads, seqlens, batch_heads):
    """Random CUDA q, k, v for one point of that grid; skips the test if no built kernel serves head_dim."""
    skip_unless_built(head_dim)
    (seqlen_q, seqlen_k), (batch, heads_q) = seqlens, batch_heads
    return random_qkv(batch, seqlen_q, seqlen_k, heads_q, KV_HEADS[kv_heads](heads_q), head_dim, dtype=dtype,
                      device="cuda")


@pytest.fixture(autouse=True)
def seed():
    """Seeds torch afresh for every test and prints the seed, which pytest shows with a failure.

    Set FLASH_ATTN2_SEED to rerun a failing test on the same inputs.
    """
    value = int(os.environ.get("FLASH_ATTN2_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(value)
    print(f"seed {value} (reproduce with FLASH_ATTN2_SEED={value})")
    return value


def random_qkv(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, *, dtype, device):
    """Random q, k, v in flash_attn_func's layout (not zeros, which would hide unwritten output)."""
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, dtype=dtype, device=device)
    return q, k, torch.randn_like(k)


def strided_qkv(layout, batch, seqlen, heads, head_dim, *, dtype, device):
    """Random q, k, v of one shape, not contiguous, laid out as callers often hold them."""
    like = dict(dtype=dtype, device=device)
    if layout == "packed-qkv":  # interleaved in one (batch, seqlen, 3, heads, head_dim)
        return torch.randn(batch, seqlen, 3, heads, head_dim, **like).unbind(2)
    assert layout == "heads-first"  # each (batch, heads, seqlen, head_dim), as SDPA takes them
    return tuple(torch.randn(batch, heads, seqlen, head_dim, **like).transpose(1, 2) for _ in "qkv")


class Varlen(NamedTuple):
    """Where the sequences of a varlen batch lie, in the order flash_attn_varlen_func, _fwd and _bwd take
    it (so `*varlen` follows q, k, v there): sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q."""
    cu_seqlens_q: torch.Tensor  # int32 (batch + 1,)
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


def varlen_of(lengths_q, lengths_k, device):
    """The Varlen of sequences of these lengths (one pair per sequence), packed in order."""
    assert len(lengths_q) == len(lengths_k)

    def cu_seqlens(lengths):
        return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)

    return Varlen(cu_seqlens(lengths_q), cu_seqlens(lengths_k), max(lengths_q, default=0),
                  max(lengths_k, default=0))


def random_varlen(lengths_q, lengths_k, heads_q, heads_kv, head_dim, *, dtype, device):
    """Random packed q (sum(lengths_q), heads_q, head_dim), k and v (sum(lengths_k), heads_kv, head_dim)
    in flash_attn_varlen_func's layout, and their Varlen."""
    q = torch.randn(sum(lengths_q), heads_q, head_dim, dtype=dtype, device=device)
    k = torch.randn(sum(lengths_k), heads_kv, head_dim, dtype=dtype, device=device)
    return q, k, torch.randn_like(k), varlen_of(lengths_q, lengths_k, device)


def reference(q, k, v, softmax_scale, causal, compute_dtype=torch.float32, varlen=None):
    """attention_ref, or attention_varlen_ref where varlen (a Varlen) is given: (out, lse)."""
    if varlen is None:
        return attention_ref(q, k, v, softmax_scale, causal, compute_dtype)
    return attention_varlen_ref(q, k, v, varlen.cu_seqlens_q, varlen.cu_seqlens_k, softmax_scale, causal,
                                compute_dtype)


def lse_shape(q, varlen=None):
    """(batch, heads_q, seqlen_q), or (heads_q, total_q) for varlen."""
    return (q.shape[1], q.shape[0]) if varlen is not None else (q.shape[0], q.shape[2], q.shape[1])


def forward_into_nan(q, k, v, softmax_scale, causal, varlen=None):
    """Runs _fwd into NaN-filled out and lse, so that any element it leaves unwritten fails. Varlen
    where varlen is given (q, k, v then (total, heads, head_dim))."""
    head_dim = q.shape[-1]
    q, k, v = (F.pad(t, (0, -head_dim % 8)) for t in (q, k, v))  # zeros, as flash_attn_func pads
    out = torch.full_like(q, float("nan"))
    lse = torch.full(lse_shape(q, varlen), float("nan"), dtype=torch.float32, device=q.device)
    _fwd(q, k, v, out, lse, softmax_scale, causal, *(varlen or ()))
    assert (out[..., head_dim:] == 0).all(), "padding columns of out must be 0 (v is 0 there)"
    return out[..., :head_dim], lse


def skip_unless_built(head_dim):
    """Skips the test unless a compiled kernel serves head_dim."""
    from flash_attn2.interface import built_head_dims

    # Kernel head dims are multiples of 8, so >= head_dim is >= head_dim rounded up to 8.
    if not any(d >= head_dim for d in built_head_dims()):
        pytest.skip(f"no kernel built for head_dim {head_dim}")


# The kernel must be within twice (gradients: three times, see test_bwd_gpu) PyTorch's own
# low-precision error (both measured against the fp32 reference), plus a floor. The floor only
# matters where PyTorch's low-precision result is (nearly) exact, e.g. a single visible key gives
# out = v: there the kernel must be exact too, up to fp32 round-off on values of order 1 to 10
# (out, lse, gradients), which 1e-5 covers while staying far below one fp16/bf16 step at those
# magnitudes, so it cannot hide a low-precision mistake.
ERROR_FLOOR = 1e-5


def check_close(out, out_ref, out_pt, name, factor=2):
    """Asserts max|out - out_ref| <= factor * max|out_pt - out_ref| + ERROR_FLOOR."""
    assert out.shape == out_ref.shape == out_pt.shape, f"{name}: shapes differ"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name} has non-finite values (NaN: unwritten element?)"
    error = (out.double() - out_ref.double()).abs().max().item()
    error_pt = (out_pt.double() - out_ref.double()).abs().max().item()
    bound = factor * error_pt + ERROR_FLOOR
    assert error <= bound, (f"{name}: max error {error:.3g} > {bound:.3g} ({factor} x PyTorch "
                            f"low-precision error {error_pt:.3g} + {ERROR_FLOOR})")

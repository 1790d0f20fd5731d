"""Shared markers, options and helpers; test modules import them with `from conftest import ...`."""

import importlib
import os

import pytest
import torch

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


def skip_unless_built(head_dim):
    """Skips the test unless a compiled kernel serves head_dim."""
    from flash_attn2.interface import built_head_dims

    # Kernel head dims are multiples of 8, so >= head_dim is >= head_dim rounded up to 8.
    if not any(d >= head_dim for d in built_head_dims()):
        pytest.skip(f"no kernel built for head_dim {head_dim}")


# The kernel must be within twice PyTorch's own low-precision error (both measured against the
# fp32 reference), plus a floor. The floor only matters where PyTorch's low-precision result is
# (nearly) exact, e.g. a single visible key gives out = v: there the kernel must be exact too, up
# to fp32 round-off on values of order 1 to 10 (out, lse), which 1e-5 covers while staying far
# below one fp16/bf16 step at those magnitudes, so it cannot hide a low-precision mistake.
ERROR_FLOOR = 1e-5


def check_close(out, out_ref, out_pt, name):
    """Asserts max|out - out_ref| <= 2 * max|out_pt - out_ref| + ERROR_FLOOR."""
    assert out.shape == out_ref.shape == out_pt.shape, f"{name}: shapes differ"
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{name} has non-finite values (NaN: unwritten element?)"
    error = (out.double() - out_ref.double()).abs().max().item()
    error_pt = (out_pt.double() - out_ref.double()).abs().max().item()
    bound = 2 * error_pt + ERROR_FLOOR
    assert error <= bound, (f"{name}: max error {error:.3g} > {bound:.3g} "
                            f"(2 x PyTorch low-precision error {error_pt:.3g} + {ERROR_FLOOR})")

"""Build choices for setup.py, kept apart so they can be tested without building anything.

Environment switches:
  FLASH_ATTN2_CUDA_ARCHS  compute capabilities to build machine code for, e.g. "80;90a" (the default); "90a"
                          (sm_90a: wgmma, TMA) builds the Hopper kernels too, "90" the mma.sync ones only
  FLASH_ATTN2_HEAD_DIMS   kernel head dims to build, e.g. "64,128" (default: all; for fast iteration and CI)
  CUTLASS_DIR             a CUTLASS checkout (its include/ is used), overriding the lookup below
  FLASH_ATTN2_BUILD_ATOMIC_BWD  1: also build the atomic-dQ backward's kernels (off by default: the split
                          backward is the faster today, and these 12 units would cost the default build ~2 min)
  FLASH_ATTN2_BUILD_DECODE_FUSED  1: also build the KV-cache kernels' fused split combine (opt-in, unverified
                          on a GPU; FLASH_ATTN2_DECODE_FUSED_COMBINE=1 takes it at run time)
  FLASH_ATTN2_BUILD_SM90_BWD  0: leave out the Hopper dQ and dK/dV kernels (built by default where sm_90a is
                          built: 8 units at head dims 64 and 128; taken by default on sm_90, FLASH_ATTN2_SM90_BWD=0
                          sends the backward to the mma.sync kernels, flash_api.cpp)
  FLASH_ATTN2_BUILD_SM90_BWD_GENERAL  0: leave out the Hopper backward's general variant (softcap, ALiBi, a
                          window's left edge, dropout; 8 units at head dims 64 and 128, built by default with the
                          Hopper backward; taken by default, FLASH_ATTN2_SM90_BWD_GENERAL=0 sends those calls'
                          backward to the mma.sync kernels, flash_api.cpp)
  NVCC_THREADS            threads per nvcc process (default 2: each handles one arch)
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
"""

import os
import re
from pathlib import Path

from generate_instantiations import DTYPES, HEAD_DIMS, KERNELS, OUT_DIR, kernel_head_dims, source_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = "80;90a"


def cuda_archs(env=os.environ):
    """'80;90a' -> ['80', '90a']; sm_80 machine code does not run on sm_90, so both are the default."""
    text = env.get("FLASH_ATTN2_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = [a.strip() for a in text.replace(",", ";").split(";") if a.strip()]
    for arch in archs:
        if not (re.fullmatch(r"\d+a?", arch) and int(arch.rstrip("a")) >= 80):
            raise ValueError(f"FLASH_ATTN2_CUDA_ARCHS: {arch!r} is not a compute capability >= 80 (e.g. '80;90a')")
    if not archs:
        raise ValueError("FLASH_ATTN2_CUDA_ARCHS is empty; give e.g. '80;90a'")
    return archs


def gencode_flags(archs):
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def builds_sm90(archs):
    """Whether the Hopper kernels are built: they need sm_90a machine code (plain sm_90 has no wgmma)."""
    return "90a" in archs


def head_dims(env=os.environ):
    """The kernel head dims to build: all of HEAD_DIMS unless FLASH_ATTN2_HEAD_DIMS names a subset."""
    text = env.get("FLASH_ATTN2_HEAD_DIMS", "").strip()
    if not text:
        return HEAD_DIMS
    try:
        dims = sorted({int(d) for d in text.replace(";", ",").split(",") if d.strip()})
    except ValueError:
        raise ValueError(f"FLASH_ATTN2_HEAD_DIMS: {text!r} is not a comma-separated list of head dims") from None
    unknown = [d for d in dims if d not in HEAD_DIMS]
    if unknown or not dims:
        raise ValueError(f"FLASH_ATTN2_HEAD_DIMS: {unknown or text!r} not among the kernel head dims {HEAD_DIMS}")
    return tuple(dims)


def cutlass_include(env=os.environ, root=ROOT):
    """CUTLASS headers: $CUTLASS_DIR, else a third_party/cutlass checkout, else the nvidia-cutlass package."""
    if env.get("CUTLASS_DIR"):
        include = Path(env["CUTLASS_DIR"]) / "include"
        if not (include / "cute" / "tensor.hpp").exists():
            raise RuntimeError(f"CUTLASS_DIR={env['CUTLASS_DIR']} has no include/cute/tensor.hpp")
        return include
    checkout = root / "third_party" / "cutlass" / "include"
    if (checkout / "cute" / "tensor.hpp").exists():
        return checkout
    try:
        import cutlass_library
    except ImportError:
        cutlass_library = None
    if cutlass_library is not None:
        include = Path(cutlass_library.__file__).parent / "source" / "include"
        if (include / "cute" / "tensor.hpp").exists():
            return include
    raise RuntimeError(
        "CUTLASS headers not found. Either `pip install nvidia-cutlass`, or "
        "`git submodule update --init third_party/cutlass`, or set CUTLASS_DIR to a CUTLASS checkout.")


def builds_atomic_bwd(env=os.environ):
    """Whether the atomic-dQ backward's kernels are built (FLASH_ATTN2_BUILD_ATOMIC_BWD=1): opt-in, as their use
    is (FLASH_ATTN2_ATOMIC_BWD=1 at run time, flash_attn2/_ops.py)."""
    return env.get("FLASH_ATTN2_BUILD_ATOMIC_BWD", "0") == "1"


def builds_sm90_bwd(env=os.environ):
    """Whether the Hopper backward's dQ and dK/dV kernels are built (unless FLASH_ATTN2_BUILD_SM90_BWD=0; and
    only where sm_90a is among the archs, as every Hopper kernel). On by default since they were measured
    (session 8, H200: backward 1.31x SDPA-flash where the mma.sync kernels give 0.97x)."""
    return env.get("FLASH_ATTN2_BUILD_SM90_BWD", "1") != "0"


def builds_decode_fused(env=os.environ):
    """Whether the KV-cache kernels' FusedCombine variant (the split combine in the last block per tile) is built
    (FLASH_ATTN2_BUILD_DECODE_FUSED=1): opt-in, as its use is (FLASH_ATTN2_DECODE_FUSED_COMBINE=1 at run time),
    since it adds half again to the KV-cache units' compile time and is not yet verified on a GPU."""
    return env.get("FLASH_ATTN2_BUILD_DECODE_FUSED", "0") == "1"


def builds_sm90_atomic_bwd(env=os.environ):
    """Whether the Hopper dK/dV kernel with the atomic dQ is built: the atomic backward's opt-in and the Hopper
    backward both (sm_90a too: its arch). Not yet verified on a GPU."""
    return builds_atomic_bwd(env) and builds_sm90_bwd(env)


def builds_sm90_bwd_general(env=os.environ):
    """Whether the Hopper backward's general variant (its dQ and dK/dV kernels with mask.h's General) is built:
    with the Hopper backward (sm_90a too: its arch) unless FLASH_ATTN2_BUILD_SM90_BWD_GENERAL=0. On by default
    (session 11, H200, D 128 bf16: forward + backward 1.08-1.44x FlexAttention where mma.sync gave 0.70-1.17x,
    dropout 0.96x SDPA-flash where it gave 0.79x)."""
    return env.get("FLASH_ATTN2_BUILD_SM90_BWD_GENERAL", "1") != "0" and builds_sm90_bwd(env)


# Kernels built only when their switch says so.
OPTIONAL_KERNELS = {"bwd_dkdv_atomic_dq": builds_atomic_bwd, "bwd_dkdv_sm90": builds_sm90_bwd,
                    "bwd_dq_sm90": builds_sm90_bwd, "bwd_dkdv_atomic_dq_sm90": builds_sm90_atomic_bwd,
                    "bwd_dq_sm90_general": builds_sm90_bwd_general, "bwd_dkdv_sm90_general": builds_sm90_bwd_general}


def kernel_sources(dims, archs=("80", "90a"), env=os.environ):
    """The translation units to compile for head dims `dims`: those of kernels for every arch, and those of
    an arch-specific kernel when `archs` has its arch; optional kernels only when switched on in env."""
    return [OUT_DIR / source_name(kernel, d, dtype)
            for kernel, k in KERNELS.items() if k.arch is None or k.arch in archs
            if kernel not in OPTIONAL_KERNELS or OPTIONAL_KERNELS[kernel](env)
            for d in kernel_head_dims(kernel, dims) for dtype in DTYPES]


# Hand-written translation units that no head dim or dtype selects: the dropout mask's debug kernel.
SHARED_SOURCES = (ROOT / "csrc" / "common" / "dropout_mask.cu",)


def nvcc_threads(env=os.environ):
    return int(env.get("NVCC_THREADS", "2"))

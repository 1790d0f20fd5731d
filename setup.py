"""Builds flash_attn2._C. `pip install --no-build-isolation .`; switches in csrc/build_config.py."""

import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "csrc"))
import build_config  # noqa: E402
import generate_instantiations  # noqa: E402


def write_build_info(archs, dims):
    """flash_attn2/_build_info.py: the torch and archs this build is for, which flash_attn2._extension
    compares with the running torch and GPU to explain an extension that does not load or has no kernel
    for the GPU. Generated (git-ignored); a wheel carries it."""
    import torch

    (ROOT / "flash_attn2" / "_build_info.py").write_text(
        '"""Written by setup.py at build time; read by flash_attn2._extension."""\n\n'
        f"TORCH_VERSION = {str(torch.__version__)!r}\n"
        f"CUDA_VERSION = {torch.version.cuda!r}\n"
        f"CUDA_ARCHS = {tuple(archs)!r}\n"
        f"HEAD_DIMS = {tuple(dims)!r}\n")


def extension():
    from torch.utils.cpp_extension import CUDAExtension

    archs = build_config.cuda_archs()
    dims = build_config.head_dims()
    write_build_info(archs, dims)
    generate_instantiations.write_all()
    built = [f"-DFLASH_ATTN2_BUILT_HEAD_DIMS={','.join(map(str, dims))}",
             f"-DFLASH_ATTN2_SM90={int(build_config.builds_sm90(archs))}",
             f"-DFLASH_ATTN2_ATOMIC_BWD={int(build_config.builds_atomic_bwd())}",
             f"-DFLASH_ATTN2_SM90_BWD={int(build_config.builds_sm90(archs) and build_config.builds_sm90_bwd())}"]
    # Read by kernel units too (sm80/fwd_launch.h), so it goes to nvcc as well.
    fused = f"-DFLASH_ATTN2_DECODE_FUSED={int(build_config.builds_decode_fused())}"
    # Read by the binding (flash_api.cpp); to nvcc too, so that a unit sees the same flash.h the binding does.
    sm90_bwd_general = build_config.builds_sm90(archs) and build_config.builds_sm90_bwd_general()
    general = f"-DFLASH_ATTN2_SM90_BWD_GENERAL={int(sm90_bwd_general)}"
    sources = [ROOT / "csrc" / "flash_api.cpp", *build_config.SHARED_SOURCES, *build_config.kernel_sources(dims, archs)]
    return CUDAExtension(
        name="flash_attn2._C",
        sources=[str(s.relative_to(ROOT)) for s in sources],
        include_dirs=[str(ROOT / "csrc"), str(build_config.cutlass_include())],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", *built, fused, general],
            # Only the binding needs the list (nvcc would split a -D value at its commas).
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", fused, general,
                     f"--threads={build_config.nvcc_threads()}", *build_config.gencode_flags(archs)],
        },
    )


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="flash_attn2",
    version="0.2.0",
    description="Exact attention for PyTorch: FlashAttention-2 written on CUTLASS/CuTe",
    packages=find_packages(include=["flash_attn2", "flash_attn2.*"]),
    ext_modules=[extension()],
    cmdclass=cmdclass(),
    python_requires=">=3.9",
    install_requires=["torch", "packaging"],
)

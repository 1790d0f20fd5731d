"""flash_attn2._extension on CPU: the messages for an extension that does not load or has no kernel for the
GPU, and the arch rule, with made-up builds and machines."""

import pytest
import torch

from flash_attn2 import _extension as ext

BUILD = dict(torch="2.11.0+cu130", cuda="13.0", archs=("80", "90"), head_dims=(64, 128))
H200 = dict(torch="2.11.0+cu130", cuda="13.0", gpu="NVIDIA H200", capability=(9, 0))


@pytest.mark.parametrize("arch, capability, runs", [
    ("80", (8, 0), True), ("80", (8, 6), True), ("80", (8, 9), True), ("86", (8, 0), False),
    ("80", (9, 0), False), ("90", (9, 0), True), ("90", (10, 0), False), ("90", (8, 0), False),
    ("100", (10, 0), True), ("120", (12, 1), True), ("100", (12, 0), False),
    ("90a", (9, 0), True), ("90a", (9, 1), False), ("90a", (10, 0), False), ("100a", (10, 0), True),
])
def test_arch_runs(arch, capability, runs):
    assert ext.arch_runs(arch, capability) is runs


def test_undefined_symbol_from_another_torch():
    error = ImportError("/x/flash_attn2/_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: _ZN3c106detail14torchCheckFail")
    running = dict(H200, torch="2.12.0+cu130")
    text = ext.format_load_error(error, BUILD, running)
    assert "undefined symbol: _ZN3c10" in text  # the original error, whole
    assert "built with: torch 2.11.0+cu130 (CUDA 13.0), machine code for sm_80, sm_90" in text
    assert "running:    torch 2.12.0+cu130 (CUDA 13.0), NVIDIA H200 (sm_90)" in text
    assert "compiled against torch 2.11.0+cu130, but torch 2.12.0+cu130 is running" in text
    assert ext.REBUILD in text and "torch==2.11.0" in text


def test_undefined_symbol_with_the_same_torch_version():
    error = ImportError("_C.so: undefined symbol: _ZN2at4_ops5empty4callE")
    text = ext.format_load_error(error, BUILD, H200)
    assert "different torch build (version, CUDA variant or C++ ABI)" in text
    assert ext.REBUILD in text and "torch==" not in text


def test_not_built():
    error = ModuleNotFoundError("No module named 'flash_attn2._C'")
    text = ext.format_load_error(error, None, dict(H200, gpu=None, capability=None))
    assert "not built" in text and "no CUDA GPU visible" in text and "built with: unknown" in text
    assert ext.REBUILD in text


def test_a_missing_library():
    error = ImportError("libcudart.so.13: cannot open shared object file: No such file or directory")
    text = ext.format_load_error(error, BUILD, H200)
    assert "libcudart.so.13" in text and "failed to load" in text


def test_no_kernel_for_the_gpu():
    b200 = dict(H200, gpu="NVIDIA B200", capability=(10, 0))
    text = ext.format_arch_error(BUILD, b200)
    assert "no kernels for this GPU" in text
    assert "machine code for sm_80, sm_90" in text and "NVIDIA B200 (sm_100)" in text
    assert f'FLASH_ATTN2_CUDA_ARCHS="80;90;100" {ext.REBUILD}' in text  # keeps the archs it had


def test_no_kernel_for_an_old_gpu():
    text = ext.format_arch_error(dict(BUILD, archs=("80",)), dict(H200, gpu="Tesla T4", capability=(7, 5)))
    assert "needs compute capability 8.0 or newer" in text and "sm_75" in text


def test_no_kernel_without_a_build_record():
    text = ext.format_arch_error(None, H200)
    assert "built with: unknown" in text and 'FLASH_ATTN2_CUDA_ARCHS="90"' in text


def test_load_of_a_missing_module_keeps_the_error():
    module, error = ext.load("flash_attn2._no_such_extension")
    assert module is None and isinstance(error, ModuleNotFoundError)


class FakeKernels:
    """An extension whose launches fail as CUDA reports a missing kernel image."""

    def __init__(self, message):
        self.message = message
        self.other = 42

    def fwd(self, *args):
        raise RuntimeError(self.message)

    bwd = fwd


@pytest.mark.parametrize("message", ["CUDA error: no kernel image is available for execution on the device",
                                     "CUDA error: invalid device function"])
def test_a_launch_without_a_kernel_image_is_explained(message):
    checked = ext.CheckedExtension(FakeKernels(message))
    with pytest.raises(RuntimeError, match="no kernels for this GPU") as raised:
        checked.fwd(torch.zeros(1), 1.0)  # CPU tensors: no capability check before the call
    assert message in str(raised.value.__cause__)
    assert "FLASH_ATTN2_CUDA_ARCHS" in str(raised.value)


def test_other_launch_errors_pass_through():
    checked = ext.CheckedExtension(FakeKernels("q must be a CUDA tensor"))
    with pytest.raises(RuntimeError, match="^q must be a CUDA tensor$"):
        checked.bwd(torch.zeros(1))
    assert checked.other == 42  # everything else is the module's


def test_ext_without_the_extension_says_what_to_do(monkeypatch):
    monkeypatch.setattr(ext, "_checked", None)
    monkeypatch.setattr(ext, "LOAD_ERROR", ModuleNotFoundError("No module named 'flash_attn2._C'"))
    with pytest.raises(ImportError, match="not built") as raised:
        ext.ext()
    assert ext.REBUILD in str(raised.value)

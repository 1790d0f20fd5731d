"""Loads flash_attn2._C, the compiled kernels, and turns the two failures users of CUDA extensions meet
most into errors that say what to do:

- the extension does not load: most often an "undefined symbol" because it was compiled against another
  torch than the one running (a C++ extension loads only into the torch it was built with), or it was
  never built;
- it loads, but has no machine code for this GPU ("no kernel image is available"): it was built for other
  compute capabilities (FLASH_ATTN2_CUDA_ARCHS).

Both messages put what the build was made with (flash_attn2/_build_info.py, which setup.py writes) beside
what is running, and give the command that fixes it. Nothing here needs a GPU: the formatting is tested on
CPU (tests/test_extension_cpu.py).
"""

import importlib

import torch

# From a source tree: the README's build. --force-reinstall --no-deps rebuilds without touching torch.
REBUILD = "python3 -m pip install --no-build-isolation --force-reinstall --no-deps ."
# How CUDA reports a kernel with no machine code for the device (cudaErrorNoKernelImageForDevice), and how
# some drivers and runtimes report the same for a kernel looked up by symbol (cudaErrorInvalidDeviceFunction).
NO_KERNEL_IMAGE = ("no kernel image is available", "invalid device function")


def build_info():
    """What the extension was built with ({torch, cuda, archs, head_dims}), or None where setup.py left no
    record (never built here, or built before the record existed)."""
    try:
        from . import _build_info as info
    except ImportError:
        return None
    return dict(torch=info.TORCH_VERSION, cuda=info.CUDA_VERSION, archs=tuple(info.CUDA_ARCHS),
                head_dims=tuple(info.HEAD_DIMS))


def runtime_info(device=None):
    """What is running: torch, its CUDA, and the GPU (name, capability) of `device` (an index or a
    torch.device; default: the current one), or no GPU."""
    info = dict(torch=str(torch.__version__), cuda=torch.version.cuda, gpu=None, capability=None)
    if torch.cuda.is_available():
        index = device if isinstance(device, int) else None if device is None else torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        info.update(gpu=torch.cuda.get_device_name(index), capability=tuple(torch.cuda.get_device_capability(index)))
    return info


def arch_runs(arch, capability):
    """Whether machine code for `arch` ("80", "90a", "120") runs on a GPU of `capability` (major, minor):
    the same major version and a minor one at least as high (sm_80 code runs on sm_86, sm_90 never on sm_100);
    arch-specific code ("90a", with wgmma) only on exactly that capability. The build embeds no PTX, so
    nothing is JIT-compiled for newer GPUs."""
    specific = arch.endswith("a")
    major, minor = divmod(int(arch.rstrip("a")), 10)
    return capability[0] == major and (capability[1] == minor if specific else capability[1] >= minor)


def _sm(capability):
    return f"sm_{capability[0]}{capability[1]}"


def _describe_build(build):
    if build is None:
        return ("built with: unknown (no flash_attn2/_build_info.py: the extension was not built from this tree, "
                "or by a version that kept no record)")
    archs = ", ".join(f"sm_{a}" for a in build["archs"])
    return f"built with: torch {build['torch']} (CUDA {build['cuda']}), machine code for {archs}"


def _describe_runtime(runtime):
    gpu = (f"{runtime['gpu']} ({_sm(runtime['capability'])})" if runtime["capability"] is not None
           else "no CUDA GPU visible")
    return f"running:    torch {runtime['torch']} (CUDA {runtime['cuda']}), {gpu}"


def format_load_error(error, build, runtime):
    """The message for an extension that does not import: what went wrong, built vs running, what to do."""
    text = str(error)
    lines = [f"flash_attn2's kernels (flash_attn2._C) could not be loaded: {type(error).__name__}: {text}",
             _describe_build(build), _describe_runtime(runtime)]
    if isinstance(error, ModuleNotFoundError) and "_C" in text:
        cause = "The extension is not built (flash_attn2 is imported from a source tree or an install without it)."
    elif build is not None and build["torch"] != runtime["torch"]:
        cause = (f"The extension was compiled against torch {build['torch']}, but torch {runtime['torch']} is "
                 "running: a C++ extension loads only into the torch it was compiled against.")
    elif "undefined symbol" in text:
        cause = ("An undefined symbol means the extension was compiled against a different torch build (version, "
                 "CUDA variant or C++ ABI) than the one running.")
    else:
        cause = "The shared library failed to load (see the error above)."
    fix = (f"To fix: rebuild it against the running torch, from the source tree: `{REBUILD}` (add -e for an "
           "editable install; the README lists the build switches)")
    if build is not None and build["torch"] != runtime["torch"]:
        fix += f", or go back to torch=={build['torch'].split('+')[0]}"
    return "\n".join([*lines, cause, fix + "."])


def format_arch_error(build, runtime):
    """The message for a GPU the build has no machine code for."""
    capability = runtime["capability"]
    target = f"{capability[0]}{capability[1]}" if capability is not None else "XY"
    archs = build["archs"] if build is not None else ()
    keep = ";".join(dict.fromkeys([*archs, target]))
    lines = ["flash_attn2 has no kernels for this GPU (CUDA: no kernel image is available for the device).",
             _describe_build(build), _describe_runtime(runtime),
             "Machine code runs only on GPUs of its major compute capability and a minor one at least as high "
             "(sm_80 code runs on sm_86, sm_90 code not on sm_80 or sm_100).",
             f"To fix: rebuild for this GPU: `FLASH_ATTN2_CUDA_ARCHS=\"{keep}\" {REBUILD}`."]
    if capability is not None and capability < (8, 0):
        lines.append(f"(flash_attn2 needs compute capability 8.0 or newer; {_sm(capability)} is older.)")
    return "\n".join(lines)


class CheckedExtension:
    """The extension's fwd and bwd, with the GPU's capability checked against the build's archs once per
    device before the first launch, and a "no kernel image" error from a launch explained; everything else
    is the module's own attribute."""

    def __init__(self, module):
        self._module = module
        self._devices_checked = set()

    def __getattr__(self, name):
        return getattr(self._module, name)

    def fwd(self, *args):
        return self._call(self._module.fwd, args)

    def bwd(self, *args):
        return self._call(self._module.bwd, args)

    def _check_device(self, device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index in self._devices_checked:
            return
        build = build_info()
        capability = tuple(torch.cuda.get_device_capability(index))
        if build is not None and not any(arch_runs(a, capability) for a in build["archs"]):
            raise RuntimeError(format_arch_error(build, runtime_info(index)))
        self._devices_checked.add(index)

    def _call(self, fn, args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is not None and device.type == "cuda":
            self._check_device(device)
        try:
            return fn(*args)
        except RuntimeError as error:
            if any(s in str(error) for s in NO_KERNEL_IMAGE):
                raise RuntimeError(format_arch_error(build_info(), runtime_info(device))) from error
            raise


def load(name="flash_attn2._C"):
    """(module, None) if the extension imports, else (None, the ImportError or OSError)."""
    try:
        return importlib.import_module(name), None
    except (ImportError, OSError) as error:
        return None, error


C, LOAD_ERROR = load()
_checked = CheckedExtension(C) if C is not None else None


def ext():
    """The extension, checked (see CheckedExtension); ImportError with the full story if it did not load."""
    if _checked is None:
        raise ImportError(format_load_error(LOAD_ERROR, build_info(), runtime_info())) from LOAD_ERROR
    return _checked

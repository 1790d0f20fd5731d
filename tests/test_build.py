"""The build choices in csrc/build_config.py and the generated instantiations, on CPU."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "csrc"))
import build_config  # noqa: E402
import generate_instantiations as gen  # noqa: E402


@pytest.mark.parametrize("text, archs", [("80", ["80"]), ("80;90", ["80", "90"]), ("80;90a", ["80", "90a"]),
                                         (" 86 , 90 ", ["86", "90"]), ("90;", ["90"])])
def test_cuda_archs(text, archs):
    assert build_config.cuda_archs({"FLASH_ATTN2_CUDA_ARCHS": text}) == archs


def test_cuda_archs_default():
    assert build_config.cuda_archs({}) == ["80", "90a"]
    assert build_config.gencode_flags(["80", "90a"]) == ["-gencode=arch=compute_80,code=sm_80",
                                                         "-gencode=arch=compute_90a,code=sm_90a"]


@pytest.mark.parametrize("archs, hopper", [(["80", "90a"], True), (["90a"], True), (["80", "90"], False),
                                           (["80"], False)])
def test_hopper_kernels_need_sm90a(archs, hopper):
    assert build_config.builds_sm90(archs) is hopper
    sm90 = [s for s in build_config.kernel_sources(gen.HEAD_DIMS, archs) if s.parent.name == "sm90"]
    assert bool(sm90) is hopper


@pytest.mark.parametrize("text, rule", [("75", "'75'.*>= 80"), ("sm_80", "'sm_80'"), ("90b", "'90b'"), ("75a", "'75a'"),
                                        ("8.0", "'8.0'"), ("", "empty"), (" ; ", "empty")])
def test_cuda_archs_errors(text, rule):
    with pytest.raises(ValueError, match=f"FLASH_ATTN2_CUDA_ARCHS.*{rule}"):
        build_config.cuda_archs({"FLASH_ATTN2_CUDA_ARCHS": text})


@pytest.mark.parametrize("text, dims", [("64", (64,)), ("128,64", (64, 128)),
                                        ("64;128;64", (64, 128)), (" 96 , 32 ", (32, 96))])
def test_head_dims(text, dims):
    assert build_config.head_dims({"FLASH_ATTN2_HEAD_DIMS": text}) == dims


@pytest.mark.parametrize("text", ["", "  "])
def test_head_dims_default_is_every_kernel(text):
    assert build_config.head_dims({}) == build_config.head_dims({"FLASH_ATTN2_HEAD_DIMS": text})
    assert build_config.head_dims({}) == gen.HEAD_DIMS


@pytest.mark.parametrize("text, named", [("48", r"\[48\]"), ("64,80", r"\[80\]"), (",", "','")])
def test_head_dims_errors(text, named):
    # The message names the variable, the offending dims and the dims there are kernels for.
    kernel_dims = re.escape(str(gen.HEAD_DIMS))
    with pytest.raises(ValueError, match=rf"FLASH_ATTN2_HEAD_DIMS.*{named}.*{kernel_dims}"):
        build_config.head_dims({"FLASH_ATTN2_HEAD_DIMS": text})


def test_head_dims_not_a_number():
    with pytest.raises(ValueError):
        build_config.head_dims({"FLASH_ATTN2_HEAD_DIMS": "64,abc"})


def fake_cutlass(include):
    """A directory that passes for CUTLASS's include/: it has cute/tensor.hpp."""
    (include / "cute").mkdir(parents=True)
    (include / "cute" / "tensor.hpp").touch()
    return include


def fake_package(monkeypatch, site):
    """Makes `import cutlass_library` (the nvidia-cutlass package) find one in site; returns where
    its headers go."""
    module = types.ModuleType("cutlass_library")
    module.__file__ = str(site / "cutlass_library" / "__init__.py")
    monkeypatch.setitem(sys.modules, "cutlass_library", module)
    return site / "cutlass_library" / "source" / "include"


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The include/ of an installed nvidia-cutlass package, with headers."""
    return fake_cutlass(fake_package(monkeypatch, tmp_path / "site"))


def test_cutlass_dir_comes_first(tmp_path, package):
    checkout = fake_cutlass(tmp_path / "root" / "third_party" / "cutlass" / "include")
    chosen = fake_cutlass(tmp_path / "mine" / "include")
    env = {"CUTLASS_DIR": str(tmp_path / "mine")}
    assert build_config.cutlass_include(env, root=tmp_path / "root") == chosen
    assert build_config.cutlass_include({}, root=tmp_path / "root") == checkout


def test_cutlass_dir_without_headers_is_an_error(tmp_path, package):
    # No quiet fallback: CUTLASS_DIR was asked for, so a wrong one must say so.
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match="CUTLASS_DIR.*include/cute/tensor.hpp"):
        build_config.cutlass_include({"CUTLASS_DIR": str(tmp_path / "empty")}, root=tmp_path)


def test_checkout_comes_before_package(tmp_path, package):
    checkout = fake_cutlass(tmp_path / "third_party" / "cutlass" / "include")
    # An empty CUTLASS_DIR counts as unset.
    assert build_config.cutlass_include({"CUTLASS_DIR": ""}, root=tmp_path) == checkout


def test_package_comes_last(tmp_path, package):
    assert build_config.cutlass_include({}, root=tmp_path) == package


@pytest.mark.parametrize("installed", [False, True], ids=["no-package", "package-without-headers"])
def test_no_cutlass_is_a_clear_error(tmp_path, monkeypatch, installed):
    if installed:
        fake_package(monkeypatch, tmp_path / "site")
    else:
        monkeypatch.setitem(sys.modules, "cutlass_library", None)  # `import cutlass_library` fails
    # The message names all three ways to get the headers.
    with pytest.raises(RuntimeError, match="(?s)nvidia-cutlass.*third_party/cutlass.*CUTLASS_DIR"):
        build_config.cutlass_include({}, root=tmp_path)


def head_dim_of(path):
    """The head dim in a generated file's name; None for a kernel that serves every head dim."""
    match = re.search(r"_hdim(\d+)_", path.name)
    return int(match[1]) if match else None


def test_kernel_sources():
    # For a head-dim subset, setup.py compiles the generated files of those head dims and those
    # that serve every head dim, each once; for all head dims, every generated file (sm_90a included) but
    # those of the optional atomic backward and the Hopper backward's general variant, which their switches add;
    # the Hopper backward's are in by default and FLASH_ATTN2_BUILD_SM90_BWD=0 leaves them out, with the Hopper
    # atomic one's and the general variant's (which need it too).
    generated = [path for path in gen.generated_files() if path.suffix == ".cu"]
    atomic = {path for path in generated if path.name.startswith("bwd_dkdv_atomic_dq_")}
    general = {path for path in generated if path.name.startswith(("bwd_dkdv_sm90_general_", "bwd_dq_sm90_general_"))}
    hopper_bwd = {path for path in generated if path.name.startswith(("bwd_dkdv_sm90_", "bwd_dq_sm90_"))} - general
    hopper_atomic = {path for path in atomic if path.name.startswith("bwd_dkdv_atomic_dq_sm90_")}
    assert atomic and hopper_bwd and all(path.parent.name == "sm90" for path in hopper_bwd | hopper_atomic | general)
    assert sorted(path.name for path in hopper_atomic) == sorted(
        f"bwd_dkdv_atomic_dq_sm90_hdim{d}_{dtype}.cu" for d in gen.SM90_BWD_HEAD_DIMS for dtype in gen.DTYPES)
    assert sorted(path.name for path in general) == sorted(
        f"{kernel}_sm90_general_hdim{d}_{dtype}.cu" for kernel in ("bwd_dq", "bwd_dkdv")
        for d in gen.SM90_BWD_HEAD_DIMS for dtype in gen.DTYPES)
    no_hopper = {"FLASH_ATTN2_BUILD_SM90_BWD": "0"}
    no_general = {"FLASH_ATTN2_BUILD_SM90_BWD_GENERAL": "0"}
    for env, left_out in [({}, atomic), ({"FLASH_ATTN2_BUILD_ATOMIC_BWD": "1"}, set()),
                          (no_general, atomic | general), (no_hopper, atomic | hopper_bwd | general),
                          ({**no_hopper, "FLASH_ATTN2_BUILD_SM90_BWD_GENERAL": "1"}, atomic | hopper_bwd | general),
                          ({**no_hopper, "FLASH_ATTN2_BUILD_ATOMIC_BWD": "1"}, hopper_bwd | hopper_atomic | general)]:
        for dims in [(64, 128), (32, 96), gen.HEAD_DIMS]:
            wanted = {path for path in generated if head_dim_of(path) in (None, *dims)} - left_out
            sources = build_config.kernel_sources(dims, ["80", "90a"], env)
            assert len(sources) == len(set(sources)) and set(sources) == wanted


def test_hopper_bwd_needs_sm90a():
    # The Hopper dQ and dK/dV kernels' units are built only where sm_90a is: 8 at head dims 64 and 128 and their
    # general variant's 8, which FLASH_ATTN2_BUILD_SM90_BWD=0 leaves out.
    env = {}
    for archs in (["80"], ["80", "90"]):
        # The Hopper atomic dK/dV and the general variant too.
        for switches in (env, {"FLASH_ATTN2_BUILD_ATOMIC_BWD": "1"}, {"FLASH_ATTN2_BUILD_SM90_BWD_GENERAL": "1"}):
            assert not any("_sm90_" in path.name and path.name.startswith("bwd_")
                           for path in build_config.kernel_sources(gen.HEAD_DIMS, archs, switches))
    added = set(build_config.kernel_sources(gen.HEAD_DIMS, ["80", "90a"], env)) - set(
        build_config.kernel_sources(gen.HEAD_DIMS, ["80", "90a"], {"FLASH_ATTN2_BUILD_SM90_BWD": "0"}))
    assert sorted(path.name for path in added) == sorted(
        f"{kernel}_sm90{general}_hdim{d}_{dtype}.cu" for kernel in ("bwd_dq", "bwd_dkdv")
        for general in ("", "_general") for d in gen.SM90_BWD_HEAD_DIMS for dtype in gen.DTYPES)
    assert build_config.builds_sm90_bwd(env) and not build_config.builds_sm90_bwd({"FLASH_ATTN2_BUILD_SM90_BWD": "0"})


def test_sm90_bwd_general_switch():
    # On by default with the Hopper backward, whose coverage it extends; FLASH_ATTN2_BUILD_SM90_BWD_GENERAL=0
    # leaves out the general variant's 8 units (dQ and dK/dV at head dims 64 and 128).
    off = {"FLASH_ATTN2_BUILD_SM90_BWD_GENERAL": "0"}
    assert build_config.builds_sm90_bwd_general({}) and not build_config.builds_sm90_bwd_general(off)
    assert build_config.builds_sm90_bwd_general({"FLASH_ATTN2_BUILD_SM90_BWD_GENERAL": "1"})
    assert not build_config.builds_sm90_bwd_general({"FLASH_ATTN2_BUILD_SM90_BWD": "0"})
    added = set(build_config.kernel_sources(gen.HEAD_DIMS, ["80", "90a"], {})) - set(
        build_config.kernel_sources(gen.HEAD_DIMS, ["80", "90a"], off))
    assert sorted(path.name for path in added) == sorted(
        f"{kernel}_sm90_general_hdim{d}_{dtype}.cu" for kernel in ("bwd_dq", "bwd_dkdv")
        for d in gen.SM90_BWD_HEAD_DIMS for dtype in gen.DTYPES)
    assert all(path.parent.name == "sm90" for path in added)
    # Their launchers are the general variant's, declared for the binding.
    assert "run_bwd_dq_general" in gen.declarations() and "run_bwd_dkdv_general" in gen.declarations()
    assert all("_general<" in gen.instantiation(path.name.split("_hdim")[0], head_dim_of(path), path.stem.split("_")[-1])
               for path in added)


def test_hopper_head_dims_are_kernel_head_dims():
    # A call goes to the Hopper forward when its head dim rounds up (among HEAD_DIMS) to one of these.
    assert set(gen.SM90_HEAD_DIMS) <= set(gen.HEAD_DIMS)
    assert set(gen.SM90_BWD_HEAD_DIMS) <= set(gen.HEAD_DIMS)


def test_nvcc_threads():
    assert build_config.nvcc_threads({}) == 2
    assert build_config.nvcc_threads({"NVCC_THREADS": "4"}) == 4


def git(*args):
    """A git command's output in the repository, or None outside a git checkout."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=build_config.ROOT).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def test_instantiations_are_what_the_generator_writes():
    # setup.py rewrites these files before every build, so a build hides a stale copy on disk;
    # git (staged or committed) must hold the generator's output too, file for file.
    expected = gen.generated_files()
    for path, text in expected.items():
        assert path.exists() and path.read_text() == text, (
            f"{path.name}: run python3 csrc/generate_instantiations.py")
    tracked = git("ls-files", "--", str(gen.OUT_DIR))
    if not tracked or git("ls-files", "--", "setup.py") == "":
        # Not a checkout of this project (a copy of the tree, or a git repository around it that does
        # not track it): the files on disk are all there is.
        return
    tracked = {(build_config.ROOT / line).resolve() for line in tracked.splitlines()}
    assert tracked == set(expected), ("git add or git rm in csrc/instantiations: "
                                      f"{sorted(path.name for path in tracked ^ set(expected))}")
    assert git("diff", "--name-only", "--", str(gen.OUT_DIR)) == "", (
        "csrc/instantiations differs from what git holds: git add csrc/instantiations")


def test_write_all_leaves_unchanged_files_alone(tmp_path, monkeypatch):
    # ninja rebuilds what is newer than its object: rewriting every file would rebuild every kernel.
    monkeypatch.setattr(gen, "OUT_DIR", tmp_path)
    gen.write_all()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path: path.read_text() for path in written} == gen.generated_files()
    for path in written:
        os.utime(path, (0, 0))
    gen.write_all()
    assert all(path.stat().st_mtime == 0 for path in written)

"""The torch-free tile sweeps (benchmarks/tile_sweep*.sh) still compile: they are built only when someone
sweeps on a GPU, so a kernel change that breaks their launch code would otherwise go unseen until then
(the forward's Hopper sweep did, in session 8). One candidate each, compiled, not run (SWEEP_COMPILE_ONLY=1);
skipped without nvcc or the CUTLASS headers."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "csrc"))
import build_config  # noqa: E402


def cutlass_include():
    try:
        return build_config.cutlass_include()
    except RuntimeError:  # not found: the build would say why; here the test cannot run
        return None


# (script, one candidate in its format): today's tiles.
SWEEPS = [
    ("tile_sweep.sh", "fwd:64:128x64x4"),
    ("tile_sweep_sm90.sh", "64:128x128:2:1:1:1"),
    ("tile_sweep_sm90_bwd.sh", "dkdv:64:64x128:2:0"),
    ("tile_sweep_sm90_bwd.sh", "dkdv_atomic:128:64x128:2:0:0:1"),  # the atomic dQ's kernel and its checks
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("script, candidate", SWEEPS, ids=[f"{s}-{c.split(':')[0]}" for s, c in SWEEPS])
def test_sweep_builds(script, candidate):
    include = cutlass_include()
    if include is None:
        pytest.skip("needs the CUTLASS headers")
    env = {**os.environ, "SWEEP_COMPILE_ONLY": "1", "CUTLASS_INCLUDE": str(include)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / script), candidate], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0 and "build failed" not in result.stdout, result.stdout + result.stderr
    assert f"== {candidate}" in result.stdout

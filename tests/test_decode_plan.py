"""The decoding plan of flash_attn_with_kvcache (csrc/common/decode_plan.h), on CPU: whether GQA decode packs
and how many splits of the keys num_splits=0 picks, for the shapes of benchmarks/bench_decode.py and a few
others. The header is plain C++: it is compiled here with the host compiler into a small driver that reads
one shape a line and prints its decision, on the same tiles (sm80/tile_config.h) the extension launches.

Each pinned count says why it is right by the header's cost model (one step: a full wave of resident blocks
streaming one key block each; an H200 holds 132 SMs x 2 blocks = 264)."""

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
H200_SMS = 132

DRIVER = r"""
#include <cstdio>
#include <algorithm>
#include "common/decode_plan.h"
#include "sm80/tile_config.h"

// One shape a line: batch heads heads_kv seqlen_q seqlen_k head_dim alibi window_left sms requested fused;
// prints "packed splits" (fused: the combine folded into the split kernel, FLASH_ATTN2_DECODE_FUSED_COMBINE). window_left -1: none (set_scores makes it seqlen_k); the kernel head dim is the
// next built one up (64, 128, 256), as the binding dispatches.
int main() {
  long long b, h, hkv, sq, sk, d, alibi, wl, sms, req, fused;
  while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld %lld %lld %lld", &b, &h, &hkv, &sq, &sk, &d, &alibi,
                    &wl, &sms, &req, &fused) == 11) {
    long long const left = wl < 0 ? sk : std::min(wl, sk);
    bool const packed = flash::packs_gqa_decode(sq, h, hkv, alibi != 0, left, sk);
    long long const heads = packed ? hkv : h, rows = packed ? h / hkv : sq;
    int const kernel_d = d <= 64 ? 64 : d <= 128 ? 128 : 256;
    flash::TileShape const tile = flash::fwd_kvcache_tile(kernel_d);
    flash::DecodeGrid const grid =
        flash::decode_grid(b, heads, rows, sk, int(d), tile.block_m, tile.block_n, int(sms), fused != 0);
    std::printf("%d %d\n", int(packed), flash::decode_num_splits(grid, req));
  }
  return 0;
}
"""


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    folder = tmp_path_factory.mktemp("decode_plan")
    (folder / "driver.cpp").write_text(DRIVER)
    subprocess.run([compiler, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{CSRC}", str(folder / "driver.cpp"),
                    "-o", str(folder / "driver")], check=True, capture_output=True, text=True)

    def decide(batch, heads, heads_kv, seqlen_k, seqlen_q=1, head_dim=128, alibi=False, window_left=-1,
               sms=H200_SMS, requested=0, fused=False):
        line = " ".join(map(str, (batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim, int(alibi), window_left, sms,
                                  requested, int(fused))))
        result = subprocess.run([str(folder / "driver")], input=line + "\n", capture_output=True, text=True,
                                check=True)
        packed, splits = result.stdout.split()
        return packed == "1", int(splits)
    return decide


K = 1024

# (batch, heads, heads_kv, seqlen_k, expected splits, why). GQA 32:8 with one query packs: 8 kv heads' blocks.
HEURISTIC = [
    # benchmarks/results/decode.md's rows (session 6 picked 16, 16, 1, 32, 66, 1, 1).
    (1, 32, 32, 8 * K, 8, "32 heads x 8 = 256 blocks: one wave of 16 key blocks (20 steps); 16 splits made "
                          "512 blocks, two waves of 8 (22 steps)"),
    (1, 32, 32, 128 * K, 8, "one wave of 256 blocks, 256 key blocks each (260 steps); 16 splits: 262"),
    (64, 32, 32, 8 * K, 1, "2048 blocks are 7.8 waves already: splitting only adds the combine"),
    (1, 32, 8, 8 * K, 16, "8 kv heads: 32 splits would fill a wave, but of 4 key blocks (256 keys) each; the "
                          "512-key minimum stops at 16 (128 blocks of 8 key blocks)"),
    (1, 32, 8, 128 * K, 32, "256 blocks, one wave of 64 key blocks (68 steps); 66 splits made two waves of 32 "
                            "(70) with 2 empty splits; 33 is cheapest (67), 32 within 5% and fewer"),
    (64, 32, 8, 8 * K, 1, "512 blocks, 1.94 waves: a second wave either way"),
    (64, 32, 8, 128 * K, 1, "512 blocks, 1.94 waves; 17 splits would save 1% by the model, under the 5% bar"),
    # Others.
    (8, 32, 8, 8 * K, 4, "64 blocks x 4 = 256: one wave of 32 key blocks"),
    (8, 32, 32, 8 * K, 1, "256 blocks fill the 264 slots unsplit"),
    (32, 32, 8, 32 * K, 1, "256 blocks fill the 264 slots unsplit"),
    (1, 32, 8, 32 * K, 31, "248 blocks of 17 key blocks (21.1 steps) within 5% of 32 splits of 16 (20.1)"),
    (1, 32, 32, 1 * K, 2, "16 key blocks: the 512-key minimum allows 2"),
    (1, 32, 8, 960, 1, "15 key blocks: two splits of the 8-key-block minimum need 16"),
    (1, 32, 8, 1000, 2, "16 key blocks, the last partial: the minimum counts key blocks, not keys"),
    (1, 32, 8, 256, 1, "4 key blocks: too few to split"),
    (1, 8, 8, 128 * K, 32, "MHA with 8 heads: the same grid as GQA 32:8 packed"),
    (4, 32, 8, 128 * K, 8, "32 blocks x 8 = 256: one wave"),
]


@pytest.mark.parametrize("batch, heads, heads_kv, seqlen_k, expected, why", HEURISTIC,
                         ids=[f"b{c[0]}-{c[1]}:{c[2]}-sk{c[3]}" for c in HEURISTIC])
def test_heuristic(plan, batch, heads, heads_kv, seqlen_k, expected, why):
    packed, splits = plan(batch, heads, heads_kv, seqlen_k)
    assert packed == (heads > heads_kv)
    assert splits == expected, why


def test_split_minimum_follows_the_bytes(plan):
    # 256 KB of K and V per split: 8 key blocks of 128 keys at D = 64 (its tile streams 128 keys), 4 of 64
    # at D = 256, so batch 1 GQA 8k splits 8 and 32 ways (D = 128: 16).
    assert plan(1, 32, 8, 8 * K, head_dim=64) == (True, 8)
    assert plan(1, 32, 8, 8 * K, head_dim=256) == (True, 32)
    # D = 96 runs on the D = 128 kernel but streams 3/4 of its bytes: 11 key blocks a split at least, so
    # 11 splits (the counts 12-16 of 8k's 128 key blocks are below the minimum).
    assert plan(1, 32, 8, 8 * K, head_dim=96) == (True, 11)


def test_slots_follow_the_sm_count(plan):
    # An A100's 108 SMs hold 216 blocks: 8 kv heads x 27 = 216, one wave of 76 key blocks (80 steps); 26
    # splits make 79 key blocks a split (83 steps), within 5%.
    assert plan(1, 32, 8, 128 * K, sms=108) == (True, 26)


@pytest.mark.parametrize("case, packed, splits", [
    # ALiBi's slopes are per query head: no packing, so 32 blocks as MHA's (8 splits, not packed GQA's 16).
    (dict(alibi=True), False, 8),
    # A window's left edge is aligned per query position: no packing either.
    (dict(window_left=1024), False, 8),
    # A left edge that cuts nothing (>= the cache) packs as no window does.
    (dict(window_left=8 * K), True, 16),
    # Several queries (speculative decoding): one query block per head, 32 blocks.
    (dict(seqlen_q=4), False, 8),
])
def test_packing_decides_the_grid(plan, case, packed, splits):
    assert plan(1, 32, 8, 8 * K, **case) == (packed, splits)


def test_requested_counts(plan):
    assert plan(64, 32, 8, 4 * K, requested=3) == (True, 3)  # explicit counts are kept ...
    assert plan(1, 32, 32, 8 * K, requested=1) == (False, 1)  # ... 1 disables splitting ...
    assert plan(1, 32, 8, 64, requested=50) == (True, 1)  # ... at most the key blocks ...
    assert plan(1, 32, 8, 128 * K, requested=500) == (True, 128)  # ... and 128
    assert plan(1, 32, 8, 8 * K, requested=32) == (True, 32)  # below the heuristic's minimum when asked


# FLASH_ATTN2_DECODE_FUSED_COMBINE=1: the combine folded into the split kernel costs 1 step, not 2, and a split
# may stream 128 KB (4 key blocks at D = 128). (batch, heads, heads_kv, seqlen_k, expected splits, why).
FUSED = [
    (1, 32, 8, 8 * K, 32, "32 splits: one wave of 256 blocks of 4 key blocks (4 + 2 + 1 = 7.1 steps) against "
                          "16's 128 blocks of 8 (8 + 2 + 1 = 11.1); the 256 KB minimum held it at 16"),
    (1, 32, 8, 32 * K, 32, "one wave of 256 blocks of 16 key blocks (16 + 2 + 1 = 19.1 steps); 31 (17 + 2 + 1) is "
                           "5.2% dearer, past the bar"),
    (1, 32, 32, 8 * K, 8, "unchanged: 16 splits would make two waves (2 x (8 + 2) + 1 = 21 against 19)"),
    (1, 32, 8, 128 * K, 32, "unchanged: one wave, 64 key blocks each"),
    (64, 32, 8, 8 * K, 1, "unchanged: 512 blocks fill two waves unsplit"),
    (1, 32, 32, 1 * K, 4, "16 key blocks: the 128 KB minimum allows 4 (one wave of 128 blocks of 4)"),
]


@pytest.mark.parametrize("batch, heads, heads_kv, seqlen_k, expected, why", FUSED,
                         ids=[f"b{c[0]}-{c[1]}:{c[2]}-sk{c[3]}" for c in FUSED])
def test_heuristic_with_the_combine_fused(plan, batch, heads, heads_kv, seqlen_k, expected, why):
    assert plan(batch, heads, heads_kv, seqlen_k, fused=True)[1] == expected, why


def test_fused_combine_keeps_requested_counts(plan):
    assert plan(1, 32, 8, 8 * K, requested=16, fused=True) == (True, 16)
    assert plan(1, 32, 8, 64, requested=50, fused=True) == (True, 1)

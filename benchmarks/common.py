"""Timing, FLOP counting and the PyTorch SDPA baselines, shared by the benchmarks."""

import statistics
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Written between timed calls so that no input is still in L2 from the call before; five times
# the largest L2 in use (50 MB on H100, 60 MB on H200).
L2_FLUSH_BYTES = 256 * 2**20

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fns, reps=30, warmup=5):
    """Median milliseconds per call of each function in `fns` (name -> callable), by CUDA events.

    The calls alternate (a, b, c, a, b, c, ...) so that clock and temperature drift hits all of
    them alike. L2 is flushed before each call; the flush also keeps the GPU busy while Python
    launches the call, so launch overhead is not timed on short problems.
    """
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    new_event = lambda: torch.cuda.Event(enable_timing=True)
    events = {name: [(new_event(), new_event()) for _ in range(reps)] for name in fns}
    for rep in range(reps):
        for name, fn in fns.items():
            flush.zero_()
            start, end = events[name][rep]
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize()
    return {name: statistics.median(start.elapsed_time(end) for start, end in pairs)
            for name, pairs in events.items()}


def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, backward=False):
    """Matmul FLOPs: Q·Kᵀ and P·V, 2·Sq·Sk·D each per head; causal does half of them.

    The backward does five such matmuls to the forward's two: 2.5 times the work.
    """
    flops = 4 * batch * heads * seqlen_q * seqlen_k * head_dim // (2 if causal else 1)
    return flops * 5 // 2 if backward else flops


def tflops(flops, ms):
    return flops / ms / 1e9


def sdpa(q, k, v, causal, backend):
    """PyTorch SDPA restricted to `backend`, on (batch, heads, seqlen, head_dim) tensors.

    Returns None where that backend refuses the inputs. SDPA aligns causal masks top-left, so
    it matches flash_attn2 only when seqlen_q == seqlen_k.
    """
    with sdpa_kernel(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refusing backend warns why before it raises
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                  enable_gqa=q.shape[1] != k.shape[1])
        except RuntimeError:
            return None

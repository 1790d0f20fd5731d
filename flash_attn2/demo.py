"""A short demo: one forward call checked against the float32 reference and timed against SDPA.

    python -m flash_attn2.demo
"""

import torch

from flash_attn2 import built_head_dims, flash_attn_func
from flash_attn2.reference import attention_ref


def main():
    if not torch.cuda.is_available():
        print("flash_attn2 demo: no CUDA GPU on this machine; the extension is built, nothing to run.")
        return
    head_dim = 128 if 128 in built_head_dims() else max(built_head_dims())
    batch, seqlen, heads = 4, 2048, 2048 // head_dim
    q, k, v = (torch.randn(batch, seqlen, heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_ref(q, k, v, causal=True)
    print(f"{torch.cuda.get_device_name()}: bf16 (batch {batch}, seqlen {seqlen}, heads {heads}, "
          f"head_dim {head_dim}), causal; max |out - fp32 reference| = {(out.float() - ref).abs().max().item():.2e}")

    def timed(fn, reps=20):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    flops = 4 * batch * heads * seqlen * seqlen * head_dim / 2
    ours = timed(lambda: flash_attn_func(q, k, v, causal=True))
    sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    print(f"forward: flash_attn2 {flops / ours / 1e9:.0f} TFLOP/s, torch SDPA (default backend) "
          f"{flops / sdpa / 1e9:.0f} TFLOP/s")


if __name__ == "__main__":
    main()

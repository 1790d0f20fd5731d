"""Sizes that break 32-bit index arithmetic or quadratic memory: skipped unless --huge is given.

Each checks sampled rows against the reference computed for just those rows, which the full problem
would be far too large for.
"""

import pytest
import torch

from conftest import check_close, random_qkv, requires_ext, requires_gpu, skip_unless_built
from flash_attn2 import flash_attn_func
from flash_attn2.reference import attention_ref
from test_bwd_gpu import GRAD_ERROR_FACTOR, reference_grads

pytestmark = [requires_gpu, requires_ext, pytest.mark.huge, pytest.mark.usefixtures("fwd_path", "bwd_path")]

HEAD_DIM = 128
SCALE = HEAD_DIM ** -0.5


def check_rows(out, lse, q, k, v, rows, causal):
    """out[:, rows] and lse[:, :, rows] against the reference for those query rows alone, by the 2x rule.

    Without causal a row's result needs only that row of q; with causal, row i of a square problem sees
    keys 0..i, which is the full attention of that one row over k[:, :i + 1].
    """
    for chunk in ([rows] if not causal else [[i] for i in rows]):
        keys = slice(None) if not causal else slice(chunk[0] + 1)
        q_rows, k_rows, v_rows = q[:, chunk], k[:, keys], v[:, keys]
        out_ref, lse_ref = attention_ref(q_rows, k_rows, v_rows, SCALE)
        out_pt, lse_pt = attention_ref(q_rows, k_rows, v_rows, SCALE, compute_dtype=q.dtype)
        check_close(out[:, chunk], out_ref, out_pt, f"out rows {chunk[:4]}...")
        check_close(lse[:, :, chunk], lse_ref, lse_pt, f"lse rows {chunk[:4]}...")


def test_more_than_2_to_the_31_elements():
    # q and out hold more than 2^31 elements (4 GiB each in bf16), so any element offset computed in
    # 32 bits wraps for the last rows. Keys are few and the mask off, to keep it fast.
    skip_unless_built(HEAD_DIM)
    batch, seqlen_q, heads, seqlen_k = 1, 2 ** 20 + 2 ** 12 + 3, 16, 256
    q, k, v = random_qkv(batch, seqlen_q, seqlen_k, heads, heads, HEAD_DIM, dtype=torch.bfloat16,
                         device="cuda")
    assert q.numel() > 2 ** 31
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=SCALE, return_attn_probs=True)

    # Random rows, and those around the first element offset past 2^31 and at the end.
    row_elements = heads * HEAD_DIM
    first_past = 2 ** 31 // row_elements
    edges = {0, first_past - 1, first_past, first_past + 1, seqlen_q - 129, seqlen_q - 2, seqlen_q - 1}
    sampled = torch.randint(0, seqlen_q, (300,)).tolist()
    rows = sorted(edges | set(sampled))
    check_rows(out, lse, q, k, v, rows, causal=False)


@pytest.mark.parametrize("seqlen", [32 * 1024, 128 * 1024], ids=["32k", "128k"])
def test_long_causal_forward_backward(seqlen):
    # A 128k causal forward and backward: memory grows with seqlen, not seqlen^2 (one fp32 score matrix
    # per head would be 64 GiB), and sampled rows of out, lse and dq are right.
    skip_unless_built(HEAD_DIM)
    qkv = random_qkv(1, seqlen, seqlen, 2, 2, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    qkv = [t.requires_grad_() for t in qkv]
    dout = torch.randn_like(qkv[0])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out, lse, _ = flash_attn_func(*qkv, softmax_scale=SCALE, causal=True, return_attn_probs=True)
    dq, dk, dv = torch.autograd.grad(out, qkv, dout)
    growth = torch.cuda.max_memory_allocated() - before
    # out, lse, dq, dk, dv and the backward's fp32 scratch: about 4 x q. A linear bound with room.
    q_bytes = qkv[0].numel() * qkv[0].element_size()
    assert growth <= 8 * q_bytes, f"forward + backward took {growth / 2**20:.0f} MiB > 8 x q"
    assert all(torch.isfinite(grad).all() for grad in (dq, dk, dv))

    q, k, v = (t.detach() for t in qkv)
    rows = [0, 1, 63, 64, 127, 128, seqlen // 2 + 1, seqlen - 129, seqlen - 65, seqlen - 1]
    check_rows(out.detach(), lse, q, k, v, rows, causal=True)
    # dq of row i needs only row i and the keys it sees. The rule applies to the sampled rows together, as
    # test_bwd applies it to whole tensors: a row with two keys alone can fail it without any fault, since
    # D = rowsum(dO * O) takes O rounded to bf16 (as FlashAttention does) while PyTorch's softmax backward
    # never rounds O (a CPU emulation of that row fails the per-row 3x rule in 9% of random draws).
    dq_refs, dq_pts = [], []
    for i in rows:
        keys = slice(i + 1)
        args = (dout[:, i:i + 1], q[:, i:i + 1], k[:, keys], v[:, keys], SCALE, False)
        dq_refs.append(reference_grads(*args, torch.float32)[0][0])
        dq_pts.append(reference_grads(*args, q.dtype)[0][0])
    check_close(dq[:, rows], torch.cat(dq_refs, 1), torch.cat(dq_pts, 1), f"dq rows {rows}",
                factor=GRAD_ERROR_FACTOR)

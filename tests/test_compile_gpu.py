"""flash_attn2 under torch.compile, torch.library.opcheck and CUDA graphs (GPU).

- opcheck of flash_attn2::fwd and flash_attn2::bwd with its default test_utils (schema, autograd
  registration, fake tensors, AOT dispatch with dynamic shapes) on fixed-length, varlen and packed inputs,
  and on the variants (window, softcap, sinks, dropout: the forward with dropout without the AOT-dispatch
  check, which compares two calls' values) where this build has them; flash_attn2::fwd_kvcache's opcheck is
  in test_kvcache_gpu.py;
- a transformer block (attention through flash_attn2 + MLP) under torch.compile(fullgraph=True): zero graph
  breaks (torch._dynamo.explain), forward and backward match eager; with dynamic=True a second sequence
  length does not recompile; the varlen path compiles whole and runs without a host sync;
- a CUDA graph capturing forward + backward of a training step (fixed-length and varlen), whose replays on
  new inputs match eager.

The op arguments are built by name from the registered schema, so these tests hold for the schema before
and after the variants (window_left, window_right, softcap, alibi_slopes, s_aux) were added to it.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flash_attn2
from conftest import requires_ext, requires_gpu, skip_unless_built, varlen_of

pytestmark = [requires_gpu, requires_ext]

HEAD_DIM = 64
DTYPE = torch.bfloat16

# The variant arguments of the final schema and the values that switch them off (deterministic: the
# backward's mode, which the forward only carries; both ops default to False, the atomic backward).
VARIANT_DEFAULTS = dict(window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, s_aux=None, dropout_p=0.0,
                        deterministic=False)


def schema_names(op):
    return [a.name for a in op._schema.arguments]


def is_off(name, value):
    """Whether value is the variant argument `name` switched off (what an older schema implies)."""
    default = VARIANT_DEFAULTS.get(name, ...)
    return value is default or (default is not ... and not isinstance(value, torch.Tensor) and value == default)


def op_args(op, **values):
    """The positional arguments of `op` from values by name; variant arguments the caller leaves out get
    their off values. Skips the test if it asks for a variant the op's schema does not have yet."""
    names = schema_names(op)
    unknown = [n for n, v in values.items() if n not in names and not is_off(n, v)]
    if unknown:
        pytest.skip(f"{op} has no argument {', '.join(unknown)} in this build")
    missing = [n for n in names if n not in values and n not in VARIANT_DEFAULTS]
    assert not missing, f"{op}: test gives no value for {missing} (schema {op._schema})"
    return tuple(values.get(n, VARIANT_DEFAULTS.get(n)) for n in names)


@functools.cache
def variant_built(variant):
    """Whether flash_attn2's Python layer runs this variant (NotImplementedError, or no s_aux argument, until
    the kernels have it)."""
    q = torch.randn(1, 8, 4, HEAD_DIM, device="cuda", dtype=DTYPE)
    kwargs = {"window": dict(window_size=(2, 0)), "softcap": dict(softcap=5.0),
              "sinks": dict(s_aux=torch.zeros(4, device="cuda")), "dropout": dict(dropout_p=0.1)}[variant]
    try:
        flash_attn2.flash_attn_func(q, q, q, causal=True, **kwargs)
    except (NotImplementedError, TypeError):
        return False
    return True


def need(variant):
    if variant is not None and not variant_built(variant):
        pytest.skip(f"{variant} is not in this build of flash_attn2")


def variant_op_values(variant, heads):
    """The op's variant arguments for `variant` (None: plain attention)."""
    if variant == "window":
        return dict(window_left=17, window_right=0)
    if variant == "softcap":
        return dict(softcap=3.0)
    if variant == "sinks":
        return dict(s_aux=torch.randn(heads, device="cuda", requires_grad=True))
    if variant == "dropout":
        return dict(dropout_p=0.2)
    return {}


# ---- opcheck

def randn(*shape, grad=True):
    return torch.randn(*shape, device="cuda", dtype=DTYPE, requires_grad=grad)


def fwd_inputs(layout, variant=None, grad=True):
    """Keyword values of flash_attn2::fwd for one representative input of `layout`."""
    batch, heads, heads_kv = 2, 4, 2
    values = dict(cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                  softmax_scale=HEAD_DIM ** -0.5, causal=True)
    if layout == "fixed":  # GQA, more keys than queries (bottom-right causal)
        values.update(q=randn(batch, 100, heads, HEAD_DIM, grad=grad), k=randn(batch, 160, heads_kv, HEAD_DIM, grad=grad),
                      v=randn(batch, 160, heads_kv, HEAD_DIM, grad=grad))
    elif layout == "varlen":  # an empty sequence and a one-token one among them
        lengths_q, lengths_k = [37, 0, 128, 1], [37, 3, 200, 1]
        varlen = varlen_of(lengths_q, lengths_k, "cuda")
        values.update(q=randn(sum(lengths_q), heads, HEAD_DIM, grad=grad),
                      k=randn(sum(lengths_k), heads_kv, HEAD_DIM, grad=grad),
                      v=randn(sum(lengths_k), heads_kv, HEAD_DIM, grad=grad), **varlen._asdict())
    elif layout == "qkvpacked":
        values.update(q=randn(batch, 96, 3, heads, HEAD_DIM, grad=grad), k=None, v=None)
    elif layout == "kvpacked-varlen":
        varlen = varlen_of([5, 64], [70, 64], "cuda")
        values.update(q=randn(69, heads, HEAD_DIM, grad=grad), k=randn(134, 2, heads_kv, HEAD_DIM, grad=grad), v=None,
                      **varlen._asdict())
    else:
        raise ValueError(layout)
    values.update(variant_op_values(variant, heads))
    return values


LAYOUTS = ["fixed", "varlen", "qkvpacked", "kvpacked-varlen"]
VARIANTS = [None, "window", "softcap", "sinks", "dropout"]


# opcheck's checks (its default set, named so that one can be left out).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def check_opcheck(op, args, test_utils=OPCHECK_UTILS):
    results = torch.library.opcheck(op, args, test_utils=test_utils, raise_exception=False)
    failed = {name: result for name, result in results.items() if result != "SUCCESS"}
    assert not failed, f"opcheck of {op}: {failed}"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "plain")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_fwd(layout, variant):
    skip_unless_built(HEAD_DIM)
    need(variant)
    op = torch.ops.flash_attn2.fwd.default
    # With dropout each call draws a new mask, so test_aot_dispatch_dynamic, which compares the values of two
    # calls, cannot hold; the schema, fake and autograd checks do not compare values and run (the backward,
    # given one rng_state, gets all four in test_opcheck_bwd).
    utils = [u for u in OPCHECK_UTILS if variant != "dropout" or u != "test_aot_dispatch_dynamic"]
    check_opcheck(op, op_args(op, **fwd_inputs(layout, variant)), utils)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "plain")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_bwd(layout, variant, deterministic):
    skip_unless_built(HEAD_DIM)
    need(variant)
    fwd, bwd = torch.ops.flash_attn2.fwd.default, torch.ops.flash_attn2.bwd.default
    values = fwd_inputs(layout, variant, grad=False)
    if values.get("s_aux") is not None:
        values["s_aux"] = values["s_aux"].detach()
    out, lse, *rng_state = fwd(*op_args(fwd, **values))  # the schema's rng_state, where it has one
    values.update(dout=torch.randn_like(out), out=out, lse=lse, **dict(zip(["rng_state"], rng_state)),
                  deterministic=deterministic)
    check_opcheck(bwd, op_args(bwd, **values))


# ---- a transformer block under torch.compile

class Block(nn.Module):
    """Pre-norm attention (GQA, through flash_attn_func or flash_attn_varlen_func) + GELU MLP."""

    def __init__(self, variant=None, hidden=512, heads=8, heads_kv=2):
        super().__init__()
        self.heads, self.heads_kv, self.variant = heads, heads_kv, variant
        head_dim = hidden // heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * heads_kv * head_dim)
        self.o = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))
        # Sinks are a parameter, as gpt-oss has them: their gradient goes through the compiled backward too.
        self.sinks = nn.Parameter(torch.randn(heads)) if variant == "sinks" else None

    def attention_options(self):
        if self.variant == "window":
            return dict(window_size=(63, 0))
        if self.variant == "softcap":
            return dict(softcap=3.0)
        if self.variant == "sinks":
            return dict(s_aux=self.sinks.float())  # the kernels take fp32 sinks; the model is bf16
        return {}

    def forward(self, x, cu_seqlens=None, max_seqlen=0):
        """x (batch, seqlen, hidden), or (total, hidden) with cu_seqlens and max_seqlen (varlen)."""
        rows = x.shape[:-1]
        h = self.norm1(x)
        q = self.q(h).view(*rows, self.heads, -1)
        k, v = self.kv(h).view(*rows, 2, self.heads_kv, q.shape[-1]).unbind(-3)
        if cu_seqlens is None:
            a = flash_attn2.flash_attn_func(q, k, v, causal=True, **self.attention_options())
        else:
            a = flash_attn2.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                                   **self.attention_options())
        x = x + self.o(a.reshape(*rows, -1))
        return x + self.mlp(self.norm2(x))


def make_block(variant=None):
    skip_unless_built(HEAD_DIM)
    need(variant)
    torch.manual_seed(0)
    return Block(variant).to(device="cuda", dtype=DTYPE)


def fwd_bwd(fn, x, *args):
    """out and the gradients of (out * dout).sum() w.r.t. x and every parameter, leaving .grad alone."""
    x = x.detach().requires_grad_()
    out = fn(x, *args)
    dout = torch.randn(out.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda", dtype=out.dtype)
    grads = torch.autograd.grad(out, [x, *fn.parameters()], dout)  # a compiled module shares the block's
    return out, grads


def assert_matches(actual, expected, name):
    """Compiled against eager in bf16: Inductor fuses the norms and the MLP differently, so rounding differs;
    the largest difference must stay within 2% of the tensor's largest value."""
    scale = expected.abs().max().item()
    error = (actual.float() - expected.float()).abs().max().item()
    assert error <= 0.02 * scale + 1e-6, f"{name}: max |compiled - eager| = {error:.3g}, largest |eager| {scale:.3g}"


def assert_no_graph_breaks(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    reasons = [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, f"{explanation.graph_break_count} graph breaks: {reasons}"
    assert explanation.graph_count == 1


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v or "plain")
def test_block_compiles_whole_and_matches_eager(variant):
    block = make_block(variant)
    x = torch.randn(2, 256, 512, device="cuda", dtype=DTYPE)
    torch._dynamo.reset()
    assert_no_graph_breaks(block, x)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out_c, grads_c = fwd_bwd(torch.compile(block, fullgraph=True), x)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    out_e, grads_e = fwd_bwd(block, x)
    assert_matches(out_c, out_e, "out")
    names = ["x", *(n for n, _ in block.named_parameters())]
    for name, g_c, g_e in zip(names, grads_c, grads_e):
        assert_matches(g_c, g_e, f"grad of {name}")


def test_dynamic_seqlen_does_not_recompile():
    """Compiled once with dynamic=True, new sequence lengths run the same graph: any recompile raises.

    Counting the backend's calls (CompileCounterWithBackend.frame_count) is no measure of recompiles here:
    Dynamo restarts the first compile once (tensorify_python_scalars, on LayerNorm's float eps) after the
    backend ran, so it reads 2 after one compile, also with SDPA in flash_attn2's place (NOTES.md)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    block = make_block()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, backend=counter, dynamic=True, fullgraph=True)
    torch._dynamo.reset()
    for i, seqlen in enumerate((256, 384, 200)):
        x = torch.randn(2, seqlen, 512, device="cuda", dtype=DTYPE)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out_c, _ = fwd_bwd(compiled, x)
        assert_matches(out_c, block(x), f"out at seqlen {seqlen}")
        if i == 0:
            frames = counter.frame_count
    assert counter.frame_count == frames, f"{counter.frame_count - frames} more compiles for new sequence lengths"


def varlen_batch(lengths):
    varlen = varlen_of(lengths, lengths, "cuda")
    return torch.randn(sum(lengths), 512, device="cuda", dtype=DTYPE), varlen.cu_seqlens_q, varlen.max_seqlen_q


def test_varlen_compiles_whole_without_a_host_sync():
    block = make_block()
    x, cu_seqlens, max_seqlen = varlen_batch([300, 1, 0, 77, 256])
    torch._dynamo.reset()
    assert_no_graph_breaks(block, x, cu_seqlens, max_seqlen)
    compiled = torch.compile(block, fullgraph=True)
    fwd_bwd(compiled, x, cu_seqlens, max_seqlen)  # compiles (compiling may sync)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing CUDA call now raises
    try:
        out_c, grads_c = fwd_bwd(compiled, x, cu_seqlens, max_seqlen)
        out_eager = flash_attn2.flash_attn_varlen_func(*(torch.randn(x.shape[0], 8, HEAD_DIM, device="cuda", dtype=DTYPE)
                                                         for _ in range(3)), cu_seqlens, cu_seqlens, max_seqlen,
                                                       max_seqlen, causal=True)  # and eager, outside compile
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    out_e, grads_e = fwd_bwd(block, x, cu_seqlens, max_seqlen)
    assert_matches(out_c, out_e, "out")
    for g_c, g_e in zip(grads_c, grads_e):
        assert_matches(g_c, g_e, "grad")
    assert torch.isfinite(out_eager).all()


# ---- CUDA graphs

def capture_training_step(block, x, *args):
    """A CUDA graph of loss = block(x).square().mean(); loss.backward(), on static x, after warm-up on a side
    stream (as torch.cuda.graphs' docs prescribe). Returns (graph, static loss)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            block.zero_grad(set_to_none=True)
            block(x, *args).float().square().mean().backward()
    torch.cuda.current_stream().wait_stream(side)
    block.zero_grad(set_to_none=True)  # .grad is then allocated inside the graph, and each replay overwrites it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = block(x, *args).float().square().mean()
        loss.backward()
    return graph, loss


@pytest.mark.parametrize("layout", ["fixed", "varlen"])
def test_cuda_graph_of_a_training_step(layout):
    block = make_block()
    if layout == "fixed":
        static_x, args = torch.randn(2, 256, 512, device="cuda", dtype=DTYPE), ()
    else:
        static_x, cu_seqlens, max_seqlen = varlen_batch([200, 1, 0, 311])
        args = (cu_seqlens, max_seqlen)
    graph, static_loss = capture_training_step(block, static_x, *args)
    eager = copy.deepcopy(block)
    for replay in range(3):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        loss = eager(x, *args).float().square().mean()
        grads = torch.autograd.grad(loss, list(eager.parameters()))
        torch.testing.assert_close(static_loss, loss, msg=f"replay {replay}: loss")
        for (name, p), g in zip(block.named_parameters(), grads):
            torch.testing.assert_close(p.grad, g, msg=f"replay {replay}: grad of {name}")


def test_block_reference_sanity():
    """The block's attention against SDPA in eager mode, so that the compiled tests compare a correct block."""
    block = make_block()
    x = torch.randn(2, 128, 512, device="cuda", dtype=DTYPE)
    h = block.norm1(x)
    q = block.q(h).view(2, 128, 8, -1)
    k, v = block.kv(h).view(2, 128, 2, 2, q.shape[-1]).unbind(-3)
    ours = flash_attn2.flash_attn_func(q, k, v, causal=True)
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=True).transpose(1, 2)
    assert_matches(ours, sdpa, "attention")

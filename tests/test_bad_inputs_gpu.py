"""Rejected calls with CUDA tensors: each raises a Python error that names the argument, before any
launch, and leaves the CUDA context fit for use, so that a valid forward and backward right after it
gives the same bits as before (a kernel that faulted would leave a sticky error that fails every later
call in the process).

test_input_checks holds the rules on CPU tensors (BAD_INPUTS); here they run again on CUDA, with
rules it does not try, the binding's checks of the buffers that _fwd and _bwd write into, a bad dout
in the backward, and inputs whose strides or address break the kernels' 16-byte loads (those in a
child process, as a fault there would poison this one).
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_qkv, requires_ext, requires_gpu, skip_unless_built
from flash_attn2 import flash_attn_func, interface
from test_bwd_gpu import check_bwd
from test_fwd_gpu import check_fwd
from test_input_checks import BAD_INPUTS, KV_SHAPE, Q_SHAPE, every_arg_valid_but, message, randn

NAN = float("nan")

# Rules test_input_checks does not try, in its format (id, changed arguments, exception, argument the
# message names, rule it states), on CPU tensors: they run on the CPU here and on CUDA below.
MORE_BAD_INPUTS = [
    ("scale-zero", lambda: dict(softmax_scale=0.0), ValueError, "softmax_scale", "positive"),
    ("scale-negative", lambda: dict(softmax_scale=-0.125), ValueError, "softmax_scale", "positive"),
    ("scale-tensor", lambda: dict(softmax_scale=torch.tensor(0.125)), TypeError, "softmax_scale", "float"),
    ("k-float64", lambda: dict(k=randn(*KV_SHAPE, dtype=torch.float64)), TypeError, "k", "float16"),
    ("q-int32", lambda: dict(q=torch.ones(Q_SHAPE, dtype=torch.int32)), TypeError, "q", "float16"),
    ("kv-no-heads", lambda: dict(k=randn(2, 16, 0, 64), v=randn(2, 16, 0, 64)), ValueError, "q", "multiple"),
]


def on_cuda(value):
    """value on the GPU with its strides kept (Tensor.to makes a non-dense tensor contiguous, which
    would turn the stride cases into valid calls); anything but a tensor as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    moved = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cuda")
    return moved.copy_(value)


def moved_to_cuda(change):
    return lambda: {name: on_cuda(value) for name, value in change().items()}


def misaligned(t, how):
    """A copy of t that the kernels' 16-byte loads cannot read in place. "stride": heads head_dim + 4
    elements apart (136 bytes for 64, not a multiple of 16); "address": a base 2 bytes past alignment."""
    if how == "stride":
        padded = torch.empty(*t.shape[:-1], t.shape[-1] + 4, dtype=t.dtype, device=t.device)
        return padded[..., :t.shape[-1]].copy_(t)
    assert how == "address"
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


# On CUDA every argument is valid but the change, moved to CUDA; BAD_INPUTS' "cpu" (every tensor on
# the CPU) becomes one tensor left on the CPU (test_input_checks tries k).
CUDA_BAD_INPUTS = [(id_, moved_to_cuda(change), *expect)
                   for id_, change, *expect in BAD_INPUTS + MORE_BAD_INPUTS if id_ != "cpu"]
CUDA_BAD_INPUTS += [
    ("q-on-cpu", lambda: dict(q=randn(*Q_SHAPE)), ValueError, "q", "CUDA"),
    ("v-on-cpu", lambda: dict(v=randn(*KV_SHAPE)), ValueError, "v", "CUDA"),
]

# The binding's own checks, through interface._fwd and _bwd: (id, kernel, changed arguments given the
# valid ones, exception, argument the message names, rule it states).
SHAPED_LIKE_Q = ("dout", "q", "k", "v", "out", "dq", "dk", "dv")
BINDING_BAD_CALLS = [
    ("fwd-out-shape", "fwd", lambda a: dict(out=a["out"][:, :-1]), ValueError, "out", "shape"),
    ("fwd-out-dtype", "fwd", lambda a: dict(out=a["out"].bfloat16()), TypeError, "out", "dtype"),
    ("fwd-out-on-cpu", "fwd", lambda a: dict(out=a["out"].cpu()), ValueError, "out", "cpu"),
    ("fwd-lse-dtype", "fwd", lambda a: dict(lse=a["lse"].half()), TypeError, "lse", "float32"),
    ("fwd-lse-shape", "fwd", lambda a: dict(lse=a["lse"].transpose(1, 2).contiguous()), ValueError, "lse",
     "seqlen_q"),
    ("fwd-lse-strides", "fwd", lambda a: dict(lse=a["lse"].transpose(1, 2).contiguous().transpose(1, 2)),
     ValueError, "lse", "contiguous"),
    ("fwd-head-dim-60", "fwd", lambda a: {n: a[n][..., :60] for n in SHAPED_LIKE_Q}, ValueError, "q",
     "multiple of 8"),
    ("fwd-scale-zero", "fwd", lambda a: dict(softmax_scale=0.0), ValueError, "softmax_scale", "positive"),
    ("bwd-dout-shape", "bwd", lambda a: dict(dout=a["dout"][:, :-1]), ValueError, "dout", "shape"),
    ("bwd-dout-dtype", "bwd", lambda a: dict(dout=a["dout"].float()), TypeError, "dout", "dtype"),
    ("bwd-dout-on-cpu", "bwd", lambda a: dict(dout=a["dout"].cpu()), ValueError, "dout", "cpu"),
    ("bwd-dout-stride", "bwd", lambda a: dict(dout=a["dout"].repeat_interleave(2, dim=-1)[..., ::2]),
     ValueError, "dout", "contiguous"),
    ("bwd-dq-shape", "bwd", lambda a: dict(dq=a["dq"][:, :, :-1]), ValueError, "dq", "shape"),
    # With GQA a dk with the heads of q is the likely mistake.
    ("bwd-dk-heads-of-q", "bwd", lambda a: dict(dk=torch.empty_like(a["q"][:, :a["k"].shape[1]])),
     ValueError, "dk", "shape"),
    ("bwd-dv-shape", "bwd", lambda a: dict(dv=a["dv"][:, :-1]), ValueError, "dv", "shape"),
    ("bwd-dq-dtype", "bwd", lambda a: dict(dq=a["dq"].bfloat16()), TypeError, "dq", "dtype"),
    ("bwd-dv-on-cpu", "bwd", lambda a: dict(dv=a["dv"].cpu()), ValueError, "dv", "cpu"),
    ("bwd-lse-dtype", "bwd", lambda a: dict(lse=a["lse"].double()), TypeError, "lse", "float32"),
    ("bwd-lse-shape", "bwd", lambda a: dict(lse=a["lse"][:, :, :-1]), ValueError, "lse", "seqlen_q"),
    ("bwd-out-shape", "bwd", lambda a: dict(out=a["out"][:, :-1]), ValueError, "out", "shape"),
    ("bwd-out-dtype", "bwd", lambda a: dict(out=a["out"].bfloat16()), TypeError, "out", "dtype"),
    ("bwd-scale-nan", "bwd", lambda a: dict(softmax_scale=NAN), ValueError, "softmax_scale", "finite"),
    # flash_attn_func copies such views (test_misaligned_input); the binding refuses them.
    ("fwd-q-misaligned-stride", "fwd", lambda a: dict(q=misaligned(a["q"], "stride")), ValueError, "q",
     "aligned"),
    ("fwd-out-misaligned-address", "fwd", lambda a: dict(out=misaligned(a["out"], "address")), ValueError,
     "out", "aligned"),
    ("bwd-dout-misaligned-address", "bwd", lambda a: dict(dout=misaligned(a["dout"], "address")), ValueError,
     "dout", "aligned"),
    ("bwd-dk-misaligned-stride", "bwd", lambda a: dict(dk=misaligned(a["dk"], "stride")), ValueError, "dk",
     "aligned"),
]
FWD_ARGS = ("q", "k", "v", "out", "lse", "softmax_scale", "causal")
BWD_ARGS = ("dout", "q", "k", "v", "out", "lse", "dq", "dk", "dv", "softmax_scale", "causal")

# A bad dout through autograd (out.backward(dout)), which checks it against out before our backward
# runs: (id, dout given out, exception, argument the message names, rule it states). A dout of
# another real dtype is no error: autograd casts it (test_autograd_casts_dout_dtype).
AUTOGRAD_BAD_CALLS = [
    ("autograd-dout-shape", lambda out: torch.randn_like(out)[:, 1:], RuntimeError, "grad_output", "shape"),
    ("autograd-dout-transposed", lambda out: torch.randn_like(out).transpose(1, 2), RuntimeError,
     "grad_output", "shape"),
    ("autograd-dout-on-cpu", lambda out: torch.randn(out.shape, dtype=out.dtype), RuntimeError, "gradient",
     "device"),
    ("autograd-dout-complex", lambda out: torch.randn(out.shape, dtype=torch.complex64, device=out.device),
     RuntimeError, "grad_output", "dtype"),
]

# Views that the kernels' 16-byte loads cannot read in place, through flash_attn_func and autograd:
# (argument, how, as misaligned() takes it).
MISALIGNED = [("q", "stride"), ("k", "address"), ("dout", "stride"), ("dout", "address")]


def ids(cases):
    return [case[0] for case in cases]


def test_enough_distinct_bad_calls():
    every_id = ids(BAD_INPUTS + CUDA_BAD_INPUTS + BINDING_BAD_CALLS + AUTOGRAD_BAD_CALLS)
    every_id += [f"{name}-misaligned-{how}" for name, how in MISALIGNED]
    distinct = set(every_id)  # a rule tried on CPU and on CUDA counts once
    assert len(distinct) >= 30, f"only {len(distinct)} distinct bad calls"


@pytest.mark.parametrize("change, error, name, rule", [case[1:] for case in MORE_BAD_INPUTS],
                         ids=ids(MORE_BAD_INPUTS))
def test_more_bad_inputs_on_cpu(change, error, name, rule):
    with pytest.raises(error, match=message(name, rule)):
        flash_attn_func(**every_arg_valid_but(**change()))


class ValidCall:
    """A causal GQA forward and backward through flash_attn_func, whose results must stay bit-identical
    after every rejected call (synchronizing first, so that a fault from the rejected call surfaces)."""

    NAMES = ("out", "lse", "dq", "dk", "dv")

    def __init__(self):
        self.qkv = random_qkv(2, 150, 97, 6, 2, 64, dtype=torch.float16, device="cuda")
        self.dout = torch.randn_like(self.qkv[0])
        self.expected = self.run()

    def run(self):
        qkv = [t.detach().requires_grad_() for t in self.qkv]
        out, lse, _ = flash_attn_func(*qkv, causal=True, return_attn_probs=True, deterministic=True)
        return (out.detach(), lse, *torch.autograd.grad(out, qkv, self.dout))

    def check(self, after):
        torch.cuda.synchronize()
        for name, result, expected in zip(self.NAMES, self.run(), self.expected):
            assert torch.equal(result, expected), f"{name} differs after {after}"


@pytest.fixture
def valid_call(fwd_path):
    skip_unless_built(64)
    return ValidCall()


@requires_gpu
@requires_ext
def test_valid_call_is_right(valid_call):
    # The yardstick of the tests below is itself right.
    out, lse, *grads = valid_call.expected
    q, k, v = valid_call.qkv
    check_fwd(out, lse, q, k, v, 1 / math.sqrt(64), causal=True)
    check_bwd(grads, valid_call.dout, q, k, v, 1 / math.sqrt(64), causal=True)


@requires_gpu
@requires_ext
@pytest.mark.parametrize("change, error, name, rule", [case[1:] for case in CUDA_BAD_INPUTS],
                         ids=ids(CUDA_BAD_INPUTS))
def test_bad_input_on_cuda(change, error, name, rule, valid_call):
    with pytest.raises(error, match=message(name, rule)):
        flash_attn_func(**every_arg_valid_but(device="cuda", **change()))
    valid_call.check(after="the rejected call")


def binding_args():
    """Valid arguments for interface._fwd and _bwd: causal GQA, ragged seqlens, one forward run."""
    q, k, v = random_qkv(2, 96, 80, 6, 2, 64, dtype=torch.float16, device="cuda")
    out = torch.empty_like(q)
    lse = torch.empty(2, 6, 96, dtype=torch.float32, device="cuda")
    interface._fwd(q, k, v, out, lse, 0.125, True)
    return dict(dout=torch.randn_like(q), q=q, k=k, v=v, out=out, lse=lse, dq=torch.empty_like(q),
                dk=torch.empty_like(k), dv=torch.empty_like(v), softmax_scale=0.125, causal=True)


@requires_gpu
@requires_ext
@pytest.mark.parametrize("kernel, change, error, name, rule", [case[1:] for case in BINDING_BAD_CALLS],
                         ids=ids(BINDING_BAD_CALLS))
def test_bad_binding_call(kernel, change, error, name, rule, valid_call):
    args = binding_args()
    args.update(change(args))
    call, names = (interface._fwd, FWD_ARGS) if kernel == "fwd" else (interface._bwd, BWD_ARGS)
    with pytest.raises(error, match=message(name, rule)):
        call(*(args[arg] for arg in names))
    valid_call.check(after="the rejected call")


@requires_gpu
@requires_ext
@pytest.mark.parametrize("make_dout, error, name, rule", [case[1:] for case in AUTOGRAD_BAD_CALLS],
                         ids=ids(AUTOGRAD_BAD_CALLS))
def test_bad_dout_through_autograd(make_dout, error, name, rule, valid_call):
    qkv = [t.detach().requires_grad_() for t in valid_call.qkv]
    out = flash_attn_func(*qkv, causal=True)
    with pytest.raises(error, match=message(name, rule)):
        out.backward(make_dout(out))
    valid_call.check(after="the rejected backward")


@requires_gpu
@requires_ext
def test_autograd_casts_dout_dtype(valid_call):
    qkv = [t.detach().requires_grad_() for t in valid_call.qkv]
    out = flash_attn_func(*qkv, causal=True, deterministic=True)
    dout = torch.randn(out.shape, dtype=torch.float32, device="cuda")
    out.backward(dout, retain_graph=True)
    cast = [t.grad for t in qkv]
    expected = torch.autograd.grad(out, qkv, dout.to(out.dtype))
    for name, grad, grad_expected in zip(("dq", "dk", "dv"), cast, expected):
        assert torch.equal(grad, grad_expected), name


# Run in a child process: prints one JSON line, {"outcome": "same" | "rejected" | "fault" | "different",
# "error": message, "after": "same" or what a valid call gave afterwards}.
MISALIGNED_SCRIPT = r"""
import json, sys
import torch
from flash_attn2 import flash_attn_func

sys.path.insert(0, "tests")
from test_bad_inputs_gpu import misaligned

name, how = sys.argv[1:]
torch.manual_seed(0)
args = {n: torch.randn(2, 150, 4, 64, dtype=torch.float16, device="cuda") for n in ("q", "k", "v", "dout")}


def run(q, k, v, dout):
    qkv = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*qkv, causal=True, deterministic=True)
    return [out.detach(), *torch.autograd.grad(out, qkv, dout)]


def same(results, expected):
    return all(torch.equal(a, b) for a, b in zip(results, expected))


expected = run(**args)
report = {}
try:
    results = run(**{**args, name: misaligned(args[name], how)})
    torch.cuda.synchronize()
    report["outcome"] = "same" if same(results, expected) else "different"
except (TypeError, ValueError) as error:
    report.update(outcome="rejected", error=str(error))
except Exception as error:
    report.update(outcome="fault", error=f"{type(error).__name__}: {error}")
try:
    report["after"] = "same" if same(run(**args), expected) else "different"
    torch.cuda.synchronize()
except Exception as error:
    report["after"] = f"{type(error).__name__}: {error}"
print(json.dumps(report))
"""


@requires_gpu
@requires_ext
@pytest.mark.parametrize("name, how", MISALIGNED, ids=[f"{name}-{how}" for name, how in MISALIGNED])
def test_misaligned_input(name, how):
    # Strides and addresses that only a 16-byte load minds: the call must give the aligned call's bits
    # (flash_attn_func copies such views) or be rejected naming the argument, never fault in a kernel.
    # In a child process, so that a fault cannot poison this one.
    skip_unless_built(64)
    child = subprocess.run([sys.executable, "-c", MISALIGNED_SCRIPT, name, how], capture_output=True,
                           text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    reports = [line for line in child.stdout.splitlines() if line.startswith("{")]
    assert reports, f"the child gave no report (exit {child.returncode}): {child.stderr[-3000:]}"
    report = json.loads(reports[-1])
    assert report["outcome"] in ("same", "rejected"), f"{name} misaligned by {how}: {report}"
    if report["outcome"] == "rejected":
        assert re.search(message(name, "."), report["error"]), report
    assert report["after"] == "same", report

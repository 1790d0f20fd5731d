"""The backward's mode (deterministic) on CPU: the ops' schemas, the autograd context carrying it from the
forward to the backward op, torch.use_deterministic_algorithms overriding False, and every entry point
passing it. The kernel calls are stand-ins (no extension needed); tests/test_bwd_gpu.py runs the kernels."""

import pytest
import torch

import flash_attn2
from flash_attn2 import _checks, _ops, interface, varlen

ENTRIES = {
    "func": lambda t, **kw: flash_attn2.flash_attn_func(t, t, t, **kw),
    "kvpacked": lambda t, **kw: flash_attn2.flash_attn_kvpacked_func(t, torch.stack([t, t], 2), **kw),
    "qkvpacked": lambda t, **kw: flash_attn2.flash_attn_qkvpacked_func(torch.stack([t, t, t], 2), **kw),
    "varlen": lambda t, cu, n, **kw: flash_attn2.flash_attn_varlen_func(t, t, t, cu, cu, n, n, **kw),
    "varlen_kvpacked": lambda t, cu, n, **kw: flash_attn2.flash_attn_varlen_kvpacked_func(
        t, torch.stack([t, t], 1), cu, cu, n, n, **kw),
    "varlen_qkvpacked": lambda t, cu, n, **kw: flash_attn2.flash_attn_varlen_qkvpacked_func(
        torch.stack([t, t, t], 1), cu, n, **kw),
}


@pytest.mark.parametrize("op", ["fwd", "bwd"])
def test_schema_has_deterministic(op):
    # A bool that defaults to False, as flash_attn's deterministic (which allows the atomic backward).
    schema = getattr(torch.ops.flash_attn2, op).default._schema
    arg = next(a for a in schema.arguments if a.name == "deterministic")
    assert str(arg.type) == "bool" and arg.default_value is False


@pytest.fixture
def kernels(monkeypatch):
    """_fwd and _bwd replaced by stand-ins on CPU tensors: out = q, lse = 0; zero gradients. Returns the list
    of deterministic values the backward kernel call was given. The atomic backward opted into (_ops)."""
    monkeypatch.setenv(_ops.ATOMIC_BACKWARD_ENV, "1")
    modes = []

    def fwd(q, k, v, out, lse, *args, **kwargs):
        out.copy_(q)
        lse.zero_()

    def bwd(dout, q, k, v, out, lse, dq, dk, dv, *args):
        modes.append(args[-1])  # _ops._bwd's last argument: deterministic
        for grad in (dq, dk, dv):
            grad.zero_()
        return torch.zeros_like(lse)

    monkeypatch.setattr(_ops, "_fwd", fwd)
    monkeypatch.setattr(_ops, "_bwd", bwd)
    return modes


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def run_backward(deterministic):
    q = torch.randn(2, 5, 4, 16, requires_grad=True)
    out = _ops.attention(q, q.detach(), q.detach(), None, False, False, deterministic=deterministic)
    out.sum().backward()


@pytest.mark.parametrize("deterministic", [False, True])
def test_autograd_carries_the_mode(kernels, deterministic):
    run_backward(deterministic)
    assert kernels == [deterministic]


def test_without_the_opt_in_false_takes_the_split_backward(kernels, monkeypatch):
    # The atomic backward measured slower than the split one: deterministic=False allows it, never forces it.
    monkeypatch.delenv(_ops.ATOMIC_BACKWARD_ENV)
    run_backward(False)
    assert kernels == [True]


def test_deterministic_algorithms_select_the_split_backward(kernels, deterministic_algorithms):
    run_backward(False)
    assert kernels == [True]


def test_the_global_is_read_when_the_backward_runs(kernels, deterministic_algorithms):
    # Set between forward and backward, it still selects the split backward: the op reads it at run time.
    torch.use_deterministic_algorithms(False)
    q = torch.randn(2, 5, 4, 16, requires_grad=True)
    out = _ops.attention(q, q.detach(), q.detach(), None, False, False, deterministic=False)
    torch.use_deterministic_algorithms(True)
    out.sum().backward()
    assert kernels == [True]


@pytest.mark.parametrize("deterministic", [None, False, True], ids=["default", "false", "true"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_passes_it(monkeypatch, entry, deterministic):
    # Each public entry hands its deterministic to the one op path (default False, as flash_attn's).
    seen = []

    def attention(*args, deterministic=None, **kwargs):
        seen.append(deterministic)

    monkeypatch.setattr(_checks, "check_devices", lambda named: None)  # CPU tensors stand in
    monkeypatch.setattr(interface, "attention", attention)
    monkeypatch.setattr(varlen, "attention", attention)
    t = torch.randn(2, 5, 4, 16, dtype=torch.float16)
    kwargs = {} if deterministic is None else dict(deterministic=deterministic)
    if entry.startswith("varlen"):
        ENTRIES[entry](t.flatten(0, 1), torch.tensor([0, 5, 10], dtype=torch.int32), 5, **kwargs)
    else:
        ENTRIES[entry](t, **kwargs)
    assert seen == [bool(deterministic)]


@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck_with_the_argument(kernels, deterministic):
    # Schema, fake implementations, autograd registration and AOT dispatch hold with deterministic given
    # (tests/test_compile_gpu.py runs opcheck on the real kernels).
    q = torch.randn(2, 5, 4, 16, requires_grad=True)
    k, v = (torch.randn(2, 7, 2, 16, requires_grad=True) for _ in "kv")
    scores = (0.25, True, -1, -1, 0.0, None, None, 0.0)  # softmax_scale ... dropout_p
    fwd_args = (q, k, v, None, None, 0, 0, *scores, deterministic)
    results = [torch.library.opcheck(torch.ops.flash_attn2.fwd.default, fwd_args, raise_exception=False)]
    out, lse, rng_state = torch.ops.flash_attn2.fwd(q.detach(), k.detach(), v.detach(), *fwd_args[3:])
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, None, None, 0, 0, *scores,
                rng_state, deterministic)
    results.append(torch.library.opcheck(torch.ops.flash_attn2.bwd.default, bwd_args, raise_exception=False))
    for result in results:
        assert all(outcome == "SUCCESS" for outcome in result.values()), result

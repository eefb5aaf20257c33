"""The eager direct call (``fastpeft.ops.linear.direct_call``): when it is taken, and that it computes exactly what
the registered op computes.

In plain eager the op's implementation runs as a function (the dispatcher never sees ``fastpeft::*``); under
anything that watches or transforms dispatch (a TorchDispatchMode, a TorchFunctionMode, FakeTensorMode, functorch,
tensor subclasses, meta tensors, torch.compile) the registered op runs. Both must give bit-identical outputs and
gradients, dropout included.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastpeft.ops.ia3 import ia3_linear
from fastpeft.ops.linear import TORCH, direct_call, lora_linear
from fastpeft.testing import OpCounter


class _PassThroughFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughDispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


def _dispatched(fn) -> list[str]:
    """Names of the fastpeft ops that went through the dispatcher while ``fn`` ran (the profiler records every
    dispatched op; a direct call records none)."""
    with torch.autograd.profiler.profile() as prof:
        fn()
    return [e.name for e in prof.function_events if e.name.startswith("fastpeft::")]


def test_direct_call_taken_in_plain_eager_only():
    x, saved = torch.randn(3, 8), torch.nn.Parameter(torch.randn(4, 8))
    assert direct_call(x) and direct_call(x, saved)
    with _PassThroughFunctionMode():
        assert not direct_call(x)
    with _PassThroughDispatchMode():
        assert not direct_call(x)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not direct_call(x)
    assert not direct_call(x.as_subclass(_Subclass))
    assert not direct_call(x, saved.as_subclass(_Subclass))
    assert not direct_call(torch.empty(3, 8, device="meta"))
    seen = []
    torch.func.vmap(lambda t: seen.append(direct_call(t)) or t)(x)
    assert seen == [False]


def _lora_case(p):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    w, bias = torch.randn(40, 24, generator=g) / 5, torch.randn(40, generator=g)
    a = (torch.randn(4, 24, generator=g) / 5).requires_grad_()
    b = (torch.randn(40, 4, generator=g) / 2).requires_grad_()
    seed = torch.tensor(123, dtype=torch.int64) if p else None
    return x, w, bias, a, b, seed


def _run_lora(p, grad):
    x, w, bias, a, b, seed = _lora_case(p)
    with torch.set_grad_enabled(grad):
        y = lora_linear(x, w, bias, a, b, None, None, 0.5, p, seed, False, TORCH)
    if not grad:
        return [y]
    return [y, *torch.autograd.grad(y, [x, a, b], torch.ones_like(y))]


def _run_ia3(scale_input, grad):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=g, requires_grad=True)
    w, bias = torch.randn(40, 24, generator=g) / 5, torch.randn(40, generator=g)
    l = (1 + torch.rand(24 if scale_input else 40, generator=g)).requires_grad_()
    with torch.set_grad_enabled(grad):
        y = ia3_linear(x, w, bias, l, scale_input, False, TORCH)
    if not grad:
        return [y]
    return [y, *torch.autograd.grad(y, [x, l], torch.ones_like(y))]


CASES = [  # (run(grad) -> outputs and gradients, the op's name)
    pytest.param(lambda grad: _run_lora(0.0, grad), "lora_linear", id="lora"),
    pytest.param(lambda grad: _run_lora(0.25, grad), "lora_linear", id="lora-dropout"),
    pytest.param(lambda grad: _run_ia3(False, grad), "ia3_linear", id="ia3-out"),
    pytest.param(lambda grad: _run_ia3(True, grad), "ia3_linear", id="ia3-in"),
]


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("run,op", CASES)
def test_direct_call_matches_registered_op_bitwise(run, op, grad):
    direct = run(grad)
    with _PassThroughDispatchMode():  # forward and backward through the registered ops
        dispatched = run(grad)
    assert len(direct) == len(dispatched)
    for d, o in zip(direct, dispatched):
        assert torch.equal(d, o)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("run,op", CASES)
def test_dispatcher_skipped_in_eager_and_used_when_watched(run, op, grad):
    expected = [op, f"{op}_backward"] if grad else [op]
    assert _dispatched(lambda: run(grad)) == []
    with _PassThroughDispatchMode():  # (the profiler records an op both where the mode catches and re-runs it)
        assert set(_dispatched(lambda: run(grad))) == {f"fastpeft::{n}" for n in expected}
    with _PassThroughFunctionMode():  # function modes cover the forward (autograd runs backward outside them)
        assert _dispatched(lambda: run(grad))[:1] == [f"fastpeft::{op}"]
    with OpCounter() as log:  # a TorchDispatchMode sees each fused op as one op
        run(grad)
    assert [n for n in log.names if n.startswith("fastpeft.")] == [f"fastpeft.{n}" for n in expected]


_NO_MODE = contextlib.nullcontext


CONTEXTS = [  # (context, input x -> x, all tensors on meta, whether the direct call is taken)
    pytest.param(_NO_MODE, lambda t: t, False, True, id="plain"),
    pytest.param(_PassThroughFunctionMode, lambda t: t, False, False, id="function-mode"),
    pytest.param(_PassThroughDispatchMode, lambda t: t, False, False, id="dispatch-mode"),
    pytest.param(_NO_MODE, lambda t: t.as_subclass(_Subclass), False, False, id="subclass-input"),
    pytest.param(_NO_MODE, lambda t: t, True, False, id="meta-tensors"),
]


@pytest.mark.parametrize("context,wrap_x,meta,direct", CONTEXTS)
def test_entry_points_inline_the_same_test(context, wrap_x, meta, direct):
    """``lora_linear`` and ``ia3_linear`` test ``direct_call``'s condition inline (a frame less at decode): without
    a gradient they skip the dispatcher exactly where ``direct_call`` says so."""
    x, w, bias, a, b, _ = (t.detach() if t is not None else None for t in _lora_case(0.0))
    l = torch.rand(40)
    if meta:
        x, w, bias, a, b, l = (t.to("meta") for t in (x, w, bias, a, b, l))
    x = wrap_x(x)
    with torch.no_grad(), context():
        assert direct_call(x) == direct
        lora = _dispatched(lambda: lora_linear(x, w, bias, a, b, None, None, 0.5, 0.0, None, False, TORCH))
        ia3 = _dispatched(lambda: ia3_linear(x, w, bias, l, False, False, TORCH))
    assert (lora == []) == direct and (ia3 == []) == direct, (lora, ia3)

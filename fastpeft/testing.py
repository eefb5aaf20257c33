"""The one tolerance table, the comparison every test uses, and the op counter tests and benchmarks share.

Low-precision results are judged against an fp32 (or fp64) oracle by *error ratio*: the fused op's error must be
no worse than a small multiple of the error that the eager low-precision path (PEFT's own computation in that
dtype) makes against the same oracle, plus an absolute floor scaled to the data. A fixed loose ``atol`` can hide a
wrong kernel; a ratio cannot, because a wrong kernel's error is orders of magnitude above rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import collections

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["Tolerance", "TOLERANCES", "tolerance", "assert_close", "assert_close_ratio", "stack_normalized", "excluded_op", "OpCounter",
           "patch_interpreter_bf16"]


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # relative to max |expected|
    atol: float  # absolute floor
    ratio: float  # allowed error relative to the eager low-precision path's own error


# One place for every tolerance, keyed by the dtype the computation runs in.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-12, ratio=2.0),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-6, ratio=2.0),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-5, ratio=2.0),
    torch.float16: Tolerance(rtol=2e-3, atol=1e-5, ratio=2.0),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}; expected one of {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def _max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype | None = None, name: str = "") -> None:
    """``max|actual - expected| <= atol + rtol * max|expected|`` with the tolerance of ``dtype``.

    ``dtype`` defaults to ``actual.dtype``; pass the *computation* dtype when comparing against an fp32 oracle.
    NaNs anywhere fail (fresh allocations are NaN-poisoned in tests, so an unwritten output fails here).
    """
    tol = tolerance(dtype or actual.dtype)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    err = _max_err(actual, expected)
    bound = tol.atol + tol.rtol * scale
    assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e} (rtol {tol.rtol}, atol {tol.atol}, scale {scale:.3e})"


def assert_close_ratio(actual: Tensor, eager: Tensor, oracle: Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Low precision: ``err(actual, oracle) <= ratio * err(eager, oracle) + atol + 1e-2 * rtol * scale``.

    ``eager`` is the same computation done the eager way in the low dtype (PEFT's path), ``oracle`` an fp32/fp64
    computation of the same math. The small ``rtol`` term keeps the bound from collapsing where the eager path
    happens to be exact.
    """
    tol = tolerance(dtype)
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(oracle.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: NaN in result"
    scale = oracle.double().abs().max().item() if oracle.numel() else 0.0
    err, ref_err = _max_err(actual, oracle), _max_err(eager, oracle)
    bound = tol.ratio * ref_err + tol.atol + 1e-2 * tol.rtol * scale
    assert err <= bound, f"{name}: err {err:.3e} > {tol.ratio} x eager err {ref_err:.3e} (+floor; scale {scale:.3e})"


def stack_normalized(grads: dict, oracle: dict) -> torch.Tensor:
    """All of a model's gradients as one fp64 vector, each tensor divided by the max |oracle| of that tensor.

    For judging a whole low-precision backward by error ratio: the rounding noise of one tensor's gradient,
    after backprop through a bf16 network, is a single random draw (per-tensor fused/eager error ratios spread
    from 0.2 to 3 with a geometric mean near 1), while the maximum over every tensor's *relative* error is a
    stable statistic. A wrong gradient in any single tensor is still an O(1) relative error here.
    """
    return torch.cat([(grads[n].double() / oracle[n].double().abs().max().clamp_min(1e-30)).flatten()
                      for n in sorted(oracle)])


# Op counting --------------------------------------------------------------------------------------------------

_EXCLUDED_BY_NAME = ("aten::_unsafe_view", "aten::_local_scalar_dense")


def excluded_op(func) -> bool:
    """The ops an op count leaves out: (1) views, ops whose schema returns an alias of an input that they do not
    write (view, t, transpose, slice, expand, detach, split...); (2) ``aten._unsafe_view``, matmul's reshape of its
    own fresh result, a view the schema does not mark; (3) ``aten._local_scalar_dense``, ``.item()``."""
    schema = func._schema
    if schema.name in _EXCLUDED_BY_NAME:
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach dispatch (``excluded_op`` aside) and the bytes of their tensor inputs and outputs.

    A fastpeft custom op counts as one: the mode is off while an op runs, so its inner aten calls are not seen.
    ``names`` lists the counted ops in order by packet name ("aten.mm", "fastpeft.lora_linear"); ``ops`` counts
    them by overload.
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.names: list[str] = []
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not excluded_op(func):
            self.ops[str(func)] += 1
            self.names.append(str(func.overloadpacket))
            self.bytes += _nbytes((args, kwargs)) + _nbytes(out)
        return out

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def patch_interpreter_bf16():
    """Make Triton's interpreter compute bf16 the way the GPU does (it stores bf16 as uint16 bit patterns); returns
    the function that undoes it. Used by the tests and ``benchmarks.gpu_check --dry-run``.

    - ``tl.dot`` multiplied the bit patterns (triton-lang/triton#11584, closed as "not supported yet"): widen bf16
      operands to fp32 first, exactly as the GPU's bf16 MMA multiplies them;
    - fp32 -> bf16 casts truncated toward zero, where the GPU (``cvt.rn.bf16.f32``) rounds to nearest even.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    orig_dot, orig_cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            u = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            return ti.TensorHandle(np.where(np.isnan(src.data), np.uint16(0x7FC0), rne), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot = lambda self, a, b, d, *args: orig_dot(self, widen(a), widen(b), d, *args)
    builder.cast_impl = cast_impl

    def undo():
        builder.create_dot, builder.cast_impl = orig_dot, orig_cast

    return undo

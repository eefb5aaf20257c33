"""IA3 in the adapted-linear op family: ``fastpeft::ia3_linear`` and its backward.

Output scaling (ordinary target modules; the bias is scaled too, as PEFT does):

    y  = (x W^T + b) * l                 dX = (dY * l) W          dl = sum_m (x W^T + b) * dY

Input scaling (feed-forward target modules):

    y  = (x * l) W^T + b                 dX = (dY W) * l          dl = sum_m x * (dY W)

What is saved, and why (PEFT's graph holds the same, never more):
- output scaling saves the base output ``x W^T + b``, as PEFT's ``result * l`` does; never y, the op's own output,
  which an in-place op downstream (``ReLU(inplace=True)``) may overwrite before backward.
- input scaling saves x (PEFT saves it too, for the same reduction); dY W is formed once and serves both dX and dl.
- the base weight only where it is read: dX, or input scaling's dl. A layer whose input needs no gradient (the
  first one) saves none, like PEFT's.
Dtypes: x and W fp32/fp16/bf16, l in its own dtype (PEFT keeps fp32 vectors on a bf16 model); the scaled input is
rounded to x's dtype before the matmul (as PEFT's ``.to(previous_dtype)`` does), reductions run in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import (AUTO, TORCH, TRITON, _dispatch_modes, _function_mode, _functorch_level, _is_compiling, _lib,
                     _linear, _use_triton, direct_call)

__all__ = ["ia3_linear"]

_lib.define(
    "ia3_linear(Tensor x, Tensor weight, Tensor? bias, Tensor scale, bool scale_input, bool weight_t, "
    "bool save_base, int backend) -> (Tensor, Tensor)"
)
_lib.define(
    "ia3_linear_backward(Tensor dy, Tensor saved, Tensor? weight, Tensor? scale, bool scale_input, bool weight_t, "
    "bool saved_is_base, bool need_dx, bool need_dl, int backend) -> (Tensor, Tensor)"
)


def _check(x: Tensor, weight: Tensor, scale: Tensor, scale_input: bool, weight_t: bool) -> None:
    """Raises, naming what was expected; the hot path calls it only once its inline test has found a mismatch."""
    k, n = (weight.shape[0], weight.shape[1]) if weight_t else (weight.shape[1], weight.shape[0])
    if x.shape[-1] != k:
        raise ValueError(f"fastpeft ia3_linear: x has {x.shape[-1]} features, expected in_features={k}")
    want = k if scale_input else n
    if scale.numel() != want:
        raise ValueError(f"fastpeft ia3_linear: IA3 vector has {scale.numel()} entries, expected "
                         f"{'in' if scale_input else 'out'}_features={want}")
    if weight.dtype != x.dtype:
        raise TypeError(f"fastpeft ia3_linear: x is {x.dtype} but the base weight is {weight.dtype}; expected the same dtype")


# Up to this many rows the Triton path is one fused launch (a GEMV with the scaling in its prologue or epilogue);
# above, the base product is cuBLAS's and the scaling one torch pass over x or y (the fused torch path below): a
# Triton GEMM main loop is 1.2-1.6x cuBLAS at large M (shared/notes/kernel-review.md), the scaling pass 2-4 bytes
# of the [M, K] or [M, N] tensor per element.
_DECODE_ROWS = 16


def _ia3_fwd(x, weight, bias, scale, scale_input, weight_t, save_base, backend):
    """The op's computation: (y, saved base output or None). The registered kernel and the direct call share it.

    This is the decode hot path, so the checks and the backend choice are inline and the torch path is written out
    here: at decode the weights streaming through evict the interpreter's working set, and every extra Python frame
    then costs microseconds (on a chain of the reference model's 28 layers, over the base layer: +87 us per IA3 layer
    with the checks and the torch path in four more frames, +62 us as written here, +16-28 us for the bare aten
    calls). On x of any rank: F.linear folds the leading dims in C++.
    """
    n, k = weight.shape
    if weight_t:
        k, n = n, k
    if x.shape[-1] != k or scale.numel() != (k if scale_input else n) or weight.dtype != x.dtype:
        _check(x, weight, scale, scale_input, weight_t)  # raises, naming what was expected
    if (backend != TORCH and (x.is_cuda or backend == TRITON) and _use_triton(x, backend)
            and x.numel() <= _DECODE_ROWS * k):
        from fastpeft.kernels.lora import ia3_fwd

        y, base = ia3_fwd(x.reshape(-1, k), weight, bias, scale.view(-1), scale_input=scale_input,
                          weight_t=weight_t, store_base=save_base)
        return y.view(*x.shape[:-1], n), base if save_base and not scale_input else None
    w = weight.t() if weight_t else weight  # [N, K] view
    if scale_input:  # PEFT's vector is [1, K]: it broadcasts against x as it is
        # the one temporary (a matmul reads operands), written in x's dtype: computed in l's dtype, rounded once,
        # as PEFT's (x.to(l.dtype) * l).to(x.dtype)
        l = scale if scale.shape[-1] == k else scale.view(-1)
        if torch.promote_types(x.dtype, l.dtype) != l.dtype:  # (fp16 x, bf16 l): PEFT rounds x to l's dtype first
            xs = x.to(l.dtype) * l
            return _linear(xs.to(x.dtype), w, bias), None
        return _linear(torch.mul(x, l, out=torch.empty_like(x)), w, bias), None
    base = _linear(x, w, bias)
    if save_base:  # y in base's dtype, l applied in its own dtype and rounded once (PEFT's result * l, cast back)
        if torch.promote_types(base.dtype, scale.dtype) != scale.dtype:
            return (base * scale.view(-1)).to(base.dtype), base.view(-1, n)
        return torch.mul(base, scale.view(-1), out=torch.empty_like(base)), base.view(-1, n)
    return base.mul_(scale.view(-1)), None  # in place; a wider l is applied in its dtype and rounded once, like PEFT


def _ia3_linear_impl(x, weight, bias, scale, scale_input, weight_t, save_base, backend):
    y, base = _ia3_fwd(x, weight, bias, scale, scale_input, weight_t, save_base, backend)
    return y, x.new_empty((0,)) if base is None else base


def _ia3_bwd(dy, saved, weight, scale, scale_input, weight_t, saved_is_base, need_dx, need_dl, backend):
    """The backward op's computation: (dx, dl), None where not requested. ``scale`` is None where dX is not
    requested (dl reads x or the base output, never l): dl then comes back flat in fp32, and a stand-in l of that
    shape is made for the launchers' checks, never read."""
    n = dy.shape[-1]
    if scale is None:
        k = saved.shape[-1] if scale_input else n
        scale = torch.empty((k,), dtype=torch.float32, device=dy.device)
    dy2, l = dy.reshape(-1, n), scale.reshape(-1)
    if weight is not None and _use_triton(dy, backend) and dy.numel() <= _DECODE_ROWS * n:
        # the fused dx launch at decode sizes; above, cuBLAS and one pass (below): no Triton GEMM main loop
        from fastpeft.kernels.lora import ia3_bwd

        dx, dl = ia3_bwd(dy2, saved.reshape(dy2.shape[0], -1), weight, l, scale_input=scale_input, weight_t=weight_t,
                         saved_is_base=saved_is_base, need_dx=need_dx, need_dl=need_dl)
    else:
        w = None if weight is None else (weight.t() if weight_t else weight)  # [N, K]
        s2 = saved.reshape(dy2.shape[0], -1)
        dx = dl = None
        if scale_input:
            t = torch.mm(dy2, w)  # [M, K] = dY W, shared by dX and dl
            if need_dl:
                dl = torch.mul(s2.float(), t.float()).sum(0)  # fp32; einsum lowers to a bmm 25x slower
            if need_dx:
                dx = t.mul_(l) if t.dtype == l.dtype else t.mul(l).to(t.dtype)
        else:
            if need_dl:
                dl = torch.mul(s2.float(), dy2.float()).sum(0)
                if not saved_is_base:
                    dl = dl.div_(l.float())
            if need_dx:
                dx = torch.mm((dy2 * l).to(dy2.dtype), w)
    return (None if dx is None else dx.view(*dy.shape[:-1], -1),
            None if dl is None else dl.to(scale.dtype).view(scale.shape))


def _ia3_linear_backward_impl(dy, saved, weight, scale, scale_input, weight_t, saved_is_base, need_dx, need_dl,
                              backend):
    dx, dl = _ia3_bwd(dy, saved, weight, scale, scale_input, weight_t, saved_is_base, need_dx, need_dl, backend)
    # unrequested outputs are distinct empty tensors: custom-op outputs may not alias each other
    return dy.new_empty((0,)) if dx is None else dx, dy.new_empty((0,)) if dl is None else dl


for _key in ("CPU", "CUDA"):
    _lib.impl("ia3_linear", _ia3_linear_impl, _key)
    _lib.impl("ia3_linear_backward", _ia3_linear_backward_impl, _key)


@torch.library.register_fake("fastpeft::ia3_linear", lib=_lib)
def _ia3_linear_fake(x, weight, bias, scale, scale_input, weight_t, save_base, backend):
    n = weight.shape[1] if weight_t else weight.shape[0]
    m = x.numel() // x.shape[-1]
    base = x.new_empty((m, n)) if save_base and not scale_input else x.new_empty((0,))
    return x.new_empty((*x.shape[:-1], n)), base


@torch.library.register_fake("fastpeft::ia3_linear_backward", lib=_lib)
def _ia3_linear_backward_fake(dy, saved, weight, scale, scale_input, weight_t, saved_is_base, need_dx, need_dl,
                              backend):
    dx = dy.new_empty((*dy.shape[:-1], weight.shape[0 if weight_t else 1])) if need_dx else dy.new_empty((0,))
    if not need_dl:
        return dx, dy.new_empty((0,))
    if scale is None:
        return dx, dy.new_empty((saved.shape[-1] if scale_input else dy.shape[-1],), dtype=torch.float32)
    return dx, scale.new_empty(scale.shape)


# resolved overloads: the overload packet resolves on every call (see ops/linear.py)
_ia3_linear_op = torch.ops.fastpeft.ia3_linear.default
_ia3_linear_backward_op = torch.ops.fastpeft.ia3_linear_backward.default


class _IA3LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, scale_input, weight_t, backend):
        nx, nl = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        save_base = nl and not scale_input
        fwd = _ia3_fwd if direct_call(x) else _ia3_linear_op
        y, base = fwd(x, weight, bias, scale, scale_input, weight_t, save_base, backend)
        # Never y itself: an in-place op on the output (ReLU(inplace=True)) would invalidate it, where PEFT's graph
        # holds the base output. The weight only where it is read: dX, or input scaling's dl = sum x * (dY W).
        # l itself only for dX (dl reads x or the base output, never l; the backward gives dl in fp32 without it)
        save_l = nx or scale.dtype != torch.float32
        ctx.save_for_backward(x if scale_input else base, weight if nx or scale_input else None,
                              scale if save_l else None)
        ctx.args = (scale_input, weight_t, backend, scale.shape)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, weight, scale = ctx.saved_tensors
        scale_input, weight_t, backend, l_shape = ctx.args
        nx, nw, nb, nl = ctx.needs_input_grad[:4]
        if nw or nb:
            raise NotImplementedError("fastpeft ia3_linear: gradients for the base weight/bias are not fused; "
                                      "this layer should have kept PEFT's forward (fastpeft.report names why)")
        if saved is None:  # output scaling with a frozen vector: dX alone, which does not read it
            saved = dy
        bwd = _ia3_bwd if direct_call(dy, saved) else _ia3_linear_backward_op
        dx, dl = bwd(dy, saved, weight, scale, scale_input, weight_t, True, nx, nl, backend)
        return dx if nx else None, None, None, dl.view(l_shape) if nl else None, None, None, None


def ia3_linear(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, scale_input: bool,
               weight_t: bool = False, backend: int = AUTO) -> Tensor:
    """IA3-scaled linear as one op; differentiable in x and the IA3 vector (the base layer is frozen). Where
    ``direct_call`` allows, the op's implementation is called as a function (see ops/linear.py)."""
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _IA3LinearFn.apply(x, weight, bias, scale, scale_input, weight_t, backend)
    # direct_call(x), inline: one Python frame less per decode call
    if (not (_is_compiling() or _dispatch_modes() or _function_mode() or _functorch_level() is not None)
            and type(x) is Tensor and (x.is_cpu or x.is_cuda)):
        return _ia3_fwd(x, weight, bias, scale, scale_input, weight_t, False, backend)[0]
    return _ia3_linear_op(x, weight, bias, scale, scale_input, weight_t, False, backend)[0]

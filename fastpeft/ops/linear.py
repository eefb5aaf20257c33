"""The adapted-linear op family: ``fastpeft::lora_linear`` and its backward.

Math (W frozen base weight [N, K] -- or [K, N] for GPT-2 Conv1D, ``weight_t`` --, A [R, K], B [N, R]):

    y  = residual + x W^T + b + s * (drop(x) A^T B^T + b_B),     drop(x) = x * keep / (1 - p)
    xa = drop(x) A^T                                              (returned, saved for backward: M x R)
    g  = s * dY B
    dX = dY W + keep / (1 - p) * (g A)        dA = g^T drop(x)        dB = s * dY^T xa

Precision contract: x and W in fp32/fp16/bf16, adapters in the same or a wider dtype (PEFT upcasts adapters to
fp32 by default); the low-rank product runs in the adapter dtype like PEFT, matmuls accumulate in fp32, y comes
back in x's dtype. Dropout is regenerated from ``seed`` in backward: neither a mask nor a dropped copy of x is
ever saved. What autograd keeps is x (the same storage the base layer's caller holds), xa, and the parameters.

Registration: ``torch.library.Library`` ``define`` + per-backend ``impl`` (the cheapest path that still gives
torch.compile one opaque op with a fake implementation; see shared/notes/host-overhead.md). Autograd is a Python
``autograd.Function`` used only when a gradient is needed, so no-grad decode pays no autograd dispatch.
CUDA tensors run the Triton kernels (``fastpeft.kernels.lora``); CPU tensors run the fused torch path below, or
the Triton kernels under ``TRITON_INTERPRET=1`` when backend "triton" is asked for.

Eager direct call (``direct_call``): the boxed dispatcher round trip into a Python kernel (thirteen arguments
packed into IValues and back) costs more host time than the two low-rank matmuls at decode size. When nothing
above the dispatcher could observe or transform the call -- not compiling or exporting, no TorchDispatchMode
(FakeTensorMode, an op counter, make_fx) or TorchFunctionMode active, no functorch transform, a plain CPU or CUDA
input -- the op's own implementation is called as a function. It is the same function the registered kernel
runs, so results are identical; anything that does watch dispatch sees the one registered op.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AUTO", "TRITON", "TORCH", "BACKENDS", "MIN_CAPABILITY", "lora_linear", "keep_mask_torch", "keep_threshold",
           "new_seed", "seed_for", "interpreter_active", "direct_call", "tensor_cores"]

AUTO, TRITON, TORCH = 0, 1, 2
BACKENDS = {"auto": AUTO, "triton": TRITON, "torch": TORCH}

_lib = torch.library.Library("fastpeft", "DEF")
_lib.define(
    "lora_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor? lora_bias, "
    "Tensor? residual, float scaling, float dropout_p, Tensor? seed, bool weight_t, bool store_xa, int backend) "
    "-> (Tensor, Tensor)"
)
_lib.define(
    "lora_linear_backward(Tensor dy, Tensor x, Tensor? weight, Tensor? lora_a, Tensor lora_b, Tensor xa, "
    "float scaling, float dropout_p, Tensor? seed, bool weight_t, bool need_dx, bool need_da, bool need_db, "
    "int backend) -> (Tensor, Tensor, Tensor)"
)


def new_seed(device=None) -> Tensor:
    """A dropout seed: an int64 scalar from torch's generator of ``device`` (the CPU's by default).

    ``torch.manual_seed`` reproduces it, and gradient checkpointing (which restores the CPU and CUDA RNG states
    before recompute) regenerates the same mask. On CUDA it is drawn on the GPU and the Triton kernels read it from
    device memory (torch's philox seed + offset pattern): inside a captured CUDA graph, torch's graph-safe generator
    advances on every replay, so each replay draws a new seed, and the kernels a new mask; no host sync either."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device=device)


def seed_for(x: Tensor, backend: int) -> Tensor:
    """A new seed where the op will read it: on x's GPU for the Triton kernels, else on the CPU (the torch path
    reads it on the host)."""
    return new_seed(x.device if x.is_cuda and _use_triton(x, backend) else None)


def _device_seed(seed: Tensor | None, x: Tensor) -> Tensor | None:
    """The seed for the kernels: on x's device. A host seed would be copied at capture time and then frozen in a
    CUDA graph (every replay the same mask), so under capture it is refused."""
    if seed is None or seed.device == x.device:
        return seed
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fastpeft lora_linear: dropout under CUDA-graph capture needs its seed on the GPU, drawn "
                           "inside the captured region (fastpeft.ops.linear.new_seed(x.device)); a CPU seed would "
                           "freeze one mask for every replay")
    return seed.to(x.device)


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)
_CHUNK = 1 << 16  # mask elements per numpy call: the chunk's random bytes and its mask stay in L2


def keep_threshold(p: float) -> int:
    """Keep iff a uniform 32-bit word is below this: ``round((1 - p) 2^32)``, Bernoulli(1 - p) to within 2^-33."""
    return min(round((1.0 - p) * 2.0**32), 2**32 - 1)


def keep_mask_torch(seed: int, shape: tuple[int, int], p: float, device, dtype) -> Tensor:
    """The fused torch path's dropout keep-mask (0/1 in ``dtype``), a pure function of ``seed``.

    On CPU the 32-bit comparison ``u < t`` (``t = keep_threshold(p)``) is made a byte at a time. Write
    ``u = 2^24 b + l`` and ``t = 2^24 T + L`` with b a uniform byte and l an independent uniform 24-bit word: then
    ``u < t`` iff ``b < T``, or ``b == T`` and ``l < L``. Each element draws its byte b; only the ties (1 in 256)
    draw an l. The mask is exactly the 32-bit one in distribution at an eighth of the random words: random words
    are what a CPU mask costs (numpy's generators give about one 64-bit word per 2 ns).

    The stream is numpy's SFC64 (a small-state generator that passes BigCrush and PractRand) seeded through
    SeedSequence, so that neighbouring seeds give independent streams. Element i takes byte i of the first
    ``ceil(n / 8)`` words (native byte order); then each tie, in element order, takes one more word, whose bits
    0-23 are its l.
    The mask is drawn twice per step (forward, and again in backward: it is never stored), which is why its cost
    matters; ``torch.rand`` alone (mt19937, element by element) costs about 3x this.
    On other devices it is ``torch.rand`` with a generator of that device.
    """
    if torch.device(device).type != "cpu":
        gen = torch.Generator(device=device).manual_seed(int(seed))
        # drawn in fp32 even for a bf16 mask: a bf16 uniform has too few levels to hit 1 - p
        u = torch.rand(shape, generator=gen, device=device, dtype=torch.float32).lt_(1.0 - p)
        return u if dtype == torch.float32 else u.to(dtype)
    import numpy as np

    t = keep_threshold(p)
    keep = torch.empty(shape, dtype=dtype if dtype in _NUMPY_DTYPES else torch.float32)
    out = keep.numpy().reshape(-1)
    n, hi, lo = out.size, np.uint8(t >> 24), np.uint64(t & 0xFFFFFF)
    bits = np.random.SFC64(int(seed))
    ties = []
    for i in range(0, n, _CHUNK):  # chunks of a multiple of 8: the byte stream does not depend on _CHUNK
        c = min(_CHUNK, n - i)
        b = bits.random_raw((c + 7) // 8).view(np.uint8)[:c]  # eight byte draws per 64-bit word
        np.less(b, hi, out=out[i:i + c], casting="unsafe")
        tie = np.flatnonzero(b == hi)
        if tie.size:
            ties.append(tie + i)
    if ties:
        tie = np.concatenate(ties)
        out[tie] = (bits.random_raw(tie.size) & np.uint64(0xFFFFFF)) < lo
    return keep if keep.dtype == dtype else keep.to(dtype)


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (decided from the environment before triton's import)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_PLAIN = (Tensor, torch.nn.Parameter)
_grad_enabled, _linear = torch.is_grad_enabled, F.linear  # module globals: one lookup each on the hot path
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.maybe_current_level


def direct_call(x: Tensor, other: Tensor | None = None) -> bool:
    """Whether the op's implementation may be called as a function instead of through the dispatcher: nothing
    could observe or transform the call (see the module docstring). ``x`` is the op's input (and ``other`` the saved
    input, in backward); parameters are not checked: on the direct path a parameter of a tensor subclass meets the
    subclass's own handling of each aten call. ``is_compiling`` comes first: under dynamo it is a constant True, so
    the C-level queries after it are never traced."""
    if _is_compiling() or _dispatch_modes() or _function_mode() or _functorch_level() is not None:
        return False
    if type(x) is not Tensor or not (x.is_cpu or x.is_cuda):
        return False
    return other is None or type(other) in _PLAIN


# CUDA device index -> whether the Triton kernels compile to tensor-core code there (compute capability 8.0 and up).
# Below it (T4, V100) tl.dot lowers to FMA loops that spill 4-29 KB per thread: right results, very slow.
_TENSOR_CORES: dict[int, bool] = {}
MIN_CAPABILITY = (8, 0)


def tensor_cores(index: int) -> bool:
    """Whether ``backend="auto"`` runs the Triton kernels on CUDA device ``index`` (else the fused torch path)."""
    ok = _TENSOR_CORES.get(index)
    if ok is None:
        ok = _TENSOR_CORES[index] = tuple(torch.cuda.get_device_capability(index)) >= MIN_CAPABILITY
    return ok


def _use_triton(x: Tensor, backend: int) -> bool:
    if backend == TORCH:
        return False
    if x.is_cuda:
        return backend == TRITON or tensor_cores(x.get_device())
    if backend == TRITON:
        if not interpreter_active():
            raise RuntimeError(
                "fastpeft backend='triton' got CPU tensors: the Triton kernels run on CPU only under the Triton "
                "interpreter (set TRITON_INTERPRET=1 before triton is imported); use backend='auto' or 'torch'."
            )
        return True
    return False


def _check(x: Tensor, weight: Tensor | None, lora_a: Tensor, lora_b: Tensor, weight_t: bool) -> None:
    """Raises, naming what was expected; the hot path calls it only once a mismatch has shown (an aten call raised,
    or the Triton path's inline test failed), and re-raises the aten error where this finds nothing to name."""
    (r, k), (n, rb) = lora_a.shape, lora_b.shape
    if x.shape[-1] != k:
        raise ValueError(f"fastpeft lora_linear: x has {x.shape[-1]} features, expected in_features={k} (lora_A {tuple(lora_a.shape)})")
    if rb != r:
        raise ValueError(f"fastpeft lora_linear: lora_B {tuple(lora_b.shape)} does not match rank {r} of lora_A {tuple(lora_a.shape)}")
    if weight is not None:
        wk, wn = weight.shape if weight_t else reversed(weight.shape)
        if wk != k or wn != n:
            raise ValueError(f"fastpeft lora_linear: base weight {tuple(weight.shape)} does not match in={k}, out={n} (weight_t={weight_t})")
        if weight.dtype != x.dtype:
            raise TypeError(f"fastpeft lora_linear: x is {x.dtype} but the base weight is {weight.dtype}; expected the same dtype")


# ---------------------------------------------------------------------------------------------------------------
# Fused torch path (CPU, or backend="torch"): few aten calls, in-place accumulation, no full-size temporaries
# beyond the ones a mixed-dtype matmul forces.


# Up to this many rows the low-rank term is added from a fresh [M, N] product: four aten calls, no Python-level
# views. Above it, in place with addmm_ (views and a transpose, but no [M, N] temporary). On a chain of the
# reference model's 28 layers at M = 1, bare aten calls, over the base layer: +70, +87, +50 us per layer with the
# fresh product against +90, +83, +59 us in place (three runs; within this VM's noise, never clearly worse).
_SMALL_M = 16


def _bwd_torch(dy2, x2, weight, a, b, xa, s, p, seed, weight_t, need_dx, need_da, need_db):
    dyb = dy2 if dy2.dtype == b.dtype else dy2.to(b.dtype)
    dx = da = db = None
    keep = None
    if p > 0.0 and (need_dx or need_da):
        keep = keep_mask_torch(seed, tuple(x2.shape), p, x2.device, a.dtype)
    if need_dx or need_da:
        # g = s dY B, with dropout's 1 / (1 - p) folded in (both dX and dA carry it): an [M, R] scale, not [M, K]
        g = torch.mm(dyb, b).mul_(s if keep is None else s / (1.0 - p))
    if need_dx:
        if keep is None and weight is not None and dy2.dtype == a.dtype:
            w = weight.t() if weight_t else weight
            dx = torch.mm(dy2, w).addmm_(g, a)
        else:
            t = torch.mm(g, a)  # [M, K] adapter dtype
            if keep is not None:
                t.mul_(keep)
            if weight is None:
                dx = t.to(x2.dtype)
            elif dy2.dtype == t.dtype:  # accumulate the base term into t: BLAS beta = 1, no extra [M, K] pass
                dx = t.addmm_(dy2, weight.t() if weight_t else weight)
            else:
                dx = torch.mm(dy2, weight.t() if weight_t else weight).add_(t)
    if need_da:
        xd = x2 if x2.dtype == a.dtype else x2.to(a.dtype)
        if keep is not None:
            xd = keep.mul_(xd)
        da = torch.mm(g.t(), xd)  # [R, K] in the parameter's layout, no transposed copy
    if need_db:
        db = torch.mm(dyb.t(), xa.to(b.dtype)).mul_(s)  # [N, R] in the parameter's layout, no transposed copy
    return dx, da, db


# ---------------------------------------------------------------------------------------------------------------
# Op implementations


def _lora_fwd(x, weight, bias, a, b, lb, res, s, p, seed, weight_t, store_xa, backend):
    """The op's computation: (y, xa as [M, R] or None when not stored). The registered kernel and the direct call
    share it.

    This is the decode hot path, so the backend choice is inline and the fused torch path is written out here: at
    decode the weights streaming through evict the interpreter's working set, and every extra Python frame or
    tensor attribute read then costs microseconds (see ops/ia3.py). The torch path takes x of any rank (F.linear
    folds the leading dims in C++, without Python-level views). Its shape and dtype checks cost nothing until they
    fail: a mismatch makes an aten call raise, and ``_check`` then names what was expected; the one mismatch aten
    would accept (a low-rank term that broadcasts to the output) is tested on the fresh, cache-hot results.
    """
    if p != 0.0 and (not 0.0 < p < 1.0 or seed is None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"fastpeft lora_linear: dropout_p must be in [0, 1), got {p}")
        raise ValueError("fastpeft lora_linear: dropout_p > 0 needs a seed tensor (fastpeft.ops.linear.new_seed())")
    if backend != TORCH and (x.is_cuda or backend == TRITON) and _use_triton(x, backend):
        from fastpeft.kernels.lora import lora_fwd

        (r, k), (n, rb) = a.shape, b.shape
        if (x.shape[-1] != k or rb != r or (weight is not None and (weight.dtype != x.dtype
                or weight.shape != ((k, n) if weight_t else (n, k))))):
            _check(x, weight, a, b, weight_t)  # raises, naming what was expected
        lead = x.shape[:-1]
        x2 = x if len(lead) == 1 else x.reshape(-1, k)
        res2 = res if res is None or len(lead) == 1 else res.reshape(-1, n)
        y, xa = lora_fwd(x2, weight, bias, a, b, lb, res2, s, p, _device_seed(seed, x) if p > 0.0 else 0,
                         weight_t=weight_t, store_xa=store_xa)
        return y if len(lead) == 1 else y.view(*lead, n), xa if store_xa else None
    seed_i = 0 if seed is None else int(seed)
    try:
        xd = x if x.dtype == a.dtype else x.to(a.dtype)
        if p > 0.0:
            xd = keep_mask_torch(seed_i, tuple(xd.shape), p, xd.device, xd.dtype).mul_(xd)
        xa = _linear(xd, a)  # [..., R]
        if p > 0.0:
            xa.mul_(1.0 / (1.0 - p))
        if weight is not None:
            y = _linear(x, weight.t() if weight_t else weight, bias)  # [..., N]
            if res is not None:
                y.add_(res)
        else:
            y = res.clone()
        r = xa.shape[-1]
        if xa.numel() <= _SMALL_M * r or lb is not None or y.dtype != b.dtype:
            # small M, lora_B bias, or a bf16 base with fp32 adapters (added in fp32, rounded once, as PEFT does)
            z = _linear(xa, b, lb)
            if z.shape != y.shape:  # add_ would broadcast a one-column low-rank term
                raise RuntimeError(f"fastpeft lora_linear: low-rank term {tuple(z.shape)} does not match the "
                                   f"output {tuple(y.shape)}")
            y.add_(z, alpha=s)
        else:
            y.view(-1, b.shape[0]).addmm_(xa.view(-1, r), b.t(), alpha=s)  # in place: no [M, N] temporary
    except RuntimeError:
        _check(x, weight, a, b, weight_t)  # raises, naming what was expected, where the inputs do not fit
        raise
    return y, xa.view(-1, r) if store_xa else None


def _lora_linear_impl(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
                      store_xa, backend):
    y, xa = _lora_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
                      store_xa, backend)
    return y, x.new_empty((0,), dtype=lora_a.dtype) if xa is None else xa


def _lora_bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t, need_dx, need_da, need_db,
              backend):
    """The backward op's computation: (dx, da, db), None where not requested. ``lora_a`` is None where dX is not
    requested (A is read for dX alone, so autograd need not hold it): a stand-in of its shape and dtype (B's, which
    the caller checked) is made for the launchers' checks, never read."""
    k, n = x.shape[-1], dy.shape[-1]
    if lora_a is None:
        lora_a = torch.empty((lora_b.shape[1], k), dtype=lora_b.dtype, device=x.device)
    x2, dy2 = x.reshape(-1, k), dy.reshape(-1, n)
    if _use_triton(x, backend):
        from fastpeft.kernels.lora import lora_bwd

        seed_t = _device_seed(seed, x) if dropout_p > 0.0 else 0
        dx, da, db = lora_bwd(dy2, x2, weight, lora_a, lora_b, xa, scaling, dropout_p, seed_t, weight_t=weight_t,
                              need_dx=need_dx, need_da=need_da, need_db=need_db)
    else:
        seed_i = 0 if seed is None else int(seed)
        dx, da, db = _bwd_torch(dy2, x2, weight, lora_a, lora_b, xa, scaling, dropout_p, seed_i, weight_t, need_dx,
                                need_da, need_db)
    return None if dx is None else dx.view(x.shape), da, db


def _lora_linear_backward_impl(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t, need_dx,
                               need_da, need_db, backend):
    dx, da, db = _lora_bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t, need_dx, need_da,
                           need_db, backend)
    # unrequested outputs are distinct empty tensors: custom-op outputs may not alias each other
    return (x.new_empty((0,)) if dx is None else dx, x.new_empty((0,)) if da is None else da,
            x.new_empty((0,)) if db is None else db)


for _key in ("CPU", "CUDA"):
    _lib.impl("lora_linear", _lora_linear_impl, _key)
    _lib.impl("lora_linear_backward", _lora_linear_backward_impl, _key)


@torch.library.register_fake("fastpeft::lora_linear", lib=_lib)
def _lora_linear_fake(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
                      store_xa, backend):
    y = x.new_empty((*x.shape[:-1], lora_b.shape[0]))
    m = x.numel() // x.shape[-1] if store_xa else 0
    xa = x.new_empty((m, lora_a.shape[0]) if store_xa else (0,), dtype=lora_a.dtype)
    return y, xa


@torch.library.register_fake("fastpeft::lora_linear_backward", lib=_lib)
def _lora_linear_backward_fake(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t, need_dx,
                               need_da, need_db, backend):
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            lora_b.new_empty((lora_b.shape[1], x.shape[-1])) if need_da else x.new_empty((0,)),
            lora_b.new_empty(lora_b.shape) if need_db else x.new_empty((0,)))



# The resolved overloads: calling ``torch.ops.fastpeft.<op>`` (the overload packet) resolves the overload on every
# call, about 9 us of host time per layer at decode; an OpOverload goes straight to the dispatcher.
_lora_linear_op = torch.ops.fastpeft.lora_linear.default
_lora_linear_backward_op = torch.ops.fastpeft.lora_linear_backward.default


# ---------------------------------------------------------------------------------------------------------------
# Autograd


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
                backend):
        fwd = _lora_fwd if direct_call(x) else _lora_linear_op
        y, xa = fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t, True,
                    backend)
        # W and A are read for dX alone: where the input needs no gradient (the first adapted layer) PEFT's graph
        # holds neither, and nothing here may hold more
        nx = ctx.needs_input_grad[0]
        save_a = nx or lora_a.dtype != lora_b.dtype  # the backward takes A's dtype from B's
        ctx.save_for_backward(x, weight if nx else None, lora_a if save_a else None, lora_b, xa, seed)
        ctx.args = (scaling, dropout_p, weight_t, backend, None if weight is None else weight.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
        scaling, dropout_p, weight_t, backend, w_dtype = ctx.args
        nx, nw, nb, na, nbb, nlb, nres = ctx.needs_input_grad[:7]
        bwd = _lora_bwd if direct_call(dy, x) else _lora_linear_backward_op
        dx, da, db = bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t, nx, na, nbb, backend)
        dy2 = dy.reshape(-1, dy.shape[-1])
        dw = dbias = dlb = None
        if nw:  # a trainable base weight is unusual for LoRA but must still be right
            x2 = x.reshape(-1, x.shape[-1])
            dw = (x2.t() @ dy2 if weight_t else dy2.t() @ x2).to(w_dtype)
        if nb:
            dbias = dy2.sum(0).to(w_dtype)
        if nlb:
            dlb = dy2.sum(0, dtype=torch.float32).mul_(scaling).to(lora_b.dtype)
        return (dx if nx else None, dw, dbias, da if na else None, db if nbb else None, dlb, dy if nres else None,
                None, None, None, None, None)


def lora_linear(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
                lora_bias: Tensor | None = None, residual: Tensor | None = None, scaling: float = 1.0,
                dropout_p: float = 0.0, seed: Tensor | None = None, weight_t: bool = False,
                backend: int = AUTO) -> Tensor:
    """``residual + x W^T + b + s * (drop(x) A^T B^T + b_B)`` as one op; differentiable in every tensor.

    Without a gradient to track it calls the op directly (no autograd bookkeeping on the decode path), or, where
    ``direct_call`` allows, the op's implementation.
    """
    if _grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
        or (weight is not None and weight.requires_grad) or (bias is not None and bias.requires_grad)
        or (lora_bias is not None and lora_bias.requires_grad) or (residual is not None and residual.requires_grad)
    ):
        return _LoraLinearFn.apply(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed,
                                   weight_t, backend)
    # direct_call(x), inline: one Python frame less per decode call
    if (not (_is_compiling() or _dispatch_modes() or _function_mode() or _functorch_level() is not None)
            and type(x) is Tensor and (x.is_cpu or x.is_cuda)):
        return _lora_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
                         False, backend)[0]
    return _lora_linear_op(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
                           False, backend)[0]

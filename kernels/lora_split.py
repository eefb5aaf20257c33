"""Launchers of LoRA's split path (M > 16): cuBLAS for the base product, the Triton kernels of
``lora_split_kernels.py`` for the adapter math around it. The math, the bytes and the precision are in that module's
docstring; this one plans launches (tiles, splits, checks), keeps the plans, and describes them for the cost model.

Each of the three kernels has one launcher, used in both directions:

    shrink(x, A)          -> drop(x) A^T        [M, R]   forward xa;  backward g = s dY B (B read transposed)
    expand(xa, B, ...)    -> s xa B^T + ...     [M, N]   forward z;   backward t = keep / (1 - p) (g A)
    wgrad(g, x, param)    -> g^T drop(x)        [R, C]   dA;          dB = s xa^T dY, written as [N, R]

Splits: a reduction over a long axis is cut into S ranges when the remaining axes give too few programs
(``_splits``): wgrad's M to fill the device (two programs per SM), the shrink's K only below an eighth of that and
into at most four ranges (its partials are re-read by every consumer program: ``_SHRINK_FILL``). Unsplit, the
forward shrink stores xa itself in A's dtype, which the expand reads and the backward keeps. The SM count is the
device's; plans made on meta or CPU tensors (the cost model, the AOT test, the interpreter) assume an H100's 132.
Results are deterministic for a given device and shape (fixed ranges, fixed summation order), and may differ in the
last bits between GPUs with different SM counts, as cuBLAS's do.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ._common import (CostStep, KernelSpec, LaunchPlan, PlanCache, TileConfig, _block_rank, _check_2d, _check_device,
                      _check_tensor, _dot_precision, _GROUP_M, _launch, _meta)
from .lora_split_kernels import SPLIT_A, SPLIT_AB, SPLIT_B, SPLIT_NONE, lora_expand_kernel, lora_shrink_kernel, \
    lora_wgrad_kernel

__all__ = ["shrink", "expand", "wgrad", "split_fwd", "split_bwd", "split_cost_steps", "split_shipped_configs"]

def _by_rank(**rows: tuple) -> dict[tuple[int, str], TileConfig]:
    """{(BR cap, class): TileConfig} from each class's three rows, for BR caps 64, 128, 256."""
    return {(cap, cls): TileConfig(*row) for cls, three in rows.items() for cap, row in zip((64, 128, 256), three)}


# Tiles by (BR cap, operand class): "16" for 16-bit dots, "split" for fp32 adapters on a bf16 x (``_mma``'s bf16
# split products: bf16 operands, more of them in registers), "tf32" for 3xTF32 dots (fp32 or fp16 x with fp32
# adapters). TileConfig(BM, BN, BK, warps, stages): the shrink uses BM x BK x BR (loop over K), the expand
# BM x BN x BR (one dot, R in chunks of BK), wgrad BR x BN x BM (loop over M, BN output columns). Rows are sized so
# that the fp32 accumulator stays at about 64 registers a thread and nothing spills on sm_80 or sm_90a
# (tests/test_aot.py), and so that the re-reads of the small operands a grid makes (A by every row block of the
# shrink, xa and B by every column and row block of the expand) stay under the kernel's own DRAM bytes at
# M = 4096 (benchmarks/cost_model.py).
_SHRINK = _by_rank(**{"16": [(64, 0, 64, 4, 3), (64, 0, 32, 4, 3), (32, 0, 32, 4, 3)],
                      "split": [(64, 0, 16, 4, 3), (64, 0, 32, 8, 3), (64, 0, 16, 8, 2)],
                      "tf32": [(32, 0, 32, 4, 3), (32, 0, 16, 4, 2), (16, 0, 16, 8, 2)]})
_EXPAND = _by_rank(**{"16": [(64, 128, 64, 4, 2)] * 3, "split": [(128, 128, 16, 8, 2)] * 3,
                      "tf32": [(64, 64, 16, 4, 2)] * 3})
_WGRAD = _by_rank(**{"16": [(64, 128, 0, 8, 3), (32, 64, 0, 4, 3), (32, 32, 0, 8, 3)],
                     "split": [(32, 64, 0, 4, 3), (32, 32, 0, 4, 2), (16, 16, 0, 4, 2)],
                     "tf32": [(32, 64, 0, 4, 3), (32, 32, 0, 4, 2), (16, 16, 0, 4, 2)]})

_DEFAULT_SMS = 132  # H100 SXM: plans on meta / CPU tensors
_MIN_STEPS = 4  # a split range spans at least this many loop steps (fewer: the partials cost more than they give)
# The shrink's partials [S, M, R] are re-read by every program of its consumers (each column block of the expand and
# of wgrad: N / BN and K / BC of them), so a split of the shrink costs S M R 4 bytes of L2 traffic per consumer
# program, while the shrink itself is one streaming pass over x (M K bytes) that needs enough loads in flight, not
# a full device. So the shrink splits only where its row blocks are under an eighth of the device's programs (M <=
# 2048 at BM = 64 on an H100), into at most four ranges; wgrad's output is its own, so it splits to fill the device.
# The eighth is a judgement the cost model cannot price (it has no occupancy): gpu_check's shrink times are what
# would move it.
_SHRINK_FILL, _SHRINK_MOST = 1 / 8, 4
_SMS: dict[int, int] = {}


def _key(R: int, dot_dtype: torch.dtype, split: int) -> tuple[int, str]:
    return max(64, _block_rank(R)), "split" if split != SPLIT_NONE else "tf32" if dot_dtype == torch.float32 else "16"


def _programs(device: torch.device) -> int:
    """Programs that fill the device: two per SM."""
    if device.type != "cuda":
        return 2 * _DEFAULT_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _SMS[index]


def _splits(tiles: int, length: int, step: int, device: torch.device, fill: float = 1.0,
            most: int | None = None) -> tuple[int, int]:
    """(S, range): ``length`` cut into S ranges of ``range`` (a multiple of ``step``, at least four steps) so that
    ``tiles * S`` programs reach ``fill`` of the device's (``_programs``); S = 1 when the tiles alone do, S at most
    ``most``."""
    want = max(1, -(-int(_programs(device) * fill) // max(tiles, 1)))
    s = max(1, min(want, most or want, length // (_MIN_STEPS * step)))
    span = triton.cdiv(triton.cdiv(max(length, 1), s), step) * step
    return triton.cdiv(max(length, 1), span), span


def _split(exact: torch.dtype, other: torch.dtype, mode: int) -> int:
    """``_mma``'s mode: split fp32 operands into bf16 parts when the other operand is exact in bf16 (a bf16 tensor)
    and the dot would otherwise run as 3xTF32; plain dots otherwise (16-bit adapters, fp16 x, TF32 allowed)."""
    if other != torch.float32 or _dot_precision() != "tf32x3":
        return SPLIT_NONE
    return mode if exact == torch.bfloat16 else SPLIT_NONE


def _seed_ptr(seed: Tensor | None, fallback: Tensor) -> Tensor:
    return fallback if seed is None else seed


def _dropout_args(p: float) -> dict:
    return dict(p=float(p), drop_scale=1.0 / (1.0 - float(p)))


# ---------------------------------------------------------------------------------------------------------------
# shrink: its output is the fp32 partial sums [S, M, R]; the consumers (expand, wgrad, the fused decode kernel) add
# them in a fixed order as they load them, so no launch sums or casts them. Unsplit (S = 1) it can be the result
# itself, already in the dtype a consumer would round the sum to (``whole_dtype``)


def _shrink_out(S, M, R, whole_dtype, device) -> Tensor:
    """The partials [S, M, R] in fp32; with S = 1 and ``whole_dtype``, the result itself in that dtype."""
    dtype = whole_dtype if S == 1 and whole_dtype is not None else torch.float32
    return torch.empty((S, M, R), device=device, dtype=dtype)


def _plan_shrink(x, a, scale, p, seed, transposed, whole_dtype=None) -> tuple[KernelSpec, int]:
    _check_2d("x", x)
    _check_2d("lora_a", a)
    M, K = x.shape
    R, ka = (a.shape[1], a.shape[0]) if transposed else a.shape
    if ka != K:
        raise ValueError(f"shrink: x has {K} columns, the adapter matrix {tuple(a.shape)} expects {ka}")
    stride_ar, stride_ak = (a.stride(1), a.stride(0)) if transposed else (a.stride(0), a.stride(1))
    split = _split(x.dtype, a.dtype, SPLIT_B)
    cfg = _SHRINK[_key(R, a.dtype, split)]  # x is cast to A's dtype: A's dtype is the dot's
    S, k_split = _splits(triton.cdiv(M, cfg.BM), K, cfg.BK, x.device, _SHRINK_FILL, _SHRINK_MOST)
    out = _shrink_out(S, M, R, whole_dtype, x.device)
    args = dict(M=M, K=K, R=R, k_split=k_split, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ar=stride_ar,
                stride_ak=stride_ak, stride_os=out.stride(0), stride_om=out.stride(1), stride_or=out.stride(2),
                **_shrink_dynamic(x, a, out, seed, scale, p))
    constexprs = dict(BM=cfg.BM, BK=cfg.BK, BR=_block_rank(R), HAS_DROPOUT=p > 0.0,
                      SPLIT=split, DOT_PREC=_dot_precision())
    spec = KernelSpec("lora_shrink", lora_shrink_kernel, args, constexprs, cfg.num_warps, cfg.num_stages,
                      (triton.cdiv(M, cfg.BM), S))
    return spec, S


def _shrink_dynamic(x, a, out, seed, scale, p) -> dict:
    return dict(x_ptr=x, a_ptr=a, out_ptr=out, seed_ptr=_seed_ptr(seed, x), scale=float(scale), **_dropout_args(p))


_SHRINK_DYNAMIC = frozenset(_shrink_dynamic(*[torch.empty(1)] * 4, 1.0, 0.0))
_SHRINK_PLANS = PlanCache()


def shrink(x: Tensor, a: Tensor, scale: float, dropout_p: float, seed: Tensor | None,
           transposed: bool = False, whole_dtype: torch.dtype | None = None) -> Tensor:
    """scale * drop(x) A^T as fp32 partial sums over S ranges of K, [S, M, R]: x [M, K]; a [R, K] (or [K, R] with
    ``transposed``: B, for g = s dY B). Where the plan does not split (S = 1) and ``whole_dtype`` is given, the
    result is rounded to that dtype as it is stored (what a consumer would round the sum to)."""
    key = (_meta(x), _meta(a), transposed, dropout_p > 0.0, _dot_precision(), whole_dtype)
    hit = _SHRINK_PLANS.get(key)
    if hit is None:
        spec, S = _plan_shrink(x, a, scale, dropout_p, seed, transposed, whole_dtype)
        _check_device(dict(x=x, a=a, seed=seed))
        _SHRINK_PLANS.put(key, (LaunchPlan.of(spec, _SHRINK_DYNAMIC), S))
        _launch(spec, x.device)
        return spec.args["out_ptr"]
    plan, S = hit
    out = _shrink_out(S, x.shape[0], plan.static["R"], whole_dtype, x.device)
    plan.launch(x.device, _shrink_dynamic(x, a, out, seed, scale, dropout_p))
    return out


def _parts(t: Tensor) -> tuple[int, int, int, int]:
    """(S, stride over S, over rows, over R) of a rank operand: the shrink's [S, M, R] partials or a plain [M, R]."""
    if t.dim() == 3:
        return t.shape[0], t.stride(0), t.stride(1), t.stride(2)
    _check_2d("xa", t)
    return 1, 0, t.stride(0), t.stride(1)


# ---------------------------------------------------------------------------------------------------------------
# expand


def _plan_expand(xa, b, lora_bias, bias, residual, scale, p, seed, out_dtype, transposed,
                 xa_dtype=None) -> tuple[KernelSpec, Tensor, Tensor | None]:
    S, stride_xas, stride_xam, stride_xar = _parts(xa)
    M, R = xa.shape[-2:]
    N, rb = (b.shape[1], b.shape[0]) if transposed else b.shape
    if rb != R:
        raise ValueError(f"expand: xa has rank {R}, the adapter matrix {tuple(b.shape)} has {rb}")
    stride_bn, stride_br = (b.stride(1), b.stride(0)) if transposed else (b.stride(0), b.stride(1))
    if lora_bias is not None:
        _check_tensor("lora_bias", lora_bias, (N,), (b.dtype,))
    if bias is not None:
        _check_tensor("bias", bias, (N,), (out_dtype,))
    if residual is not None:
        _check_tensor("residual", residual, (M, N), (out_dtype,))
    _check_device(dict(xa=xa, b=b, lora_bias=lora_bias, bias=bias, residual=residual))
    split = SPLIT_AB if out_dtype != torch.float32 and _split(torch.bfloat16, b.dtype, 1) else SPLIT_NONE
    cfg = _EXPAND[_key(R, b.dtype, split)]  # xa (or g) is cast to B's (or A's) dtype
    out, xs = _expand_out(M, N, R, out_dtype, xa_dtype, xa.device)
    res, xs_out = residual if residual is not None else out, xs if xs is not None else out
    args = dict(M=M, N=N, R=R, S=S, stride_xas=stride_xas, stride_xam=stride_xam, stride_xar=stride_xar,
                stride_bn=stride_bn, stride_br=stride_br, stride_rm=res.stride(0), stride_rn=res.stride(1),
                stride_om=out.stride(0), stride_on=out.stride(1), stride_xsm=xs_out.stride(0),
                stride_xsr=xs_out.stride(1),
                **_expand_dynamic(xa, b, lora_bias, bias, residual, out, xs, seed, scale, p))
    constexprs = dict(BM=cfg.BM, BN=cfg.BN, BRK=min(cfg.BK, _block_rank(R)), GROUP_M=_GROUP_M,
                      HAS_LORA_BIAS=lora_bias is not None, HAS_BIAS=bias is not None,
                      HAS_RESIDUAL=residual is not None, HAS_DROPOUT=p > 0.0, STORE_XA=xs is not None,
                      SPLIT=split, DOT_PREC=_dot_precision())
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    spec = KernelSpec("lora_expand", lora_expand_kernel, args, constexprs, cfg.num_warps, cfg.num_stages, grid)
    return spec, out, xs


def _expand_out(M, N, R, out_dtype, xa_dtype, device) -> tuple[Tensor, Tensor | None]:
    out = torch.empty((M, N), device=device, dtype=out_dtype)
    return out, (None if xa_dtype is None else torch.empty((M, R), device=device, dtype=xa_dtype))


def _expand_dynamic(xa, b, lora_bias, bias, residual, out, xs, seed, scale, p) -> dict:
    return dict(xa_ptr=xa, b_ptr=b, lbias_ptr=lora_bias if lora_bias is not None else b,
                bias_ptr=bias if bias is not None else out, res_ptr=residual if residual is not None else out,
                out_ptr=out, xs_ptr=xs if xs is not None else out, seed_ptr=_seed_ptr(seed, out),
                scale=float(scale), **_dropout_args(p))


_EXPAND_DYNAMIC = frozenset(_expand_dynamic(*[torch.empty(1)] * 8, 1.0, 0.0))
_EXPAND_PLANS = PlanCache()


def expand(xa: Tensor, b: Tensor, lora_bias: Tensor | None, bias: Tensor | None, residual: Tensor | None,
           scale: float, dropout_p: float, seed: Tensor | None, out_dtype: torch.dtype, transposed: bool = False,
           xa_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """drop(scale (xa B^T + lora_bias)) + bias + residual, [M, N] in out_dtype: xa [S, M, R] partials (or [M, R]);
    b [N, R] (or [R, N] with ``transposed``: A, for t = g A). With ``xa_dtype`` also xa itself, summed and
    rounded to that dtype, [M, R] (else None)."""
    key = (_meta(xa), _meta(b), _meta(lora_bias), _meta(bias), _meta(residual), out_dtype, transposed, xa_dtype,
           dropout_p > 0.0, _dot_precision())
    plan = _EXPAND_PLANS.get(key)
    if plan is None:
        spec, out, xs = _plan_expand(xa, b, lora_bias, bias, residual, scale, dropout_p, seed, out_dtype, transposed,
                                     xa_dtype)
        _EXPAND_PLANS.put(key, LaunchPlan.of(spec, _EXPAND_DYNAMIC))
        _launch(spec, xa.device)
        return out, xs
    out, xs = _expand_out(xa.shape[-2], plan.static["N"], plan.static["R"], out_dtype, xa_dtype, xa.device)
    plan.launch(xa.device, _expand_dynamic(xa, b, lora_bias, bias, residual, out, xs, seed, scale, dropout_p))
    return out, xs


# ---------------------------------------------------------------------------------------------------------------
# wgrad


def _plan_wgrad(g, x, param, scale, p, seed, rows_r) -> tuple[KernelSpec, int]:
    S_g, stride_gs, stride_gm, stride_gr = _parts(g)
    _check_2d("x", x)
    (M, R), C = g.shape[-2:], x.shape[1]
    if x.shape[0] != M:
        raise ValueError(f"wgrad: g has {M} rows, x has {x.shape[0]}")
    _check_tensor("param", param, (R, C) if rows_r else (C, R))
    split = _split(x.dtype, param.dtype, SPLIT_A)
    cfg = _WGRAD[_key(R, param.dtype, split)]  # both operands are cast to the parameter's dtype
    S, m_split = _splits(triton.cdiv(C, cfg.BN), M, cfg.BM, x.device)
    out = _wgrad_out(R, C, S, param.dtype, rows_r, x.device)
    stride_or, stride_oc = (out.stride(-2), out.stride(-1)) if rows_r else (out.stride(-1), out.stride(-2))
    args = dict(M=M, C=C, R=R, m_split=m_split, S_g=S_g, stride_gs=stride_gs, stride_gm=stride_gm,
                stride_gr=stride_gr, stride_xm=x.stride(0), stride_xc=x.stride(1),
                stride_os=out.stride(0) if S > 1 else 0, stride_or=stride_or, stride_oc=stride_oc,
                **_wgrad_dynamic(g, x, param, out, seed, scale, p))
    constexprs = dict(BM=cfg.BM, BC=cfg.BN, BR=_block_rank(R), HAS_DROPOUT=p > 0.0,
                      SPLIT=split, DOT_PREC=_dot_precision())
    spec = KernelSpec("lora_wgrad", lora_wgrad_kernel, args, constexprs, cfg.num_warps, cfg.num_stages,
                      (triton.cdiv(C, cfg.BN), S))
    return spec, S


def _wgrad_out(R, C, S, dtype, rows_r, device) -> Tensor:
    shape = (R, C) if rows_r else (C, R)
    if S == 1:
        return torch.empty(shape, device=device, dtype=dtype)
    return torch.empty((S, *shape), device=device, dtype=torch.float32)


def _wgrad_dynamic(g, x, param, out, seed, scale, p) -> dict:
    return dict(g_ptr=g, x_ptr=x, ref_ptr=param, out_ptr=out, seed_ptr=_seed_ptr(seed, x), scale=float(scale),
                **_dropout_args(p))


_WGRAD_DYNAMIC = frozenset(_wgrad_dynamic(*[torch.empty(1)] * 5, 1.0, 0.0))
_WGRAD_PLANS = PlanCache()


def wgrad(g: Tensor, x: Tensor, param: Tensor, scale: float, dropout_p: float, seed: Tensor | None,
          rows_r: bool) -> Tensor:
    """scale * g^T drop(x) reduced over the M rows: g [M, R] (or the shrink's [S, M, R] partials), x [M, C]; the
    result in ``param``'s dtype and layout, [R, C] (``rows_r``: dA) or [C, R] (dB)."""
    if x.shape[0] == 0:  # a sum over no rows
        return torch.zeros(param.shape, device=param.device, dtype=param.dtype)
    key = (_meta(g), _meta(x), _meta(param), rows_r, dropout_p > 0.0, _dot_precision())
    hit = _WGRAD_PLANS.get(key)
    if hit is None:
        spec, S = _plan_wgrad(g, x, param, scale, dropout_p, seed, rows_r)
        _check_device(dict(g=g, x=x, param=param, seed=seed))
        _WGRAD_PLANS.put(key, (LaunchPlan.of(spec, _WGRAD_DYNAMIC), S))
        out = spec.args["out_ptr"]
        _launch(spec, x.device)
    else:
        plan, S = hit
        out = _wgrad_out(plan.static["R"], plan.static["C"], S, param.dtype, rows_r, x.device)
        plan.launch(x.device, _wgrad_dynamic(g, x, param, out, seed, scale, dropout_p))
    if S == 1:
        return out
    out = out.sum(0)  # the M ranges' partials, in a fixed order
    return out if param.dtype == torch.float32 else out.to(param.dtype)


# ---------------------------------------------------------------------------------------------------------------
# the layer


def _check_base_weight(weight, N, K, dtype, weight_t) -> None:
    """nn.Linear's [N, K] or Conv1D's [K, N] (``weight_t``) base weight, in x's dtype, or None."""
    if weight is not None:
        _check_tensor("weight", weight, (K, N) if weight_t else (N, K), (dtype,))


# (metadata of a layer call) for the calls whose layer-level checks passed: a repeated call (every training step)
# skips them, as the launchers skip theirs on a kept plan
_CHECKED = PlanCache()


def _checked(key: tuple, check) -> None:
    if _CHECKED.get(key) is None:
        check()
        _CHECKED.put(key, True)


def _xa_to_store(part: Tensor, a_dtype: torch.dtype, store_xa: bool) -> torch.dtype | None:
    """The dtype in which the expand stores xa for the backward, or None: unsplit, the shrink's output is xa itself
    (in A's dtype), and nothing more is stored."""
    return a_dtype if store_xa and part.shape[0] > 1 else None


def split_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
              lora_bias: Tensor | None, residual: Tensor | None, scaling: float, dropout_p: float,
              seed: Tensor | None, weight_t: bool = False, store_xa: bool = True) -> tuple[Tensor, Tensor | None]:
    """y = residual + x W^T + bias + s (drop(x) A^T B^T + lora_bias) and xa = drop(x) A^T: shrink, expand (bias and
    residual folded in), then cuBLAS adds x W^T into it in place. Arguments as ``lora.lora_fwd`` (shapes of x and
    the adapters checked by the caller)."""
    M, K = x.shape
    N = lora_b.shape[0]

    def check():
        _check_base_weight(weight, N, K, x.dtype, weight_t)
        if bias is not None and weight is None:
            raise ValueError("bias without weight: the base term is absent, pass bias=None")
        _check_device(dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_bias=lora_bias,
                           residual=residual))

    _checked(("fwd", _meta(x), _meta(weight), _meta(bias), _meta(lora_a), _meta(lora_b), weight_t), check)
    part = shrink(x, lora_a, 1.0, dropout_p, seed, whole_dtype=lora_a.dtype)
    y, xa = expand(part, lora_b, lora_bias, bias, residual, scaling, 0.0, None, x.dtype,
                   xa_dtype=_xa_to_store(part, lora_a.dtype, store_xa))
    if store_xa and xa is None:
        xa = part[0]
    if weight is not None:
        y.addmm_(x, weight if weight_t else weight.t())
    return y, xa


def split_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, lora_a: Tensor, lora_b: Tensor, xa: Tensor | None,
              scaling: float, dropout_p: float, seed: Tensor | None, weight_t: bool = False, need_dx: bool = True,
              need_da: bool = True, need_db: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """dx = dy W + keep / (1 - p) (s dy B) A, da = (s dy B)^T drop(x), db = s dy^T xa. Arguments as
    ``lora.lora_bwd`` (shapes of x and the adapters checked by the caller)."""
    M, K = x.shape
    N = lora_b.shape[0]

    def check():
        _check_2d("dy", dy)
        _check_tensor("dy", dy, (M, N), (x.dtype,))
        _check_base_weight(weight, N, K, x.dtype, weight_t)
        if need_db:
            if xa is None:
                raise ValueError("need_db needs xa (the forward's drop(x) A^T): call lora_fwd with store_xa=True")
            _check_tensor("xa", xa, (M, lora_a.shape[0]), (lora_a.dtype,))
        _check_device(dict(dy=dy, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, xa=xa if need_db else None))

    _checked(("bwd", _meta(dy), _meta(x), _meta(weight), _meta(lora_a), _meta(lora_b),
              _meta(xa) if need_db else None, weight_t, need_db), check)
    dx = da = db = None
    if need_dx or need_da:
        g = shrink(dy, lora_b, scaling, 0.0, None, transposed=True)  # [S, M, R] fp32 partials
        if need_dx:
            dx, _ = expand(g, lora_a, None, None, None, 1.0, dropout_p, seed, x.dtype, transposed=True)
            if weight is not None:
                dx.addmm_(dy, weight.t() if weight_t else weight)
        if need_da:
            da = wgrad(g, x, lora_a, 1.0, dropout_p, seed, rows_r=True)
    if need_db:
        db = wgrad(xa, dy, lora_b, scaling, 0.0, None, rows_r=False)
    return dx, da, db


# ---------------------------------------------------------------------------------------------------------------
# what the plans launch: for the cost model and the AOT test


def _meta_tensors(M, N, K, R, x_dtype, a_dtype):
    e = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    return (e(M, K, dtype=x_dtype), e(N, K, dtype=x_dtype), e(N, dtype=x_dtype), e(R, K, dtype=a_dtype),
            e(N, R, dtype=a_dtype), e(M, N, dtype=x_dtype), e(M, R, dtype=a_dtype), e(dtype=torch.int64))


def _rate(split: int, *dtypes) -> tuple[str, int]:
    if split != SPLIT_NONE:
        return "bf16", 3
    if torch.float32 not in dtypes:
        return "bf16", 1
    return "tf32", 3 if _dot_precision() == "tf32x3" else 1


def _bytes(t) -> int:
    return t.numel() * t.element_size()


def _kernel_step(spec: KernelSpec, S: int) -> list[CostStep]:
    """The Triton launch's compulsory bytes and FLOPs (and its re-reads), plus the sum of wgrad's partials when its
    S > 1 (the shrink's partials are summed by their consumers as they load them)."""
    a, c = spec.args, spec.constexprs
    M, R = a["M"], a["R"]
    out = a["out_ptr"]
    if spec.name == "lora_shrink":
        x, w = a["x_ptr"], a["a_ptr"]
        K = a["K"]
        flops, rate = 2 * M * K * R, _rate(c["SPLIT"], w.dtype)
        dram = M * K * x.element_size() + R * K * w.element_size() + _bytes(out)
        l2 = (spec.grid[0] - 1) * R * K * w.element_size()  # every row block reads its K range of A
    elif spec.name == "lora_expand":
        xa, b, N = a["xa_ptr"], a["b_ptr"], a["N"]
        flops, rate = 2 * M * N * R, _rate(c["SPLIT"], b.dtype)
        dram = _bytes(xa) + N * R * b.element_size() + _bytes(out)
        dram += _bytes(a["xs_ptr"]) if c["STORE_XA"] else 0
        dram += (N * b.element_size() if c["HAS_LORA_BIAS"] else 0) + (N * out.element_size() if c["HAS_BIAS"] else 0)
        dram += _bytes(out) if c["HAS_RESIDUAL"] else 0
        num_m, num_n = triton.cdiv(M, c["BM"]), triton.cdiv(N, c["BN"])
        l2 = (num_n - 1) * _bytes(xa) + (num_m - 1) * N * R * b.element_size()
    else:
        g, x, C = a["g_ptr"], a["x_ptr"], a["C"]
        flops, rate = 2 * M * C * R, _rate(c["SPLIT"], a["ref_ptr"].dtype)
        dram = _bytes(g) + M * C * x.element_size() + _bytes(out)
        l2 = (spec.grid[0] - 1) * _bytes(g)  # every column block reads all of g
    steps = [CostStep(spec.name, "triton", flops, rate[0], rate[1], dram, l2)]
    if spec.name == "lora_wgrad" and S > 1:  # Tensor.sum(0) of the fp32 partials (and a cast to 16 bits)
        steps.append(CostStep(f"{spec.name}_sum", "torch", 0, "none", 1, _bytes(out) * (S + 1) // S, 0))
    return steps


def _gemm_step(name, M, N, K, dtype, with_c=True) -> CostStep:
    size = torch.empty((), dtype=dtype).element_size()
    rate = ("fp32", 1) if dtype == torch.float32 else ("bf16", 1)  # torch's default: no TF32 in matmuls
    dram = (M * K + N * K + M * N * (2 if with_c else 1)) * size
    return CostStep(name, "cublas", 2 * M * N * K, rate[0], rate[1], dram, 0)


def split_specs(M, N, K, R, x_dtype, a_dtype, dropout_p, train) -> list[tuple[KernelSpec, int]]:
    """The Triton launches (spec, S) that split_fwd (and with ``train`` split_bwd) make, planned on meta tensors
    with bias; the cuBLAS calls between them are in ``split_cost_steps``."""
    x, w, bias, a, b, dy, xa, seed = _meta_tensors(M, N, K, R, x_dtype, a_dtype)
    p = dropout_p
    shrink_x = _plan_shrink(x, a, 1.0, p, seed, False, a_dtype)
    part = shrink_x[0].args["out_ptr"]
    xs_dtype = _xa_to_store(part, a_dtype, True)
    out = [shrink_x, (_plan_expand(part, b, None, bias, None, 2.0, 0.0, None, x_dtype, False, xs_dtype)[0], 1)]
    if train:
        shrink_dy = _plan_shrink(dy, b, 2.0, 0.0, None, True)
        g = shrink_dy[0].args["out_ptr"]
        out += [shrink_dy, (_plan_expand(g, a, None, None, None, 1.0, p, seed, x_dtype, True)[0], 1),
                _plan_wgrad(g, x, a, 1.0, p, seed, True), _plan_wgrad(xa, dy, b, 2.0, 0.0, None, False)]
    return out


def split_cost_steps(M, N, K, R, x_dtype, a_dtype, dropout_p, train=False) -> list[CostStep]:
    """Every launch of the split plan in order, with its FLOPs and bytes: the shrink, the expand, cuBLAS's base
    GEMM (reading z as C); with ``train`` the backward's shrink on dY, the masked expand, cuBLAS's dY W, dA, dB."""
    specs = split_specs(M, N, K, R, x_dtype, a_dtype, dropout_p, train)
    steps = _kernel_step(*specs[0]) + _kernel_step(*specs[1]) + [_gemm_step("cublas_addmm", M, N, K, x_dtype)]
    if train:
        steps += _kernel_step(*specs[2]) + _kernel_step(*specs[3]) + [_gemm_step("cublas_addmm_dx", M, K, N, x_dtype)]
        steps += _kernel_step(*specs[4]) + _kernel_step(*specs[5])
    return steps


_ROLES = ("shrink", "expand", "shrink-dy", "expand-dx", "wgrad-da", "wgrad-db")  # split_specs' order


def split_shipped_configs() -> list[tuple[str, KernelSpec]]:
    """(id, spec) for every split-kernel tile row: each rank class at its largest rank, 16-bit and fp32 adapters
    on a bf16 x and fp32 on fp32, with dropout, bias, and the splits of a prefill shape."""
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    out = []
    for x_dt, a_dt in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                       (torch.bfloat16, torch.float32), (torch.float32, torch.float32)):
        for R in (64, 128, 256):
            tag = f"{short[x_dt]}x-{short[a_dt]}a-r{R}"
            specs = split_specs(4096, 4096, 4096, R, x_dt, a_dt, 0.1, True)
            for role, (spec, _) in zip(_ROLES, specs):
                out.append((f"{role}-{tag}", spec))
    return out

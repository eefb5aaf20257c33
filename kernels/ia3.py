"""IA3 launchers: the adapted-linear kernels (``adapted_linear.py``) with the low-rank part off and IA3's scaling on.

    output scaling:  y = (x W^T + b) * l[n]      dx = (dy * l[n]) W      dl[n] = sum_m base[m, n] dy[m, n]
                                                                           = sum_m y[m, n] dy[m, n] / l[n]
    input scaling:   y = (x * l[k]) W^T + b      dx = (dy W) * l[k]      dl[k] = sum_m x[m, k] (dy W)[m, k]

x [M, K]; W [N, K] (or [K, N], GPT-2 Conv1D, ``weight_t``); l [K] (input) or [N] (output), in any of fp16/bf16/fp32
whatever x's dtype (PEFT keeps fp32 vectors on bf16 models). One forward launch. One backward launch forms dx and
dl's fp32 partial sums, one row per M tile, [cdiv(M, BM), K or N]; torch's ``Tensor.sum(0)`` adds the rows (a
fixed-order reduction: dl is deterministic, and no atomics are used).

Precision: products accumulate in fp32, y / base / dx are cast to x's dtype once, dl is returned in fp32. The
scaled input is rounded as PEFT rounds it, ``(x.to(l.dtype) * l).to(x.dtype)``, and the scaled output gradient
``dy * l`` to dy's dtype, before their matmuls; y = (x W^T + b) * l is rounded once (PEFT rounds the base output
first, then the product).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ._common import (_DTYPES, _GROUP_M, KernelSpec, LaunchPlan, PlanCache, _check_2d, _check_device, _check_tensor,
                      _dot_precision, _ia3_config, _launch, _meta, _weight_strides)
from .adapted_linear import linear_bwd_dx_kernel, linear_fwd_kernel

__all__ = ["ia3_fwd", "ia3_bwd", "ia3_shipped_configs"]

# the low-rank arguments of the shared kernels, unused with HAS_LORA=False
_NO_LORA_FWD = dict(R=0, S=0, stride_ar=0, stride_ak=0, stride_bn=0, stride_br=0, stride_rm=0, stride_rn=0,
                    stride_xam=0, stride_xar=0, stride_ps=0, stride_pm=0, stride_pr=0, scaling=1.0, p=0.0,
                    drop_scale=1.0)


def _check_vector(l, features: int, scale_input: bool) -> None:
    if not isinstance(l, Tensor):
        raise TypeError(f"l: expected a torch.Tensor, got {type(l).__name__}")
    if tuple(l.shape) != (features,):
        side = "in_features (input scaling)" if scale_input else "out_features (output scaling)"
        raise ValueError(f"l: expected a 1-D IA3 vector of shape ({features},), {side}; got {tuple(l.shape)}")
    _check_tensor("l", l, (features,), _DTYPES)


def _weight_dims(weight, weight_t: bool, K: int | None = None, N: int | None = None) -> tuple[int, int]:
    """(N, K) of the weight ([N, K], or [K, N] with ``weight_t``), checked against the K or N the caller knows."""
    _check_2d("weight", weight)
    n, k = (weight.shape[1], weight.shape[0]) if weight_t else tuple(weight.shape)
    layout = "[K, N] (weight_t)" if weight_t else "[N, K]"
    for dim, want, got in (("K", K, k), ("N", N, n)):
        if want is not None and want != got:
            raise ValueError(f"weight: expected a {layout} weight with {dim} = {want}, got shape {tuple(weight.shape)}")
    return n, k


def _fwd_outputs(x, N: int, store_base: bool) -> tuple[Tensor, Tensor | None]:
    y = torch.empty((x.shape[0], N), device=x.device, dtype=x.dtype)
    return y, (torch.empty_like(y) if store_base else None)  # base is written through y's strides


def _fwd_dynamic(x, weight, bias, l, y, base) -> dict:
    """The forward's per-call tensors (the low-rank ones, and absent ones, point at a harmless stand-in)."""
    return dict(x_ptr=x, w_ptr=weight, bias_ptr=bias if bias is not None else y, a_ptr=x, b_ptr=x, lbias_ptr=x,
                res_ptr=y, l_ptr=l, y_ptr=y, xa_ptr=y, base_ptr=base if base is not None else y, seed_ptr=y, xap_ptr=y)


def _bwd_outputs(dy, K: int, num_m: int, scale_input: bool, need_dx: bool, need_dl: bool):
    """dx (None unless asked for) and dl's fp32 partial sums, one row per M tile (None unless asked for)."""
    M, N = dy.shape
    return (torch.empty((M, K), device=dy.device, dtype=dy.dtype) if need_dx else None,
            torch.empty((num_m, K if scale_input else N), device=dy.device, dtype=torch.float32) if need_dl else None)


def _bwd_dynamic(dy, saved, weight, l, dx, part) -> dict:
    return dict(dy_ptr=dy, w_ptr=weight, l_ptr=l, s_ptr=saved if part is not None else dy,
                dx_ptr=dx if dx is not None else dy, dl_ptr=part if part is not None else dy)


# the names of the per-call arguments, read off the builders themselves (so the two cannot drift apart)
_FWD_DYNAMIC = frozenset(_fwd_dynamic(*[torch.empty(1, 1)] * 6))
_BWD_DYNAMIC = frozenset(_bwd_dynamic(*[torch.empty(1, 1)] * 6))
_FWD_PLANS, _BWD_PLANS = PlanCache(), PlanCache()


def _plan_ia3_fwd(x, weight, bias, l, scale_input, weight_t, store_base) -> tuple[KernelSpec, Tensor, Tensor | None]:
    _check_2d("x", x)
    M, K = x.shape
    N, _ = _weight_dims(weight, weight_t, K=K)
    _check_tensor("x", x, (M, K))
    stride_wn, stride_wk = _weight_strides(weight, N, K, x.dtype, weight_t)
    if bias is not None:
        _check_tensor("bias", bias, (N,), (x.dtype,))
    _check_vector(l, K if scale_input else N, scale_input)
    _check_device(dict(x=x, weight=weight, bias=bias, l=l))

    store_base = bool(store_base) and not scale_input
    y, base = _fwd_outputs(x, N, store_base)
    cfg, _ = _ia3_config(M, x.dtype)
    args = dict(
        M=M, N=N, K=K, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
        stride_l=l.stride(0), stride_ym=y.stride(0), stride_yn=y.stride(1), **_NO_LORA_FWD,
        **_fwd_dynamic(x, weight, bias, l, y, base),
    )
    constexprs = dict(
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=16, GROUP_M=_GROUP_M, HAS_BASE=True, HAS_BIAS=bias is not None,
        HAS_LORA=False, HAS_LORA_BIAS=False, HAS_RESIDUAL=False, HAS_DROPOUT=False, STORE_XA=False,
        SCALE_INPUT=bool(scale_input), SCALE_OUTPUT=not scale_input, STORE_BASE=store_base, XA_IN=False,
        DOT_PREC=_dot_precision(),
    )
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    spec = KernelSpec("ia3_fwd", linear_fwd_kernel, args, constexprs, cfg.num_warps, cfg.num_stages, grid)
    return spec, y, base


def ia3_fwd(x2: Tensor, weight: Tensor, bias: Tensor | None, l: Tensor, scale_input: bool, weight_t: bool,
            store_base: bool) -> tuple[Tensor, Tensor | None]:
    """IA3-scaled linear in one launch: y = (x * l) W^T + b (``scale_input``) or y = (x W^T + b) * l.

    x2 [M, K] (any strides); weight [N, K], or [K, N] with ``weight_t``, in x's dtype; bias [N] in x's dtype or
    None; l [K] or [N] in fp16/bf16/fp32. Returns y [M, N] in x's dtype and, for output scaling with
    ``store_base``, the unscaled base output x W^T + b [M, N] in x's dtype (else None; input scaling has none).
    """
    key = (_meta(x2), _meta(weight), _meta(bias), _meta(l), scale_input, weight_t, store_base, _dot_precision())
    plan = _FWD_PLANS.get(key)
    if plan is None:  # first call with this metadata: full checks, then the plan is kept
        spec, y, base = _plan_ia3_fwd(x2, weight, bias, l, scale_input, weight_t, store_base)
        _FWD_PLANS.put(key, LaunchPlan.of(spec, _FWD_DYNAMIC))
        _launch(spec, x2.device)
        return y, base
    y, base = _fwd_outputs(x2, plan.static["N"], plan.static["STORE_BASE"])
    plan.launch(x2.device, _fwd_dynamic(x2, weight, bias, l, y, base))
    return y, base


def _plan_ia3_bwd(dy, saved, weight, l, scale_input, weight_t, saved_is_base, need_dx,
                  need_dl) -> tuple[KernelSpec | None, Tensor | None, Tensor | None]:
    _check_2d("dy", dy)
    M, N = dy.shape
    _, K = _weight_dims(weight, weight_t, N=N)
    _check_tensor("dy", dy, (M, N))
    stride_wn, stride_wk = _weight_strides(weight, N, K, dy.dtype, weight_t)
    _check_vector(l, K if scale_input else N, scale_input)
    if need_dl:
        _check_2d("saved", saved)
        _check_tensor("saved", saved, (M, K) if scale_input else (M, N), (dy.dtype,))
    _check_device(dict(dy=dy, saved=saved if need_dl else None, weight=weight, l=l))
    if not (need_dx or need_dl):
        return None, None, None

    cfg = _ia3_config(M, dy.dtype)[1]
    num_m = triton.cdiv(M, cfg.BM)
    form_dx = need_dx or (scale_input and need_dl)  # input-scaling dl reduces the dx tile, so the grid spans K
    dx, part = _bwd_outputs(dy, K, num_m, scale_input, need_dx, need_dl)
    dyn = _bwd_dynamic(dy, saved, weight, l, dx, part)
    dx_out, s_in, part_out = dyn["dx_ptr"], dyn["s_ptr"], dyn["dl_ptr"]
    args = dict(
        M=M, N=N, K=K, stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
        stride_l=l.stride(0), stride_sm=s_in.stride(0), stride_sc=s_in.stride(1), stride_dxm=dx_out.stride(0),
        stride_dxk=dx_out.stride(1), stride_dlm=part_out.stride(0), **dyn,
    )
    constexprs = dict(
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, GROUP_M=_GROUP_M, NEED_DX=bool(need_dx), SCALE_INPUT=bool(scale_input),
        SCALE_OUTPUT=not scale_input,
        STORE_DL=bool(need_dl), DL_DIV=bool(need_dl and not scale_input and not saved_is_base),
        DOT_PREC=_dot_precision(),
    )
    grid = (num_m * (triton.cdiv(K, cfg.BK) if form_dx else 1),)
    spec = KernelSpec("ia3_bwd_dx", linear_bwd_dx_kernel, args, constexprs, cfg.num_warps, cfg.num_stages, grid)
    return spec, dx, part


def ia3_bwd(dy2: Tensor, saved: Tensor, weight: Tensor, l: Tensor, scale_input: bool, weight_t: bool,
            saved_is_base: bool, need_dx: bool, need_dl: bool) -> tuple[Tensor | None, Tensor | None]:
    """Backward of ``ia3_fwd`` in one launch (plus the row sum of dl's partials).

    dy2 [M, N] in x's dtype; saved: x [M, K] for input scaling, for output scaling the base output [M, N]
    (``saved_is_base``) or y [M, N] (then l must have no zero entry: the base is recovered as y / l, one division
    per column after the row sum); only read for dl. Returns dx [M, K] in x's dtype and dl [K or N] in fp32, each
    None when not asked for. dW and dbias are not formed (the base layer is frozen).
    """
    key = (_meta(dy2), _meta(saved) if need_dl else None, _meta(weight), _meta(l), scale_input, weight_t,
           saved_is_base, need_dx, need_dl, _dot_precision())
    plan = _BWD_PLANS.get(key)
    if plan is None:  # first call with this metadata: full checks, then the plan is kept
        spec, dx, part = _plan_ia3_bwd(dy2, saved, weight, l, scale_input, weight_t, saved_is_base, need_dx,
                                       need_dl)
        if spec is None:
            return None, None
        _BWD_PLANS.put(key, LaunchPlan.of(spec, _BWD_DYNAMIC))
        _launch(spec, dy2.device)
    else:
        st = plan.static
        dx, part = _bwd_outputs(dy2, st["K"], triton.cdiv(st["M"], st["BM"]), scale_input, need_dx, need_dl)
        plan.launch(dy2.device, _bwd_dynamic(dy2, saved, weight, l, dx, part))
    dl = None if part is None else (part[0] if part.shape[0] == 1 else part.sum(0))
    return dx, dl


def ia3_shipped_configs() -> list[tuple[str, KernelSpec]]:
    """(id, spec) for every IA3 config the heuristics can pick: both tables' rows IA3 uses (decode / prefill x
    16-bit / fp32 x) for input and output scaling, with the costliest features on (bias, the stored base, dx and
    dl, dl from y); a 16-bit row is planned for bf16 x with fp32 vectors (PEFT's default, the most casts).
    tests/_aot.py compiles the remaining flag combinations once."""
    out = []
    for x_dt, tag_dt in ((torch.bfloat16, "bf16x-fp32l"), (torch.float32, "fp32x-fp32l")):
        for decode in (True, False):
            M, N, K = (16 if decode else 4096), 4096, 4096
            x, w, bias, dy = (torch.empty(s, dtype=x_dt, device="meta") for s in ((M, K), (N, K), (N,), (M, N)))
            for scale_input in (False, True):
                l = torch.empty(K if scale_input else N, dtype=torch.float32, device="meta")
                tag = f"{'in' if scale_input else 'out'}-{tag_dt}-{'decode' if decode else 'prefill'}"
                out.append((f"ia3-fwd-{tag}", _plan_ia3_fwd(x, w, bias, l, scale_input, False, True)[0]))
                saved = x if scale_input else dy
                out.append((f"ia3-dx-{tag}", _plan_ia3_bwd(dy, saved, w, l, scale_input, False, False, True, True)[0]))
    return out

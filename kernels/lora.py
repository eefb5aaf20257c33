"""LoRA launchers: the fused LoRA linear, forward and backward: one forward launch, two backward launches.

    y  = residual + x W^T + bias + s * (drop(x) A^T B^T + lora_bias)        x [M, K], W [N, K], A [R, K], B [N, R]
    xa = drop(x) A^T                                  [M, R], saved for backward (unscaled, in A's dtype like PEFT)
    g  = s * dy B                                     [M, R], fp32 workspace of the backward
    dx = dy W + keep / (1 - p) * (g A)     da = g^T drop(x)     db = s * dy^T xa

The kernels (``adapted_linear.py``) are shared with IA3 (``ia3.py``, re-exported here) through constexpr flags.

Precision: x in fp16/bf16/fp32, adapters in fp16/bf16/fp32 (they may differ from x, e.g. bf16 x with fp32
adapters, PEFT's default); operands are cast in registers, every product accumulates in fp32, and each output is
cast once on store (y and dx to x's dtype, xa and da to A's, db to B's). As in PEFT the adapter product runs in the
adapter dtype: drop(x) is rounded to A's dtype before the A product and xa to it before the B product. Dots with
fp32 operands run as 3xTF32 (fp32-grade error) unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32,
as torch's matmuls); see ``_common._dot_precision``.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ._common import (_GROUP_M, _MAX_RANK, KernelSpec, LaunchPlan, PlanCache, TileConfig, _block_rank, _bwd_config,
                      _check_2d, _check_device, _check_launch_device, _check_tensor, _dot_precision, _fwd_config,
                      _launch, _meta, _weight_strides)
from .adapted_linear import linear_bwd_dx_kernel, linear_fwd_kernel, lora_bwd_dw_kernel, lora_dropout_mask_kernel
from .ia3 import ia3_bwd, ia3_fwd, ia3_shipped_configs

__all__ = [
    "TileConfig",
    "KernelSpec",
    "lora_fwd",
    "lora_bwd",
    "lora_dropout_mask",
    "ia3_fwd",
    "ia3_bwd",
    "shipped_configs",
]


def _check_dropout(dropout_p: float, seed: int) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def _adapter_shapes(x, lora_a, lora_b) -> tuple[int, int, int, int]:
    _check_2d("x", x)
    _check_2d("lora_a", lora_a)
    _check_2d("lora_b", lora_b)
    M, K = x.shape
    R, N = lora_a.shape[0], lora_b.shape[0]
    _check_tensor("x", x, (M, K))
    _check_tensor("lora_a", lora_a, (R, K))
    _check_tensor("lora_b", lora_b, (N, R), (lora_a.dtype,))
    if not 1 <= R <= _MAX_RANK:
        raise ValueError(f"lora rank R = lora_a.shape[0] must be in [1, {_MAX_RANK}], got {R}")
    return M, N, K, R


def _fwd_outputs(x, lora_a, lora_b, store_xa) -> tuple[Tensor, Tensor | None]:
    M, N, R = x.shape[0], lora_b.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return y, (torch.empty((M, R), device=x.device, dtype=lora_a.dtype) if store_xa else None)


def _fwd_dynamic(x, weight, bias, lora_a, lora_b, lora_bias, residual, y, xa, scaling, dropout_p, seed) -> dict:
    """The forward's per-call arguments: tensors (absent ones point at a harmless stand-in) and runtime scalars."""
    return dict(
        x_ptr=x, w_ptr=weight if weight is not None else x, bias_ptr=bias if bias is not None else y,
        a_ptr=lora_a, b_ptr=lora_b, lbias_ptr=lora_bias if lora_bias is not None else lora_b,
        res_ptr=residual if residual is not None else y, l_ptr=y, y_ptr=y, xa_ptr=xa if xa is not None else y,
        base_ptr=y, scaling=float(scaling), p=float(dropout_p), drop_scale=1.0 / (1.0 - float(dropout_p)),
        seed=int(seed),
    )


# the names of the per-call arguments, read off the builders themselves (so the two cannot drift apart)
_FWD_DYNAMIC = frozenset(_fwd_dynamic(*[torch.empty(1, 1)] * 9, 1.0, 0.0, 0))
_FWD_PLANS = PlanCache()


def _plan_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
              store_xa) -> tuple[KernelSpec, Tensor, Tensor | None]:
    M, N, K, R = _adapter_shapes(x, lora_a, lora_b)
    stride_wn, stride_wk = _weight_strides(weight, N, K, x.dtype, weight_t)
    if bias is not None:
        if weight is None:
            raise ValueError("bias without weight: the base term is absent, pass bias=None")
        _check_tensor("bias", bias, (N,), (weight.dtype,))
    if lora_bias is not None:
        _check_tensor("lora_bias", lora_bias, (N,), (lora_b.dtype,))
    if residual is not None:
        _check_tensor("residual", residual, (M, N), (x.dtype,))
    _check_dropout(dropout_p, seed)
    _check_device(dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_bias=lora_bias,
                       residual=residual))

    y, xa = _fwd_outputs(x, lora_a, lora_b, store_xa)
    cfg = _fwd_config(M, N, K, R, x.dtype, lora_a.dtype)
    res = residual if residual is not None else y
    xa_out = xa if xa is not None else y
    args = dict(
        M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1), stride_bn=lora_b.stride(0),
        stride_br=lora_b.stride(1), stride_rm=res.stride(0), stride_rn=res.stride(1), stride_l=0,
        stride_ym=y.stride(0), stride_yn=y.stride(1), stride_xam=xa_out.stride(0), stride_xar=xa_out.stride(1),
        **_fwd_dynamic(x, weight, bias, lora_a, lora_b, lora_bias, residual, y, xa, scaling, dropout_p, seed),
    )
    constexprs = dict(
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=_block_rank(R), GROUP_M=_GROUP_M,
        HAS_BASE=weight is not None, HAS_BIAS=bias is not None, HAS_LORA=True, HAS_LORA_BIAS=lora_bias is not None,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, STORE_XA=store_xa, SCALE_INPUT=False,
        SCALE_OUTPUT=False, STORE_BASE=False, DOT_PREC=_dot_precision(),
    )
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    spec = KernelSpec("lora_fwd", linear_fwd_kernel, args, constexprs, cfg.num_warps, cfg.num_stages, grid)
    return spec, y, xa


def lora_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
             lora_bias: Tensor | None, residual: Tensor | None, scaling: float, dropout_p: float, seed: int,
             weight_t: bool = False, store_xa: bool = True) -> tuple[Tensor, Tensor | None]:
    """y = residual + x W^T + bias + s * (drop(x) A^T B^T + lora_bias) in one launch; also xa = drop(x) A^T.

    x [M, K] (any strides); weight [N, K], or [K, N] with ``weight_t`` (GPT-2 Conv1D), or None (no base term);
    bias [N] (weight's dtype) or None; lora_a [R, K], lora_b [N, R] (one adapter dtype, may differ from x's);
    lora_bias [N] (adapter dtype) or None; residual [M, N] (x's dtype) or None. Returns y [M, N] in x's dtype and
    xa [M, R] in lora_a's dtype (None unless ``store_xa``).
    """
    key = (_meta(x), _meta(weight), _meta(bias), _meta(lora_a), _meta(lora_b), _meta(lora_bias), _meta(residual),
           weight_t, store_xa, dropout_p > 0.0, _dot_precision())
    plan = _FWD_PLANS.get(key)
    if plan is None:  # first call with this metadata: full checks, then the plan is kept
        spec, y, xa = _plan_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed,
                                weight_t, store_xa)
        _FWD_PLANS.put(key, LaunchPlan.of(spec, _FWD_DYNAMIC))
        _launch(spec, x.device)
        return y, xa
    _check_dropout(dropout_p, seed)  # runtime scalars are not in the key
    y, xa = _fwd_outputs(x, lora_a, lora_b, store_xa)
    plan.launch(x.device, _fwd_dynamic(x, weight, bias, lora_a, lora_b, lora_bias, residual, y, xa, scaling,
                                       dropout_p, seed))
    return y, xa


def _bwd_outputs(x, lora_a, lora_b, need_dx, need_da, need_db):
    """dx, da, db (each None unless asked for) and the fp32 workspace g = s dy B (only dA reads it back)."""
    (M, K), R, N, dev = x.shape, lora_a.shape[0], lora_b.shape[0], x.device
    return (torch.empty((M, K), device=dev, dtype=x.dtype) if need_dx else None,
            torch.empty((R, K), device=dev, dtype=lora_a.dtype) if need_da else None,
            torch.empty((N, R), device=dev, dtype=lora_b.dtype) if need_db else None,
            torch.empty((M, R), device=dev, dtype=torch.float32) if need_da else None)


def _bwd_dynamic(dy, x, weight, lora_a, lora_b, xa, dx, da, db, g, need_db, scaling, dropout_p,
                 seed) -> tuple[dict, dict]:
    """Per-call arguments of the two backward launches (absent tensors point at a harmless stand-in)."""
    common = dict(scaling=float(scaling), p=float(dropout_p), drop_scale=1.0 / (1.0 - float(dropout_p)),
                  seed=int(seed))
    dx_args = dict(dy_ptr=dy, w_ptr=weight if weight is not None else dy, a_ptr=lora_a, b_ptr=lora_b, l_ptr=dy,
                   s_ptr=dy, dx_ptr=dx if dx is not None else dy, g_ptr=g if g is not None else dy, dl_ptr=dy,
                   **common)
    dw_args = dict(x_ptr=x, g_ptr=g if g is not None else x, dy_ptr=dy, xa_ptr=xa if need_db else x,
                   da_ptr=da if da is not None else lora_a, db_ptr=db if db is not None else lora_b, **common)
    return dx_args, dw_args


_BWD_DX_DYNAMIC, _BWD_DW_DYNAMIC = (frozenset(d) for d in _bwd_dynamic(*[torch.empty(1, 1)] * 10, True, 1.0, 0.0, 0))
_BWD_PLANS = PlanCache()


def _plan_bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t, need_dx, need_da,
              need_db) -> tuple[list[KernelSpec], Tensor | None, Tensor | None, Tensor | None]:
    M, N, K, R = _adapter_shapes(x, lora_a, lora_b)
    _check_2d("dy", dy)
    _check_tensor("dy", dy, (M, N), (x.dtype,))
    stride_wn, stride_wk = _weight_strides(weight, N, K, x.dtype, weight_t)
    if need_db:
        if xa is None:
            raise ValueError("need_db needs xa (the forward's drop(x) A^T): call lora_fwd with store_xa=True")
        _check_tensor("xa", xa, (M, R), (lora_a.dtype,))
    _check_dropout(dropout_p, seed)
    _check_device(dict(dy=dy, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, xa=xa if need_db else None))

    dx, da, db, g = _bwd_outputs(x, lora_a, lora_b, need_dx, need_da, need_db)
    cfg_dx, cfg_dw = _bwd_config(M, N, K, R, x.dtype, lora_a.dtype)
    BR, prec, drop = _block_rank(R), _dot_precision(), dropout_p > 0.0
    dx_args, dw_args = _bwd_dynamic(dy, x, weight, lora_a, lora_b, xa, dx, da, db, g, need_db, scaling, dropout_p,
                                    seed)
    specs = []
    if need_dx or need_da:
        dx_out, g_out = dx_args["dx_ptr"], dx_args["g_ptr"]
        args = dict(
            M=M, N=N, K=K, R=R,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
            stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1), stride_bn=lora_b.stride(0),
            stride_br=lora_b.stride(1), stride_l=0, stride_sm=0, stride_sc=0, stride_dxm=dx_out.stride(0),
            stride_dxk=dx_out.stride(1), stride_gm=g_out.stride(0), stride_gr=g_out.stride(1), stride_dlm=0,
            **dx_args,
        )
        constexprs = dict(BM=cfg_dx.BM, BN=cfg_dx.BN, BK=cfg_dx.BK, BR=BR, GROUP_M=_GROUP_M,
                          HAS_BASE=weight is not None, HAS_LORA=True, HAS_DROPOUT=drop, NEED_DX=need_dx,
                          STORE_G=need_da, SCALE_INPUT=False, SCALE_OUTPUT=False, STORE_DL=False, DL_DIV=False,
                          DOT_PREC=prec)
        grid = (triton.cdiv(M, cfg_dx.BM) * (triton.cdiv(K, cfg_dx.BK) if need_dx else 1),)
        specs.append(KernelSpec("lora_bwd_dx", linear_bwd_dx_kernel, args, constexprs, cfg_dx.num_warps,
                                cfg_dx.num_stages, grid))
    if need_da or need_db:
        num_da = triton.cdiv(K, cfg_dw.BK) if need_da else 0
        num_db = triton.cdiv(N, cfg_dw.BN) if need_db else 0
        g_in, xa_in, da_out, db_out = dw_args["g_ptr"], dw_args["xa_ptr"], dw_args["da_ptr"], dw_args["db_ptr"]
        args = dict(
            M=M, N=N, K=K, R=R,
            num_da=num_da, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_gm=g_in.stride(0),
            stride_gr=g_in.stride(1), stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_xam=xa_in.stride(0),
            stride_xar=xa_in.stride(1), stride_dar=da_out.stride(0), stride_dak=da_out.stride(1),
            stride_dbn=db_out.stride(0), stride_dbr=db_out.stride(1), **dw_args,
        )
        constexprs = dict(BM=cfg_dw.BM, BN=cfg_dw.BN, BK=cfg_dw.BK, BR=BR, HAS_DROPOUT=drop, NEED_DA=need_da,
                          NEED_DB=need_db, DOT_PREC=prec)
        specs.append(KernelSpec("lora_bwd_dw", lora_bwd_dw_kernel, args, constexprs, cfg_dw.num_warps,
                                cfg_dw.num_stages, (num_da + num_db,)))
    return specs, dx, da, db


def lora_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, lora_a: Tensor, lora_b: Tensor, xa: Tensor | None,
             scaling: float, dropout_p: float, seed: int, weight_t: bool = False, need_dx: bool = True,
             need_da: bool = True, need_db: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of ``lora_fwd`` in two launches: (dx and g = s dy B), then (da and db).

    dy [M, N] (x's dtype); xa as returned by lora_fwd (needed for db). Returns dx [M, K] in x's dtype, da [R, K]
    in lora_a's dtype, db [N, R] in lora_b's dtype, each None when not asked for. The dropout mask is regenerated
    from ``seed``. dW, dbias and dlora_bias are left to the caller.
    """
    key = (_meta(dy), _meta(x), _meta(weight), _meta(lora_a), _meta(lora_b), _meta(xa) if need_db else None,
           weight_t, need_dx, need_da, need_db, dropout_p > 0.0, _dot_precision())
    plans = _BWD_PLANS.get(key)
    if plans is None or x.shape[0] == 0:  # first call with this metadata: full checks, then the plans are kept
        specs, dx, da, db = _plan_bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t,
                                      need_dx, need_da, need_db)
        if x.shape[0] == 0:  # no rows: the weight gradients are sums over nothing
            da = None if da is None else da.zero_()
            db = None if db is None else db.zero_()
            return dx, da, db
        _BWD_PLANS.put(key, [LaunchPlan.of(spec, _BWD_DX_DYNAMIC if spec.name == "lora_bwd_dx" else _BWD_DW_DYNAMIC)
                             for spec in specs])
        for spec in specs:
            _launch(spec, x.device)
        return dx, da, db
    _check_dropout(dropout_p, seed)
    dx, da, db, g = _bwd_outputs(x, lora_a, lora_b, need_dx, need_da, need_db)
    dx_args, dw_args = _bwd_dynamic(dy, x, weight, lora_a, lora_b, xa, dx, da, db, g, need_db, scaling, dropout_p,
                                    seed)
    for plan in plans:
        plan.launch(x.device, dx_args if plan.kernel is linear_bwd_dx_kernel else dw_args)
    return dx, da, db


def _plan_mask(seed: int, M: int, K: int, p: float, device) -> tuple[KernelSpec, Tensor]:
    keep = torch.empty((M, K), device=device, dtype=torch.uint8)
    BM, BK = 32, 64
    args = dict(keep_ptr=keep, M=M, K=K, p=float(p), seed=int(seed))
    grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
    spec = KernelSpec("lora_dropout_mask", lora_dropout_mask_kernel, args, dict(BM=BM, BK=BK), 4, 1, grid)
    return spec, keep


def lora_dropout_mask(seed: int, M: int, K: int, p: float, device) -> Tensor:
    """The bool keep mask [M, K] that lora_fwd / lora_bwd draw for ``seed`` and ``p`` (for tests and oracles)."""
    _check_dropout(p, seed)
    device = torch.device(device)
    if p == 0.0:
        return torch.ones((M, K), device=device, dtype=torch.bool)
    _check_launch_device(device)
    spec, keep = _plan_mask(seed, M, K, p, device)
    if K > 0:
        _launch(spec, device)
    return keep.view(torch.bool)


def shipped_configs() -> list[tuple[str, KernelSpec]]:
    """(readable id, spec) for every config the heuristics can pick, planned on meta tensors, for AOT compiles.

    LoRA: every table row (decode / prefill x rank class) for every (x, adapter) dtype pair PEFT produces, at the
    largest rank of the row (registers and shared memory grow with BR, so that is the row's worst case), with the
    features on that cost the most (bias, lora_bias, residual, dropout, xa, all gradients); nn.Linear and, for the
    smallest rank class, the transposed Conv1D weight too (dw never reads the weight, so it has no weight_t
    variant). Then IA3's (``ia3.ia3_shipped_configs``).
    """
    pairs = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    out = []
    for x_dt, a_dt in pairs:
        for decode in (True, False):
            for R, weight_t in ((64, False), (64, True), (128, False), (256, False)):
                M, N, K = (16 if decode else 4096), 4096, 4096
                meta = [torch.empty(shape, dtype=dt, device="meta") for shape, dt in (
                    ((M, K), x_dt), ((K, N) if weight_t else (N, K), x_dt), ((N,), x_dt), ((R, K), a_dt),
                    ((N, R), a_dt), ((N,), a_dt), ((M, N), x_dt), ((M, R), a_dt))]
                x, w, bias, a, b, lb, res, xa = meta
                tag = f"{short[x_dt]}x-{short[a_dt]}a-{'decode' if decode else 'prefill'}-r{R}" + ("-wt" * weight_t)
                fwd, _, _ = _plan_fwd(x, w, bias, a, b, lb, res, 2.0, 0.1, 1234, weight_t, True)
                out.append((f"fwd-{tag}", fwd))
                for spec in _plan_bwd(res, x, w, a, b, xa, 2.0, 0.1, 1234, weight_t, True, True, True)[0]:
                    if not (weight_t and spec.name == "lora_bwd_dw"):
                        out.append((f"{spec.name.removeprefix('lora_bwd_')}-{tag}", spec))
    return out + ia3_shipped_configs()

"""LoRA launchers, forward and backward:

    y  = residual + x W^T + bias + s * (drop(x) A^T B^T + lora_bias)        x [M, K], W [N, K], A [R, K], B [N, R]
    xa = drop(x) A^T                                  [M, R], saved for backward (unscaled, in A's dtype like PEFT)
    g  = s * dy B                                     [M, R], fp32 workspace of the backward
    dx = dy W + keep / (1 - p) * (g A)     da = g^T drop(x)     db = s * dy^T xa

Two plans, chosen by the rows M of x:
- M <= 16 (decode): one fused launch (``adapted_linear.linear_fwd_kernel``, shared with IA3): a GEMV whose program
  also forms xa for its rows and adds the low-rank term in its epilogue. One launch is the point at decode, where a
  layer's whole GPU time is a few microseconds and host time per launch is of the same order.
- M > 16 (prefill, training) and every backward: the split plan of ``lora_split.py``: cuBLAS for the base product,
  thin Triton kernels for the adapter math (its docstring has the math, the bytes, and why).

Precision: x in fp16/bf16/fp32, adapters in fp16/bf16/fp32 (they may differ from x, e.g. bf16 x with fp32
adapters, PEFT's default); operands are cast in registers, every product accumulates in fp32, and each output is
cast once on store (y and dx to x's dtype, xa and da to A's, db to B's). As in PEFT the adapter product runs in the
adapter dtype: drop(x) is rounded to A's dtype before the A product and xa to it before the B product. Dots with
fp32 operands run as 3xTF32 (fp32-grade error) unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32,
as torch's matmuls); see ``_common._dot_precision``.

The dropout seed is an int64 scalar tensor on x's device, read by the kernels (a Python int is accepted and put on
the device, for tests); see ``lora_split_kernels`` on CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from ._common import (_GROUP_M, _MAX_RANK, CostStep, KernelSpec, LaunchPlan, PlanCache, TileConfig, _block_rank, _check_2d,
                      _check_device, _check_launch_device, _check_tensor, _dot_precision, _fwd_config, _launch, _meta,
                      _weight_strides)
from .adapted_linear import linear_fwd_kernel, lora_dropout_mask_kernel
from .ia3 import ia3_bwd, ia3_fwd, ia3_shipped_configs
from .lora_split import _kernel_step, _plan_shrink, _rate, shrink, split_bwd, split_fwd, split_shipped_configs
from .lora_split_kernels import SPLIT_NONE

__all__ = [
    "TileConfig",
    "KernelSpec",
    "lora_fwd",
    "lora_bwd",
    "lora_dropout_mask",
    "ia3_fwd",
    "ia3_bwd",
    "shipped_configs",
    "decode_cost_steps",
    "DECODE_ROWS",
]

DECODE_ROWS = 16  # up to this many rows of x the forward is one fused launch


def _check_dropout(dropout_p: float, seed) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"seed: expected an int64 tensor with one element, got {seed.dtype} {tuple(seed.shape)}")
    elif not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def _seed_tensor(seed, device: torch.device) -> Tensor:
    """The seed as the int64 device tensor the kernels read (an int is put on the device; a tensor elsewhere is
    copied there, which a CUDA graph would freeze: the op layer draws seeds on x's device)."""
    if not isinstance(seed, Tensor):
        return torch.tensor(int(seed), dtype=torch.int64, device=device)
    return seed if seed.device == device else seed.to(device)


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


def _fwd_dynamic(x, weight, bias, lora_a, lora_b, lora_bias, residual, y, xa, scaling, dropout_p, seed,
                 xa_part=None) -> dict:
    """The forward's per-call arguments: tensors (absent ones point at a harmless stand-in) and runtime scalars."""
    return dict(xap_ptr=xa_part if xa_part is not None else y,
        x_ptr=x, w_ptr=weight if weight is not None else x, bias_ptr=bias if bias is not None else y,
        a_ptr=lora_a, b_ptr=lora_b, lbias_ptr=lora_bias if lora_bias is not None else lora_b,
        res_ptr=residual if residual is not None else y, l_ptr=y, y_ptr=y, xa_ptr=xa if xa is not None else y,
        base_ptr=y, seed_ptr=seed if seed is not None else y, scaling=float(scaling), p=float(dropout_p),
        drop_scale=1.0 / (1.0 - float(dropout_p)),
    )


# the names of the per-call arguments, read off the builders themselves (so the two cannot drift apart)
_FWD_DYNAMIC = frozenset(_fwd_dynamic(*[torch.empty(1, 1)] * 9, 1.0, 0.0, None))
_FWD_PLANS = PlanCache()


def _xa_apart(N: int, K: int, R: int, cfg: TileConfig, a_dtype: torch.dtype, weight) -> bool:
    """Whether the decode plan forms xa in a shrink launch of its own (two launches): when the N-tile programs,
    each forming xa for its rows, would together re-read more of A (from L2) than all of W that they stream from
    memory. At rank 16 with 16-bit adapters they re-read half of W's bytes: one launch; at rank 64, or 32 with fp32
    adapters, twice or more: two."""
    a_bytes = R * K * torch.empty((), dtype=a_dtype).element_size()
    w_bytes = 0 if weight is None else weight.numel() * weight.element_size()
    return triton.cdiv(N, cfg.BN) * a_bytes > w_bytes


def _plan_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed, weight_t,
              store_xa, xa_part=None) -> tuple[KernelSpec, Tensor, Tensor | None]:
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
    _check_device(dict(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_bias=lora_bias,
                       residual=residual))

    y, xa = _fwd_outputs(x, lora_a, lora_b, store_xa)
    cfg = _fwd_config(M, N, K, R, x.dtype, lora_a.dtype)
    res = residual if residual is not None else y
    xa_out = xa if xa is not None else y
    part = xa_part if xa_part is not None else torch.empty((1, 1, 1), device=x.device)
    args = dict(
        M=M, N=N, K=K, R=R, S=part.shape[0], stride_ps=part.stride(0), stride_pm=part.stride(1),
        stride_pr=part.stride(2),
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1), stride_bn=lora_b.stride(0),
        stride_br=lora_b.stride(1), stride_rm=res.stride(0), stride_rn=res.stride(1), stride_l=0,
        stride_ym=y.stride(0), stride_yn=y.stride(1), stride_xam=xa_out.stride(0), stride_xar=xa_out.stride(1),
        **_fwd_dynamic(x, weight, bias, lora_a, lora_b, lora_bias, residual, y, xa, scaling, dropout_p, seed,
                       xa_part),
    )
    constexprs = dict(
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=_block_rank(R), GROUP_M=_GROUP_M,
        HAS_BASE=weight is not None, HAS_BIAS=bias is not None, HAS_LORA=True, HAS_LORA_BIAS=lora_bias is not None,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0 and xa_part is None, STORE_XA=store_xa,
        SCALE_INPUT=False, SCALE_OUTPUT=False, STORE_BASE=False, XA_IN=xa_part is not None, DOT_PREC=_dot_precision(),
    )
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    spec = KernelSpec("lora_fwd", linear_fwd_kernel, args, constexprs, cfg.num_warps, cfg.num_stages, grid)
    return spec, y, xa


def lora_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
             lora_bias: Tensor | None, residual: Tensor | None, scaling: float, dropout_p: float, seed,
             weight_t: bool = False, store_xa: bool = True) -> tuple[Tensor, Tensor | None]:
    """y = residual + x W^T + bias + s * (drop(x) A^T B^T + lora_bias); also xa = drop(x) A^T.

    x [M, K] (any strides); weight [N, K], or [K, N] with ``weight_t`` (GPT-2 Conv1D), or None (no base term);
    bias [N] (weight's dtype) or None; lora_a [R, K], lora_b [N, R] (one adapter dtype, may differ from x's);
    lora_bias [N] (adapter dtype) or None; residual [M, N] (x's dtype) or None; seed an int64 scalar tensor on x's
    device (or an int), read only when dropout_p > 0. Returns y [M, N] in x's dtype and xa [M, R] in lora_a's dtype
    (None unless ``store_xa``). One fused launch for M <= DECODE_ROWS, else the split plan.
    """
    _check_dropout(dropout_p, seed)
    seed_t = _seed_tensor(seed, x.device) if dropout_p > 0.0 else None
    if x.shape[0] > DECODE_ROWS:
        _adapter_shapes(x, lora_a, lora_b)
        return split_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed_t,
                         weight_t=weight_t, store_xa=store_xa)
    key = (_meta(x), _meta(weight), _meta(bias), _meta(lora_a), _meta(lora_b), _meta(lora_bias), _meta(residual),
           weight_t, store_xa, dropout_p > 0.0, _dot_precision())
    hit = _FWD_PLANS.get(key)
    if hit is None:  # first call with this metadata: full checks, then the plan is kept
        M, N, K, R = _adapter_shapes(x, lora_a, lora_b)
        apart = _xa_apart(N, K, R, _fwd_config(M, N, K, R, x.dtype, lora_a.dtype), lora_a.dtype, weight)
        part = shrink(x, lora_a, 1.0, dropout_p, seed_t) if apart else None
        spec, y, xa = _plan_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed_t,
                                weight_t, store_xa, part)
        _FWD_PLANS.put(key, (LaunchPlan.of(spec, _FWD_DYNAMIC), apart))
        _launch(spec, x.device)
        return y, xa
    plan, apart = hit
    part = shrink(x, lora_a, 1.0, dropout_p, seed_t) if apart else None
    y, xa = _fwd_outputs(x, lora_a, lora_b, store_xa)
    plan.launch(x.device, _fwd_dynamic(x, weight, bias, lora_a, lora_b, lora_bias, residual, y, xa, scaling,
                                       dropout_p, seed_t, part))
    return y, xa


def lora_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, lora_a: Tensor, lora_b: Tensor, xa: Tensor | None,
             scaling: float, dropout_p: float, seed, weight_t: bool = False, need_dx: bool = True,
             need_da: bool = True, need_db: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Backward of ``lora_fwd``: the split plan at every M (``lora_split.split_bwd``; cuBLAS forms dy W).

    dy [M, N] (x's dtype); xa as returned by lora_fwd (needed for db). Returns dx [M, K] in x's dtype, da [R, K]
    in lora_a's dtype, db [N, R] in lora_b's dtype, each None when not asked for. The dropout mask is regenerated
    from ``seed``. dW, dbias and dlora_bias are left to the caller.
    """
    _adapter_shapes(x, lora_a, lora_b)
    _check_dropout(dropout_p, seed)
    seed_t = _seed_tensor(seed, x.device) if dropout_p > 0.0 else None
    return split_bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed_t, weight_t=weight_t,
                     need_dx=need_dx, need_da=need_da, need_db=need_db)


def _plan_mask(seed: Tensor, M: int, K: int, p: float, device) -> tuple[KernelSpec, Tensor]:
    keep = torch.empty((M, K), device=device, dtype=torch.uint8)
    BM, BK = 32, 64
    args = dict(keep_ptr=keep, seed_ptr=seed, M=M, K=K, p=float(p))
    grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
    spec = KernelSpec("lora_dropout_mask", lora_dropout_mask_kernel, args, dict(BM=BM, BK=BK), 4, 1, grid)
    return spec, keep


def lora_dropout_mask(seed, M: int, K: int, p: float, device) -> Tensor:
    """The bool keep mask [M, K] that lora_fwd / lora_bwd draw for ``seed`` and ``p`` (for tests and oracles)."""
    _check_dropout(p, seed)
    device = torch.device(device)
    if p == 0.0:
        return torch.ones((M, K), device=device, dtype=torch.bool)
    _check_launch_device(device)
    spec, keep = _plan_mask(_seed_tensor(seed, device), M, K, p, device)
    if K > 0:
        _launch(spec, device)
    return keep.view(torch.bool)


def decode_cost_steps(M: int, N: int, K: int, R: int, x_dtype: torch.dtype, a_dtype: torch.dtype,
                      dropout_p: float = 0.0) -> list[CostStep]:
    """The decode plan's launches (M <= DECODE_ROWS) with their FLOPs and bytes, read off the plan made on meta
    tensors: the compulsory bytes (x, W, A, B once, y and xa written once) and the re-reads its grid makes (every
    N-tile program forms xa for its rows: A and x again, from L2; FLOPs count those redundant products too). At
    high rank (``_xa_apart``) a shrink launch forms xa's partials first and the programs read those instead."""
    if M > DECODE_ROWS:
        raise ValueError(f"decode_cost_steps: M = {M} rows is the split plan (lora_split.split_cost_steps)")
    e = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    x, w, a, b = e(M, K, dtype=x_dtype), e(N, K, dtype=x_dtype), e(R, K, dtype=a_dtype), e(N, R, dtype=a_dtype)
    seed = e(dtype=torch.int64)
    apart = _xa_apart(N, K, R, _fwd_config(M, N, K, R, x_dtype, a_dtype), a_dtype, w)
    steps, part = [], None
    if apart:
        shrink_spec, _ = _plan_shrink(x, a, 1.0, dropout_p, seed, False)
        steps, part = _kernel_step(shrink_spec, 1), shrink_spec.args["out_ptr"]
    spec = _plan_fwd(x, w, None, a, b, None, None, 1.0, dropout_p, seed, False, True, part)[0]
    xs, ws, as_ = x.element_size(), w.element_size(), a.element_size()
    programs = spec.grid[0]
    rate, passes = _rate(SPLIT_NONE, x_dtype, a_dtype)  # the widest of its dots (decode is bound by W's bytes)
    flops = 2 * M * N * K + 2 * M * N * R + (0 if apart else programs * 2 * M * K * R)
    dram = M * K * xs + N * K * ws + N * R * as_ + M * N * xs + M * R * as_
    if apart:  # the partials, read by every program
        dram += part.numel() * 4
        l2 = (programs - 1) * (part.numel() * 4 + M * K * xs)
    else:  # every program forms xa: A and x again
        dram += R * K * as_
        l2 = (programs - 1) * (R * K * as_ + M * K * xs)
    return steps + [CostStep("lora_fwd_decode", "triton", flops, rate, passes, dram, l2)]


def shipped_configs() -> list[tuple[str, KernelSpec]]:
    """(readable id, spec) for every config the heuristics can pick, planned on meta tensors, for AOT compiles.

    LoRA's fused decode kernel: every decode table row (rank class) for every (x, adapter) dtype pair PEFT
    produces, at the largest rank of the row (registers and shared memory grow with BR, so that is the row's worst
    case), with the features on that cost the most (bias, lora_bias, residual, dropout, xa); nn.Linear and, for the
    smallest rank class, the transposed Conv1D weight too; each both ways, forming xa itself and reading xa's
    partials (``-xa``, ``_xa_apart``). Then the split kernels (``split_shipped_configs``) and IA3's
    (``ia3.ia3_shipped_configs``).
    """
    pairs = [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    out = []
    for x_dt, a_dt in pairs:
        for R, weight_t in ((64, False), (64, True), (128, False), (256, False)):
            M, N, K = DECODE_ROWS, 4096, 4096
            meta = [torch.empty(shape, dtype=dt, device="meta") for shape, dt in (
                ((M, K), x_dt), ((K, N) if weight_t else (N, K), x_dt), ((N,), x_dt), ((R, K), a_dt),
                ((N, R), a_dt), ((N,), a_dt), ((M, N), x_dt), ((), torch.int64))]
            x, w, bias, a, b, lb, res, seed = meta
            tag = f"{short[x_dt]}x-{short[a_dt]}a-decode-r{R}" + ("-wt" * weight_t)
            out.append((f"fwd-{tag}", _plan_fwd(x, w, bias, a, b, lb, res, 2.0, 0.1, seed, weight_t, True)[0]))
            part = _plan_shrink(x, a, 1.0, 0.1, seed, False)[0].args["out_ptr"]
            out.append((f"fwd-{tag}-xa", _plan_fwd(x, w, bias, a, b, lb, res, 2.0, 0.1, seed, weight_t, True,
                                                   part)[0]))
    return out + split_shipped_configs() + ia3_shipped_configs()

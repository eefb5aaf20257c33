"""Host launchers of the prefix-attention kernels (``kernels/prefix_attention_kernels.py``: the math, the
programs, the precision contract): argument checks, the tile tables, launch plans, and every shipped config for the
ahead-of-time compile (tests/test_aot.py).

No autotuning: one tile per (padded head dim BD, fp32 or 16-bit operands, regime), each the largest that compiles
with no spill on sm_80 and sm_90a, so every tile that can run is compiled ahead of time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from ._common import _DTYPES, KernelSpec, _check_device, _check_tensor, _dot_precision, _launch
from .prefix_attention_kernels import (LOG2E_HOST, prefix_attention_bwd_delta_kernel, prefix_attention_bwd_dkv_kernel,
                                       prefix_attention_bwd_dq_kernel, prefix_attention_fwd_kernel)

__all__ = ["prefix_attention_fwd", "prefix_attention_bwd", "AttnConfig", "shipped_configs"]


class AttnConfig(NamedTuple):
    BM: int  # query rows per block
    BN: int  # keys per block
    num_warps: int
    num_stages: int


_MAX_D = {False: 256, True: 128}  # by wide: fp32 at D = 256 spills at every tile (3xTF32 keeps split operands live)
C = AttnConfig
# Keyed (BD, wide: fp32 operands): (forward prefill, dK / dV and dprefix (BM rows per row step, BN keys),
# dQ). Each is the largest tile that compiles with no spill on sm_80 and sm_90a with every score feature on
# (tests/test_aot.py); 3xTF32 (wide) holds split operands in registers, so its tiles are small.
_CONFIGS: dict[tuple[int, bool], tuple[AttnConfig, AttnConfig, AttnConfig]] = {
    (16, False): (C(128, 64, 8, 2), C(32, 64, 4, 3), C(64, 64, 4, 3)),
    (32, False): (C(128, 64, 8, 3), C(32, 64, 4, 3), C(64, 64, 4, 3)),
    (64, False): (C(128, 64, 8, 3), C(32, 64, 4, 3), C(64, 32, 4, 2)),
    (128, False): (C(128, 32, 8, 2), C(32, 64, 8, 2), C(64, 32, 4, 2)),
    (256, False): (C(64, 32, 8, 2), C(16, 32, 8, 2), C(32, 32, 8, 2)),
    (16, True): (C(64, 32, 4, 2), C(32, 32, 4, 2), C(32, 32, 4, 2)),
    (32, True): (C(64, 32, 4, 2), C(16, 32, 4, 2), C(32, 32, 4, 2)),
    (64, True): (C(32, 32, 4, 2), C(32, 32, 8, 2), C(32, 32, 4, 2)),
    (128, True): (C(32, 32, 8, 2), C(16, 16, 8, 2), C(16, 32, 8, 2)),
}
# Forward row blocks with fewer rows than the prefill BM (decode: the G Sq rows of a kv head), keyed
# (BM = rows padded to a power of two >= 16, BD, wide): one K / V pass serves all G heads of the kv head.
_FWD_SMALL: dict[tuple[int, int, bool], AttnConfig] = {
    (16, 16, False): C(16, 64, 4, 2), (32, 16, False): C(32, 32, 4, 2), (64, 16, False): C(64, 32, 4, 2),
    (16, 32, False): C(16, 128, 4, 2), (32, 32, False): C(32, 32, 4, 2), (64, 32, False): C(64, 32, 4, 2),
    (16, 64, False): C(16, 128, 4, 3), (32, 64, False): C(32, 64, 4, 2), (64, 64, False): C(64, 64, 4, 2),
    (16, 128, False): C(16, 64, 4, 3), (32, 128, False): C(32, 64, 4, 3), (64, 128, False): C(64, 16, 4, 2),
    (16, 256, False): C(16, 32, 8, 2), (32, 256, False): C(32, 16, 4, 2),
    (16, 16, True): C(16, 64, 4, 2), (32, 16, True): C(32, 64, 4, 2), (16, 32, True): C(16, 32, 4, 2),
    (32, 32, True): C(32, 32, 4, 2), (16, 64, True): C(16, 32, 4, 2), (16, 128, True): C(16, 32, 4, 2),
}
_DELTA_ROWS = 32


def _block_d(D: int) -> int:
    """D padded to a power of two >= 16 (the K of the q k^T dot and the N of the p V dot)."""
    return max(16, triton.next_power_of_2(D))


def _fwd_config(rows: int, BD: int, wide: bool) -> AttnConfig:
    """The prefill tile, or for fewer rows than its BM the decode tile of BM = rows padded to a power of two."""
    cfg, BM = _CONFIGS[(BD, wide)][0], max(16, triton.next_power_of_2(rows))
    return cfg if BM >= cfg.BM else _FWD_SMALL[(BM, BD, wide)]


def _check_columns(name: str, t, B: int, H: int, Sq: int, N: int, dtypes) -> None:
    """A mask or bias over N key columns: [1|B, 1|H, Sq, N]."""
    shape = tuple(getattr(t, "shape", ()))
    if not isinstance(t, Tensor) or len(shape) != 4 or shape[0] not in (1, B) or shape[1] not in (1, H) or (
            shape[2:] != (Sq, N)):
        raise ValueError(f"{name}: expected shape [1 or {B}, 1 or {H}, {Sq}, {N}], got {shape or type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_inputs(q, k, v, prefix_k, prefix_v, mask, softcap, window, bias, prefix_bias) -> tuple:
    """(B, H, Sq, D, Hkv, Skv, P) after checking every shape, dtype and device against the reference's contract."""
    for name, t, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("prefix_k", prefix_k, 3), ("prefix_v", prefix_v, 3)):
        if not isinstance(t, Tensor) or t.dim() != dims:
            raise ValueError(f"{name}: expected a {dims}-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    B, H, Sq, D = q.shape
    Hkv, Skv, P = k.shape[1], k.shape[2], prefix_k.shape[1]
    _check_tensor("q", q, (B, H, Sq, D))
    for name, t, shape in (("k", k, (B, Hkv, Skv, D)), ("v", v, (B, Hkv, Skv, D)), ("prefix_k", prefix_k, (Hkv, P, D)),
                           ("prefix_v", prefix_v, (Hkv, P, D))):
        _check_tensor(name, t, shape, (q.dtype,))
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"k: expected a number of kv heads that divides the {H} query heads, got {Hkv}")
    if not 1 <= D <= _MAX_D[q.dtype == torch.float32]:
        raise ValueError(f"head dim D = q.shape[3] must be in [1, {_MAX_D[q.dtype == torch.float32]}] for {q.dtype} "
                         f"inputs, got {D}")
    if mask is not None:
        _check_columns("mask", mask, B, H, Sq, Skv, (torch.bool,) + _DTYPES)
    if bias is not None:
        _check_columns("bias", bias, B, H, Sq, Skv, _DTYPES)
    if prefix_bias is not None:
        _check_columns("prefix_bias", prefix_bias, B, H, Sq, P, _DTYPES)
    if softcap < 0 or window < 0:
        raise ValueError(f"softcap and window must be >= 0 (0 = off), got {softcap}, {window}")
    _check_device(dict(q=q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v, mask=mask, bias=bias,
                       prefix_bias=prefix_bias))
    return B, H, Sq, D, Hkv, Skv, P


def _strides(name: str, t, dims: str, broadcast: bool = False) -> dict:
    """``stride_<name><dim>`` for each dim letter; a 3-D prefix read as 4-D gets batch stride 0, broadcast dims of
    a mask or bias stride 0, an absent tensor zeros."""
    if t is None:
        return {f"stride_{name}{d}": 0 for d in dims}
    st = (0,) * (len(dims) - t.dim()) + tuple(t.stride())
    shape = (1,) * (len(dims) - t.dim()) + tuple(t.shape)
    return {f"stride_{name}{d}": 0 if broadcast and n == 1 else s for d, s, n in zip(dims, st, shape)}


def _shared_args(q, mask, bias, scaling, causal, softcap) -> tuple[dict, dict]:
    """What every kernel but delta reads: the mask / bias pointers and strides, the score scalars; and the flags."""
    Sq = q.shape[2]
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    args = dict(
        mask_ptr=q if mask is None else (mask.view(torch.uint8) if kind == 1 else mask),
        bias_ptr=q if bias is None else bias, **_strides("m", mask, "bhsj", True), **_strides("b", bias, "bhsj", True),
        qk_scale=float(scaling) * LOG2E_HOST, cap2=float(softcap) * LOG2E_HOST,
        cap_in=float(scaling) / float(softcap) if softcap else 0.0,
    )
    flags = dict(SOFTCAP=softcap > 0, HAS_BIAS=bias is not None, MASK=kind,
                 CAUSAL=bool(causal) and kind == 0 and Sq > 1, DOT_PREC=_dot_precision())
    return args, flags


def _plan_fwd(q, k, v, prefix_k, prefix_v, mask, scaling, causal, softcap, window, bias,
              prefix_bias) -> tuple[KernelSpec, Tensor, Tensor]:
    B, H, Sq, D, Hkv, Skv, P = _check_inputs(q, k, v, prefix_k, prefix_v, mask, softcap, window, bias, prefix_bias)
    out = torch.empty((B, Sq, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    G, BD = H // Hkv, _block_d(D)
    cfg = _fwd_config(G * Sq, BD, q.dtype == torch.float32)
    shared, flags = _shared_args(q, mask, bias, scaling, causal, softcap)
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, pk_ptr=prefix_k, pv_ptr=prefix_v, out_ptr=out, lse_ptr=lse,
        pbias_ptr=q if prefix_bias is None else prefix_bias, **_strides("q", q, "bhsd"), **_strides("k", k, "bhsd"),
        **_strides("v", v, "bhsd"), **_strides("pk", prefix_k, "hpd"), **_strides("pv", prefix_v, "hpd"),
        **_strides("pb", prefix_bias, "bhsj", True), **_strides("o", out, "bshd"), **_strides("l", lse, "bhs"),
        Hkv=Hkv, G=G, Sq=Sq, Skv=Skv, P=P, window=int(window), **shared,
    )
    constexprs = dict(D=D, BM=cfg.BM, BN=cfg.BN, BD=BD, HAS_PBIAS=prefix_bias is not None, WINDOW=window > 0, **flags)
    grid = (triton.cdiv(G * Sq, cfg.BM) * B * Hkv,)
    spec = KernelSpec("prefix_attention_fwd", prefix_attention_fwd_kernel, args, constexprs, cfg.num_warps,
                      cfg.num_stages, grid)
    return spec, out, lse


def prefix_attention_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, mask: Tensor | None,
                         scaling: float, causal: bool, softcap: float, window: int, bias: Tensor | None,
                         prefix_bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention of q over ``[prefix | sequence]`` in one launch: (out [B, Sq, H, D] contiguous in q's dtype,
    lse [B, H, Sq] fp32). Arguments as ``fastpeft.reference.prefix_attention_ref`` (no dropout); every tensor is
    read through its strides (q may be a transposed [B, S, H, D] view; broadcast mask / bias dims read stride 0)."""
    spec, out, lse = _plan_fwd(q, k, v, prefix_k, prefix_v, mask, scaling, causal, softcap, window, bias, prefix_bias)
    _launch(spec, q.device)
    return out, lse


def _plan_bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, mask, scaling, causal, softcap, window, bias, prefix_bias,
              need_dq, need_dkv, need_dprefix) -> tuple[list[KernelSpec], tuple]:
    B, H, Sq, D, Hkv, Skv, P = _check_inputs(q, k, v, prefix_k, prefix_v, mask, softcap, window, bias, prefix_bias)
    for name, t, shape, dts in (("dout", dout, (B, Sq, H, D), (q.dtype,)), ("out", out, (B, Sq, H, D), (q.dtype,)),
                                ("lse", lse, (B, H, Sq), (torch.float32,))):
        if not isinstance(t, Tensor) or t.dim() != len(shape):
            raise ValueError(f"{name}: expected shape {shape}, got {getattr(t, 'shape', type(t).__name__)}")
        _check_tensor(name, t, shape, dts)
    _check_device(dict(q=q, dout=dout, out=out, lse=lse))
    dev, G, BD, wide = q.device, H // Hkv, _block_d(D), q.dtype == torch.float32
    delta = torch.empty((B, H, Sq), device=dev, dtype=torch.float32)
    dq = torch.empty_like(q) if need_dq else None
    dk, dv = (torch.empty_like(k), torch.empty_like(v)) if need_dkv else (None, None)
    ws = torch.empty((2, B, Hkv, P, D), device=dev, dtype=torch.float32) if need_dprefix else None
    if not (need_dq or need_dkv or need_dprefix):
        return [], (None,) * 4
    R = B * H * Sq
    specs = [KernelSpec("prefix_attention_bwd_delta", prefix_attention_bwd_delta_kernel, dict(
        do_ptr=dout, o_ptr=out, delta_ptr=delta, **_strides("do", dout, "bshd"), **_strides("o", out, "bshd"), H=H,
        Sq=Sq, R=R), dict(D=D, BR=_DELTA_ROWS, BD=BD), 4, 1, (triton.cdiv(R, _DELTA_ROWS),))]
    shared, flags = _shared_args(q, mask, bias, scaling, causal, softcap)
    rows = dict(q_ptr=q, do_ptr=dout, lse_ptr=lse, delta_ptr=delta, **_strides("q", q, "bhsd"),
                **_strides("do", dout, "bshd"), **_strides("l", lse, "bhs"), H=H, Hkv=Hkv, G=G, Sq=Sq,
                scaling=float(scaling), **shared)
    _, cfg, cfg_dq = _CONFIGS[(BD, wide)]
    launches = [("dkv", k, v, dk, dv, Skv, {}, dict(WINDOW=False))] if need_dkv else []
    if need_dprefix:  # prefix keys: no sequence mask or causal rule; their own bias and the window
        launches.append(("dprefix", prefix_k, prefix_v, ws[0], ws[1], P, dict(
            bias_ptr=q if prefix_bias is None else prefix_bias, **_strides("b", prefix_bias, "bhsj", True)), dict(
            HAS_BIAS=prefix_bias is not None, MASK=0, CAUSAL=False, WINDOW=window > 0)))
    for tag, keys, vals, gk, gv, N, args_over, flags_over in launches:
        args = dict(rows, k_ptr=keys, v_ptr=vals, dk_ptr=gk, dv_ptr=gv, N=N, lim=P + Skv - Sq - int(window),
                    **_strides("k", keys, "bhnd"), **_strides("v", vals, "bhnd"), **_strides("dk", gk, "bhnd"),
                    **_strides("dv", gv, "bhnd"), **args_over)
        constexprs = dict(flags, D=D, BM=cfg.BM, BN=cfg.BN, BD=BD, PREFIX=tag == "dprefix", **flags_over)
        specs.append(KernelSpec(f"prefix_attention_bwd_{tag}", prefix_attention_bwd_dkv_kernel, args, constexprs,
                                cfg.num_warps, cfg.num_stages, (triton.cdiv(N, cfg.BN) * B * Hkv,)))
    if need_dq:
        cfg = cfg_dq
        args = dict(rows, k_ptr=k, v_ptr=v, pk_ptr=prefix_k, pv_ptr=prefix_v, dq_ptr=dq,
                    pbias_ptr=q if prefix_bias is None else prefix_bias, **_strides("k", k, "bhsd"),
                    **_strides("v", v, "bhsd"), **_strides("pk", prefix_k, "hpd"), **_strides("pv", prefix_v, "hpd"),
                    **_strides("pb", prefix_bias, "bhsj", True), **_strides("dq", dq, "bhsd"), Skv=Skv, P=P,
                    window=int(window))
        constexprs = dict(D=D, BM=cfg.BM, BN=cfg.BN, BD=BD, HAS_PBIAS=prefix_bias is not None, WINDOW=window > 0,
                          **flags)
        specs.append(KernelSpec("prefix_attention_bwd_dq", prefix_attention_bwd_dq_kernel, args, constexprs,
                                cfg.num_warps, cfg.num_stages, (triton.cdiv(G * Sq, cfg.BM) * B * Hkv,)))
    return specs, (dq, dk, dv, ws)


def prefix_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor,
                         out: Tensor, lse: Tensor, mask: Tensor | None, scaling: float, causal: bool, softcap: float,
                         window: int, bias: Tensor | None, prefix_bias: Tensor | None, need_dq: bool = True,
                         need_dkv: bool = True, need_dprefix: bool = True) -> tuple:
    """Backward of ``prefix_attention_fwd``: (dq like q, dk like k, dv like v, dprefix_k, dprefix_v [Hkv, P, D] in
    the prefix dtype), each None when not asked for. dout, out [B, Sq, H, D] (any strides) and lse as the forward
    returned them. dprefix is reduced over the batch in fp32 without atomics (bitwise reproducible)."""
    specs, (dq, dk, dv, ws) = _plan_bwd(dout, q, k, v, prefix_k, prefix_v, out, lse, mask, scaling, causal, softcap,
                                        window, bias, prefix_bias, need_dq, need_dkv, need_dprefix)
    for spec in specs:
        _launch(spec, q.device)
    dpk = dpv = None
    if ws is not None:  # the batch rows' fp32 partials, added in a fixed order
        part = ws[:, 0] if ws.shape[1] == 1 else ws.sum(1)
        dpk, dpv = part[0].to(prefix_k.dtype), part[1].to(prefix_v.dtype)
    return dq, dk, dv, dpk, dpv


def _meta_specs(dt, D: int, Sq: int, mask: str | None = "float", bias: bool = True, causal: bool = False,
                softcap: float = 30.0, window: int = 64, backward: bool = True) -> list[tuple[str, KernelSpec]]:
    """(kernel tag, spec) of the forward and (with ``backward``) the four backward launches for a GQA layer
    (B 2, H 32, Hkv 8, Skv 4096, P 32) planned on meta tensors; q a transposed [B, Sq, H, D] view, as HF passes it."""
    B, H, Hkv, Skv, P = 2, 32, 8, 4096, 32

    def m(*shape, dtype=dt):
        return torch.empty(shape, dtype=dtype, device="meta")

    q, k, v, pk, pv = m(B, Sq, H, D).transpose(1, 2), m(B, Hkv, Skv, D), m(B, Hkv, Skv, D), m(Hkv, P, D), m(Hkv, P, D)
    mk = None if mask is None else m(B, 1, Sq, Skv, dtype=torch.bool if mask == "bool" else dt)
    b, pb = (m(1, H, Sq, Skv, dtype=torch.float32), m(1, H, Sq, P, dtype=torch.float32)) if bias else (None, None)
    extras = (mk, 0.125, causal, softcap, window, b, pb)
    out = [("fwd", _plan_fwd(q, k, v, pk, pv, *extras)[0])]
    if backward:
        o, lse = m(B, Sq, H, D), m(B, H, Sq, dtype=torch.float32)
        out += [(s.name.removeprefix("prefix_attention_bwd_"), s)
                for s in _plan_bwd(o, q, k, v, pk, pv, o, lse, *extras, True, True, True)[0]]
    return out


def shipped_configs() -> list[tuple[str, KernelSpec]]:
    """(id, spec) for every config the heuristics can pick: for each dtype and BD, the forward's prefill tile and
    each decode tile below it, and the four backward launches, with the costliest features on (additive mask, bias
    and prefix bias, softcap, window). tests/_aot.py compiles the other flags (bool mask, causal, none) once."""
    out = []
    for dt, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for BD in (16, 32, 64, 128, 256)[:4 if dt == torch.float32 else 5]:
            for rows in (16, 32, 64):  # G = 4: Sq = rows / 4 fills the decode tile of that many rows
                if rows < _CONFIGS[(BD, dt == torch.float32)][0].BM:
                    out += [(f"pa-fwd-{name}-d{BD}-m{rows}", _meta_specs(dt, BD, rows // 4, backward=False)[0][1])]
            out += [(f"pa-{tag}-{name}-d{BD}", s) for tag, s in _meta_specs(dt, BD, 2048)]
    return out

"""Fused LoRA linear, forward and backward: one forward launch, two backward launches.

    y  = residual + x W^T + bias + s * (drop(x) A^T B^T + lora_bias)        x [M, K], W [N, K], A [R, K], B [N, R]
    xa = drop(x) A^T                                  [M, R], saved for backward (unscaled, in A's dtype like PEFT)
    g  = s * dy B                                     [M, R], fp32 workspace of the backward
    dx = dy W + keep / (1 - p) * (g A)     da = g^T drop(x)     db = s * dy^T xa

Precision: x in fp16/bf16/fp32, adapters in fp16/bf16/fp32 (they may differ from x, e.g. bf16 x with fp32
adapters, PEFT's default); operands are cast in registers, every product accumulates in fp32, and each output is
cast once on store (y and dx to x's dtype, xa and da to A's, db to B's). As in PEFT the adapter product runs in the
adapter dtype: drop(x) is rounded to A's dtype before the A product and xa to it before the B product. Dots with
fp32 operands run as 3xTF32 (fp32-grade error) unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32,
as torch's matmuls); see ``_dot_precision``.

Dropout: keep[m, k] = uniform >= p from Philox4x32-10 keyed by seed at element (m, k), scaled by 1 / (1 - p); the
stream (four elements per Philox counter, int64 counters) is defined in ``_dropout_keep``. The mask is regenerated
from the seed in the backward, never stored.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "TileConfig",
    "KernelSpec",
    "lora_fwd",
    "lora_bwd",
    "lora_dropout_mask",
    "shipped_configs",
    "lora_fwd_kernel",
    "lora_bwd_dx_kernel",
    "lora_bwd_dw_kernel",
    "lora_dropout_mask_kernel",
]


class TileConfig(NamedTuple):
    BM: int  # rows of x / dy per program
    BN: int  # output columns (fwd, db) or the N step of the loop (dx)
    BK: int  # the K step of the loop (fwd) or output columns (dx, da)
    num_warps: int
    num_stages: int


# No autotuning: one config per (regime, padded rank, operand width), picked by the heuristics below, so every
# config that can run is known ahead of time and compiled by tests/test_aot.py (registers, spills, shared memory).
# Keys: (decode: M <= 16, BR cap, wide: some operand is fp32). Bigger ranks get smaller tiles: the [BM, BR] xa/g
# accumulator and the [BR, *] adapter tiles grow with R and would otherwise spill. Wide rows are small because
# 3xTF32 holds split operands in registers and sm_80's mma.sync takes its A operand from registers.
_FWD_CONFIGS: dict[tuple[bool, int, bool], TileConfig] = {
    (True, 64, False): TileConfig(16, 32, 128, 4, 4),
    (True, 128, False): TileConfig(16, 32, 64, 4, 3),
    (True, 256, False): TileConfig(16, 32, 32, 4, 3),
    (False, 64, False): TileConfig(128, 128, 32, 8, 4),
    (False, 128, False): TileConfig(128, 64, 64, 8, 3),
    (False, 256, False): TileConfig(64, 64, 64, 8, 2),
    (True, 64, True): TileConfig(16, 32, 64, 4, 4),
    (True, 128, True): TileConfig(16, 32, 32, 4, 3),
    (True, 256, True): TileConfig(16, 32, 32, 8, 2),
    (False, 64, True): TileConfig(32, 64, 32, 8, 3),
    (False, 128, True): TileConfig(32, 64, 32, 8, 3),
    (False, 256, True): TileConfig(16, 64, 32, 8, 2),
}
# dx: output tile [BM, BK], loop over N in steps of BN.
_BWD_DX_CONFIGS: dict[tuple[bool, int, bool], TileConfig] = {
    (True, 64, False): TileConfig(16, 128, 32, 4, 4),
    (True, 128, False): TileConfig(16, 64, 32, 4, 3),
    (True, 256, False): TileConfig(16, 32, 32, 4, 3),
    (False, 64, False): TileConfig(128, 64, 64, 8, 3),
    (False, 128, False): TileConfig(128, 64, 64, 8, 3),
    (False, 256, False): TileConfig(64, 64, 64, 8, 2),
    (True, 64, True): TileConfig(16, 64, 32, 4, 4),
    (True, 128, True): TileConfig(16, 32, 32, 4, 3),
    (True, 256, True): TileConfig(16, 32, 32, 4, 2),
    (False, 64, True): TileConfig(64, 32, 64, 8, 3),
    (False, 128, True): TileConfig(32, 32, 64, 8, 3),
    (False, 256, True): TileConfig(16, 32, 32, 4, 2),
}
# dw: da tiles [BR, BK] and db tiles [BN, BR], both looping over M in steps of BM.
_BWD_DW_CONFIGS: dict[tuple[bool, int, bool], TileConfig] = {
    (True, 64, False): TileConfig(16, 64, 64, 4, 3),
    (True, 128, False): TileConfig(16, 64, 64, 4, 3),
    (True, 256, False): TileConfig(16, 64, 64, 8, 2),
    (False, 64, False): TileConfig(64, 64, 64, 4, 3),
    (False, 128, False): TileConfig(64, 64, 64, 8, 3),
    (False, 256, False): TileConfig(32, 64, 64, 8, 3),
    (True, 64, True): TileConfig(16, 64, 64, 4, 3),
    (True, 128, True): TileConfig(16, 64, 64, 4, 3),
    (True, 256, True): TileConfig(16, 64, 64, 8, 2),
    (False, 64, True): TileConfig(32, 64, 64, 4, 3),
    (False, 128, True): TileConfig(32, 64, 64, 8, 3),
    (False, 256, True): TileConfig(32, 32, 32, 8, 3),
}
_GROUP_M = 8  # programs sharing a weight column block run close together (L2 reuse of W)
_MAX_RANK = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _block_rank(R: int) -> int:
    """R padded to a power of two >= 16: BR is the reduction dim of the epilogue dots (>= 16 for 16-bit MMA)."""
    return max(16, triton.next_power_of_2(R))


def _config_key(M: int, R: int, x_dtype: torch.dtype, a_dtype: torch.dtype) -> tuple[bool, int, bool]:
    return (M <= 16, max(64, _block_rank(R)), torch.float32 in (x_dtype, a_dtype))


def _fwd_config(M: int, N: int, K: int, R: int, x_dtype: torch.dtype, a_dtype: torch.dtype) -> TileConfig:
    return _FWD_CONFIGS[_config_key(M, R, x_dtype, a_dtype)]


def _bwd_config(M: int, N: int, K: int, R: int, x_dtype: torch.dtype,
                a_dtype: torch.dtype) -> tuple[TileConfig, TileConfig]:
    key = _config_key(M, R, x_dtype, a_dtype)
    return _BWD_DX_CONFIGS[key], _BWD_DW_CONFIGS[key]


@triton.jit
def _dropout_keep(seed, o_m, k0, K, p, BM: tl.constexpr, BK: tl.constexpr):
    """Keep mask [BM, BK] for rows o_m [BM] and columns k0 .. k0 + BK - 1 (k0 % 4 == 0) of an [M, K] input.

    Element (m, k) is lane k % 4 of Philox4x32-10 at counter m * ceil(K / 4) + k // 4 (tl.rand4x): one Philox
    evaluation serves four neighbouring elements, a quarter of the integer work and live registers of one per
    element. The counter is an int64 and tl.rand4x splits it into the two low Philox counter words, so nothing
    wraps or aliases for M * K up to 2^63 (a 32-bit m * K + k would repeat the mask every 2^32 elements). Forward,
    backward and lora_dropout_mask all call this helper, so they agree element for element whatever their tiles.
    """
    tl.static_assert(BK % 4 == 0, "dropout tiles must cover whole groups of 4 columns")
    o_c = k0 // 4 + tl.arange(0, BK // 4)  # [BK/4] counter column
    ctr = o_m.to(tl.int64)[:, None] * ((K + 3) // 4) + o_c.to(tl.int64)[None, :]  # [BM, BK/4]
    u0, u1, u2, u3 = tl.rand4x(seed, ctr)  # 4 x [BM, BK/4]
    # interleave lanes: [BM, BK/4, 2, 2] with [..., j, i] = lane 2j + i, then flatten to column 4c + lane
    b_u = tl.join(tl.join(u0, u2), tl.join(u1, u3))
    return tl.reshape(b_u, (BM, BK)) >= p


@triton.jit
def _tile_ids(num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering of a 1-D grid over [num_m, num_n] tiles; int64 so address arithmetic cannot wrap."""
    i_p = tl.program_id(0).to(tl.int64)
    width = GROUP_M * num_n
    first_m = (i_p // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (i_p % width) % size_m, (i_p % width) // size_m


@triton.jit(do_not_specialize=["seed"])
def lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, lbias_ptr, res_ptr, y_ptr, xa_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_rm, stride_rn, stride_ym, stride_yn, stride_xam, stride_xar,
    scaling, p, drop_scale, seed,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, STORE_XA: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # W is read through (stride_wn, stride_wk), so nn.Linear [N, K] and Conv1D [K, N] weights need no copy.
    a_dtype = a_ptr.dtype.element_ty
    i_m, i_n = _tile_ids(tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM] int64
    o_n = i_n * BN + tl.arange(0, BN)  # [BN] int64
    o_k = tl.arange(0, BK).to(tl.int64)  # [BK]
    o_r = tl.arange(0, BR)  # [BR]
    m_m, m_n, m_r = o_m < M, o_n < N, o_r < R

    p_x0 = x_ptr + o_m[:, None] * stride_xm  # [BM, 1]
    p_w0 = w_ptr + o_n[None, :] * stride_wn  # [1, BN]
    p_a0 = a_ptr + o_r[None, :] * stride_ar  # [1, BR]
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    b_xa = tl.zeros([BM, BR], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_kk = k0 + o_k  # [BK]
        m_k = o_kk < K
        b_x = tl.load(p_x0 + o_kk[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if HAS_BASE:
            b_w = tl.load(p_w0 + o_kk[:, None] * stride_wk, mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
            b_acc = tl.dot(b_x, b_w, b_acc, input_precision=DOT_PREC)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, o_m, k0, K, p, BM, BK)  # [BM, BK]
            b_xd = tl.where(keep, b_x.to(tl.float32) * drop_scale, 0.0).to(a_dtype)  # [BM, BK]
        else:
            b_xd = b_x.to(a_dtype)  # [BM, BK]
        b_a = tl.load(p_a0 + o_kk[:, None] * stride_ak, mask=m_k[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
        b_xa = tl.dot(b_xd, b_a, b_xa, input_precision=DOT_PREC)

    b_xar = b_xa.to(a_dtype)  # [BM, BR] rounded to the adapter dtype, as PEFT does before the B product
    if STORE_XA:
        if i_n == 0:
            p_xa = xa_ptr + o_m[:, None] * stride_xam + o_r[None, :] * stride_xar  # [BM, BR]
            tl.store(p_xa, b_xar, mask=m_m[:, None] & m_r[None, :])
    p_b = b_ptr + o_r[:, None] * stride_br + o_n[None, :] * stride_bn  # [BR, BN]
    b_b = tl.load(p_b, mask=m_r[:, None] & m_n[None, :], other=0.0)  # [BR, BN]
    b_lora = tl.dot(b_xar.to(b_ptr.dtype.element_ty), b_b, input_precision=DOT_PREC)  # [BM, BN]
    if HAS_LORA_BIAS:
        b_lora += tl.load(lbias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_acc += scaling * b_lora
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    m_y = m_m[:, None] & m_n[None, :]
    if HAS_RESIDUAL:
        p_res = res_ptr + o_m[:, None] * stride_rm + o_n[None, :] * stride_rn  # [BM, BN]
        b_acc += tl.load(p_res, mask=m_y, other=0.0).to(tl.float32)
    p_y = y_ptr + o_m[:, None] * stride_ym + o_n[None, :] * stride_yn  # [BM, BN]
    tl.store(p_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit(do_not_specialize=["seed"])
def lora_bwd_dx_kernel(
    dy_ptr, w_ptr, a_ptr, b_ptr, dx_ptr, g_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_dxm, stride_dxk, stride_gm, stride_gr,
    scaling, p, drop_scale, seed,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, STORE_G: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # One loop over N feeds both dy W (the base part of dx) and dy B (g); without NEED_DX the grid has one column
    # of programs and only g is computed.
    a_dtype = a_ptr.dtype.element_ty
    num_k = tl.cdiv(K, BK) if NEED_DX else 1
    i_m, i_k = _tile_ids(tl.cdiv(M, BM), num_k, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM] int64
    o_k = i_k * BK + tl.arange(0, BK)  # [BK] int64
    o_n = tl.arange(0, BN).to(tl.int64)  # [BN]
    o_r = tl.arange(0, BR)  # [BR]
    m_m, m_k, m_r = o_m < M, o_k < K, o_r < R

    p_dy0 = dy_ptr + o_m[:, None] * stride_dym  # [BM, 1]
    p_w0 = w_ptr + o_k[None, :] * stride_wk  # [1, BK]
    p_b0 = b_ptr + o_r[None, :] * stride_br  # [1, BR]
    b_acc = tl.zeros([BM, BK], dtype=tl.float32)
    b_g = tl.zeros([BM, BR], dtype=tl.float32)
    for n0 in range(0, N, BN):
        o_nn = n0 + o_n  # [BN]
        m_n = o_nn < N
        b_dy = tl.load(p_dy0 + o_nn[None, :] * stride_dyn, mask=m_m[:, None] & m_n[None, :], other=0.0)  # [BM, BN]
        if HAS_BASE:
            if NEED_DX:
                b_w = tl.load(p_w0 + o_nn[:, None] * stride_wn, mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
                b_acc = tl.dot(b_dy, b_w, b_acc, input_precision=DOT_PREC)
        b_b = tl.load(p_b0 + o_nn[:, None] * stride_bn, mask=m_n[:, None] & m_r[None, :], other=0.0)  # [BN, BR]
        b_g = tl.dot(b_dy.to(b_ptr.dtype.element_ty), b_b, b_g, input_precision=DOT_PREC)
    b_g = b_g * scaling  # [BM, BR]

    if STORE_G:
        if i_k == 0:
            p_g = g_ptr + o_m[:, None] * stride_gm + o_r[None, :] * stride_gr  # [BM, BR]
            tl.store(p_g, b_g, mask=m_m[:, None] & m_r[None, :])
    if NEED_DX:
        p_a = a_ptr + o_r[:, None] * stride_ar + o_k[None, :] * stride_ak  # [BR, BK]
        b_a = tl.load(p_a, mask=m_r[:, None] & m_k[None, :], other=0.0)  # [BR, BK]
        b_gx = tl.dot(b_g.to(a_dtype), b_a, input_precision=DOT_PREC)  # [BM, BK]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, o_m, i_k * BK, K, p, BM, BK)  # [BM, BK]
            b_gx = tl.where(keep, b_gx * drop_scale, 0.0)
        b_acc += b_gx
        p_dx = dx_ptr + o_m[:, None] * stride_dxm + o_k[None, :] * stride_dxk  # [BM, BK]
        tl.store(p_dx, b_acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


@triton.jit
def _da_tile(i_k, x_ptr, g_ptr, da_ptr, M, K, R, stride_xm, stride_xk, stride_gm, stride_gr, stride_dar, stride_dak,
             p, drop_scale, seed, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr):
    """da[:, k-block] = g^T drop(x), looping over all rows of M."""
    da_dtype = da_ptr.dtype.element_ty
    o_k = i_k * BK + tl.arange(0, BK)  # [BK] int64
    o_m = tl.arange(0, BM).to(tl.int64)  # [BM]
    o_r = tl.arange(0, BR)  # [BR]
    m_k, m_r = o_k < K, o_r < R
    p_x0 = x_ptr + o_k[None, :] * stride_xk  # [1, BK]
    p_g0 = g_ptr + o_r[:, None] * stride_gr  # [BR, 1]
    b_acc = tl.zeros([BR, BK], dtype=tl.float32)
    for m0 in range(0, M, BM):
        o_mm = m0 + o_m  # [BM]
        m_m = o_mm < M
        b_gt = tl.load(p_g0 + o_mm[None, :] * stride_gm, mask=m_r[:, None] & m_m[None, :], other=0.0)  # [BR, BM]
        b_x = tl.load(p_x0 + o_mm[:, None] * stride_xm, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, o_mm, i_k * BK, K, p, BM, BK)  # [BM, BK]
            b_x = tl.where(keep, b_x.to(tl.float32) * drop_scale, 0.0)
        b_acc = tl.dot(b_gt.to(da_dtype), b_x.to(da_dtype), b_acc, input_precision=DOT_PREC)
    p_da = da_ptr + o_r[:, None] * stride_dar + o_k[None, :] * stride_dak  # [BR, BK]
    tl.store(p_da, b_acc.to(da_dtype), mask=m_r[:, None] & m_k[None, :])


@triton.jit
def _db_tile(i_n, dy_ptr, xa_ptr, db_ptr, M, N, R, stride_dym, stride_dyn, stride_xam, stride_xar, stride_dbn,
             stride_dbr, scaling, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT_PREC: tl.constexpr):
    """db[n-block, :] = s * dy^T xa, looping over all rows of M."""
    db_dtype = db_ptr.dtype.element_ty
    o_n = i_n * BN + tl.arange(0, BN)  # [BN] int64
    o_m = tl.arange(0, BM).to(tl.int64)  # [BM]
    o_r = tl.arange(0, BR)  # [BR]
    m_n, m_r = o_n < N, o_r < R
    p_dy0 = dy_ptr + o_n[:, None] * stride_dyn  # [BN, 1]
    p_xa0 = xa_ptr + o_r[None, :] * stride_xar  # [1, BR]
    b_acc = tl.zeros([BN, BR], dtype=tl.float32)
    for m0 in range(0, M, BM):
        o_mm = m0 + o_m  # [BM]
        m_m = o_mm < M
        b_dyt = tl.load(p_dy0 + o_mm[None, :] * stride_dym, mask=m_n[:, None] & m_m[None, :], other=0.0)  # [BN, BM]
        b_xa = tl.load(p_xa0 + o_mm[:, None] * stride_xam, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_acc = tl.dot(b_dyt.to(db_dtype), b_xa.to(db_dtype), b_acc, input_precision=DOT_PREC)
    p_db = db_ptr + o_n[:, None] * stride_dbn + o_r[None, :] * stride_dbr  # [BN, BR]
    tl.store(p_db, (b_acc * scaling).to(db_dtype), mask=m_n[:, None] & m_r[None, :])


@triton.jit(do_not_specialize=["seed"])
def lora_bwd_dw_kernel(
    x_ptr, g_ptr, dy_ptr, xa_ptr, da_ptr, db_ptr,
    M, N, K, R, num_da,
    stride_xm, stride_xk, stride_gm, stride_gr, stride_dym, stride_dyn, stride_xam, stride_xar,
    stride_dar, stride_dak, stride_dbn, stride_dbr,
    scaling, p, drop_scale, seed,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, NEED_DA: tl.constexpr, NEED_DB: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Programs [0, num_da) own one K-block of da each, the rest one N-block of db: deterministic, no atomics.
    i_p = tl.program_id(0).to(tl.int64)
    if NEED_DA:
        if i_p < num_da:
            _da_tile(i_p, x_ptr, g_ptr, da_ptr, M, K, R, stride_xm, stride_xk, stride_gm, stride_gr, stride_dar,
                     stride_dak, p, drop_scale, seed, BM, BK, BR, HAS_DROPOUT, DOT_PREC)
    if NEED_DB:
        if i_p >= num_da:
            _db_tile(i_p - num_da, dy_ptr, xa_ptr, db_ptr, M, N, R, stride_dym, stride_dyn, stride_xam, stride_xar,
                     stride_dbn, stride_dbr, scaling, BM, BN, BR, DOT_PREC)


@triton.jit(do_not_specialize=["seed"])
def lora_dropout_mask_kernel(keep_ptr, M, K, p, seed, BM: tl.constexpr, BK: tl.constexpr):
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # [BM]
    k0 = tl.program_id(1).to(tl.int64) * BK
    o_k = k0 + tl.arange(0, BK)  # [BK]
    keep = _dropout_keep(seed, o_m, k0, K, p, BM, BK)  # [BM, BK]
    m = (o_m < M)[:, None] & (o_k < K)[None, :]
    tl.store(keep_ptr + o_m[:, None] * K + o_k[None, :], keep.to(tl.int8), mask=m)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers

_INTERPRETED = not isinstance(lora_fwd_kernel, triton.runtime.jit.JITFunction)


class KernelSpec(NamedTuple):
    """One launch as the launchers would issue it: enough to compile it ahead of time (tests/test_aot.py)."""
    name: str
    kernel: object
    args: dict  # runtime arguments by name (tensors may live on the meta device)
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple


def _dot_precision() -> str:
    """Precision of the dots that take fp32 operands (fp16/bf16 dots ignore it).

    torch.backends.cuda.matmul.allow_tf32 set: plain TF32, as torch. Unset (torch's default): 3xTF32, whose error is
    within fp32 accumulation error, on tensor cores. Not "ieee": Triton lowers IEEE fp32 dots to FMAs that unroll
    the whole K extent into registers (triton-lang/triton#5572), and the epilogue dots here have K = BR up to 256;
    every prefill config then spilled kilobytes (tests/test_aot.py), and FMAs run far below tensor-core rates.
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _check_tensor(name: str, t, shape: tuple, dtypes=_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_device(tensors: dict) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {({k: str(v) for k, v in devices.items()})}")
    _check_launch_device(next(iter(devices.values())))


def _check_launch_device(dev: torch.device) -> None:
    if dev.type != "meta" and dev.type != "cuda" and not (_INTERPRETED and dev.type == "cpu"):
        raise ValueError(f"expected CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {dev}")


def _check_dropout(dropout_p: float, seed: int) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def _check_2d(name: str, t) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")


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


def _weight_strides(weight, N: int, K: int, dtype, weight_t: bool) -> tuple[int, int]:
    """(stride over N, stride over K) of W; (0, 0) without a base weight."""
    if weight is None:
        return 0, 0
    _check_tensor("weight", weight, (K, N) if weight_t else (N, K), (dtype,))
    return (weight.stride(1), weight.stride(0)) if weight_t else (weight.stride(0), weight.stride(1))


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

    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    xa = torch.empty((M, R), device=x.device, dtype=lora_a.dtype) if store_xa else None
    cfg = _fwd_config(M, N, K, R, x.dtype, lora_a.dtype)
    res = residual if residual is not None else y
    xa_out = xa if xa is not None else y
    args = dict(
        x_ptr=x, w_ptr=weight if weight is not None else x, bias_ptr=bias if bias is not None else y,
        a_ptr=lora_a, b_ptr=lora_b, lbias_ptr=lora_bias if lora_bias is not None else lora_b,
        res_ptr=res, y_ptr=y, xa_ptr=xa_out,
        M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
        stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1), stride_bn=lora_b.stride(0),
        stride_br=lora_b.stride(1), stride_rm=res.stride(0), stride_rn=res.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1), stride_xam=xa_out.stride(0), stride_xar=xa_out.stride(1),
        scaling=float(scaling), p=float(dropout_p), drop_scale=1.0 / (1.0 - float(dropout_p)), seed=int(seed),
    )
    constexprs = dict(
        BM=cfg.BM, BN=cfg.BN, BK=cfg.BK, BR=_block_rank(R), GROUP_M=_GROUP_M,
        HAS_BASE=weight is not None, HAS_BIAS=bias is not None, HAS_LORA_BIAS=lora_bias is not None,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=dropout_p > 0.0, STORE_XA=store_xa,
        DOT_PREC=_dot_precision(),
    )
    grid = (triton.cdiv(M, cfg.BM) * triton.cdiv(N, cfg.BN),)
    spec = KernelSpec("lora_fwd_kernel", lora_fwd_kernel, args, constexprs, cfg.num_warps, cfg.num_stages, grid)
    return spec, y, xa


def _launch(spec: KernelSpec, device: torch.device) -> None:
    if spec.grid[0] == 0:
        return
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        spec.kernel[spec.grid](**spec.args, **spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)


def lora_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
             lora_bias: Tensor | None, residual: Tensor | None, scaling: float, dropout_p: float, seed: int,
             weight_t: bool = False, store_xa: bool = True) -> tuple[Tensor, Tensor | None]:
    """y = residual + x W^T + bias + s * (drop(x) A^T B^T + lora_bias) in one launch; also xa = drop(x) A^T.

    x [M, K] (any strides); weight [N, K], or [K, N] with ``weight_t`` (GPT-2 Conv1D), or None (no base term);
    bias [N] (weight's dtype) or None; lora_a [R, K], lora_b [N, R] (one adapter dtype, may differ from x's);
    lora_bias [N] (adapter dtype) or None; residual [M, N] (x's dtype) or None. Returns y [M, N] in x's dtype and
    xa [M, R] in lora_a's dtype (None unless ``store_xa``).
    """
    spec, y, xa = _plan_fwd(x, weight, bias, lora_a, lora_b, lora_bias, residual, scaling, dropout_p, seed,
                            weight_t, store_xa)
    _launch(spec, x.device)
    return y, xa


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

    dev = x.device
    dx = torch.empty((M, K), device=dev, dtype=x.dtype) if need_dx else None
    da = torch.empty((R, K), device=dev, dtype=lora_a.dtype) if need_da else None
    db = torch.empty((N, R), device=dev, dtype=lora_b.dtype) if need_db else None
    g = torch.empty((M, R), device=dev, dtype=torch.float32) if need_da else None
    cfg_dx, cfg_dw = _bwd_config(M, N, K, R, x.dtype, lora_a.dtype)
    BR, prec, drop = _block_rank(R), _dot_precision(), dropout_p > 0.0
    common = dict(scaling=float(scaling), p=float(dropout_p), drop_scale=1.0 / (1.0 - float(dropout_p)),
                  seed=int(seed))
    specs = []
    if need_dx or need_da:
        dx_out, g_out = (dx if dx is not None else dy), (g if g is not None else dy)
        args = dict(
            dy_ptr=dy, w_ptr=weight if weight is not None else dy, a_ptr=lora_a, b_ptr=lora_b, dx_ptr=dx_out,
            g_ptr=g_out, M=M, N=N, K=K, R=R,
            stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_wn=stride_wn, stride_wk=stride_wk,
            stride_ar=lora_a.stride(0), stride_ak=lora_a.stride(1), stride_bn=lora_b.stride(0),
            stride_br=lora_b.stride(1), stride_dxm=dx_out.stride(0), stride_dxk=dx_out.stride(1),
            stride_gm=g_out.stride(0), stride_gr=g_out.stride(1), **common,
        )
        constexprs = dict(BM=cfg_dx.BM, BN=cfg_dx.BN, BK=cfg_dx.BK, BR=BR, GROUP_M=_GROUP_M,
                          HAS_BASE=weight is not None, HAS_DROPOUT=drop, NEED_DX=need_dx, STORE_G=need_da,
                          DOT_PREC=prec)
        grid = (triton.cdiv(M, cfg_dx.BM) * (triton.cdiv(K, cfg_dx.BK) if need_dx else 1),)
        specs.append(KernelSpec("lora_bwd_dx_kernel", lora_bwd_dx_kernel, args, constexprs, cfg_dx.num_warps,
                                cfg_dx.num_stages, grid))
    if need_da or need_db:
        num_da = triton.cdiv(K, cfg_dw.BK) if need_da else 0
        num_db = triton.cdiv(N, cfg_dw.BN) if need_db else 0
        g_in, xa_in = (g if g is not None else x), (xa if need_db else x)
        da_out, db_out = (da if da is not None else lora_a), (db if db is not None else lora_b)
        args = dict(
            x_ptr=x, g_ptr=g_in, dy_ptr=dy, xa_ptr=xa_in, da_ptr=da_out, db_ptr=db_out, M=M, N=N, K=K, R=R,
            num_da=num_da, stride_xm=x.stride(0), stride_xk=x.stride(1), stride_gm=g_in.stride(0),
            stride_gr=g_in.stride(1), stride_dym=dy.stride(0), stride_dyn=dy.stride(1), stride_xam=xa_in.stride(0),
            stride_xar=xa_in.stride(1), stride_dar=da_out.stride(0), stride_dak=da_out.stride(1),
            stride_dbn=db_out.stride(0), stride_dbr=db_out.stride(1), **common,
        )
        constexprs = dict(BM=cfg_dw.BM, BN=cfg_dw.BN, BK=cfg_dw.BK, BR=BR, HAS_DROPOUT=drop, NEED_DA=need_da,
                          NEED_DB=need_db, DOT_PREC=prec)
        specs.append(KernelSpec("lora_bwd_dw_kernel", lora_bwd_dw_kernel, args, constexprs, cfg_dw.num_warps,
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
    specs, dx, da, db = _plan_bwd(dy, x, weight, lora_a, lora_b, xa, scaling, dropout_p, seed, weight_t, need_dx,
                                  need_da, need_db)
    if x.shape[0] == 0:  # no rows: the weight gradients are sums over nothing
        da = None if da is None else da.zero_()
        db = None if db is None else db.zero_()
        return dx, da, db
    for spec in specs:
        _launch(spec, x.device)
    return dx, da, db


def _plan_mask(seed: int, M: int, K: int, p: float, device) -> tuple[KernelSpec, Tensor]:
    keep = torch.empty((M, K), device=device, dtype=torch.uint8)
    BM, BK = 32, 64
    args = dict(keep_ptr=keep, M=M, K=K, p=float(p), seed=int(seed))
    grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
    spec = KernelSpec("lora_dropout_mask_kernel", lora_dropout_mask_kernel, args, dict(BM=BM, BK=BK), 4, 1, grid)
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

    Every table row (decode / prefill x rank class) for every (x, adapter) dtype pair PEFT produces, at the largest
    rank of the row (registers and shared memory grow with BR, so that is the row's worst case), with the features
    on that cost the most (bias, lora_bias, residual, dropout, xa, all gradients); nn.Linear and, for the smallest
    rank class, the transposed Conv1D weight too (dw never reads the weight, so it has no weight_t variant).
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
                    if not (weight_t and spec.name == "lora_bwd_dw_kernel"):
                        out.append((f"{spec.name.removeprefix('lora_bwd_').removesuffix('_kernel')}-{tag}", spec))
    return out

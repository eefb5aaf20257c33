"""The adapted-linear Triton kernels at decode sizes: one GEMV/GEMM family that LoRA and IA3 switch on with constexpr
flags. (At M > 16 LoRA runs the split plan, ``lora_split.py``: cuBLAS for the base product.)

Forward (``linear_fwd_kernel``), x [M, K], W [N, K] (or [K, N] read through strides), bias [N]:

    LoRA (HAS_LORA):     y = residual + x W^T + bias + s * (drop(x) A^T B^T + lora_bias)    xa = drop(x) A^T
    IA3, SCALE_INPUT:    y = (x * l[k]) W^T + bias        the x tile is scaled in the K loop, before the dot
    IA3, SCALE_OUTPUT:   y = (x W^T + bias) * l[n]        the accumulator is scaled in the epilogue (STORE_BASE:
                                                          x W^T + bias is stored too, for the backward)

LoRA's xa is formed by each program in a loop of its own before the base loop, then multiplied by its B tile in the
epilogue (why apart: see the kernel). IA3's backward, ``linear_bwd_dx_kernel``: dx = dy W from one loop over N, dy
scaled by l[n] before the dot or dx by l[k] in the epilogue, and dl without a second launch:

    SCALE_INPUT:   dl[k] = sum_m x[m, k] (dy W)[m, k]: each (M tile, K tile) program reduces its own fp32 dy W tile
                   over its rows before the l[k] scaling;
    SCALE_OUTPUT:  dl[n] = sum_m base[m, n] dy[m, n] (or (y[m, n] / l[n]) dy[m, n] from the saved output): after
                   its dx tile, each program of an M tile reduces a round-robin share of that tile's N blocks.

Both write fp32 partials [cdiv(M, BM), K or N], one row per M tile; the launcher sums the rows (a fixed-order,
deterministic reduction: no atomics anywhere).

Precision: every product accumulates in fp32 and each output is cast once on store. IA3 rounds like PEFT where
PEFT rounds an operand of a matmul: the scaled input (x cast to l's dtype, times l, rounded to l's dtype, then to
x's) and the scaled output gradient (dy * l rounded to dy's dtype) are rounded before their dots. LoRA's adapter
product runs in the adapter dtype (drop(x) and xa rounded to A's dtype before their dots), as PEFT does.

Dropout: keep[m, k] = uniform >= p from Philox4x32-10 keyed by seed at element (m, k), scaled by 1 / (1 - p); the
stream (four elements per Philox counter, int64 counters) is defined in ``_dropout_keep``, which every LoRA kernel
(this one, the split plan's, the mask kernel) calls. The seed is read from a device tensor; the mask is regenerated
from it in the backward, never stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["linear_fwd_kernel", "linear_bwd_dx_kernel", "lora_dropout_mask_kernel"]


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


@triton.jit
def _as_scaled_operand(b_x, l_dtype: tl.constexpr):
    """x as PEFT multiplies it by an IA3 vector of ``l_dtype``: ``x.to(l.dtype)``, then widened to fp32."""
    return b_x.to(tl.float32).to(l_dtype).to(tl.float32)


@triton.jit
def _scale_input(b_x, b_l):
    """(x * l[k]) for an x tile [BM, BK] and l [BK], rounded as PEFT's ``(x.to(l.dtype) * l).to(x.dtype)``: the
    product is exact in fp32 and rounded to l's dtype, then to x's (both no-ops where the dtype is fp32)."""
    b_xs = _as_scaled_operand(b_x, b_l.dtype) * b_l.to(tl.float32)[None, :]  # [BM, BK]
    return b_xs.to(b_l.dtype).to(tl.float32).to(b_x.dtype)


@triton.jit
def linear_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, lbias_ptr, res_ptr, l_ptr, y_ptr, xa_ptr, base_ptr, seed_ptr, xap_ptr,
    M, N, K, R, S,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_rm, stride_rn, stride_l, stride_ym, stride_yn, stride_xam, stride_xar, stride_ps, stride_pm, stride_pr,
    scaling, p, drop_scale,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_LORA_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_XA: tl.constexpr, SCALE_INPUT: tl.constexpr,
    SCALE_OUTPUT: tl.constexpr, STORE_BASE: tl.constexpr, XA_IN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # W is read through (stride_wn, stride_wk), so nn.Linear [N, K] and Conv1D [K, N] weights need no copy.
    # base is allocated like y and written through y's strides.
    a_dtype = a_ptr.dtype.element_ty
    i_m, i_n = _tile_ids(tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM] int64
    o_n = i_n * BN + tl.arange(0, BN)  # [BN] int64
    o_k = tl.arange(0, BK).to(tl.int64)  # [BK]
    o_r = tl.arange(0, BR)  # [BR]
    m_m, m_n, m_r = o_m < M, o_n < N, o_r < R

    p_x0 = x_ptr + o_m[:, None] * stride_xm  # [BM, 1]
    p_w0 = w_ptr + o_n[None, :] * stride_wn  # [1, BN]
    if HAS_LORA and XA_IN:
        # xa from the S fp32 partial sums [S, M, R] of a shrink launch (at high rank, where every program forming xa
        # would re-read more of A than the whole of W), added in a fixed order
        p_part = xap_ptr + o_m[:, None] * stride_pm + o_r[None, :] * stride_pr  # [BM, BR]
        b_xa = tl.zeros([BM, BR], dtype=tl.float32)
        for i_s in range(0, S):
            b_xa += tl.load(p_part + i_s * stride_ps, mask=m_m[:, None] & m_r[None, :], other=0.0)
    elif HAS_LORA:
        # xa = drop(x) A^T in a loop of its own, before the base loop: sharing the base loop's x tile made Triton lay
        # out every dot for the chained xa -> B product (warps along M: [4, 1], 4x redundant MMAs at BM = 16, shared
        # memory traffic 1.7x); apart, the base GEMV gets the [1, 4] layout IA3's gets.
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)  # a device tensor: a captured CUDA graph replays with the seed its RNG op wrote
        p_a0 = a_ptr + o_r[None, :] * stride_ar  # [1, BR]
        b_xa = tl.zeros([BM, BR], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_kk = k0 + o_k  # [BK]
            m_k = o_kk < K
            b_x = tl.load(p_x0 + o_kk[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, o_m, k0, K, p, BM, BK)  # [BM, BK]
                b_x = tl.where(keep, b_x.to(tl.float32) * drop_scale, 0.0)
            b_a = tl.load(p_a0 + o_kk[:, None] * stride_ak, mask=m_k[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
            b_xa = tl.dot(b_x.to(a_dtype), b_a, b_xa, input_precision=DOT_PREC)
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    if HAS_BASE:
        for k0 in range(0, K, BK):
            o_kk = k0 + o_k  # [BK]
            m_k = o_kk < K
            b_x = tl.load(p_x0 + o_kk[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
            if SCALE_INPUT:
                b_l = tl.load(l_ptr + o_kk * stride_l, mask=m_k, other=0.0)  # [BK], once per x tile
                b_x = _scale_input(b_x, b_l)  # [BM, BK]
            b_w = tl.load(p_w0 + o_kk[:, None] * stride_wk, mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BK, BN]
            b_acc = tl.dot(b_x, b_w, b_acc, input_precision=DOT_PREC)

    if HAS_LORA:
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
    o_y = o_m[:, None] * stride_ym + o_n[None, :] * stride_yn  # [BM, BN]
    if SCALE_OUTPUT:
        b_l = tl.load(l_ptr + o_n * stride_l, mask=m_n, other=0.0).to(tl.float32)  # l [BN], once
        if STORE_BASE:
            tl.store(base_ptr + o_y, b_acc.to(base_ptr.dtype.element_ty), mask=m_y)
        b_acc *= b_l[None, :]
    if HAS_RESIDUAL:
        p_res = res_ptr + o_m[:, None] * stride_rm + o_n[None, :] * stride_rn  # [BM, BN]
        b_acc += tl.load(p_res, mask=m_y, other=0.0).to(tl.float32)
    tl.store(y_ptr + o_y, b_acc.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.jit
def linear_bwd_dx_kernel(
    dy_ptr, w_ptr, l_ptr, s_ptr, dx_ptr, dl_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_l, stride_sm, stride_sc, stride_dxm, stride_dxk,
    stride_dlm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, NEED_DX: tl.constexpr,
    SCALE_INPUT: tl.constexpr, SCALE_OUTPUT: tl.constexpr, STORE_DL: tl.constexpr, DL_DIV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # IA3's backward at decode sizes: dx = dy W from one loop over N, with dy scaled by l[n] before the dot or dx by
    # l[k] in the epilogue, and the dl partial sums. The grid spans the K tiles when the dx tile is formed (for dx,
    # or for input-scaling dl, which reduces dy W); otherwise it has one column of programs, which only reduce the
    # output-scaling dl. s is IA3's saved tensor: x [M, K] for input scaling, the base output (or y, DL_DIV)
    # [M, N] for output scaling; dl partials are [cdiv(M, BM), K or N] with unit column stride, one row per M tile.
    FORM_DX: tl.constexpr = NEED_DX or (SCALE_INPUT and STORE_DL)
    num_k = tl.cdiv(K, BK) if FORM_DX else 1
    i_m, i_k = _tile_ids(tl.cdiv(M, BM), num_k, GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM] int64
    o_k = i_k * BK + tl.arange(0, BK)  # [BK] int64
    o_n = tl.arange(0, BN).to(tl.int64)  # [BN]
    m_m, m_k = o_m < M, o_k < K

    p_dy0 = dy_ptr + o_m[:, None] * stride_dym  # [BM, 1]
    p_w0 = w_ptr + o_k[None, :] * stride_wk  # [1, BK]
    b_acc = tl.zeros([BM, BK], dtype=tl.float32)
    if FORM_DX:
        for n0 in range(0, N, BN):
            o_nn = n0 + o_n  # [BN]
            m_n = o_nn < N
            b_dy = tl.load(p_dy0 + o_nn[None, :] * stride_dyn, mask=m_m[:, None] & m_n[None, :], other=0.0)
            if SCALE_OUTPUT:
                b_l = tl.load(l_ptr + o_nn * stride_l, mask=m_n, other=0.0).to(tl.float32)  # [BN], once per dy tile
                b_dy = (b_dy.to(tl.float32) * b_l[None, :]).to(b_dy.dtype)  # [BM, BN] rounded, as PEFT's grad
            b_w = tl.load(p_w0 + o_nn[:, None] * stride_wn, mask=m_n[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
            b_acc = tl.dot(b_dy, b_w, b_acc, input_precision=DOT_PREC)
    if SCALE_INPUT:
        b_l = tl.load(l_ptr + o_k * stride_l, mask=m_k, other=0.0)  # [BK], once per dx tile
        if STORE_DL:
            p_s = s_ptr + o_m[:, None] * stride_sm + o_k[None, :] * stride_sc  # [BM, BK]
            b_x = _as_scaled_operand(tl.load(p_s, mask=m_m[:, None] & m_k[None, :], other=0.0), b_l.dtype)
            tl.store(dl_ptr + i_m * stride_dlm + o_k, tl.sum(b_x * b_acc, axis=0), mask=m_k)  # [BK]
        b_acc *= b_l.to(tl.float32)[None, :]
    if NEED_DX:
        p_dx = dx_ptr + o_m[:, None] * stride_dxm + o_k[None, :] * stride_dxk  # [BM, BK]
        tl.store(p_dx, b_acc.to(dx_ptr.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])
    if SCALE_OUTPUT:
        if STORE_DL:
            # After the dx tile is stored (nothing else live): the N blocks of this M tile are dealt out round-robin
            # to its num_k programs, which just streamed all of dy's rows (an L2-warm re-read of 1 / num_k of it).
            for n0 in range(i_k * BN, N, num_k * BN):
                o_nn = n0 + o_n  # [BN]
                m_n = o_nn < N
                m_dy = m_m[:, None] & m_n[None, :]
                b_dy = tl.load(p_dy0 + o_nn[None, :] * stride_dyn, mask=m_dy, other=0.0).to(tl.float32)  # [BM, BN]
                p_s = s_ptr + o_m[:, None] * stride_sm + o_nn[None, :] * stride_sc  # [BM, BN]
                b_dl = tl.sum(tl.load(p_s, mask=m_dy, other=0.0).to(tl.float32) * b_dy, axis=0)  # [BN]
                if DL_DIV:  # s is y = base * l
                    b_dl = b_dl / tl.load(l_ptr + o_nn * stride_l, mask=m_n, other=1.0).to(tl.float32)
                tl.store(dl_ptr + i_m * stride_dlm + o_nn, b_dl, mask=m_n)


@triton.jit
def lora_dropout_mask_kernel(keep_ptr, seed_ptr, M, K, p, BM: tl.constexpr, BK: tl.constexpr):
    seed = tl.load(seed_ptr)
    o_m = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)  # [BM]
    k0 = tl.program_id(1).to(tl.int64) * BK
    o_k = k0 + tl.arange(0, BK)  # [BK]
    keep = _dropout_keep(seed, o_m, k0, K, p, BM, BK)  # [BM, BK]
    m = (o_m < M)[:, None] & (o_k < K)[None, :]
    tl.store(keep_ptr + o_m[:, None] * K + o_k[None, :], keep.to(tl.int8), mask=m)

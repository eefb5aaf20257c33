"""LoRA's adapter math around a cuBLAS base product: three thin Triton kernels (no HF imports).

At M > 16 rows the base product x W^T is a large GEMM, and cuBLAS is its floor; a Triton main loop with the
adapter math inside it lost to cuBLAS by 1.2-18x on the compiled evidence (shared/notes/kernel-review.md, P1-P4).
So the layer is split, and the adapter math moves no more than it must (x [M, K], W [N, K], A [R, K], B [N, R]):

    forward   xa = drop(x) A^T                      lora_shrink   reads x once; the mask is drawn once per element
              z  = s (xa B^T + b_B) + b + residual  lora_expand   writes z once, in x's dtype
              y  = z + x W^T                        cuBLAS addmm_ with beta = 1: z is read in the GEMM's epilogue
    backward  g  = s dY B                           lora_shrink   on dY, B read as "A" through its strides (fp32)
              t  = keep / (1 - p) (g A)             lora_expand   masked on its output
              dX = t + dY W                         cuBLAS addmm_
              dA = g^T drop(x)                      lora_wgrad    split over M
              dB = s dY^T xa                        lora_wgrad    split over M

Extra bytes over the base GEMM: forward 2MK (x again) + 2MN (z), backward 2MN (dY for g) + 2MN (dY for dB) +
2MK (t) + 2MK (x for dA), at 16-bit. The adapter FLOPs are 2R/N and 2R/K of the base's (0.8% at r = 16).

Reductions over long axes (K in the shrink, M in wgrad) are split into S contiguous ranges when the other axes give
too few programs to fill the GPU; each range writes an fp32 partial [S, ...], which the shrink's consumers add in a
fixed order as they load them and wgrad's launcher sums (``Tensor.sum(0)``): deterministic, no atomics. With S = 1
the kernel writes the result directly, rounded to its dtype.

Precision (as PEFT, which runs the adapter in its own dtype): x (or dY) is cast to the adapter dtype before its dot,
with dropout applied in fp32 and the product rounded to that dtype; xa is rounded to A's dtype before the B product;
g is kept in fp32 (it feeds dA and t) and rounded to A's dtype before the A product; every dot accumulates in fp32;
z and t are rounded once, to x's dtype. fp32 operands use ``DOT_PREC`` (3xTF32 unless TF32 is allowed, see
``_common._dot_precision``).

Dropout: keep[m, k] comes from ``_dropout_keep`` (Philox keyed by the element index, adapted_linear.py), so the
shrink, expand and wgrad tiles agree with each other and with the fused decode kernel whatever their tile sizes. The
seed is read from a device tensor (``seed_ptr``), never passed by value: a captured CUDA graph replays the kernel
with whatever seed the graph's own RNG op wrote, so each replay draws a fresh mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .adapted_linear import _dropout_keep, _tile_ids

__all__ = ["lora_shrink_kernel", "lora_expand_kernel", "lora_wgrad_kernel", "SPLIT_NONE", "SPLIT_A", "SPLIT_B",
           "SPLIT_AB"]

SPLIT_NONE, SPLIT_A, SPLIT_B, SPLIT_AB = 0, 1, 2, 3  # which operand of ``_mma`` is split into bf16 parts


@triton.jit
def _bf16_parts(v):
    """fp32 v as hi + mid + lo, three bf16 (round-to-nearest): their sum is v to about 24 bits, fp32's precision."""
    hi = v.to(tl.bfloat16)
    rest = v - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    return hi, mid, (rest - mid.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _mma(a, b, acc, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + a @ b. SPLIT_NONE: one tl.dot in the operands' dtype (fp32 ones at DOT_PREC: 3xTF32 by default).

    PEFT's default on a bf16 model is fp32 adapters; there one operand of every thin product is exact in bf16 (x, or
    dY, or a 0/1-masked x), so the fp32 product runs as bf16 MMAs, at twice 3xTF32's rate:
    - SPLIT_A / SPLIT_B: the other operand split, v = hi + mid + lo: three products, each exact in fp32 (8-bit by
      8-bit mantissas), accumulated in fp32: fp32-grade, as IEEE fp32 is;
    - SPLIT_AB (both fp32, the result rounded to 16 bits): a = a1 + a2, b = b1 + b2 (16 bits each) and
      a1 b1 + a1 b2 + a2 b1: relative error about 2^-16, far below the output's own rounding (2^-9 to 2^-11).
    Small terms are added first."""
    if SPLIT == 1:
        a1, a2, a3 = _bf16_parts(a.to(tl.float32))
        b16 = b.to(tl.bfloat16)
        acc = tl.dot(a3, b16, acc)
        acc = tl.dot(a2, b16, acc)
        acc = tl.dot(a1, b16, acc)
    elif SPLIT == 2:
        a16 = a.to(tl.bfloat16)
        b1, b2, b3 = _bf16_parts(b.to(tl.float32))
        acc = tl.dot(a16, b3, acc)
        acc = tl.dot(a16, b2, acc)
        acc = tl.dot(a16, b1, acc)
    elif SPLIT == 3:
        a1 = a.to(tl.bfloat16)
        a2 = (a.to(tl.float32) - a1.to(tl.float32)).to(tl.bfloat16)
        b1 = b.to(tl.bfloat16)
        b2 = (b.to(tl.float32) - b1.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(a2, b1, acc)
        acc = tl.dot(a1, b2, acc)
        acc = tl.dot(a1, b1, acc)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seed_ptr,
    M, K, R, k_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_os, stride_om, stride_or,
    scale, p, drop_scale,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, HAS_DROPOUT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """out[s, m, :] = scale * drop(x)[m, ks] A[:, ks]^T over the K range ks = [s k_split, (s + 1) k_split).

    Grid (cdiv(M, BM), S). Each x element is loaded by exactly one program, so its mask is drawn once. The masked
    x enters the product unscaled and 1 / (1 - p) scales the fp32 sum (one rounding less than PEFT's dropped copy;
    and a bf16 x stays exact in bf16, which SPLIT_B needs)."""
    a_dtype = a_ptr.dtype.element_ty
    i_m = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM] int64
    o_r = tl.arange(0, BR)  # [BR]
    m_m, m_r = o_m < M, o_r < R
    k_lo = i_s * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    p_x0 = x_ptr + o_m[:, None] * stride_xm  # [BM, 1]
    p_a0 = a_ptr + o_r[None, :] * stride_ar  # [1, BR]
    b_acc = tl.zeros([BM, BR], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)  # [BK] int64
        m_k = o_k < k_hi
        b_x = tl.load(p_x0 + o_k[None, :] * stride_xk, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, o_m, k0, K, p, BM, BK)  # [BM, BK]
            b_x = tl.where(keep, b_x, 0.0)
        b_a = tl.load(p_a0 + o_k[:, None] * stride_ak, mask=m_k[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
        b_acc = _mma(b_x.to(a_dtype), b_a, b_acc, SPLIT, DOT_PREC)
    if HAS_DROPOUT:
        b_acc = b_acc * drop_scale
    p_out = out_ptr + i_s * stride_os + o_m[:, None] * stride_om + o_r[None, :] * stride_or  # [BM, BR]
    tl.store(p_out, (b_acc * scale).to(out_ptr.dtype.element_ty), mask=m_m[:, None] & m_r[None, :])


@triton.jit
def lora_expand_kernel(
    xa_ptr, b_ptr, lbias_ptr, bias_ptr, res_ptr, out_ptr, xs_ptr, seed_ptr,
    M, N, R, S,
    stride_xas, stride_xam, stride_xar, stride_bn, stride_br, stride_rm, stride_rn, stride_om, stride_on,
    stride_xsm, stride_xsr,
    scale, p, drop_scale,
    BM: tl.constexpr, BN: tl.constexpr, BRK: tl.constexpr, GROUP_M: tl.constexpr, HAS_LORA_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_XA: tl.constexpr,
    SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """out[m, n] = drop(scale * (xa[m, :] B[n, :]^T + b_B[n])) + bias[n] + residual[m, n], rounded once.

    Grid cdiv(M, BM) * cdiv(N, BN), grouped so that programs sharing xa's rows run together. A dot of depth R per
    program (in chunks of BRK): the kernel is bound by the store of out. xa comes as the shrink's S fp32 partial
    sums [S, M, R], added here in a fixed order and rounded to B's dtype before the dot (STORE_XA: the programs of
    the first column block store it, in xs's dtype, for the backward), or unsplit (S = 1) already rounded."""
    b_dtype = b_ptr.dtype.element_ty
    i_m, i_n = _tile_ids(tl.cdiv(M, BM), tl.cdiv(N, BN), GROUP_M)
    o_m = i_m * BM + tl.arange(0, BM)  # [BM] int64
    o_n = i_n * BN + tl.arange(0, BN)  # [BN] int64
    m_m, m_n = o_m < M, o_n < N
    p_xa0 = xa_ptr + o_m[:, None] * stride_xam  # [BM, 1]
    p_b0 = b_ptr + o_n[None, :] * stride_bn  # [1, BN]
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for r0 in range(0, R, BRK):  # R in chunks: a [BM, R] x [R, BN] dot held whole spills at R = 128-256 in fp32
        o_r = r0 + tl.arange(0, BRK)  # [BRK]
        m_r = o_r < R
        p_xa = p_xa0 + o_r[None, :] * stride_xar  # [BM, BRK]
        m_xa = m_m[:, None] & m_r[None, :]
        b_xa = tl.zeros([BM, BRK], dtype=tl.float32)
        for i_part in range(0, S):
            b_xa += tl.load(p_xa + i_part * stride_xas, mask=m_xa, other=0.0).to(tl.float32)
        if STORE_XA:
            if i_n == 0:
                p_xs = xs_ptr + o_m[:, None] * stride_xsm + o_r[None, :] * stride_xsr  # [BM, BRK]
                tl.store(p_xs, b_xa.to(xs_ptr.dtype.element_ty), mask=m_xa)
        b_b = tl.load(p_b0 + o_r[:, None] * stride_br, mask=m_r[:, None] & m_n[None, :], other=0.0)  # [BRK, BN]
        b_acc = _mma(b_xa.to(b_dtype), b_b, b_acc, SPLIT, DOT_PREC)
    if HAS_LORA_BIAS:
        b_acc += tl.load(lbias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    b_acc = b_acc * scale
    if HAS_DROPOUT:
        keep = _dropout_keep(tl.load(seed_ptr), o_m, i_n * BN, N, p, BM, BN)  # [BM, BN]
        b_acc = tl.where(keep, b_acc * drop_scale, 0.0)
    if HAS_BIAS:
        b_acc += tl.load(bias_ptr + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    m_o = m_m[:, None] & m_n[None, :]
    if HAS_RESIDUAL:
        p_res = res_ptr + o_m[:, None] * stride_rm + o_n[None, :] * stride_rn  # [BM, BN]
        b_acc += tl.load(p_res, mask=m_o, other=0.0).to(tl.float32)
    p_out = out_ptr + o_m[:, None] * stride_om + o_n[None, :] * stride_on  # [BM, BN]
    tl.store(p_out, b_acc.to(out_ptr.dtype.element_ty), mask=m_o)


@triton.jit
def lora_wgrad_kernel(
    g_ptr, x_ptr, ref_ptr, out_ptr, seed_ptr,
    M, C, R, m_split, S_g,
    stride_gs, stride_gm, stride_gr, stride_xm, stride_xc, stride_os, stride_or, stride_oc,
    scale, p, drop_scale,
    BM: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr, HAS_DROPOUT: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """out[s, :, c] = scale * g[ms, :]^T drop(x)[ms, c] over the row range ms = [s m_split, (s + 1) m_split).

    Grid (cdiv(C, BC), S). dA: g = s dY B, x = x, C = K. dB: g = xa, x = dY, C = N (out written through the
    transposed strides). g may come as S_g fp32 partial sums (the shrink's), added in a fixed order. Both operands
    are rounded to the parameter's dtype (``ref_ptr``'s, never read)."""
    w_dtype = ref_ptr.dtype.element_ty
    i_c = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)  # [BC] int64
    o_r = tl.arange(0, BR)  # [BR]
    m_c, m_r = o_c < C, o_r < R
    m_lo = i_s * m_split
    m_hi = tl.minimum(M, m_lo + m_split)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    p_g0 = g_ptr + o_r[:, None] * stride_gr  # [BR, 1]
    p_x0 = x_ptr + o_c[None, :] * stride_xc  # [1, BC]
    b_acc = tl.zeros([BR, BC], dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        o_m = m0 + tl.arange(0, BM)  # [BM] int64
        m_m = o_m < m_hi
        p_g = p_g0 + o_m[None, :] * stride_gm  # [BR, BM]
        b_gt = tl.zeros([BR, BM], dtype=tl.float32)
        for i_part in range(0, S_g):
            b_gt += tl.load(p_g + i_part * stride_gs, mask=m_r[:, None] & m_m[None, :], other=0.0).to(tl.float32)
        b_x = tl.load(p_x0 + o_m[:, None] * stride_xm, mask=m_m[:, None] & m_c[None, :], other=0.0)  # [BM, BC]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, o_m, i_c * BC, C, p, BM, BC)  # [BM, BC]
            b_x = tl.where(keep, b_x, 0.0)  # unscaled: 1 / (1 - p) scales the sum, as in the shrink
        b_acc = _mma(b_gt.to(w_dtype), b_x.to(w_dtype), b_acc, SPLIT, DOT_PREC)
    if HAS_DROPOUT:
        b_acc = b_acc * drop_scale
    p_out = out_ptr + i_s * stride_os + o_r[:, None] * stride_or + o_c[None, :] * stride_oc  # [BR, BC]
    tl.store(p_out, (b_acc * scale).to(out_ptr.dtype.element_ty), mask=m_r[:, None] & m_c[None, :])

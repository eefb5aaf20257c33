"""Prefix attention: flash attention over ``[prefix | sequence]`` with the prefix read once per kv head, never
concatenated, never expanded over the batch. Semantics: ``fastpeft.reference.prefix_attention_ref``.

q [B, H, Sq, D], k / v [B, Hkv, Skv, D] (query head h reads kv head h // G, G = H / Hkv), prefix_k / prefix_v
[Hkv, P, D] (batch stride 0). Per query row, with s = q k^T * scaling over the P prefix columns then the Skv sequence
columns, each soft-capped, biased and masked as the reference orders it:

    m = max_j s_j        l = sum_j exp(s_j - m)        lse = m + log l        O = sum_j exp(s_j - lse) V_j

Forward (``prefix_attention_fwd_kernel``): one program per (block of BM query rows, batch row, kv head). The rows of
a program are the G query heads of its kv head folded into M, ``r = g Sq + i``, so a decode step (Sq = 1) loads each
prefix and K/V tile once per kv head rather than G times, and prefill (Sq >= BM) gets one head per block. The key
loop runs over the prefix blocks, then the sequence blocks, with an fp32 online softmax in the log2 domain
(``exp2``; log2(e) folded into the score scale). Causal with no mask stops at the block's last diagonal key; a
sliding window skips the prefix blocks it hides for every row of the block.

Backward (flash-attention 2, against the merged O and lse):

    p = exp(s - lse)    delta = rowsum(dO * O)    ds = p (dO V^T - delta)  (times 1 - tanh^2 under softcap)
    dQ = scaling ds [Pk | K]     dK = scaling ds^T Q     dV = p^T dO     (prefix: the same, summed over the batch)

``..._bwd_delta_kernel`` forms delta; ``..._bwd_dkv_kernel`` runs one program per (key block, batch row, kv head)
over every query row of the kv group (its G heads reduced in the program, in a fixed order); ``..._bwd_dq_kernel``
is the forward's loop with dQ as the accumulator. No atomics: sequence keys belong to one batch row, so dK / dV are
stored directly; for the prefix keys each batch row's program stores an fp32 partial in a [B, Hkv, P, D] workspace
and ``Tensor.sum`` over B (a fixed-order reduction) adds them, so dprefix is bitwise reproducible.

Precision: scores, softmax statistics and every accumulator are fp32; probabilities (and ds) are rounded to the
input dtype before their products, as eager attention rounds them; outputs are cast once on store (out, dq, dk, dv
in the input dtype; lse fp32; dprefix reduced in fp32, then cast). Dots with fp32 operands follow
``_common._dot_precision`` (3xTF32, fp32-grade, unless ``allow_tf32``; IEEE fp32 dots lower to FMAs that spill).
Head dims up to 256 (fp32: 128) are padded to BD = max(16, next_pow2(D)) with masks (``tl.dot`` needs K >= 16).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["prefix_attention_fwd_kernel", "prefix_attention_bwd_delta_kernel", "prefix_attention_bwd_dkv_kernel",
           "prefix_attention_bwd_dq_kernel", "LOG2E_HOST"]

LOG2E_HOST = 1.4426950408889634  # folded into the score scale by the launchers
LOG2E = tl.constexpr(LOG2E_HOST)
LN2 = tl.constexpr(0.6931471805599453)
MASK_CLAMP = tl.constexpr(-1e38)  # additive masks are clamped here: mask * log2(e) stays finite (finfo.min would not)


@triton.jit
def _tanh(x):
    """fp32 tanh (Cephes tanhf, 2 ulp; the interpreter has no libdevice): 1 - 2 / (e^2|x| + 1) for |x| >= 0.625,
    an odd minimax polynomial below, where the exp form would cancel its low bits."""
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp2(tl.minimum(a, 16.0) * 2.8853900817779268) + 1.0)  # e^2|x|; tanh(16) = 1 in fp32
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1) * z * x + x
    return tl.where(a >= 0.625, tl.where(x < 0, -big, big), small)


@triton.jit
def _scores(qk, i_q, j_k, m_ld, p_bias, p_mask, lim, qk_scale, cap2, cap_in, PREFIX: tl.constexpr,
            SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
            WINDOW: tl.constexpr):
    """One score tile in the log2 domain, ``s * log2(e)`` with the reference's terms in its order, and
    t = tanh(qk scaling / softcap) for the softcap backward (qk itself when there is no softcap; then unused).

    Orientation-free: ``i_q`` / ``j_k`` are the query / key indices broadcastable to the tile, ``m_ld`` the
    in-range elements, ``p_bias`` / ``p_mask`` pointer tiles. Sequence tiles apply the mask (MASK 1: bool, True
    attends; 2: additive) or the upper-left causal rule; prefix tiles the window (hidden iff j <= lim + i,
    lim = P + Skv - Sq - window).
    """
    if SOFTCAP:
        t = _tanh(qk * cap_in)  # cap_in = scaling / softcap
        s = t * cap2  # cap2 = softcap log2(e)
    else:
        t = qk
        s = qk * qk_scale  # qk_scale = scaling log2(e)
    if HAS_BIAS:
        s += tl.load(p_bias, mask=m_ld, other=0.0).to(tl.float32) * LOG2E
    hidden = ~m_ld
    if PREFIX:
        if WINDOW:
            hidden |= j_k <= lim + i_q
    elif MASK == 1:
        hidden |= tl.load(p_mask, mask=m_ld, other=0) == 0
    elif MASK == 2:
        b_m = tl.load(p_mask, mask=m_ld, other=0.0).to(tl.float32)
        s += tl.maximum(b_m, MASK_CLAMP) * LOG2E
        hidden |= b_m == float("-inf")
    elif CAUSAL:
        hidden |= j_k > i_q
    return tl.where(hidden, float("-inf"), s), t


@triton.jit
def _row_block(Hkv, G, Sq, BM: tl.constexpr):
    """This program's batch row, kv head, and query rows r = g Sq + i over the G heads of the kv head: (i_b, i_kv,
    head [BM] int64, i [BM] int32, i [BM] int64, valid [BM], lowest and highest i in the block). Row blocks run
    fastest in the 1-D grid, so the programs of one kv head run together and share its K/V in L2."""
    rows = G * Sq
    i_p = tl.program_id(0)
    num_m = tl.cdiv(rows, BM)
    i_bk = (i_p // num_m).to(tl.int64)
    r0 = (i_p % num_m) * BM
    o_r = r0 + tl.arange(0, BM)  # [BM]
    r1 = tl.minimum(r0 + BM, rows) - 1
    one_head = (r0 // Sq) == (r1 // Sq)
    i_lo = tl.where(one_head, r0 % Sq, 0)
    i_hi = tl.where(one_head, r1 % Sq, Sq - 1)
    i_kv = i_bk % Hkv
    o_i = o_r % Sq
    return i_bk // Hkv, i_kv, i_kv * G + (o_r // Sq).to(tl.int64), o_i, o_i.to(tl.int64), o_r < rows, i_lo, i_hi


@triton.jit
def _key_ranges(i_lo, i_hi, P, Skv, lim, BN: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """The first prefix block and the end of the sequence keys that rows i_lo .. i_hi can see: the window hides
    prefix keys j <= lim + i (start at the block of the lowest key the first row sees); causal hides j > i."""
    p_lo = 0
    if WINDOW:
        p_lo = (tl.minimum(tl.maximum(lim + i_lo + 1, 0), P) // BN) * BN
    s_hi = Skv
    if CAUSAL:
        s_hi = tl.minimum(Skv, i_hi + 1)
    return p_lo, s_hi


@triton.jit
def _key_blocks(acc, m_i, l_i, b_q, b_do, b_lse2, b_delta, p_k, p_v, stride_kn, stride_kd, stride_vn, stride_vd, lo,
                hi, N, o_i, m_r, o_d, m_d, p_brow, stride_bj, p_mrow, stride_mj, lim, qk_scale, cap2, cap_in,
                DQ: tl.constexpr, PREFIX: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
                MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BN: tl.constexpr,
                DOT_PREC: tl.constexpr):
    """The loop over key blocks lo .. hi of one key source (the prefix or the sequence). Forward: the online
    softmax into (acc = unnormalized O, m_i, l_i). DQ: acc += ds K from p = exp2(s - lse) (m_i, l_i unused)."""
    o_n = tl.arange(0, BN)
    for j0 in range(lo, hi, BN):
        o_j = j0 + o_n  # [BN]
        m_j = o_j < N
        o_jl = o_j.to(tl.int64)
        m_dj = m_d[:, None] & m_j[None, :]
        b_kt = tl.load(p_k + o_jl[None, :] * stride_kn + o_d[:, None] * stride_kd, mask=m_dj, other=0.0)  # [BD, BN]
        qk = tl.dot(b_q, b_kt, input_precision=DOT_PREC)  # [BM, BN] fp32
        s, t = _scores(qk, o_i[:, None], o_j[None, :], m_r[:, None] & m_j[None, :],
                       p_brow[:, None] + o_jl[None, :] * stride_bj, p_mrow[:, None] + o_jl[None, :] * stride_mj, lim,
                       qk_scale, cap2, cap_in, PREFIX, SOFTCAP, HAS_BIAS, MASK, CAUSAL, WINDOW)
        if DQ:
            b_vt = tl.load(p_v + o_jl[None, :] * stride_vn + o_d[:, None] * stride_vd, mask=m_dj, other=0.0)
            b_ds = tl.exp2(s - b_lse2[:, None]) * (tl.dot(b_do, b_vt, input_precision=DOT_PREC) - b_delta[:, None])
            if SOFTCAP:
                b_ds = b_ds * (1.0 - t * t)
            acc = tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), acc, input_precision=DOT_PREC)  # [BM, BD]
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))  # [BM]
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row hidden so far: exp2(-inf - 0) = 0, no NaN
            b_p = tl.exp2(s - m_use[:, None])  # [BM, BN]
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(b_p, 1)
            b_v = tl.load(p_v + o_jl[:, None] * stride_vn + o_d[None, :] * stride_vd,
                          mask=m_j[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
            acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT_PREC)  # [BM, BD]
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, mask_ptr, bias_ptr, pbias_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd, stride_pkh, stride_pkp, stride_pkd, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_mh, stride_ms, stride_mj, stride_bb, stride_bh, stride_bs, stride_bj,
    stride_pbb, stride_pbh, stride_pbs, stride_pbj, stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    Hkv, G, Sq, Skv, P, qk_scale, cap2, cap_in, window,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PBIAS: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_b, i_kv, o_h, o_i, o_il, m_r, i_lo, i_hi = _row_block(Hkv, G, Sq, BM)
    o_d = tl.arange(0, BD).to(tl.int64)
    m_d = o_d < D

    p_qrow = q_ptr + i_b * stride_qb + o_h * stride_qh + o_il * stride_qs  # [BM]
    b_q = tl.load(p_qrow[:, None] + o_d[None, :] * stride_qd, mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)

    lim = P + Skv - Sq - window
    p_lo, s_hi = _key_ranges(i_lo, i_hi, P, Skv, lim, BN, CAUSAL, WINDOW)
    p_brow = pbias_ptr + i_b * stride_pbb + o_h * stride_pbh + o_il * stride_pbs
    acc, m_i, l_i = _key_blocks(acc, m_i, l_i, b_q, b_q, m_i, m_i, pk_ptr + i_kv * stride_pkh,
                                pv_ptr + i_kv * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd, p_lo, P, P,
                                o_i, m_r, o_d, m_d, p_brow, stride_pbj, p_brow, 0, lim, qk_scale, cap2, cap_in, False,
                                True, SOFTCAP, HAS_PBIAS, 0, False, WINDOW, BN, DOT_PREC)
    p_brow = bias_ptr + i_b * stride_bb + o_h * stride_bh + o_il * stride_bs
    p_mrow = mask_ptr + i_b * stride_mb + o_h * stride_mh + o_il * stride_ms
    acc, m_i, l_i = _key_blocks(acc, m_i, l_i, b_q, b_q, m_i, m_i, k_ptr + i_b * stride_kb + i_kv * stride_kh,
                                v_ptr + i_b * stride_vb + i_kv * stride_vh, stride_ks, stride_kd, stride_vs,
                                stride_vd, 0, s_hi, Skv, o_i, m_r, o_d, m_d, p_brow, stride_bj, p_mrow, stride_mj, lim,
                                qk_scale, cap2, cap_in, False, False, SOFTCAP, HAS_BIAS, MASK, CAUSAL, False, BN,
                                DOT_PREC)

    seen = l_i > 0  # a row with every column hidden: out 0, lse -inf
    l_safe = tl.where(seen, l_i, 1.0)
    b_o = acc * tl.where(seen, 1.0 / l_safe, 0.0)[:, None]
    p_o = out_ptr + i_b * stride_ob + o_il * stride_os + o_h * stride_oh
    tl.store(p_o[:, None] + o_d[None, :] * stride_od, b_o.to(out_ptr.dtype.element_ty),
             mask=m_r[:, None] & m_d[None, :])
    b_lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    tl.store(lse_ptr + i_b * stride_lb + o_h * stride_lh + o_il * stride_ls, b_lse, mask=m_r)


@triton.jit
def prefix_attention_bwd_delta_kernel(
    do_ptr, o_ptr, delta_ptr, stride_dob, stride_dos, stride_doh, stride_dod, stride_ob, stride_os, stride_oh,
    stride_od, H, Sq, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, i, h, d] O[b, i, h, d] in fp32, written as a contiguous [B, H, Sq]."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)  # [BR] index into [B, H, Sq]
    m_r = o_r < R
    o_i, o_h, o_b = o_r % Sq, (o_r // Sq) % H, o_r // (Sq * H)
    o_d = tl.arange(0, BD)
    m = m_r[:, None] & (o_d < D)[None, :]
    b_do = tl.load(do_ptr + (o_b * stride_dob + o_i * stride_dos + o_h * stride_doh)[:, None]
                   + o_d[None, :] * stride_dod, mask=m, other=0.0)  # [BR, BD]
    b_o = tl.load(o_ptr + (o_b * stride_ob + o_i * stride_os + o_h * stride_oh)[:, None] + o_d[None, :] * stride_od,
                  mask=m, other=0.0)  # [BR, BD]
    tl.store(delta_ptr + o_r, tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), 1), mask=m_r)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, i_b, o_h, o_il, m_r, stride_lb, stride_lh, stride_ls, H, Sq):
    """(lse in the log2 domain, delta) of rows [BM]; a fully hidden row's lse -inf becomes +inf (so p = 0)."""
    b_lse = tl.load(lse_ptr + i_b * stride_lb + o_h * stride_lh + o_il * stride_ls, mask=m_r, other=float("inf"))
    b_delta = tl.load(delta_ptr + (i_b * H + o_h) * Sq + o_il, mask=m_r, other=0.0)
    return tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E), b_delta


@triton.jit
def prefix_attention_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, bias_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls, stride_mb, stride_mh, stride_ms, stride_mj, stride_bb, stride_bh, stride_bs,
    stride_bj, stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, Hkv, G, Sq, N, lim, scaling, qk_scale, cap2, cap_in,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, PREFIX: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # One key block of N keys (the prefix, stride_kb = 0, or one batch row's sequence) against every query row of
    # its kv group; tiles are [keys, rows] so that p^T and ds^T come out of the dots in the orientation their own
    # products take (no register transposes).
    i_p = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    i_n, i_bk = i_p % num_n, (i_p // num_n).to(tl.int64)
    i_b, i_kv = i_bk // Hkv, i_bk % Hkv
    o_j = i_n * BN + tl.arange(0, BN)  # [BN]
    o_jl = o_j.to(tl.int64)
    m_j = o_j < N
    o_d = tl.arange(0, BD).to(tl.int64)
    m_d = o_d < D
    m_kd = m_j[:, None] & m_d[None, :]
    b_k = tl.load(k_ptr + i_b * stride_kb + i_kv * stride_kh + o_jl[:, None] * stride_kn + o_d[None, :] * stride_kd,
                  mask=m_kd, other=0.0)  # [BN, BD]
    b_v = tl.load(v_ptr + i_b * stride_vb + i_kv * stride_vh + o_jl[:, None] * stride_vn + o_d[None, :] * stride_vd,
                  mask=m_kd, other=0.0)  # [BN, BD]
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)

    # the query rows that can see a key of this block: i >= j0 (causal), i < max j - lim (prefix window)
    i_lo, i_hi = 0, Sq
    if CAUSAL:
        i_lo = i_n * BN
    if WINDOW:
        i_hi = tl.minimum(tl.maximum(tl.minimum(i_n * BN + BN, N) - 1 - lim, 0), Sq)
    # all rows: one pass over the G heads folded (r = g Sq + i); a row range: one pass per head. One flat loop
    # (step t: head g = t // n_r, rows from r_lo + (t % n_r) BM) keeps the row loop innermost, so it is pipelined.
    fold = (i_lo == 0) & (i_hi == Sq)
    r_lo, r_hi = tl.where(fold, 0, i_lo), tl.where(fold, G * Sq, i_hi)
    n_r = tl.cdiv(tl.maximum(r_hi - r_lo, 0), BM)
    for t in range(0, n_r * tl.where(fold, 1, G)):
        g, r0 = t // n_r, r_lo + (t % n_r) * BM
        o_r = r0 + tl.arange(0, BM)  # [BM]
        m_r = o_r < r_hi
        o_h = i_kv * G + tl.where(fold, o_r // Sq, g).to(tl.int64)
        o_i = tl.where(fold, o_r % Sq, o_r)
        o_il = o_i.to(tl.int64)
        p_qrow = q_ptr + i_b * stride_qb + o_h * stride_qh + o_il * stride_qs
        b_qt = tl.load(p_qrow[None, :] + o_d[:, None] * stride_qd, mask=m_d[:, None] & m_r[None, :],
                       other=0.0)  # [BD, BM]
        qkt = tl.dot(b_k, b_qt, input_precision=DOT_PREC)  # [BN, BM]
        p_brow = bias_ptr + i_b * stride_bb + o_h * stride_bh + o_il * stride_bs
        p_mrow = mask_ptr + i_b * stride_mb + o_h * stride_mh + o_il * stride_ms
        st, tt = _scores(qkt, o_i[None, :], o_j[:, None], m_j[:, None] & m_r[None, :],
                         p_brow[None, :] + o_jl[:, None] * stride_bj, p_mrow[None, :] + o_jl[:, None] * stride_mj,
                         lim, qk_scale, cap2, cap_in, PREFIX, SOFTCAP, HAS_BIAS, MASK, CAUSAL, WINDOW)
        b_lse2, b_delta = _row_stats(lse_ptr, delta_ptr, i_b, o_h, o_il, m_r, stride_lb, stride_lh, stride_ls,
                                     H, Sq)
        b_pt = tl.exp2(st - b_lse2[None, :])  # [BN, BM]
        p_dorow = do_ptr + i_b * stride_dob + o_il * stride_dos + o_h * stride_doh
        b_do = tl.load(p_dorow[:, None] + o_d[None, :] * stride_dod, mask=m_r[:, None] & m_d[None, :],
                       other=0.0)  # [BM, BD]
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PREC)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PREC)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        if SOFTCAP:
            b_dst = b_dst * (1.0 - tt * tt)
        b_dk = tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), b_dk, input_precision=DOT_PREC)
    p_dk = dk_ptr + i_b * stride_dkb + i_kv * stride_dkh + o_jl[:, None] * stride_dkn + o_d[None, :] * stride_dkd
    tl.store(p_dk, (b_dk * scaling).to(dk_ptr.dtype.element_ty), mask=m_kd)
    p_dv = dv_ptr + i_b * stride_dvb + i_kv * stride_dvh + o_jl[:, None] * stride_dvn + o_d[None, :] * stride_dvd
    tl.store(p_dv, b_dv.to(dv_ptr.dtype.element_ty), mask=m_kd)


@triton.jit
def prefix_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, bias_ptr, pbias_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd, stride_pkh, stride_pkp, stride_pkd, stride_pvh, stride_pvp, stride_pvd,
    stride_dob, stride_dos, stride_doh, stride_dod, stride_lb, stride_lh, stride_ls,
    stride_mb, stride_mh, stride_ms, stride_mj, stride_bb, stride_bh, stride_bs, stride_bj,
    stride_pbb, stride_pbh, stride_pbs, stride_pbj, stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    H, Hkv, G, Sq, Skv, P, scaling, qk_scale, cap2, cap_in, window,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PBIAS: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # the forward's rows and key ranges, with dQ as the accumulator
    i_b, i_kv, o_h, o_i, o_il, m_r, i_lo, i_hi = _row_block(Hkv, G, Sq, BM)
    o_d = tl.arange(0, BD).to(tl.int64)
    m_d = o_d < D
    m_rd = m_r[:, None] & m_d[None, :]
    p_qrow = q_ptr + i_b * stride_qb + o_h * stride_qh + o_il * stride_qs
    b_q = tl.load(p_qrow[:, None] + o_d[None, :] * stride_qd, mask=m_rd, other=0.0)  # [BM, BD]
    p_dorow = do_ptr + i_b * stride_dob + o_il * stride_dos + o_h * stride_doh
    b_do = tl.load(p_dorow[:, None] + o_d[None, :] * stride_dod, mask=m_rd, other=0.0)  # [BM, BD]
    b_lse2, b_delta = _row_stats(lse_ptr, delta_ptr, i_b, o_h, o_il, m_r, stride_lb, stride_lh, stride_ls, H, Sq)
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)

    lim = P + Skv - Sq - window
    p_lo, s_hi = _key_ranges(i_lo, i_hi, P, Skv, lim, BN, CAUSAL, WINDOW)
    p_brow = pbias_ptr + i_b * stride_pbb + o_h * stride_pbh + o_il * stride_pbs
    b_dq, _, _ = _key_blocks(b_dq, b_lse2, b_lse2, b_q, b_do, b_lse2, b_delta, pk_ptr + i_kv * stride_pkh,
                             pv_ptr + i_kv * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd, p_lo, P, P,
                             o_i, m_r, o_d, m_d, p_brow, stride_pbj, p_brow, 0, lim, qk_scale, cap2, cap_in, True,
                             True, SOFTCAP, HAS_PBIAS, 0, False, WINDOW, BN, DOT_PREC)
    p_brow = bias_ptr + i_b * stride_bb + o_h * stride_bh + o_il * stride_bs
    p_mrow = mask_ptr + i_b * stride_mb + o_h * stride_mh + o_il * stride_ms
    b_dq, _, _ = _key_blocks(b_dq, b_lse2, b_lse2, b_q, b_do, b_lse2, b_delta,
                             k_ptr + i_b * stride_kb + i_kv * stride_kh, v_ptr + i_b * stride_vb + i_kv * stride_vh,
                             stride_ks, stride_kd, stride_vs, stride_vd, 0, s_hi, Skv, o_i, m_r, o_d, m_d, p_brow,
                             stride_bj, p_mrow, stride_mj, lim, qk_scale, cap2, cap_in, True, False, SOFTCAP, HAS_BIAS,
                             MASK, CAUSAL, False, BN, DOT_PREC)
    p_dq = dq_ptr + i_b * stride_dqb + o_h * stride_dqh + o_il * stride_dqs
    tl.store(p_dq[:, None] + o_d[None, :] * stride_dqd, (b_dq * scaling).to(dq_ptr.dtype.element_ty), mask=m_rd)

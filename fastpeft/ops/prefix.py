"""The prefix-attention op family: ``fastpeft::prefix_attention`` and its backward.

Attention over ``[prefix | sequence]`` without ever concatenating keys or values (semantics, shapes and the order
of the score terms: ``fastpeft.reference.prefix_attention_ref``). Math, per query row with scores
``s_p = q Pk^T * scaling`` over the P prefix columns and ``s_r = q K^T * scaling`` over the sequence columns (each
block then soft-capped, biased and masked as the reference says):

    m = max(max s_p, max s_r)        l = sum exp(s_p - m) + sum exp(s_r - m)        lse = m + log l
    O = (exp(s_p - lse) Pv + exp(s_r - lse) V)              (probabilities cast to q's dtype before each product)

Backward (flash-attention's, against the merged lse: the partials never need their own statistics):

    p = exp(s - lse)    dp = dO V^T    delta = rowsum(p * dp) (= rowsum(dO * O))    ds = p * (dp - delta)
    (ds times 1 - tanh^2 under softcap)
    dQ = scaling (ds_p Pk + ds_r K)      dK = scaling ds_r^T Q      dV = p_r^T dO
    dPk = scaling sum_rows ds_p^T Q      dPv = sum_rows p_p^T dO

where "sum_rows" runs over every (batch row, query head of the kv group, query position): the prefix is one copy
shared by the batch, so its gradient is a reduction over all of them, made in fp32.

Two layouts keep the prefix un-copied on the fused torch path (CPU, or backend="torch"): the sequence block works
on q viewed as ``[B, Hkv, G Sq, D]`` (GQA without repeating K/V), the prefix block on q folded to
``[Hkv, B G Sq, D]``, one matmul per kv head against the one ``[Hkv, P, D]`` prefix. A broadcast matmul of
``[B, Hkv, ., D]`` against the prefix would materialise it per row (measured: shared/notes/prefix-attention.md
§5.2). What autograd keeps is q, k, v (the cache's own tensors), the prefix, O and lse: no probabilities.

Attention dropout in training (``dropout_p > 0``) goes through the reference, whose ``F.dropout`` draws exactly as
eager attention does; so does a position bias that needs a gradient (a trainable T5 relative bias), and so do
torch.func transforms and forward-mode AD (the op has no batching or forward-AD rule; the reference is plain aten).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import AUTO, TRITON, _functorch_level, _lib, _use_triton, direct_call

_forward_ad = torch.autograd.forward_ad

__all__ = ["prefix_attention"]

_EXTRAS = "Tensor? mask, float scaling, bool causal, float softcap, int window, Tensor? bias, Tensor? prefix_bias"
_lib.define(f"prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, {_EXTRAS}, "
            "int backend) -> (Tensor, Tensor)")
_lib.define(f"prefix_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
            f"Tensor out, Tensor lse, {_EXTRAS}, bool need_dq, bool need_dkv, bool need_dprefix, int backend) "
            "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _check(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, mask: Tensor | None) -> None:
    """Raises, naming what was expected."""
    name = "fastpeft prefix_attention"
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{name}: expected q [B, H, Sq, D] and k, v [B, Hkv, Skv, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    if k.shape[0] != b or k.shape[3] != d or h % hkv:
        raise ValueError(f"{name}: k {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected [{b}, Hkv, Skv, {d}] "
                         f"with Hkv dividing {h}")
    if pk.dim() != 3 or pk.shape[0] != hkv or pk.shape[2] != d or pv.shape != pk.shape:
        raise ValueError(f"{name}: expected prefix_k, prefix_v [{hkv}, P, {d}] (one copy shared by the batch); got "
                         f"{tuple(pk.shape)}, {tuple(pv.shape)}")
    for t, what in ((k, "k"), (v, "v"), (pk, "prefix_k"), (pv, "prefix_v")):
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name}: {what} is {t.dtype} on {t.device}; expected q's {q.dtype} on {q.device}")
    if mask is not None and (mask.dim() != 4 or mask.shape[-2:] != (sq, k.shape[2]) or mask.shape[0] not in (1, b)
                             or mask.shape[1] not in (1, h)):
        raise ValueError(f"{name}: mask {tuple(mask.shape)}; expected [1|{b}, 1|{h}, {sq}, {k.shape[2]}] over the "
                         "sequence columns only")


# ---------------------------------------------------------------------------------------------------------------
# Fused torch path


def _scores(q, k, pk, mask, scaling, causal, softcap, window, bias, prefix_bias):
    """The two fp32 score blocks, every term applied: s_r [B, Hkv, G, Sq, Skv], s_p [Hkv, B, G, Sq, P]; the
    folded q [Hkv, B G Sq, D]; and the soft-capped ``tanh`` blocks (for backward) or None."""
    b, h, sq, d = q.shape
    hkv, p, skv = pk.shape[0], pk.shape[1], k.shape[2]
    g = h // hkv
    qg = q.reshape(b, hkv, g * sq, d)
    qf = qg.transpose(0, 1).reshape(hkv, b * g * sq, d)
    s_r = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scaling).view(b, hkv, g, sq, skv)
    s_p = torch.bmm(qf, pk.transpose(-1, -2)).float().mul_(scaling).view(hkv, b, g, sq, p)
    t_r = t_p = None
    if softcap:
        t_r, t_p = s_r.div_(softcap).tanh_(), s_p.div_(softcap).tanh_()
        s_r, s_p = t_r * softcap, t_p * softcap
    if bias is not None:
        s_r.add_(bias.view(bias.shape[0], hkv, g, sq, skv))
    if prefix_bias is not None:
        s_p.add_(prefix_bias.view(prefix_bias.shape[0], hkv, g, sq, p).transpose(0, 1))
    if mask is not None:
        m5 = mask.view(mask.shape[0], hkv, g, sq, skv) if mask.shape[1] != 1 else mask.unsqueeze(2)
        if mask.dtype == torch.bool:
            s_r.masked_fill_(~m5, float("-inf"))
        else:
            s_r.add_(m5)
    elif causal and sq > 1:
        s_r.masked_fill_(torch.ones(sq, skv, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    if window:
        i = torch.arange(sq, device=q.device)[:, None]
        s_p.masked_fill_(torch.arange(p, device=q.device)[None, :] <= p + skv - sq + i - window, float("-inf"))
    return s_r, s_p, qf, t_r, t_p


def _fwd_torch(q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias):
    b, h, sq, d = q.shape
    hkv, p = pk.shape[0], pk.shape[1]
    g = h // hkv
    s_r, s_p, _, _, _ = _scores(q, k, pk, mask, scaling, causal, softcap, window, bias, prefix_bias)
    m = torch.maximum(s_r.amax(-1), s_p.amax(-1).transpose(0, 1))  # [B, Hkv, G, Sq]
    # every column of a row hidden: possible only where a window hides the prefix (the prefix is visible to every
    # query otherwise); then exp gives 0, not NaN, and the row comes out as zeros, as in eager attention
    if window:
        m.masked_fill_(m == float("-inf"), 0.0)
    e_r = s_r.sub_(m.unsqueeze(-1)).exp_()
    e_p = s_p.sub_(m.transpose(0, 1).unsqueeze(-1)).exp_()
    l = e_r.sum(-1).add_(e_p.sum(-1).transpose(0, 1))
    lse = l.log().add_(m)
    inv = torch.where(l > 0, l.reciprocal(), torch.zeros_like(l)) if window else l.reciprocal()
    pr = e_r.mul_(inv.unsqueeze(-1)).to(q.dtype).view(b, hkv, g * sq, -1)
    pp = e_p.mul_(inv.transpose(0, 1).unsqueeze(-1)).to(q.dtype).view(hkv, b * g * sq, p)
    out = torch.matmul(pr, v)  # [B, Hkv, G Sq, D]
    out.add_(torch.bmm(pp, pv).view(hkv, b, g * sq, d).transpose(0, 1))
    return out.view(b, h, sq, d).transpose(1, 2).contiguous(), lse.view(b, h, sq)


def _bwd_torch(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap, window, bias, prefix_bias,
               need_dq, need_dkv, need_dprefix):
    b, h, sq, d = q.shape
    hkv, p, skv = pk.shape[0], pk.shape[1], k.shape[2]
    g = h // hkv
    s_r, s_p, qf, t_r, t_p = _scores(q, k, pk, mask, scaling, causal, softcap, window, bias, prefix_bias)
    lse5 = lse.view(b, hkv, g, sq).unsqueeze(-1)
    # a fully hidden row has lse = -inf: its probabilities are 0, not exp(-inf + inf)
    lse5 = lse5.masked_fill(lse5 == float("-inf"), float("inf"))
    pr = s_r.sub_(lse5).exp_()  # [B, Hkv, G, Sq, Skv] fp32
    pp = s_p.sub_(lse5.transpose(0, 1)).exp_()  # [Hkv, B, G, Sq, P]
    do = dout.transpose(1, 2).reshape(b, hkv, g * sq, d)  # [B, Sq, H, D] -> [B, Hkv, G Sq, D]
    dof = do.transpose(0, 1).reshape(hkv, b * g * sq, d)
    dt = q.dtype
    dk = dv = dpk = dpv = dq = None
    if need_dkv:
        dv = torch.matmul(pr.to(dt).view(b, hkv, g * sq, skv).transpose(-1, -2), do)
    if need_dprefix:
        dpv = torch.bmm(pp.view(hkv, b * g * sq, p).transpose(1, 2), dof.float()).to(pv.dtype)
    # ds = p * (dp - delta), dp = dO V^T, in place over p. delta = rowsum(p * dp) from the fp32 probabilities,
    # not rowsum(dO * O) from the rounded output: in fp16 the rounded O costs the prefix gradient (a sum over
    # every row of the batch) 2-3x eager's error; the score blocks are in memory here anyway.
    dp_r = torch.matmul(do, v.transpose(-1, -2)).float().view(b, hkv, g, sq, skv)
    dp_p = torch.bmm(dof, pv.transpose(1, 2)).float().view(hkv, b, g, sq, p)
    delta = (pr * dp_r).sum(-1, keepdim=True).add_((pp * dp_p).sum(-1, keepdim=True).transpose(0, 1))
    ds_r = pr.mul_(dp_r.sub_(delta))
    ds_p = pp.mul_(dp_p.sub_(delta.transpose(0, 1)))
    if softcap:
        ds_r.mul_(t_r.square_().neg_().add_(1.0))
        ds_p.mul_(t_p.square_().neg_().add_(1.0))
    ds_r = ds_r.mul_(scaling).view(b, hkv, g * sq, skv)
    ds_p = ds_p.mul_(scaling).view(hkv, b * g * sq, p)
    if need_dkv:
        dk = torch.matmul(ds_r.to(dt).transpose(-1, -2), q.reshape(b, hkv, g * sq, d))
    if need_dprefix:
        dpk = torch.bmm(ds_p.transpose(1, 2), qf.float()).to(pk.dtype)
    if need_dq:
        dq = torch.matmul(ds_r.to(dt), k)
        dq.add_(torch.bmm(ds_p.to(dt), pk).view(hkv, b, g * sq, d).transpose(0, 1))
        dq = dq.view(b, h, sq, d)
    return dq, dk, dv, dpk, dpv


# ---------------------------------------------------------------------------------------------------------------
# Op implementations


def _triton(q, backend) -> bool:
    """The Triton kernels where they are built for the head dim (fp32 up to 128, 16-bit up to 256: wider tiles
    spill, kernels/prefix_attention.py); backend="auto" takes the torch path beyond, "triton" lets the launcher
    say why not."""
    if not _use_triton(q, backend):
        return False
    return backend == TRITON or q.shape[-1] <= (128 if q.dtype == torch.float32 else 256)


def _fwd(q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias, backend):
    _check(q, k, v, pk, pv, mask)
    if _triton(q, backend):
        from fastpeft.kernels.prefix_attention import prefix_attention_fwd

        return prefix_attention_fwd(q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias)
    return _fwd_torch(q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias)


def _bwd(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap, window, bias, prefix_bias, need_dq,
         need_dkv, need_dprefix, backend):
    if _triton(q, backend):
        from fastpeft.kernels.prefix_attention import prefix_attention_bwd

        return prefix_attention_bwd(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap, window, bias,
                                    prefix_bias, need_dq, need_dkv, need_dprefix)
    return _bwd_torch(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap, window, bias, prefix_bias,
                      need_dq, need_dkv, need_dprefix)


def _bwd_impl(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap, window, bias, prefix_bias, need_dq,
              need_dkv, need_dprefix, backend):
    grads = _bwd(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap, window, bias, prefix_bias, need_dq,
                 need_dkv, need_dprefix, backend)
    # unrequested outputs are distinct empty tensors: custom-op outputs may not alias each other
    return tuple(q.new_empty((0,)) if t is None else t for t in grads)


for _key in ("CPU", "CUDA"):
    _lib.impl("prefix_attention", _fwd, _key)
    _lib.impl("prefix_attention_backward", _bwd_impl, _key)


@torch.library.register_fake("fastpeft::prefix_attention", lib=_lib)
def _fwd_fake(q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias, backend):
    b, h, sq, d = q.shape
    return q.new_empty((b, sq, h, d)), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.register_fake("fastpeft::prefix_attention_backward", lib=_lib)
def _bwd_fake(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap, window, bias, prefix_bias, need_dq,
              need_dkv, need_dprefix, backend):
    e = q.new_empty((0,))
    return (q.new_empty(q.shape) if need_dq else e, k.new_empty(k.shape) if need_dkv else q.new_empty((0,)),
            v.new_empty(v.shape) if need_dkv else q.new_empty((0,)), pk.new_empty(pk.shape) if need_dprefix else
            q.new_empty((0,)), pv.new_empty(pv.shape) if need_dprefix else q.new_empty((0,)))


_fwd_op = torch.ops.fastpeft.prefix_attention.default
_bwd_op = torch.ops.fastpeft.prefix_attention_backward.default


# ---------------------------------------------------------------------------------------------------------------
# Autograd


class _PrefixAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias, backend):
        out, lse = (_fwd if direct_call(q) else _fwd_op)(q, k, v, pk, pv, mask, scaling, causal, softcap, window,
                                                         bias, prefix_bias, backend)
        ctx.save_for_backward(q, k, v, pk, pv, out, lse, mask, bias, prefix_bias)
        ctx.args = (scaling, causal, softcap, window, backend)
        # lse is a statistic for backward, not an output to differentiate (autograd then says so where one tries)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, pk, pv, out, lse, mask, bias, prefix_bias = ctx.saved_tensors
        scaling, causal, softcap, window, backend = ctx.args
        nq, nk, nv, npk, npv = ctx.needs_input_grad[:5]
        bwd = _bwd if direct_call(dout, q) else _bwd_op
        dq, dk, dv, dpk, dpv = bwd(dout, q, k, v, pk, pv, out, lse, mask, scaling, causal, softcap,
                                   window, bias, prefix_bias, nq, nk or nv, npk or npv, backend)
        return (dq if nq else None, dk if nk else None, dv if nv else None, dpk if npk else None,
                dpv if npv else None) + (None,) * 8


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor, mask: Tensor | None = None,
                     scaling: float = 1.0, causal: bool = False, softcap: float = 0.0, window: int = 0,
                     bias: Tensor | None = None, prefix_bias: Tensor | None = None, dropout_p: float = 0.0,
                     backend: int = AUTO) -> tuple[Tensor, Tensor]:
    """Attention of q over ``[prefix | sequence]`` as one op: ``(out [B, Sq, H, D], lse [B, H, Sq] fp32)``.
    Differentiable in q, k, v and the prefix; see the module docstring and ``prefix_attention_ref``."""
    if dropout_p or (bias is not None and bias.requires_grad and torch.is_grad_enabled()) or (
            prefix_bias is not None and prefix_bias.requires_grad and torch.is_grad_enabled()) or (
            _functorch_level() is not None or _forward_ad._current_level >= 0):
        from ..reference import prefix_attention_ref

        return prefix_attention_ref(q, k, v, prefix_k, prefix_v, mask, scaling, causal, softcap, window, bias,
                                    prefix_bias, dropout_p)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or prefix_k.requires_grad
                                    or prefix_v.requires_grad):
        return _PrefixAttentionFn.apply(q, k, v, prefix_k, prefix_v, mask, scaling, causal, softcap, window, bias,
                                        prefix_bias, backend)
    if direct_call(q):
        return _fwd(q, k, v, prefix_k, prefix_v, mask, scaling, causal, softcap, window, bias, prefix_bias, backend)
    return _fwd_op(q, k, v, prefix_k, prefix_v, mask, scaling, causal, softcap, window, bias, prefix_bias, backend)

"""Eager reference implementations: the ground truth every fused op is tested against.

Each function is plain autograd-friendly torch, written to compute what PEFT computes (same casts, same order of
roundings), not to be fast. Tests and benchmarks import them from here; nothing redefines them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lora_linear_ref", "base_linear_ref", "ia3_linear_ref", "prefix_attention_ref", "soft_prompt_embed_ref"]


def base_linear_ref(x: Tensor, weight: Tensor | None, bias: Tensor | None, weight_t: bool = False) -> Tensor:
    """``x W^T + b`` for nn.Linear (weight [N, K]); ``x W + b`` for GPT-2 Conv1D (``weight_t``, weight [K, N])."""
    w = weight if weight_t else weight.t()
    y = x @ w
    return y if bias is None else y + bias


def lora_linear_ref(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    lora_bias: Tensor | None,
    scaling: float,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
    weight_t: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """PEFT ``lora.Linear.forward`` for one adapter, with an explicit dropout keep-mask.

    ``y = residual + base(x) + s * ((x * keep / (1 - p)) A^T B^T + b_B)``

    As in PEFT (``peft/tuners/lora/layer.py`` Linear.forward): the base output is computed in the base dtype,
    x is cast to the adapter dtype, the low-rank product is computed in the adapter dtype (so ``x A^T`` is rounded
    to it before the B product), the sum is formed by type promotion and cast back to the base output dtype.
    ``keep`` is a bool mask shaped like ``x`` (None: no dropout), so fused kernels can be compared exactly by
    feeding the mask they generated.
    """
    out_dtype = x.dtype if weight is None else weight.dtype
    result = None if weight is None else base_linear_ref(x, weight, bias, weight_t)
    if residual is not None:
        result = residual if result is None else residual + result
    xd = x.to(lora_a.dtype)
    if keep is not None:
        xd = xd * keep.to(xd.dtype) / (1.0 - dropout_p)
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_a), lora_b, lora_bias)
    out = lora * scaling if result is None else result + lora * scaling
    if weight is None and residual is not None:
        out_dtype = residual.dtype
    return out.to(out_dtype)


def ia3_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, scale_input: bool,
                   weight_t: bool = False) -> Tensor:
    """PEFT ``ia3.Linear.forward`` for a combined IA3 vector ``scale`` (the product of the active adapters').

    Input scaling (feed-forward modules): ``y = base((x * l).to(x.dtype))`` -- x cast to l's dtype, scaled, rounded
    back. Output scaling: ``y = (base(x) * l).to(base dtype)``, the bias scaled too (``ia3/layer.py`` forward).
    """
    l = scale.flatten()
    if scale_input:
        return base_linear_ref((x.to(l.dtype) * l).to(x.dtype), weight, bias, weight_t)
    result = base_linear_ref(x, weight, bias, weight_t)
    return (result * l).to(result.dtype)


def prefix_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    mask: Tensor | None = None,
    scaling: float = 1.0,
    causal: bool = False,
    softcap: float = 0.0,
    window: int = 0,
    bias: Tensor | None = None,
    prefix_bias: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention over ``[prefix | sequence]`` computed as PEFT does: the prefix concatenated in front of the keys
    and values of every row, one softmax over all columns (``<family>.eager_attention_forward`` behind PEFT's
    ``DynamicCache`` of prefix entries and its ``cat(ones(B, P), mask)``).

    Shapes: q [B, H, Sq, D]; k, v [B, Hkv, Skv, D] (the cache after update; H = G Hkv, query head h reads kv head
    h // G); prefix_k, prefix_v [Hkv, P, D], shared by every row. Returns the output [B, Sq, H, D] (the layout
    attention functions return) and the log-sum-exp of the scores [B, H, Sq] in fp32.

    Scores, in order: ``s = q k^T * scaling``; Gemma2's ``softcap * tanh(s / softcap)`` (both blocks);
    T5's additive position bias (``bias`` [1|B, H, Sq, Skv] on the sequence columns, ``prefix_bias``
    [1|B, H, Sq, P] on the prefix columns); the real-token ``mask`` on the sequence columns only ([1|B, 1|H, Sq,
    Skv], bool True = attend, or additive float). ``mask=None`` with ``causal`` and Sq > 1 is the upper-left
    causal mask (key j visible to query i iff j <= i), as sdpa applies it. Prefix columns are visible to every
    query except under a sliding ``window``: PEFT's cache puts prefix key j at position j and query i at
    ``P + (Skv - Sq) + i``, so the window hides j once ``j <= P + Skv - Sq + i - window``.
    Softmax in fp32, probabilities cast to q's dtype before the value product, as in eager attention.
    """
    b, h, sq, d = q.shape
    hkv, p = prefix_k.shape[0], prefix_k.shape[1]
    skv, g = k.shape[2], h // hkv
    kf = torch.cat([prefix_k.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2).repeat_interleave(g, dim=1)
    vf = torch.cat([prefix_v.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2).repeat_interleave(g, dim=1)
    s = (q @ kf.transpose(-1, -2)) * scaling
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None or prefix_bias is not None:
        zeros = s.new_zeros(1, h, sq, p + skv)
        s = s + torch.cat([zeros[..., :p] if prefix_bias is None else prefix_bias.to(s.dtype) + zeros[..., :p],
                           zeros[..., p:] if bias is None else bias.to(s.dtype) + zeros[..., p:]], dim=-1)
    s = s.float()
    i = torch.arange(sq, device=q.device)[:, None]
    if window:
        hidden = torch.arange(p, device=q.device)[None, :] <= p + skv - sq + i - window
        s[..., :p] = s[..., :p].masked_fill(hidden, float("-inf"))
    real = s[..., p:]
    if mask is not None:
        real = real.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else real + mask.float()
    elif causal and sq > 1:
        real = real.masked_fill(torch.arange(skv, device=q.device)[None, :] > i, float("-inf"))
    s = torch.cat([s[..., :p], real], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    probs = torch.softmax(s, dim=-1).nan_to_num(0.0).to(q.dtype)  # a row with every column hidden gives zeros
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return (probs @ vf).transpose(1, 2).contiguous(), lse


def soft_prompt_embed_ref(prompt: Tensor, weight: Tensor | None = None, ids: Tensor | None = None,
                          embeds: Tensor | None = None) -> Tensor:
    """``[virtual prompt | token embeddings]`` as PEFT builds it (peft_model.py:2162-2170): the tokens embedded
    (``weight[ids]``, or ``embeds`` given), the prompt [P, D] repeated per row and cast to their dtype, then
    concatenated: [B, P + T, D]."""
    tokens = torch.nn.functional.embedding(ids, weight) if embeds is None else embeds
    return torch.cat([prompt.unsqueeze(0).repeat(tokens.shape[0], 1, 1).to(tokens.dtype), tokens], dim=1)

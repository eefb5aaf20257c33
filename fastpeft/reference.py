"""Eager reference implementations: the ground truth every fused op is tested against.

Each function is plain autograd-friendly torch, written to compute what PEFT computes (same casts, same order of
roundings), not to be fast. Tests and benchmarks import them from here; nothing redefines them.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["lora_linear_ref", "base_linear_ref", "ia3_linear_ref"]


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

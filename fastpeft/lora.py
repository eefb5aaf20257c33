"""Fused forward for PEFT ``lora.Linear`` (nn.Linear and GPT-2 Conv1D base layers).

The patched forward reads PEFT's live state on every call -- ``disable_adapters``, ``merged``,
``active_adapters``, ``scaling``, the dropout module's ``p`` and ``training`` -- so ``set_adapter``,
``disable_adapter()``, ``merge``/``unmerge``, ``set_scale`` and train/eval switches behave exactly as in PEFT.
Anything it does not fuse (mixed-batch ``adapter_names=``, DoRA and other variants, extra forward arguments)
runs PEFT's own forward.

Several active adapters are summed by sequential launches of the same op: the first computes the base term, each
later one adds its low-rank term to the previous output (``residual``), so there is one op per adapter and no
extra elementwise pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import autocast_dtype, base_weight, check_base_layer, peft_forward
from .ops.linear import lora_linear, new_seed

__all__ = ["check_lora_linear", "fused_lora_linear_forward"]


def check_lora_linear(module: nn.Module) -> str | None:
    """Why this ``lora.Linear`` cannot be fused (None if it can). Checked once, at patch time."""
    reason = check_base_layer(module)
    if reason is not None:
        return reason
    variants = sorted(name for name, v in getattr(module, "lora_variant", {}).items() if v is not None)
    if variants or any(module.use_dora.values()):
        return f"LoRA variant (DoRA or other) on adapter(s) {variants or sorted(module.use_dora)}"
    return None


def fused_lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    variants, lora_a = self.lora_variant, self.lora_A
    active = [name for name in self.active_adapters if name in lora_a]
    if args or kwargs or self.disable_adapters or self.merged or not active or (variants and any(
            name in variants for name in active)):
        # mixed batches, merged or disabled adapters, no adapter on this layer, DoRA & co. added after patching
        return peft_forward(self, x, *args, **kwargs)
    weight, bias, weight_t = base_weight(self.base_layer)
    dt = autocast_dtype(x)
    if dt is not None:
        with torch.autocast(x.device.type, enabled=False):
            return _fused(self, active, x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), weight_t, dt)
    if x.dtype != weight.dtype:
        return peft_forward(self, x)  # PEFT raises (or casts) exactly as it always did
    return _fused(self, active, x, weight, bias, weight_t, None)


def _fused(self, active, x, weight, bias, weight_t, cast):
    backend = self._fastpeft_backend
    y = None
    lora_a_dict, lora_b_dict = self.lora_A, self.lora_B
    for name in active:
        a, lin_b = lora_a_dict[name].weight, lora_b_dict[name]
        b, lb = lin_b.weight, lin_b.bias
        if cast is not None:
            a, b, lb = a.to(cast), b.to(cast), None if lb is None else lb.to(cast)
        drop = self.lora_dropout[name]
        p = drop.p if drop.training and isinstance(drop, nn.Dropout) else 0.0
        seed = new_seed() if p > 0.0 else None
        if y is None:
            y = lora_linear(x, weight, bias, a, b, lb, None, self.scaling[name], p, seed, weight_t, backend)
        else:
            y = lora_linear(x, None, None, a, b, lb, y, self.scaling[name], p, seed, weight_t, backend)
    return y

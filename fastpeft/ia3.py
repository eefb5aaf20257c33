"""Fused forward for PEFT ``ia3.Linear`` (nn.Linear and GPT-2 Conv1D base layers).

Reads PEFT's live state on every call, like the LoRA layer: ``disable_adapters``, ``merged``, ``active_adapters``
and the vectors themselves. Several active adapters multiply their vectors (a vector-sized product, as PEFT);
one active adapter passes its parameter straight to the op.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import any_autocast, autocast_dtype, calls_watched, check_base_layer, observed, peft_forward
from .ops.ia3 import ia3_linear

__all__ = ["check_ia3_linear", "fused_ia3_linear_forward"]


def check_ia3_linear(module: nn.Module) -> str | None:
    """Why this ``ia3.Linear`` cannot be fused (None if it can). Checked once, at patch time."""
    reason = check_base_layer(module)
    if reason is None and module.get_base_layer().weight.requires_grad:
        return "the base weight is trainable; fused IA3 treats the base layer as frozen"
    return reason


def fused_ia3_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    d = self.__dict__  # PEFT's live state without nn.Module.__getattr__ (see fastpeft/lora.py)
    if args or kwargs or d["_disable_adapters"] or d["merged_adapters"] or calls_watched():
        return peft_forward(self, x, *args, **kwargs)
    mods = d["_modules"]
    base_mod = mods["base_layer"]
    if type(base_mod) is not d["_fastpeft_base_type"] or observed(base_mod):
        return peft_forward(self, x)  # hooks on the base layer (or a base layer swapped) since patching
    params = mods["ia3_l"]._parameters
    active = d["_active_adapter"]
    if isinstance(active, str):  # the common case: one adapter, its vector passed as it is
        scale = params.get(active)
        if scale is None:
            return peft_forward(self, x)
        vectors = (scale,)
    else:
        vectors = [params[name] for name in active if name in params]
        if not vectors:
            return peft_forward(self, x)
        scale = vectors[0]
        for v in vectors[1:]:
            scale = scale.flatten() * v.flatten()
    base = base_mod._parameters
    weight, bias = base["weight"], base["bias"]
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return peft_forward(self, x)  # e.g. bias="all" made the base bias trainable
    scale_input = d["is_feedforward"]
    if any_autocast():
        dt = autocast_dtype(x)
        if dt is not None:
            with torch.autocast(x.device.type, enabled=False):
                return ia3_linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), scale, scale_input,
                                  d["_fastpeft_weight_t"], d["_fastpeft_backend"])
    if x.dtype != weight.dtype:
        return peft_forward(self, x)
    return ia3_linear(x, weight, bias, scale, scale_input, d["_fastpeft_weight_t"], d["_fastpeft_backend"])

"""What every patched PEFT layer shares: which base layers a fused op can compute, the checks made once at patch
time, and the way back to PEFT's own forward."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["base_weight", "check_base_layer", "peft_forward", "autocast_dtype", "any_autocast"]


def base_weight(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
    """(weight, bias, weight_t) for the base layers the kernels compute; None for anything else."""
    if type(base) is nn.Linear:
        return base.weight, base.bias, False
    if type(base).__name__ == "Conv1D" and type(base).__module__.startswith("transformers"):
        return base.weight, base.bias, True  # GPT-2 Conv1D: y = x W + b, W is [in, out]
    return None


def check_base_layer(module: nn.Module) -> str | None:
    """Why the base layer of a PEFT tuner layer cannot be fused (None if it can)."""
    base = module.get_base_layer()
    if module.base_layer is not base:
        return "nested adapter layers (the base layer is itself wrapped)"
    if base_weight(base) is None:
        return f"base layer {type(base).__name__} is not nn.Linear or transformers Conv1D (quantized or wrapped)"
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"base weight dtype {base.weight.dtype} is not fp32/fp16/bf16"
    if base._forward_hooks or base._forward_pre_hooks:
        return "base layer has forward hooks (offloading or quantization wrappers) that a fused call would bypass"
    return None


def peft_forward(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's own forward for this layer: what runs for everything the fused path does not take."""
    return module._fastpeft_orig_class.forward(module, x, *args, **kwargs)


# Whether autocast is on for any device: one C call, so that the common case (no autocast) skips building x.device
any_autocast = torch._C._is_any_autocast_enabled


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype in force for x's device, or None. Under autocast, linear casts every operand to it; the
    fused layers do the same explicitly and run the op with autocast off, so results follow autocast's rule."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

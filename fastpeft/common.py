"""What every patched PEFT layer shares: which base layers a fused op can compute, the checks made once at patch
time, and the way back to PEFT's own forward."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["base_weight", "check_base_layer", "check_sub_layers", "observed", "calls_watched", "peft_forward",
           "autocast_dtype", "any_autocast"]


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
    return check_sub_layers(base)


def check_sub_layers(*subs: nn.Module) -> str | None:
    """Why calls into these sub-layers must stay real calls (None if a fused op may stand in for them)."""
    for sub in subs:
        if "_hf_hook" in sub.__dict__:
            return (f"{type(sub).__name__} sub-layer is wrapped by an accelerate hook ({type(sub._hf_hook).__name__}: "
                    "offload or device placement) that loads its weights when called")
        if observed(sub):
            return f"{type(sub).__name__} sub-layer has hooks or a replaced forward that a fused call would bypass"
    return None


def observed(sub: nn.Module) -> bool:
    """Whether calling ``sub`` does more than ``type(sub).forward``: hooks, or a forward replaced on the instance
    (accelerate's offload and device hooks, wrappers). The same test as ``nn.Module._call_impl``'s fast path."""
    d = sub.__dict__
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"]
                or "forward" in d)


_mm = torch.nn.modules.module
_global_hooks = (_mm._global_forward_hooks, _mm._global_forward_pre_hooks, _mm._global_backward_hooks,
                 _mm._global_backward_pre_hooks)  # mutated in place by torch, never rebound
_functorch_level = torch._C._functorch.maybe_current_level
_forward_ad = torch.autograd.forward_ad


def calls_watched() -> bool:
    """Whether anything global would see or transform PEFT's sub-layer calls, so the layer must make them: module
    hooks registered for every module, a torch.func transform (grad, vmap, jvp: the fused ops have no batching or
    forward-AD rules), or forward-mode AD."""
    g0, g1, g2, g3 = _global_hooks
    return bool(g0 or g1 or g2 or g3) or _functorch_level() is not None or _forward_ad._current_level >= 0


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

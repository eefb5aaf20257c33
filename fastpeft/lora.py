"""Fused forward for PEFT ``lora.Linear`` (nn.Linear and GPT-2 Conv1D base layers).

The patched forward reads PEFT's live state on every call -- ``disable_adapters``, ``merged``,
``active_adapters``, ``scaling``, the dropout module's ``p`` and ``training`` -- so ``set_adapter``,
``disable_adapter()``, ``merge``/``unmerge``, ``set_scale`` and train/eval switches behave exactly as in PEFT.
Anything it does not fuse (mixed-batch ``adapter_names=``, DoRA and other variants, extra forward arguments)
runs PEFT's own forward. So does every call that something would watch inside PEFT's forward: a hook (or an
accelerate wrapper, whose offload hook loads the weights) on the base layer, ``lora_A``, ``lora_B`` or the dropout
module, global module hooks, torch.func transforms and forward-mode AD. These are checked on every call, as
``nn.Module.__call__`` checks its own hooks, so a hook registered after patching fires exactly as in PEFT.

Several active adapters are summed by sequential launches of the same op: the first computes the base term, each
later one adds its low-rank term to the previous output (``residual``), so there is one op per adapter and no
extra elementwise pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import (any_autocast, autocast_dtype, calls_watched, check_base_layer, check_sub_layers, observed,
                     peft_forward)
from .ops.linear import lora_linear, seed_for

__all__ = ["check_lora_linear", "fused_lora_linear_forward"]


def check_lora_linear(module: nn.Module) -> str | None:
    """Why this ``lora.Linear`` cannot be fused (None if it can). Checked once, at patch time."""
    reason = check_base_layer(module)
    if reason is None:
        subs = [*module.lora_A.values(), *module.lora_B.values(), *module.lora_dropout.values()]
        reason = check_sub_layers(*subs)
    if reason is not None:
        return reason
    variants = sorted(name for name, v in getattr(module, "lora_variant", {}).items() if v is not None)
    if variants or any(module.use_dora.values()):
        return f"LoRA variant (DoRA or other) on adapter(s) {variants or sorted(module.use_dora)}"
    return None


def fused_lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # PEFT's live state, read straight from the instance dicts: the same attributes PEFT's properties return
    # (``_disable_adapters``, ``merged_adapters``, ``_active_adapter``), without nn.Module.__getattr__ on the
    # decode path (see shared/notes/host-overhead.md). Nothing is cached. Each dict is read once and one active
    # adapter goes straight to the op: at decode the interpreter's working set is cold (the weights stream through
    # the caches), so every lookup and Python frame counts.
    d = self.__dict__
    if args or kwargs or d["_disable_adapters"] or d["merged_adapters"] or calls_watched():
        return peft_forward(self, x, *args, **kwargs)  # mixed batches, merged or disabled: PEFT's own forward
    mods = d["_modules"]
    base_mod = mods["base_layer"]
    if type(base_mod) is not d["_fastpeft_base_type"] or observed(base_mod):
        return peft_forward(self, x)  # hooks on the base layer (or a base layer swapped) since patching
    lora_a = mods["lora_A"]._modules
    active = d["_active_adapter"]
    if isinstance(active, str):  # the common case: one adapter, no list to build
        active = (active,) if active in lora_a else ()
    else:
        active = [name for name in active if name in lora_a]
    variants = d["lora_variant"]
    if not active or (variants and any(name in variants for name in active)):
        return peft_forward(self, x)  # no adapter on this layer, or DoRA & co. added after patching
    dropout = mods["lora_dropout"]._modules
    lora_b = mods["lora_B"]._modules
    ps = []
    for name in active:
        drop = dropout[name]  # PEFT makes nn.Identity at p = 0 and nn.Dropout otherwise
        if observed(lora_a[name]) or observed(lora_b[name]) or observed(drop):
            return peft_forward(self, x)  # a hook on a sub-layer PEFT calls: PEFT's forward makes the call
        kind = type(drop)
        if kind is _Identity:
            ps.append(0.0)
            continue
        if kind is not _Dropout:
            return peft_forward(self, x)  # a dropout module of another kind: PEFT calls it as it is
        p = drop.p if drop.training else 0.0
        if p >= 1.0:
            return peft_forward(self, x)  # dropout p = 1 zeroes the input: no 1 / (1 - p) to fold
        ps.append(p)
    base = base_mod._parameters
    weight, bias = base["weight"], base["bias"]
    cast = None
    if any_autocast():
        cast = autocast_dtype(x)
    if cast is None and x.dtype != weight.dtype:
        return peft_forward(self, x)  # PEFT raises (or casts) exactly as it always did
    if cast is None and len(active) == 1:
        name, p = active[0], ps[0]
        bp = lora_b[name]._parameters
        return lora_linear(x, weight, bias, lora_a[name]._parameters["weight"], bp["weight"], bp.get("bias"), None,
                           d["scaling"][name], p, seed_for(x, d["_fastpeft_backend"]) if p > 0.0 else None,
                           d["_fastpeft_weight_t"], d["_fastpeft_backend"])
    if cast is None:
        return _fused(d, mods, active, ps, x, weight, bias, None)
    with torch.autocast(x.device.type, enabled=False):
        return _fused(d, mods, active, ps, x.to(cast), weight.to(cast), None if bias is None else bias.to(cast), cast)


def _fused(d, mods, active, ps, x, weight, bias, cast):
    """Several active adapters (or autocast): one op per adapter, each adding its term to the previous output."""
    backend, weight_t, scaling = d["_fastpeft_backend"], d["_fastpeft_weight_t"], d["scaling"]
    lora_a, lora_b = mods["lora_A"]._modules, mods["lora_B"]._modules
    y = None
    for name, p in zip(active, ps):
        a = lora_a[name]._parameters["weight"]
        bp = lora_b[name]._parameters
        b, lb = bp["weight"], bp.get("bias")
        if cast is not None:
            a, b, lb = a.to(cast), b.to(cast), None if lb is None else lb.to(cast)
        seed = seed_for(x, backend) if p > 0.0 else None
        if y is None:
            y = lora_linear(x, weight, bias, a, b, lb, None, scaling[name], p, seed, weight_t, backend)
        else:
            y = lora_linear(x, None, None, a, b, lb, y, scaling[name], p, seed, weight_t, backend)
    return y


_Identity, _Dropout = nn.Identity, nn.Dropout

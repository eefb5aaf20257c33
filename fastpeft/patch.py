"""``patch`` / ``unpatch``: one dispatch table from PEFT layer types to fused forwards, and the report.

A supported layer keeps its identity, parameters, buffers and type: only its class is swapped for a subclass whose
``forward`` calls the fused op (so ``isinstance(m, LoraLayer)``, ``state_dict`` keys, ``save_pretrained``,
``merge_and_unload``, optimizer param groups and ``requires_grad`` are untouched). Nothing is registered on the
module that PEFT would save: the backend choice is a plain attribute.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .common import base_weight
from .ops.linear import AUTO, BACKENDS, MIN_CAPABILITY, TRITON, interpreter_active, tensor_cores

__all__ = ["PatchReport", "patch", "unpatch", "report"]


@dataclass(frozen=True)
class Handler:
    check: Callable[[nn.Module], str | None]  # why a module cannot be fused, or None
    forward: Callable


@dataclass
class PatchReport:
    backend: str
    fused: dict[str, str] = field(default_factory=dict)  # module name -> PEFT layer type
    fallback: dict[str, str] = field(default_factory=dict)  # module name -> reason it keeps PEFT's forward
    notes: list[str] = field(default_factory=list)  # what applies to the whole model (nothing to fuse, backends)

    def __str__(self) -> str:
        lines = [f"fastpeft patch report (backend={self.backend}): {len(self.fused)} fused, "
                 f"{len(self.fallback)} on PEFT's forward"]
        lines += [f"  note: {note}" for note in self.notes]
        by_kind: dict[str, int] = {}
        for kind in self.fused.values():
            by_kind[kind] = by_kind.get(kind, 0) + 1
        lines += [f"  fused {kind}: {n}" for kind, n in sorted(by_kind.items())]
        lines += [f"  PEFT forward: {name}: {why}" for name, why in self.fallback.items()]
        lines.append("  at call time, PEFT's forward also runs for: adapter_names= mixed batches, extra forward "
                     "arguments, merged or disabled adapters, hooks on a layer's sub-layers (accelerate's included) "
                     "or global module hooks, torch.func transforms and forward-mode AD")
        return "\n".join(lines)


def _dispatch_table() -> dict[type, Handler]:
    """PEFT layer type -> how to fuse it. Exact types only: subclasses (quantized LoRA layers) are not fused."""
    from peft.tuners import ia3, lora

    from .ia3 import check_ia3_linear, fused_ia3_linear_forward
    from .lora import check_lora_linear, fused_lora_linear_forward

    return {
        lora.Linear: Handler(check_lora_linear, fused_lora_linear_forward),
        ia3.Linear: Handler(check_ia3_linear, fused_ia3_linear_forward),
    }


_FUSED_CLASSES: dict[type, type] = {}


def _fused_name(cls: type) -> str:
    """A module-level name for the fused subclass of ``cls``, e.g. ``Fused_peft_tuners_lora_layer_Linear``."""
    return f"Fused_{cls.__module__.replace('.', '_')}_{cls.__name__}"


def _fused_class(cls: type, forward: Callable) -> type:
    """The fused subclass of a PEFT layer class. It is named in this module (see ``__getattr__`` below), so a
    patched model pickles (``torch.save(model)``) and unpickles in a fresh process."""
    if cls not in _FUSED_CLASSES:
        # __name__ is PEFT's, so the model prints, reports (get_layer_status) and is matched by name exactly as
        # PEFT's; pickle finds the class by module and __qualname__.
        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "_fastpeft_orig_class": cls,
                                                          "__module__": __name__, "__qualname__": _fused_name(cls)})
    return _FUSED_CLASSES[cls]


def __getattr__(name: str) -> type:
    # PEP 562: pickle looks fused classes up by name; rebuild them on demand from the dispatch table.
    if name.startswith("Fused_"):
        for cls, handler in _dispatch_table().items():
            if _fused_name(cls) == name:
                return _fused_class(cls, handler.forward)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_backend(model: nn.Module, backend: str) -> int:
    if backend not in BACKENDS:
        raise ValueError(f"fastpeft.patch: backend={backend!r}; expected one of {sorted(BACKENDS)}")
    code = BACKENDS[backend]
    if code == TRITON:
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise RuntimeError("fastpeft.patch(backend='triton') needs the triton package") from e
        on_cpu = any(not p.is_cuda for p in model.parameters())
        if on_cpu and not interpreter_active():
            raise RuntimeError("fastpeft.patch(backend='triton'): the model has CPU parameters and the Triton "
                               "interpreter is off; set TRITON_INTERPRET=1 before importing triton, move the model "
                               "to CUDA, or use backend='auto' / 'torch'")
    return code


def patch(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Swap every supported PEFT adapter layer of ``model`` to its fused forward; return ``model``.

    ``backend``: "auto" (Triton on CUDA tensors, the fused torch path elsewhere), "triton" (the Triton kernels;
    CPU tensors only under TRITON_INTERPRET=1), "torch" (the fused torch path everywhere). Idempotent: patching
    again only updates the backend. The report is returned by ``fastpeft.report(model)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastpeft.patch: expected a torch.nn.Module (a PeftModel from get_peft_model or "
                        f"PeftModel.from_pretrained), got {type(model).__name__}")
    code = _check_backend(model, backend)
    from peft.tuners.tuners_utils import BaseTunerLayer

    table = _dispatch_table()
    rep = PatchReport(backend=backend)
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        orig = getattr(type(module), "_fastpeft_orig_class", type(module))
        handler = table.get(orig)
        if handler is None:
            rep.fallback[name] = f"no fused kernel for PEFT {orig.__module__}.{orig.__name__}"
            continue
        reason = handler.check(module)
        if reason is not None:
            if orig is not type(module):
                module.__class__ = orig
            rep.fallback[name] = reason
            continue
        module.__class__ = _fused_class(orig, handler.forward)
        module._fastpeft_backend = code
        module._fastpeft_weight_t = base_weight(module.get_base_layer())[2]
        module._fastpeft_base_type = type(module.get_base_layer())
        rep.fused[name] = f"{orig.__module__.rsplit('.', 2)[-2]}.{orig.__name__}"
    _patch_prompt_learning(model, rep, code)
    model._fastpeft_report = rep
    rep.notes += _notes(model, rep, code)
    if not rep.fused and not rep.fallback:
        warnings.warn(f"fastpeft: nothing fused: {rep.notes[0]}", stacklevel=2)
    elif rep.fallback:
        reasons = sorted(set(rep.fallback.values()))
        warnings.warn(f"fastpeft: {len(rep.fallback)} adapter layer(s) keep PEFT's forward: " + "; ".join(reasons)
                      + " (see fastpeft.report(model))", stacklevel=2)
    return model


def _patch_prompt_learning(model: nn.Module, rep: PatchReport, code: int) -> None:
    config = getattr(model, "active_peft_config", None)
    kind = None if config is None else config.peft_type.value
    if kind == "PREFIX_TUNING":
        from .prefix import patch_prefix as patcher
    elif kind in ("PROMPT_TUNING", "P_TUNING"):
        from .soft_prompt import patch_soft_prompt as patcher
    else:
        return
    name = f"prompt_encoder.{model.active_adapter}"
    ok, what = patcher(model, code)
    if ok:
        rep.fused[name] = f"{kind.lower()}.{type(model.prompt_encoder[model.active_adapter]).__name__}"
        rep.notes.append(what)
    else:
        rep.fallback[name] = what


def _cuda_devices(model: nn.Module) -> set[int]:
    return {p.get_device() for p in model.parameters() if p.is_cuda}


def _notes(model: nn.Module, rep: PatchReport, code: int) -> list[str]:
    """What the report says of the whole model: why nothing was fused, which GPUs run the torch path."""
    notes = []
    if not rep.fused and not rep.fallback:
        config = getattr(model, "active_peft_config", None)
        if config is not None and config.is_prompt_learning:
            notes.append(f"PEFT method {config.peft_type.value} is not fused (fastpeft patches prefix tuning, prompt "
                         "tuning and P-tuning): the model runs PEFT's forward")
        else:
            notes.append(f"no PEFT adapter layers found in {type(model).__name__}: expected a PeftModel "
                         "(get_peft_model or PeftModel.from_pretrained) or a model with LoRA / IA3 layers injected")
    if code == AUTO and rep.fused:
        for index in sorted(_cuda_devices(model)):
            if not tensor_cores(index):
                cc = ".".join(map(str, torch.cuda.get_device_capability(index)))
                notes.append(f"CUDA device {index} has compute capability {cc} < {MIN_CAPABILITY[0]}.0: the fused "
                             "torch path runs there instead of Triton, whose dots would lower to FMA loops without "
                             "tensor cores")
    return notes


def unpatch(model: nn.Module) -> nn.Module:
    """Restore every patched layer's PEFT class. Parameters and state are untouched."""
    for module in model.modules():
        orig = getattr(type(module), "_fastpeft_orig_class", None)
        if orig is not None:
            module.__class__ = orig
            module.__dict__.pop("_fastpeft_backend", None)
            module.__dict__.pop("_fastpeft_weight_t", None)
            module.__dict__.pop("_fastpeft_base_type", None)
    from .prefix import unpatch_prefix
    from .soft_prompt import unpatch_soft_prompt

    unpatch_prefix(model)
    unpatch_soft_prompt(model)
    model.__dict__.pop("_fastpeft_report", None)
    return model


def report(model: nn.Module) -> PatchReport | None:
    """The report of the last ``patch(model)``: which layers were fused and which keep PEFT's forward, and why."""
    return model.__dict__.get("_fastpeft_report")



"""The benchmark counters that need a model: ops of a step (``count_ops``, over fastpeft.testing's OpCounter), the
same split at generate's steps with the bytes each copy op writes (``StepCounter``), the copies made before the
model's forward (``count_inputs``: a soft prompt's input preparation), and what autograd saves for backward
(``SavedCounter``). Definitions: the ``benchmarks/harness.py`` module docstring."""

from __future__ import annotations

import collections
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from fastpeft.testing import OpCounter, excluded_op

__all__ = ["count_ops", "count_inputs", "COPY_OPS", "Segment", "StepCounter", "SavedCounter"]


def count_ops(fn: Callable[[], Any]) -> OpCounter:
    counter = OpCounter()
    with counter:
        fn()
    return counter


# Ops that move data without arithmetic -> the argument whose bytes they write (None: their output). An embedding
# lookup is a gather too, but it is the model's compute (the token embeddings), not a copy of state, so it is left out.
COPY_OPS: dict[str, int | None] = {
    "aten.cat": None, "aten.stack": None, "aten.clone": None, "aten._to_copy": None, "aten.copy": None,
    "aten.repeat": None, "aten.repeat_interleave": None, "aten.index_select": None, "aten.index_copy": None,
    "aten.index_put": None, "aten.slice_scatter": None, "aten.select_scatter": None, "aten.expand_copy": None,
    "aten.copy_": 0, "aten.index_copy_": 3, "aten.index_put_": 2,
}

# fastpeft's custom ops -> (module, function): the implementation the op runs on CPU, called under the counter
# so the aten ops (and copies) inside it are seen. The op itself still counts as one op in ``total``.
_SEE_THROUGH = {"fastpeft.prefix_attention": ("fastpeft.ops.prefix", "_fwd"),
                "fastpeft.prefix_attention_backward": ("fastpeft.ops.prefix", "_bwd_impl"),
                "fastpeft.soft_prompt_embed": ("fastpeft.ops.soft_prompt", "_fwd")}


def _nbytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


@dataclass
class Segment:
    """What one stretch between two ``StepCounter.mark()`` calls dispatched."""

    ops: int = 0  # counted as OpCounter counts (a fastpeft custom op is one)
    forward_ops: int = 0  # the part of ``ops`` inside the model's forward (``StepCounter.watch``)
    copies: collections.Counter = field(default_factory=collections.Counter)  # copy op -> bytes written
    inside_ops: collections.Counter = field(default_factory=collections.Counter)  # aten ops inside fastpeft ops
    histogram: collections.Counter = field(default_factory=collections.Counter)

    @property
    def copy_bytes(self) -> int:
        """Bytes written by copy ops, those inside fastpeft's ops included."""
        return sum(self.copies.values())


class StepCounter(OpCounter):
    """An OpCounter that also splits its counts into ``segments`` at each ``mark()`` (a generate step), attributes
    the bytes written by ``COPY_OPS`` to each op (``Segment.copies``; an op inside a fastpeft custom op is keyed
    ``"inside:<op>"``), and counts the aten ops a fastpeft op runs inside (``Segment.inside_ops``, not in ``ops``).

    Inside a fastpeft op the counter calls the op's CPU implementation itself (``_SEE_THROUGH``), under the mode:
    the same aten calls the op makes when called directly in eager (``fastpeft.ops.linear.direct_call``).
    """

    def __init__(self, see_through: bool = True):
        super().__init__()
        self.segments = [Segment()]
        self.see_through = see_through
        self._inside = 0
        self._forward = 0
        self.writes: list | None = None  # (op, tensor written) of every copy op outside ``watch``ed forwards

    def mark(self) -> None:
        self.segments.append(Segment())

    def watch(self, module: nn.Module) -> list:
        """Count the ops inside ``module``'s forward apart (``Segment.forward_ops``); returns the hook handles."""

        def enter(*_):
            self._forward += 1

        def leave(*_):
            self._forward -= 1

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        seg = self.segments[-1]
        impl = _SEE_THROUGH.get(name) if self.see_through and not self._inside else None
        if impl is not None:
            self._inside += 1
            try:
                with self:
                    out = getattr(importlib.import_module(impl[0]), impl[1])(*args, **kwargs)
            finally:
                self._inside -= 1
        else:
            out = func(*args, **kwargs)
        if excluded_op(func):
            return out
        if self._inside:
            seg.inside_ops[name] += 1
        else:
            self.ops[str(func)] += 1
            self.names.append(name)
            self.bytes += _nbytes((args, kwargs)) + _nbytes(out)
            seg.ops += 1
            seg.histogram[name] += 1
            seg.forward_ops += bool(self._forward)
        if name in COPY_OPS:
            i = COPY_OPS[name]
            dst = out if i is None else (args[i] if i < len(args) else None)
            key = f"inside:{name}" if self._inside else name
            seg.copies[key] += _nbytes(dst)
            if self.writes is not None and not self._forward:
                self.writes.append((key, dst))
        return out


def count_inputs(model: nn.Module, fn: Callable[[], Any]) -> StepCounter:
    """``fn()`` counted as ``count_ops`` counts it (fastpeft's ops seen through, still one op each), with
    ``counter.inputs``: the copy ops that ran before the model's forward first started -- a PeftModel's task forward
    building the model's inputs; nothing for a bare model, whose forward is the call -- in bytes written per op
    (inside fastpeft's ops too), split by destination: ``input_embeds_writes`` into the ``inputs_embeds`` the model
    receives (its storage: the output itself), ``input_copies`` anywhere else (a per-row copy of a prompt, a mask's
    concatenation, an encoder's own stacking). ``input_embeds_bytes``: the size of that ``inputs_embeds``."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    counter, seen = StepCounter(), {}
    counter.writes = []

    def at_forward(module, args, kwargs):
        if "writes" not in seen:
            seen["writes"], seen["embeds"], counter.writes = counter.writes, kwargs.get("inputs_embeds"), None

    hooks = [lm.register_forward_pre_hook(at_forward, with_kwargs=True), *counter.watch(lm)]
    try:
        with counter:
            fn()
    finally:
        for h in hooks:
            h.remove()
    embeds = seen.get("embeds")
    target = None if embeds is None else (embeds.device, embeds.untyped_storage().data_ptr())
    into, other = collections.Counter(), collections.Counter()
    for key, dst in seen.get("writes", []):  # the written tensors were kept alive: no storage address is reused
        hit = isinstance(dst, torch.Tensor) and (dst.device, dst.untyped_storage().data_ptr()) == target
        (into if hit else other)[key] += _nbytes(dst)
    counter.inputs = {"input_copies": dict(other), "input_copy_bytes": sum(other.values()),
                      "input_embeds_writes": dict(into), "input_embeds_bytes": _nbytes(embeds)}
    return counter


class SavedCounter:
    """What autograd saves for backward during a forward: distinct storages, parameters apart (see module doc).

    Holds the storages it saw until ``close()`` so a freed storage's address cannot be counted twice.
    """

    def __init__(self, model: nn.Module):
        self._params = {self._key(p) for p in model.parameters()}
        self._storages: dict[tuple, torch.UntypedStorage] = {}
        self._param_storages: dict[tuple, int] = {}
        self.scalar_bytes = 0
        self.wide_x_bytes = 0
        self._scopes: list[torch.Tensor] = []  # inputs of the adapter layers being run
        self._wide_seen: set[tuple] = set()
        self._hooks = []
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                self._hooks.append(m.register_forward_pre_hook(self._enter))
                self._hooks.append(m.register_forward_hook(self._exit))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.device, t.untyped_storage().data_ptr())

    def _enter(self, module, args):
        self._scopes.append(args[0] if args and isinstance(args[0], torch.Tensor) else None)

    def _exit(self, module, args, out):
        self._scopes.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key, st = self._key(t), t.untyped_storage()
        if key in self._params:
            self._param_storages.setdefault(key, st.nbytes())
            return t
        if key not in self._storages:
            self._storages[key] = st
            if t.dim() == 0 and st.nbytes() == t.element_size():
                self.scalar_bytes += st.nbytes()
        x = self._scopes[-1] if self._scopes else None
        if (x is not None and t.is_floating_point() and x.is_floating_point() and t.numel() == x.numel()
                and t.element_size() > x.element_size() and key not in self._wide_seen):
            self._wide_seen.add(key)
            self.wide_x_bytes += st.nbytes()
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def saved_bytes(self) -> int:
        return sum(st.nbytes() for st in self._storages.values())

    @property
    def param_bytes(self) -> int:
        return sum(self._param_storages.values())

    def close(self) -> None:
        self._storages.clear()

"""The benchmark counters that need a model: ops of a step (``count_ops``, over fastpeft.testing's OpCounter) and
what autograd saves for backward (``SavedCounter``). Definitions: the ``benchmarks/harness.py`` module docstring."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fastpeft.testing import OpCounter

__all__ = ["count_ops", "SavedCounter"]


def count_ops(fn: Callable[[], Any]) -> OpCounter:
    counter = OpCounter()
    with counter:
        fn()
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

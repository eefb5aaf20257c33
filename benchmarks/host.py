"""Host time of one adapted-linear layer call at decode size, per provider.

At decode the arithmetic of an adapter is tiny and the host path is the cost: on a GPU without CUDA graphs each
layer's Python, dispatch and launch time is what the step waits for, and on a CPU it adds to every layer. This
measures it directly on one layer (in = out = 64, M = 1, so the matmuls are negligible): the base ``nn.Linear``
module (the floor), PEFT's layer, and the fused layer, timed alone, no grad, medians of several rounds. On CUDA
the loop is not synchronised per call, so it measures what the host spends to enqueue (what bounds eager decode).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from .harness import METHODS, PROVIDERS, _fastpeft_patch

FEATURES, RANK = 64, 8


class _One(nn.Module):
    """One projection named like a Llama target module, so each method's default targets apply."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        setattr(self, name, nn.Linear(FEATURES, FEATURES, bias=False))

    def forward(self, x):
        return getattr(self, self.name)(x)


def _layers(method: str, device: str) -> dict[str, nn.Module]:
    from peft import IA3Config, LoraConfig, get_peft_model

    torch.manual_seed(0)
    name = "q_proj" if method == "lora" else "k_proj"
    base = _One(name).to(device).eval()
    config = (LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[name]) if method == "lora" else
              IA3Config(target_modules=[name], feedforward_modules=[]))
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    fast_model = _fastpeft_patch(copy.deepcopy(peft_model), device).eval()
    inner = lambda m: getattr(m.get_base_model(), name)  # noqa: E731
    return {"base": getattr(base, name), "peft": inner(peft_model), "fastpeft": inner(fast_model)}


def layer_host_us(method: str, device: str = "cpu", rounds: int = 9, calls: int = 2000) -> dict[str, float]:
    """Median microseconds per layer call, per provider, providers interleaved round by round."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}; expected one of {sorted(METHODS)}")
    layers = _layers(method, device)
    x = torch.randn(1, 1, FEATURES, device=device)
    times: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for layer in layers.values():  # warm-up: first-call planning and allocator growth
            for _ in range(100):
                layer(x)
        sync()
        for _ in range(rounds):
            for p in PROVIDERS:
                layer = layers[p]
                t0 = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                sync()
                times[p].append((time.perf_counter() - t0) / calls * 1e6)
    return {p: statistics.median(ts) for p, ts in times.items()}

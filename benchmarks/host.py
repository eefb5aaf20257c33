"""Host time of one adapted-linear layer call at decode size, per provider (the layer methods, ``LAYER_METHODS``;
prefix tuning adapts no layer: its decode overhead is in the generate-mode counters and times).

At decode the arithmetic of an adapter is tiny and the host path is the cost: on a GPU without CUDA graphs each
layer's Python, dispatch and launch time is what the step waits for, and on a CPU it adds to every layer. This
measures it directly on one layer (in = out = 64, M = 1, so the matmuls are negligible): the base ``nn.Linear``
module (the floor), PEFT's layer, and the fused layer, timed alone, no grad, medians of several rounds. On CUDA
the loop is not synchronised per call, so it measures what the host spends to enqueue (what bounds eager decode).
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's import: plan on CPU tensors, launch nothing
from torch import nn

from .harness import PROVIDERS, _fastpeft_patch

__all__ = ["LAYER_METHODS", "layer_host_us", "launcher_host_us"]

FEATURES, RANK = 64, 8
LAYER_METHODS = ("lora", "ia3")


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
    if method not in LAYER_METHODS:
        raise ValueError(f"method {method!r}; expected one of {LAYER_METHODS}")
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


def launcher_host_us(calls: int = 3000, rounds: int = 7) -> dict[str, float]:
    """Host time of the Triton launchers' own work per call at decode size (checks and planning, output allocation,
    argument binding), with the kernel call itself stubbed out: ``*-planned`` plans every call (what the launchers
    did before launch plans were kept), ``*-replayed`` is the shipped path. Needs CUDA tensors, or CPU tensors with
    TRITON_INTERPRET=1 set before triton is imported."""
    from unittest import mock

    from fastpeft.kernels import _common, ia3, lora, lora_split

    class _NoKernel:  # kernel[grid](**kwargs): binds every argument, launches nothing
        def __getitem__(self, grid):
            return lambda **kwargs: None

    stub = _NoKernel()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
    x, w, a, b, l, dy, xa = t(1, 512), t(512, 512), t(16, 512), t(512, 16), t(512), t(1, 512), t(1, 16)

    def planned_launch(spec, device):
        with _common._on_device(device):
            stub[spec.grid](**spec.args, **spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)

    def replayed_launch(plan, device, dynamic):
        with _common._on_device(device):
            stub[plan.grid](**plan.static, **dynamic, num_warps=plan.num_warps, num_stages=plan.num_stages)

    def lora_bwd_planned():  # the split plan's launchers, each planning afresh
        for cache in (lora_split._SHRINK_PLANS, lora_split._EXPAND_PLANS, lora_split._WGRAD_PLANS):
            cache.plans.clear()
        lora.lora_bwd(dy, x, w, a, b, xa, 2.0, 0.0, 0)

    cases = {
        "lora-fwd-planned": lambda: planned_launch(lora._plan_fwd(x, w, None, a, b, None, None, 2.0, 0.0, None,
                                                                  False, False)[0], x.device),
        "lora-fwd-replayed": lambda: lora.lora_fwd(x, w, None, a, b, None, None, 2.0, 0.0, 0, False, False),
        "lora-bwd-planned": lora_bwd_planned,
        "lora-bwd-replayed": lambda: lora.lora_bwd(dy, x, w, a, b, xa, 2.0, 0.0, 0),
        "ia3-fwd-planned": lambda: planned_launch(ia3._plan_ia3_fwd(x, w, None, l, False, False, False)[0], x.device),
        "ia3-fwd-replayed": lambda: ia3.ia3_fwd(x, w, None, l, False, False, False),
    }
    out = {}
    with mock.patch.object(lora, "_launch", planned_launch), mock.patch.object(ia3, "_launch", planned_launch), \
            mock.patch.object(lora_split, "_launch", planned_launch), \
            mock.patch.object(_common.LaunchPlan, "launch", replayed_launch):
        for name, fn in cases.items():
            for _ in range(100):
                fn()
            ts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                ts.append((time.perf_counter() - t0) / calls * 1e6)
            out[name] = statistics.median(ts)
    return out


if __name__ == "__main__":  # python -m benchmarks.host
    torch.set_num_threads(1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for method in LAYER_METHODS:
        us = layer_host_us(method, dev)
        print(f"{method} layer call at decode size, {dev}: " + ", ".join(f"{p} {v:.1f} us" for p, v in us.items()))
    print("launcher host work per call (kernel call stubbed out): " +
          ", ".join(f"{k} {v:.1f} us" for k, v in launcher_host_us().items()))

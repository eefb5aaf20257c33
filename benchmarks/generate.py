"""The harness's "generate" mode: greedy ``model.generate`` of ``w.new_tokens`` tokens after a ``w.seq``-token prompt
(all ones mask), timed per decode step, and the counters of one such call.

Why a mode of its own: a prompt-learning method reaches its decode loop only through ``generate``. PEFT's prefix
forward replaces any cache it is handed with a fresh prefix cache, and its ``prepare_inputs_for_generation`` is
where the prefix enters the cache and the prefix mask is concatenated (every step), so a hand-written decode loop
would not run PEFT's path. The decode step of such a method is one iteration of generate's loop.

Per-step times: a stopping criterion, called once per generated token after its logits, stamps the clock; the
difference of consecutive stamps is one whole decode iteration (generate's input preparation, the model's
forward and cache update, logits processing). ``new_tokens`` tokens give ``new_tokens - 1`` decode steps; the
first stamp closes the prefill.

Counters (one generate call under ``StepCounter``, its segments cut at the same stamps):
- ``prefill_ops`` / ``prefill_forward_ops``: ops from generate's start to the first token (setup, PEFT's prefix
  build and cache injection, the prompt's forward) / the part inside the model's forward;
- ``decode_step_ops`` / ``decode_forward_ops``: the same for the last decode step (the steps are alike);
  ``decode_inside_ops``: aten ops run inside fastpeft's custom ops during that step (not in the counts above, where
  such an op counts as one);
- ``copy_bytes_per_step``: bytes written by copy ops (``counters.COPY_OPS``: cat, copy_, clone, index_copy, ...)
  per decode step, the mean over the decode steps (the cache grows by a token each step), copies inside
  fastpeft's ops included; ``decode_copy_bytes``: their sum over the decode steps; ``decode_copies``: that sum by op;
- ``prefix_bytes_held``: at the prompt's forward, the distinct storages of the cache handed to the model (PEFT:
  its prefix, one copy per row; empty for the others) plus those of fastpeft's prefix (``PrefixKV.layers``, one
  ``[Hkv, P, D]`` key and value per layer); ``prefix_tensor_bytes``: the same as a sum of tensor sizes (equal
  unless something is a broadcast view);
- ``kv_cache_bytes``: the distinct storages of the cache generate returns (keys and values of every layer);
- ``generated_sha1``: a digest of the generated sequences, to compare providers.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .counters import StepCounter

__all__ = ["GenerateState", "generate_steps", "generate_counters", "cache_tensors", "storage_bytes"]


@dataclass
class GenerateState:
    token_times: list[float] = field(default_factory=list)  # seconds per decode step of the last call
    prefill_s: float = 0.0  # generate's start to the first token, last call


@functools.cache
def _clock_class():
    from transformers import StoppingCriteria

    class Clock(StoppingCriteria):
        """Never stops; calls ``tick()`` once per generated token."""

        def __init__(self, tick: Callable[[], None]):
            self.tick = tick

        def __call__(self, input_ids, scores, **kwargs):
            self.tick()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Clock


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, tick: Callable[[], None]):
    from transformers import StoppingCriteriaList

    with torch.no_grad():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              stopping_criteria=StoppingCriteriaList([_clock_class()(tick)]),
                              return_dict_in_generate=True)


def generate_steps(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: str):
    """``(prepare, step)`` of the harness's Runner: ``step(state)`` runs one generate call and leaves its per-step
    times in ``state``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(state: GenerateState):
        stamps: list[float] = []

        def tick():
            sync()
            stamps.append(time.perf_counter())

        sync()
        t0 = time.perf_counter()
        out = _generate(model, prompt, new_tokens, tick)
        state.prefill_s = stamps[0] - t0
        state.token_times = [b - a for a, b in zip(stamps, stamps[1:])]
        return out

    return GenerateState, step


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The key and value tensors a cache holds (a transformers Cache's layers, or a legacy tuple)."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tree = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    else:
        tree = cache
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count it once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(t.device, st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def _prefix_tensors(kwargs: dict) -> list[torch.Tensor]:
    from fastpeft.prefix import PrefixKV

    return [t for v in kwargs.values() if isinstance(v, PrefixKV) for t in tree_leaves(v.layers)]


def generate_counters(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """Every counter of one generate call (see the module docstring)."""
    if new_tokens < 2:
        raise ValueError(f"generate counters need at least 2 new tokens (one decode step); got {new_tokens}")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    held: dict[str, int] = {}

    def at_forward(module, args, kwargs):
        if not held:  # the first forward: the prompt's
            cache, prefix = cache_tensors(kwargs.get("past_key_values")), _prefix_tensors(kwargs)
            held["prefix_bytes_held"] = storage_bytes(cache) + storage_bytes(prefix)
            held["prefix_tensor_bytes"] = sum(t.numel() * t.element_size() for t in cache + prefix)

    counter = StepCounter()
    hooks = [lm.register_forward_pre_hook(at_forward, with_kwargs=True), *counter.watch(lm)]
    try:
        with counter:
            out = _generate(model, prompt, new_tokens, counter.mark)
    finally:
        for h in hooks:
            h.remove()
    # segments: [prefill, decode steps 2..new_tokens, generate's tail after the last token]
    prefill, decode = counter.segments[0], counter.segments[1:new_tokens]
    copies = sum((s.copies for s in decode), start=collections.Counter())
    last = decode[-1]
    total_copy = sum(copies.values())
    return {
        **held,
        "ops": counter.total, "bytes_touched": counter.bytes, "op_histogram": dict(last.histogram.most_common()),
        "prefill_ops": prefill.ops, "prefill_forward_ops": prefill.forward_ops,
        "decode_step_ops": last.ops, "decode_forward_ops": last.forward_ops, "generate_ops": last.ops,
        "decode_inside_ops": sum(last.inside_ops.values()), "decode_inside_histogram": dict(last.inside_ops),
        "decode_steps": len(decode), "decode_copy_bytes": total_copy, "copy_bytes_per_step": total_copy / len(decode),
        "decode_copies": dict(copies.most_common()),
        "kv_cache_bytes": storage_bytes(cache_tensors(out.past_key_values)),
        "generated_sha1": hashlib.sha1(out.sequences.cpu().numpy().tobytes()).hexdigest(),
    }

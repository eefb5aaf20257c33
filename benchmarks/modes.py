"""The harness's modes: what one timed step of each mode runs (``make_runner``), and the decode ops per token inside
``generate()`` (``generate_ops``). Definitions of the modes: the ``benchmarks/harness.py`` module docstring."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .counters import count_ops

if TYPE_CHECKING:
    from .harness import Workload

__all__ = ["MODES", "Runner", "make_runner", "generate_ops"]

MODES = ("decode", "generate", "prefill", "forward", "train")


@dataclass
class Runner:
    """``prepare()`` builds fresh per-round state (inputs, a prefilled cache) untimed; ``step(state)`` is timed."""

    model: nn.Module
    prepare: Callable[[], Any]
    step: Callable[[Any], Any]


@dataclass
class _DecodeState:
    cache: Any
    tokens: list  # [B, 1] token tensors, fed in turn
    i: int = 0


def _tokens(vocab: int, batch: int, seq: int, device: str, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=gen).to(device)


def make_runner(model: nn.Module, w: Workload, device: str, decode_tokens: int, extra_tokens: int = 0) -> Runner:
    vocab, seq = model.config.vocab_size, w.seq + extra_tokens
    if w.mode == "decode":
        from transformers import DynamicCache

        stream = _tokens(vocab, w.batch, decode_tokens, device, seed=4)
        tokens = [t.contiguous() for t in stream.split(1, dim=1)]  # [B, 1] each, made once
        prompt = _tokens(vocab, w.batch, seq, device)

        def prepare():
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return _DecodeState(cache, tokens)

        def step(s: _DecodeState):
            with torch.no_grad():
                out = model(input_ids=s.tokens[s.i % len(s.tokens)], past_key_values=s.cache, use_cache=True)
            s.i += 1
            return out.logits

        return Runner(model, prepare, step)

    ids = _tokens(vocab, w.batch, seq, device)
    if w.mode == "generate":
        from .generate import generate_steps

        return Runner(model, *generate_steps(model, ids, w.new_tokens, device))
    if w.mode == "prefill":
        def step(_):
            with torch.no_grad():
                return model(input_ids=ids, use_cache=True, logits_to_keep=1).logits

        return Runner(model, lambda: None, step)

    if w.mode == "forward":
        mask = torch.ones_like(ids)

        def step(_):
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=mask).logits

        return Runner(model, lambda: None, step)

    if w.mode == "train":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=True) if params else None

        def step(_):
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if opt is not None:
                opt.step()
            return loss

        return Runner(model, lambda: None, step)
    raise ValueError(f"mode {w.mode!r}; expected one of {MODES}")


def generate_ops(model: nn.Module, w: Workload, device: str) -> int:
    """Ops per new token inside greedy ``generate()``: ops(3 new tokens) - ops(2 new tokens), same prompt."""
    prompt = _tokens(model.config.vocab_size, w.batch, w.seq, device)

    def run(n: int) -> int:
        with torch.no_grad():
            return count_ops(lambda: model.generate(
                input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=0)).total

    return run(3) - run(2)

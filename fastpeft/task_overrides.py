"""What the prompt-learning patches (prefix tuning, soft prompts) share: PEFT's task classes, their arguments, and
the instance-level overrides of ``forward`` / ``prepare_inputs_for_generation`` / ``generate``.

Overrides are instance attributes: PEFT's ``disable_adapter`` swaps exactly those attributes out and back
(peft_model.py:1040), and ``generate`` installs ``self.prepare_inputs_for_generation`` by an instance lookup, so
both compose with them. ``unpatch`` removes them; the class methods are PEFT's again.
"""

from __future__ import annotations

import inspect
from typing import Callable

__all__ = ["TASKS", "bind", "past_length", "install", "uninstall"]

# PEFT task class -> the override set it takes
TASKS = {"PeftModelForCausalLM": "causal", "PeftModelForSeq2SeqLM": "seq2seq",
         "PeftModelForSequenceClassification": "encoder", "PeftModelForTokenClassification": "encoder",
         "PeftModelForQuestionAnswering": "encoder", "PeftModelForFeatureExtraction": "encoder"}

# Named parameters of a PEFT task forward that its prompt-learning branch never passes on: PEFT drops them
# silently (QA: peft_model.py:2982-3051 names token_type_ids and position_ids, then calls the base without them).
_DROPPED = {"PeftModelForQuestionAnswering": ("token_type_ids", "position_ids")}


def bind(model, state: dict, args, kwargs) -> dict:
    """The call's arguments by name, as PEFT's task forward receives them (``**kwargs`` flattened in), less the
    ones PEFT drops."""
    a = dict(state["signature"].bind(*args, **kwargs).arguments)
    a.update(a.pop("kwargs", {}))
    for name in _DROPPED.get(type(model).__name__, ()):
        a.pop(name, None)
    return a


def past_length(kwargs: dict) -> int:
    """Tokens already in the cache the call carries (``past_key_values``, or ``cache`` since transformers 5.24)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        cache = kwargs.get("cache")
    if cache is None:
        return 0
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else cache[0][0].shape[-2]


def install(model, key: str, state: dict, impls: dict[str, Callable]) -> None:
    """Keep PEFT's bound methods and the forward's signature in ``state`` (stored under ``key``), then bind each
    of ``impls`` onto the instance."""
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]
    state["signature"] = inspect.Signature(params)
    state["peft"] = {name: getattr(model, name) for name in impls}
    model.__dict__[key] = state
    for name, impl in impls.items():
        model.__dict__[name] = impl.__get__(model)


def uninstall(model, key: str) -> dict | None:
    """Remove the overrides ``install`` bound; returns their state (None if the model had none)."""
    state = model.__dict__.pop(key, None)
    if state is not None:
        for name in state["peft"]:
            model.__dict__.pop(name, None)
    return state

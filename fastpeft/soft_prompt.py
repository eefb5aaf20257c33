"""Prompt tuning and P-tuning: the soft prompt written straight into the input, its encoder run once.

PEFT (peft_model.py:2131-2171 and its task twins) embeds the tokens, runs the prompt encoder at batch 1 on every
forward, ``repeat``s its output per row, concatenates, and prepends a ones mask and a -100 label block with two
more concatenations. Here ``fastpeft::soft_prompt_embed`` writes ``[prompt | token embeddings]`` once, the prompt
read from one [P, D] copy; masks and labels get their prefix by ``F.pad``. Everything else is PEFT's, replayed:
the prompt sits before any left padding, ``position_ids`` are dropped (and ``token_type_ids`` for causal LMs,
seq2seq and feature extraction) with PEFT's warnings, classification tasks extend ``token_type_ids`` with zeros,
T5 gets ``prompt[:P]`` of its 2P rows on the encoder side only, logits include the P virtual positions.

The encoder (P-tuning's MLP or LSTM head) runs once per forward at batch 1, and once per ``generate``; on CUDA its
output is also reused across eval forwards where no gradient is needed (``_PromptCache``, ``CACHE_DEVICES``).
Prompt tuning and loaded (inference-mode) adapters have no encoder: the prompt is a view of the embedding table.

``generate``: the prompt is injected at prefill only, on transformers 5.23 and 5.24 alike (5.24 renamed the cache
argument to ``cache``; PEFT 0.21.2 looks for ``past_key_values`` only and re-injects the prompt at every step).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .common import calls_watched, observed
from .ops.soft_prompt import soft_prompt_embed
from .task_overrides import TASKS, bind, install, past_length, uninstall

__all__ = ["patch_soft_prompt", "unpatch_soft_prompt"]

_TYPES = ("PROMPT_TUNING", "P_TUNING")

# Where eval forwards reuse the encoder's output across calls. Not on CPU, measured: the exact validity check
# (every weight against a stored copy) costs what the batch-1 encoder costs, as both are one pass over the
# weights there (hidden 512, 20 tokens, one thread: LSTM check 21.5 ms by torch.equal, encoder 22.9 ms; MLP 0.54
# vs 0.50 ms). On CUDA the check is a few bandwidth-bound launches and one sync, where the LSTM runs 2 P
# sequential launch-bound steps (derived, not measured: no GPU was available). generate reuses it within the call
# everywhere (the parameters cannot change inside one call).
CACHE_DEVICES = ("cuda",)

# Bumped after every optimizer step (a global post-hook sees fused steps, which bump no version counter).
_STEPS = [0]
_HOOK = None


def _count_step(optimizer, args, kwargs):
    _STEPS[0] += 1


class _PromptCache:
    """One adapter's encoder output, valid while nothing it depends on has changed.

    The key (cheap, catches most changes before any comparison): the encoder's mode; per parameter its identity
    (``load_state_dict(assign=True)``, a new Parameter), storage pointer (``.data =``, ``.to()``), version counter
    (in-place writes under no_grad, ``load_state_dict``, non-fused optimizers), dtype and device; and the global
    optimizer-step count (fused optimizers bump no version counter). Then, as the proof: every parameter equal to
    a copy taken when the output was computed, because ``p.data.copy_()`` / ``p.data.add_()`` change nothing any
    key can see. The copy costs the encoder's weights once more in memory (and a transient difference buffer); the
    comparison reads them twice, which for P-tuning's heads is under their own cost (an LSTM runs P sequential
    steps).
    """

    __slots__ = ("key", "weights", "out")

    def __init__(self, key, weights, out):
        self.key, self.weights, self.out = key, weights, out

    @staticmethod
    def key_of(enc: nn.Module, params: list) -> tuple:
        return (enc.training, _STEPS[0],
                tuple((id(p), p.data_ptr(), p._version, p.dtype, p.device, p.shape) for p in params))

    def valid(self, key, params) -> bool:
        """Four ops and one host sync whatever the encoder's size (a ``torch.equal`` per parameter would be one
        sync each): the largest |p - copy| over all parameters, exactly 0 iff every value is unchanged (NaN in
        a weight compares unequal, so it recomputes)."""
        if key != self.key:
            return False
        diffs = torch._foreach_sub(params, self.weights)
        return torch.stack(torch._foreach_norm(diffs, float("inf"))).amax().item() == 0


def _encode(model, adapter: str) -> torch.Tensor:
    """The adapter's prompt as [P * n_sub, D] at batch 1, as PEFT's ``get_prompt`` computes it before its
    ``repeat`` (peft_model.py:918-930)."""
    cfg = model.peft_config[adapter]
    enc = model.prompt_encoder[adapter]
    n = model.prompt_tokens[adapter].numel()
    heads = not cfg.inference_mode and cfg.peft_type.value == "P_TUNING"
    if not heads and not (observed(enc) or observed(enc.embedding) or calls_watched()):
        return enc.embedding.weight[:n]  # the lookup of arange(n) is the table itself: a view, nothing computed
    if cfg.inference_mode:
        return enc.embedding.weight
    return enc(model.prompt_tokens[adapter][:n].unsqueeze(0).to(enc.embedding.weight.device))[0]


def _prompt(model, state) -> torch.Tensor:
    adapter = model.active_adapter
    if state["generating"] is not None:
        return state["generating"]
    cfg = model.peft_config[adapter]
    enc = model.prompt_encoder[adapter]
    if cfg.inference_mode or cfg.peft_type.value != "P_TUNING" or enc.training or calls_watched():
        return _encode(model, adapter)
    params = list(enc.parameters())
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _encode(model, adapter)  # a cached output would carry no gradient
    if not params or params[0].device.type not in CACHE_DEVICES:
        return _encode(model, adapter)
    key = _PromptCache.key_of(enc, params)
    entry = state["cache"].get(adapter)
    if entry is None or not entry.valid(key, params):
        with torch.no_grad():
            out = _encode(model, adapter)
        entry = state["cache"][adapter] = _PromptCache(key, [p.detach().clone() for p in params], out)
    return entry.out


def _embed(model, state, prompt: torch.Tensor, ids, embeds) -> torch.Tensor:
    """``[prompt | word_embeddings(ids)]`` (or ``[prompt | embeds]``) through the fused op. A word-embedding
    module that is watched (hooks: ``enable_input_require_grads`` under gradient checkpointing) or not a plain
    ``nn.Embedding`` is called as a module, as PEFT calls it."""
    backend = state["backend"]
    if embeds is not None:
        return soft_prompt_embed(prompt, embeds=embeds, backend=backend)
    we = model.word_embeddings
    if type(we) is not nn.Embedding or we.max_norm is not None or observed(we) or calls_watched():
        return soft_prompt_embed(prompt, embeds=we(ids), backend=backend)
    return soft_prompt_embed(prompt, we.weight, ids, backend=backend)


def _pad(t: torch.Tensor | None, p: int, value) -> torch.Tensor | None:
    return None if t is None else F.pad(t, (p, 0), value=value)


def _forward(self, *args, **kwargs):
    state = self.__dict__["_fastpeft_soft_prompt"]
    a = bind(self, state, args, kwargs)
    cfg = self.active_peft_config
    if cfg.peft_type.value not in _TYPES:
        return state["peft"]["forward"](*args, **kwargs)
    task, p = state["task"], cfg.num_virtual_tokens
    a.pop("task_ids", None)
    ids, embeds = a.pop("input_ids", None), a.pop("inputs_embeds", None)
    if task == "encoder" and type(self).__name__ != "PeftModelForFeatureExtraction":
        self._adjust_prompt_learning_kwargs(cfg, kwargs=a, remove_token_type_ids=False)
        if a.get("token_type_ids") is not None:  # zeros for the prompt (peft_model.py:1952-1959)
            a["token_type_ids"] = _pad(a["token_type_ids"], p, 0).long()
    else:
        self._adjust_prompt_learning_kwargs(cfg, kwargs=a)
    a["attention_mask"] = _pad(a.get("attention_mask"), p, 1)
    if task == "causal":
        a["labels"] = _pad(a.get("labels"), p, -100)
    prompt = _prompt(self, state)
    a["inputs_embeds"] = _embed(self, state, prompt[:p], ids, embeds)
    return self.base_model(**a)


def _cache_of(model_kwargs):
    cache = model_kwargs.get("past_key_values")
    return model_kwargs.get("cache") if cache is None else cache


def _prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
    """PEFT's causal-LM step preparation (peft_model.py:2252-2377) with the cache found under either name: the
    prompt is written at prefill only, later steps feed the last token; the 2-D mask gets its P ones each step."""
    state = self.__dict__["_fastpeft_soft_prompt"]
    cfg = self.active_peft_config
    model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
    mask = model_kwargs.get("attention_mask")
    if cfg.peft_type.value not in _TYPES or isinstance(mask, dict) or (mask is not None and mask.dim() != 2):
        return state["peft"]["prepare_inputs_for_generation"](*args, task_ids=task_ids, **kwargs)
    cache = _cache_of(model_kwargs)
    past = 0 if cache is None else past_length(model_kwargs)
    ids = model_kwargs["input_ids"]
    if past >= ids.shape[1]:
        ids = model_kwargs["input_ids"] = ids[:, -1:]
    model_kwargs["attention_mask"] = _pad(mask, cfg.num_virtual_tokens, 1)
    self._adjust_prompt_learning_kwargs(cfg, kwargs=model_kwargs)
    if past == 0:
        prompt = _prompt(self, state)
        model_kwargs["inputs_embeds"] = _embed(self, state, prompt[: cfg.num_virtual_tokens], ids, None)
        model_kwargs["input_ids"] = None
    model_kwargs.pop("cache_position", None)
    return model_kwargs


def _generate_seq2seq(self, **kwargs):
    """Keyword arguments only, as PEFT's seq2seq generate (a positional input_ids raises TypeError there too)."""
    return _generate(self, **kwargs)


def _generate(self, *args, **kwargs):
    state = self.__dict__["_fastpeft_soft_prompt"]
    cfg = self.active_peft_config
    if cfg.peft_type.value not in _TYPES:
        return state["peft"]["generate"](*args, **kwargs)
    with torch.no_grad():
        state["generating"] = _prompt(self, state)  # once per call: parameters cannot change inside it
    try:
        if state["task"] == "causal":
            return state["peft"]["generate"](*args, **kwargs)
        return _seq2seq_generate(self, state, cfg, **kwargs)
    finally:
        state["generating"] = None


def _seq2seq_generate(self, state, cfg, **kwargs):
    """PEFT's seq2seq prompt generate (peft_model.py:2551-2605): the encoder input built once, then the base
    model's generate on ``inputs_embeds`` (without PEFT's ``deepcopy`` of every input tensor)."""
    if "input_ids" not in kwargs:
        raise ValueError("input_ids must be provided for Peft model generation")
    kwargs = dict(kwargs)
    self._adjust_prompt_learning_kwargs(cfg, kwargs=kwargs)
    if "encoder_outputs" in kwargs:
        del kwargs["encoder_outputs"]
        warnings.warn("`encoder_outputs` should not be passed to `generate` when using prompt tuning. Ignoring it.")
    ids = kwargs.pop("input_ids")
    kwargs.pop("task_ids", None)
    p = cfg.num_virtual_tokens
    kwargs["inputs_embeds"] = _embed(self, state, state["generating"][:p], ids, None)
    if "attention_mask" in kwargs:
        kwargs["attention_mask"] = _pad(kwargs["attention_mask"], p, 1)
    self.base_model.prepare_inputs_for_generation = self.prepare_inputs_for_generation
    try:
        return self.base_model.generate(**kwargs)
    finally:
        self.base_model.prepare_inputs_for_generation = self.base_model_prepare_inputs_for_generation


_OVERRIDES = {"causal": {"forward": _forward, "prepare_inputs_for_generation": _prepare_inputs_for_generation,
                         "generate": _generate},
              "seq2seq": {"forward": _forward, "generate": _generate_seq2seq}, "encoder": {"forward": _forward}}


def patch_soft_prompt(model, backend: int) -> tuple[bool, str]:
    """Patch a prompt-tuning or P-tuning PeftModel in place. Returns (patched, what the report says)."""
    global _HOOK
    state = model.__dict__.get("_fastpeft_soft_prompt")
    if state is not None:
        state["backend"] = backend
        return True, state["note"]
    task = TASKS.get(type(model).__name__)
    if task is None:
        return False, f"{type(model).__name__}: soft prompts are patched for {sorted(TASKS)}"
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK = register_optimizer_step_post_hook(_count_step)
    state = {"task": task, "backend": backend, "generating": None, "cache": {},
             "note": "soft prompt written straight into the input embeddings (fastpeft::soft_prompt_embed); the "
                     "encoder run once per forward and per generate (reused across eval forwards on CUDA)"}
    install(model, "_fastpeft_soft_prompt", state, _OVERRIDES[task])
    return True, state["note"]


def unpatch_soft_prompt(model) -> None:
    uninstall(model, "_fastpeft_soft_prompt")

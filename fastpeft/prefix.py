"""Prefix tuning with the prefix read straight into attention: one copy of the prefix, a KV cache of real tokens.

PEFT hands the prefix to the base model as ``past_key_values``: the prefix encoder runs on all B rows, a cache holds
B copies, the mask gets P columns of ones, and every decode step concatenates the whole cache again. Here the prefix
is built once per forward (once per ``generate``) at batch 1, from the same encoder and PEFT's own
view/cat/permute/split (so T5's layer layout, ``[x, x]`` included, is PEFT's), and reaches attention as the
``fastpeft_prefix`` forward kwarg, which transformers passes down to every attention call. A fastpeft attention
implementation, registered per original one (``fastpeft_prefix_eager``, ``fastpeft_prefix_sdpa``) in both
``AttentionInterface`` and ``AttentionMaskInterface`` (without the latter the function gets no mask), runs
``fastpeft::prefix_attention`` for the layers that have a prefix and delegates every other call -- T5's encoder
and cross-attention, ``disable_adapter()``, a model called without the kwarg -- to the original implementation.

What the base model computes behind PEFT's P-token cache, replayed (shared/notes/prefix-attention.md §4-§5):
positions start at P (``arange + past + P``; OPT's ``where(mask, P + cumsum(mask) - 1, -1)``; RoBERTa's
``create_position_ids_from_input_ids(ids, pad, P + past)``), a sliding window hides prefix key j from query i
once ``j <= P + past + i - W`` (inside the op), T5's prefix columns get the bias of relative position
``j - (P + past + i)`` from decoder layer 0. Nothing is injected into the cache, so the cache holds real tokens
only, and gradient checkpointing works: the kwarg is bound into the recomputed layer call (non-reentrant; the
reentrant kind too without projection, see ``_check_checkpointing``).

The prefix is not cached across forwards, only for the length of one ``generate``. Without projection it is views
of the embedding table: nothing to compute. With projection (training configs only: a loaded checkpoint holds the
projected prefix) the batch-1 MLP is one pass over its weights; the only test that catches every way they change
(``p.data.copy_()`` and fused optimizers bump no version counter) compares them with a stored copy, which reads
twice as much. Measured on this CPU for a 7B-shaped encoder (32 layers, 4096 wide, hidden 512, P = 20: 137M
weights): the encoder 56 ms, one checksum pass over its weights 23 ms (and a checksum can miss a write).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch
from torch import nn

from .common import calls_watched, observed
from .ops.prefix import prefix_attention
from .task_overrides import TASKS, bind, install, past_length, uninstall

__all__ = ["FAMILIES", "PrefixKV", "patch_prefix", "unpatch_prefix"]

KWARG = "fastpeft_prefix"
# model_type -> how real tokens are positioned behind a P-token cache ("arange", "opt", "roberta", None: no
# position ids, the attention function handles it)
FAMILIES = {"llama": "arange", "qwen2": "arange", "mistral": "arange", "gemma": "arange", "gemma2": "arange",
            "phi3": "arange", "gpt_neox": "arange", "gpt2": "arange", "opt": "opt", "bert": "arange",
            "roberta": "roberta", "t5": None}


class PrefixKV:
    """One adapter's prefix for one forward: per layer the keys and values ``[H_kv, P, D]``, shared by every row.

    ``targets`` maps ``id(attention module)`` to its layer, so that modules without a prefix (encoder, cross
    attention) are told apart inside the attention function; ``t5_bias`` is decoder layer 0's relative bias module.
    """

    __slots__ = ("layers", "targets", "length", "backend", "t5_bias", "past", "_bias_cache")

    def __init__(self, layers, targets, length, backend, t5_bias=None):
        self.layers, self.targets, self.length, self.backend = layers, targets, length, backend
        # real tokens already in the cache, set per call: a static cache's keys span its whole length, so the
        # query positions (sliding window, T5's bias) cannot be read off the key length there
        self.t5_bias, self.past, self._bias_cache = t5_bias, None, {}

    def t5_prefix_bias(self, sq: int, past: int, device) -> torch.Tensor:
        """``[1, H, Sq, P]``: the bias PEFT's prefix columns get, relative position ``j - (P + past + i)``."""
        key = (sq, past)
        if key not in self._bias_cache:
            mod, p = self.t5_bias, self.length
            rel = torch.arange(p, device=device)[None, :] - (torch.arange(sq, device=device)[:, None] + p + past)
            bucket = mod._relative_position_bucket(rel, bidirectional=not mod.is_decoder,
                                                   num_buckets=mod.relative_attention_num_buckets,
                                                   max_distance=mod.relative_attention_max_distance)
            self._bias_cache[key] = mod.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)
        return self._bias_cache[key]


# ---------------------------------------------------------------------------------------------------------------
# The attention implementations


@functools.lru_cache(maxsize=None)
def _module_eager(cls: type):
    """The module file's own ``eager_attention_forward``: "eager" is not in ALL_ATTENTION_FUNCTIONS, each family's
    call site falls back to its own (Gemma2's softcap and T5's position bias live there)."""
    return importlib.import_module(cls.__module__).eager_attention_forward


def _original(orig: str, module: nn.Module):
    if orig == "eager":
        return _module_eager(type(module))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[orig]


def _window(w: int | None, skv: int, sq: int, past: int) -> int:
    """The op's window, which places query i at ``P + (skv - sq) + i``, for queries really at ``P + past + i``:
    a static cache's keys span its whole length, a sliding cache's only the window. PEFT hides prefix key j once
    ``j <= P + past + i - w``; ``w + (skv - sq) - past`` gives the op the same rule. Where that is below 1 the
    rule hides every prefix key (past >= w - 1), and so does 1 (the op reads 0 as "no window")."""
    if not w:
        return 0
    return max(w + skv - sq - past, 1)


def _make_attention(orig: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        prefix = kwargs.pop(KWARG, None)
        layer = None if prefix is None else prefix.targets.get(id(module))
        if layer is None:
            return _original(orig, module)(module, query, key, value, attention_mask, **kwargs)
        pk, pv = prefix.layers[layer]
        if pk.dtype != query.dtype:
            pk, pv = pk.to(query.dtype), pv.to(query.dtype)
        skv, sq = key.shape[-2], query.shape[2]
        past = skv - sq if prefix.past is None else prefix.past
        mask = attention_mask
        if mask is not None and mask.shape[-1] != skv:
            mask = mask[..., :skv]  # a static cache's mask covers its whole length, as eager and sdpa crop it
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        scaling = kwargs.get("scaling")
        bias = kwargs.get("position_bias")
        prefix_bias = None
        if bias is not None:
            bias = bias[..., -skv:] if bias.shape[-1] != skv else bias
            prefix_bias = prefix.t5_prefix_bias(sq, past, query.device)
        out, _ = prefix_attention(
            query, key, value, pk, pv, mask, query.shape[-1] ** -0.5 if scaling is None else scaling, bool(causal),
            kwargs.get("softcap") or 0.0, _window(kwargs.get("sliding_window"), skv, sq, past), bias, prefix_bias,
            dropout_p=kwargs.get("dropout", 0.0) if module.training else 0.0, backend=prefix.backend)
        return out, None

    attention.__name__ = attention.__qualname__ = f"fastpeft_prefix_{orig}"
    return attention


def _register(orig: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"fastpeft_prefix_{orig}"
    AttentionInterface.register(name, _make_attention(orig))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])
    return name


# ---------------------------------------------------------------------------------------------------------------
# Building the prefix


def _targets(base: nn.Module, encoder_decoder: bool) -> dict[int, int]:
    """id(self-attention module that PEFT's cache reaches) -> its layer index."""
    out = {}
    for name, m in base.named_modules():
        idx = getattr(m, "layer_idx", None)
        if not isinstance(idx, int) or not type(m).__name__.endswith("Attention"):
            continue
        if getattr(m, "is_cross_attention", False) or name.endswith(("EncDecAttention", "crossattention.self")):
            continue
        if encoder_decoder and not getattr(m, "is_decoder", False):
            continue
        out[id(m)] = idx
    return out


def build_prefix(model, state) -> PrefixKV:
    """The active adapter's prefix at batch 1, by PEFT's own arithmetic (``get_prompt``, peft_model.py:765-800)."""
    cfg = model.active_peft_config
    adapter = model.active_adapter
    enc = model.prompt_encoder[adapter]
    p = cfg.num_virtual_tokens
    if cfg.inference_mode or not (cfg.prefix_projection or observed(enc) or observed(enc.embedding) or
                                  calls_watched()):
        # the embedding of tokens arange(P) is rows 0..P-1 of its table: taken as a view of the leaf, whose graph
        # saves nothing, so reentrant checkpointing can backpropagate through it once per layer
        x = enc.embedding.weight[:p].unsqueeze(0)
    else:
        x = enc(model.prompt_tokens[adapter][:p].unsqueeze(0).to(enc.embedding.weight.device))
    if model.base_model_torch_dtype is not None:
        x = x.to(model.base_model_torch_dtype)
    x = x.view(1, p, cfg.num_layers * 2, cfg.num_attention_heads, cfg.token_dim // cfg.num_attention_heads)
    if cfg.num_transformer_submodules == 2:
        x = torch.cat([x, x], dim=2)
    entries = x.permute(2, 0, 3, 1, 4).split(cfg.num_transformer_submodules * 2)
    layers = [(e[0, 0], e[1, 0]) for e in entries]  # [H_kv, P, D] each: self-attention keys and values
    return PrefixKV(layers, state["targets"], p, state["backend"], state["t5_bias"])


def _prefix(model, state) -> PrefixKV:
    return state["generating"] if state["generating"] is not None else build_prefix(model, state)


def _positions(kind: str | None, p: int, a: dict, pad_id: int | None) -> torch.Tensor | None:
    """Where the base model would put the real tokens behind a P-token cache (see the module docstring); None
    where it computes them itself without reference to the cache."""
    ids, embeds = a.get("input_ids"), a.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if kind is None or ref is None:
        return None
    length, past = ref.shape[1], past_length(a)
    if kind == "roberta":  # from input_ids only: from inputs_embeds RoBERTa ignores the past (arange from pad + 1)
        if ids is None:
            return None
        mask = ids.ne(pad_id).long()
        return (torch.cumsum(mask, dim=1) + p + past) * mask + pad_id  # create_position_ids_from_input_ids
    if kind == "opt":  # OPTLearnedPositionalEmbedding over the P-extended mask, sliced past the cache
        mask = a.get("attention_mask")
        if mask is None:
            mask = torch.ones(ref.shape[0], past + length, dtype=torch.long, device=ref.device)
        mask = mask.long()
        return ((torch.cumsum(mask, dim=1) + p) * mask - 1)[:, past:]
    return torch.arange(past + p, past + p + length, device=ref.device).unsqueeze(0)


# ---------------------------------------------------------------------------------------------------------------
# The PeftModel overrides (fastpeft/task_overrides.py)


def _applicable(model, a: dict) -> bool:
    from peft.utils import PeftType

    cfg = model.active_peft_config
    # output_attentions: PEFT's weights carry the prefix columns; this path returns none
    return cfg.peft_type == PeftType.PREFIX_TUNING and not a.get("output_attentions")


def _check_checkpointing(model) -> None:
    """Reentrant checkpointing backpropagates through the prefix once per layer, in separate backward passes:
    the first frees the projection MLP's saved tensors (PyTorch's "backward through the graph a second time").
    Without projection the prefix is a view of the embedding table and saves nothing, so that case works."""
    cfg = model.active_peft_config
    if not (cfg.prefix_projection and not cfg.inference_mode and torch.is_grad_enabled() and model.training):
        return
    for m in model.get_base_model().modules():
        if getattr(m, "gradient_checkpointing", False) and m.training:
            func = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(func, "keywords", {}).get("use_reentrant", True) is not False:
                raise ValueError("fastpeft prefix tuning: prefix_projection=True cannot train under reentrant "
                                 "gradient checkpointing (each layer's separate backward pass would run through the "
                                 "projection MLP again after the first freed it); enable it with "
                                 "gradient_checkpointing_kwargs={'use_reentrant': False}, transformers' default")
            return


def _forward(self, *args, **kwargs):
    state = self.__dict__["_fastpeft_prefix"]
    a = bind(self, state, args, kwargs)
    if not _applicable(self, a):
        return state["peft"]["forward"](*args, **kwargs)
    a.pop("task_ids", None)
    _check_checkpointing(self)
    prefix = _prefix(self, state)
    self._adjust_prompt_learning_kwargs(self.active_peft_config, kwargs=a)  # position_ids + P, token_type_ids
    if a.get("position_ids") is None and state["task"] != "seq2seq":
        pos = _positions(state["positions"], prefix.length, a, self.get_base_model().config.pad_token_id)
        if pos is not None:
            a["position_ids"] = pos
    prefix.past = past_length(a)
    a[KWARG] = prefix
    return self.base_model(**a)


def _prepare_inputs_for_generation(self, *args, task_ids=None, **kwargs):
    """Installed on the base model by PEFT's ``generate``: no mask concatenation, no cache injection; the positions
    PEFT gives (``+ P``), and the prefix on every step. A literal ``**kwargs``: generate validates model kwargs
    against this signature (generation/utils.py:1926)."""
    state = self.__dict__["_fastpeft_prefix"]
    model_kwargs = self.base_model_prepare_inputs_for_generation(*args, **kwargs)
    if self.active_peft_config.peft_type.value != "PREFIX_TUNING":
        return state["peft"]["prepare_inputs_for_generation"](*args, task_ids=task_ids, **kwargs)
    if state["task"] == "causal":
        self._adjust_prompt_learning_kwargs(self.active_peft_config, kwargs=model_kwargs)
    prefix = model_kwargs[KWARG] = _prefix(self, state)
    prefix.past = past_length(model_kwargs)
    return model_kwargs


def _generate(self, *args, **kwargs):
    state = self.__dict__["_fastpeft_prefix"]
    if self.active_peft_config.peft_type.value == "PREFIX_TUNING":
        with torch.no_grad():
            state["generating"] = build_prefix(self, state)  # once per generate call: parameters cannot change
    try:
        return state["peft"]["generate"](*args, **kwargs)
    finally:
        state["generating"] = None


_GENERATE = {"forward": _forward, "prepare_inputs_for_generation": _prepare_inputs_for_generation, "generate": _generate}
_OVERRIDES = {"causal": _GENERATE, "seq2seq": _GENERATE, "encoder": {"forward": _forward}}


def _why_not(model) -> str | None:
    """Why this prefix-tuning model keeps PEFT's path (None: it is patched)."""
    base = model.get_base_model()
    cfg = base.config
    task = TASKS.get(type(model).__name__)
    if task is None:
        return f"{type(model).__name__}: prefix tuning is patched for {sorted(TASKS)}"
    if cfg.model_type == "bloom":
        return ("BLOOM's attention does not go through transformers' AttentionInterface (ALiBi hard-coded, kwargs "
                "dropped by BloomModel): PEFT's prefix path runs")
    if cfg.model_type not in FAMILIES:
        return f"model type {cfg.model_type!r} is not among the verified families {sorted(FAMILIES)}"
    orig = cfg._attn_implementation
    if orig not in ("eager", "sdpa"):
        return f"attention implementation {orig!r}: the prefix path wraps 'eager' and 'sdpa'"
    if cfg.model_type == "gpt2" and getattr(cfg, "reorder_and_upcast_attn", False) and orig == "eager":
        return "GPT-2 reorder_and_upcast_attn runs only under the name 'eager' (modeling_gpt2.py:206)"
    return None


def patch_prefix(model, backend: int) -> tuple[bool, str]:
    """Patch a prefix-tuning PeftModel in place. Returns (patched, what the report says)."""
    state = model.__dict__.get("_fastpeft_prefix")
    if state is not None:
        state["backend"] = backend
        return True, state["note"]
    reason = _why_not(model)
    if reason is not None:
        return False, reason
    base = model.get_base_model()
    cfg = model.active_peft_config
    enc_dec = bool(getattr(base.config, "is_encoder_decoder", False))
    targets = _targets(base, enc_dec)
    if sorted(targets.values()) != list(range(cfg.num_layers)):
        return False, (f"found attention layers {sorted(targets.values())}, expected one self-attention per layer "
                       f"0..{cfg.num_layers - 1}: PEFT's prefix path runs")
    orig = base.config._attn_implementation
    t5_bias = base.decoder.block[0].layer[0].SelfAttention if base.config.model_type == "t5" else None
    task = TASKS[type(model).__name__]
    state = {"task": task, "orig": orig, "targets": targets, "backend": backend, "t5_bias": t5_bias,
             "positions": FAMILIES[base.config.model_type], "generating": None,
             "note": f"prefix tuning: prefix read straight into attention ({len(targets)} layers, "
                     f"fastpeft_prefix_{orig}); the KV cache holds real tokens only"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.set_attn_implementation(_register(orig))
    install(model, "_fastpeft_prefix", state, _OVERRIDES[task])
    return True, state["note"]


def unpatch_prefix(model) -> None:
    state = uninstall(model, "_fastpeft_prefix")
    if state is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.get_base_model().set_attn_implementation(state["orig"])

"""pytest plugin: run PEFT's own tests with every PEFT model patched by fastpeft.

Load with ``-p compat.plugin``. Modes, from the env var ``FASTPEFT_COMPAT``:

- ``plain`` (or unset): only the hub-model substitution below; PEFT runs as shipped.
- ``patched``: also, right after every ``BaseTuner.inject_adapter`` (the one place PEFT creates LoRA/IA3 layers:
  ``get_peft_model``, ``PeftModel.from_pretrained``/``load_adapter``/``add_adapter``, ``inject_adapter_in_model``,
  ``LoraModel(...)``/``IA3Model(...)`` built directly, ``add_weighted_adapter``, mixed and X-LoRA models),
  ``fastpeft.patch(model, backend="torch")`` runs on the model the adapter was injected into; and after the
  ``__init__`` of each PeftModel task class when the active adapter is prefix tuning, prompt tuning or P-tuning
  (which inject no layers:
  ``get_peft_model`` and ``PeftModel.from_pretrained`` both build the task class). As a check that no
  path escapes, every ``lora.Linear``/``ia3.Linear`` constructed is tracked; one never seen by a patch call is
  counted as ``escaped``.

Hub models (both modes, so plain and patched see identical models): ``from_pretrained`` of transformers model and
Auto classes, and ``AutoConfig.from_pretrained``, for a hub id such as ``hf-internal-testing/tiny-random-OPTForCausalLM``
(the suffix names the class) or one of a few named ids (gpt2, bert-base-uncased, opt-125m), build a small random model
from a config of that architecture, seeded per id (the same id always gives the same weights). Local paths
(save_pretrained round trips) load for real.

Options: ``--compat-stats PATH`` (JSON written at session end: fused-layer counts, tests with fused layers, per-test
counts); ``--compat-methods LoraConfig,IA3Config`` (deselect tests parametrized only by other PEFT configs; tests
not parametrized by a config are kept).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import warnings
import weakref

import pytest

MODE = os.environ.get("FASTPEFT_COMPAT", "plain")
if MODE not in ("plain", "patched"):
    raise ValueError(f"FASTPEFT_COMPAT={MODE!r}: expected 'plain' or 'patched'")


class _Stats:
    def __init__(self):
        self.patch_calls = 0
        self.fused_total = 0  # sum of len(report.fused) over patch calls
        self.fused_distinct = 0  # distinct module objects ever fused
        self.fused_seen = weakref.WeakSet()
        self.created = weakref.WeakSet()  # lora.Linear / ia3.Linear constructed
        self.seen = weakref.WeakSet()  # modules a patch call walked over
        self.escaped_total = 0
        self.substituted: dict[str, int] = {}
        self.per_test: dict[str, dict] = {}
        self.current: dict | None = None


STATS = _Stats()


# ---------------------------------------------------------------------------------------------------- patching
def _patch_model(model):
    import fastpeft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastpeft's "N layers keep PEFT's forward" warning only
        fastpeft.patch(model, backend="torch")
    rep = fastpeft.report(model)
    STATS.patch_calls += 1
    for m in model.modules():
        STATS.seen.add(m)
    n_new = 0
    for name in rep.fused:
        mod = model.get_submodule(name) if name else model
        if mod not in STATS.fused_seen:
            STATS.fused_seen.add(mod)
            n_new += 1
    STATS.fused_total += len(rep.fused)
    STATS.fused_distinct += n_new
    if STATS.current is not None:
        STATS.current["fused"] += len(rep.fused)
        STATS.current["distinct"] += n_new
        STATS.current["calls"] += 1


def _install_patching():
    from peft.tuners import ia3, lora
    from peft.tuners.tuners_utils import BaseTuner

    orig_inject = BaseTuner.inject_adapter

    @functools.wraps(orig_inject)
    def inject_adapter(self, model, *args, **kwargs):
        out = orig_inject(self, model, *args, **kwargs)
        _patch_model(model)
        return out

    BaseTuner.inject_adapter = inject_adapter

    # prompt learning creates no adapter layers: patch the PeftModel once its task class is built
    from peft import peft_model

    for name in ("PeftModelForCausalLM", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
                 "PeftModelForTokenClassification", "PeftModelForQuestionAnswering", "PeftModelForFeatureExtraction"):
        task_cls = getattr(peft_model, name)

        def make_task(orig_init, task_cls):
            @functools.wraps(orig_init)
            def __init__(self, *args, **kwargs):
                orig_init(self, *args, **kwargs)
                if type(self) is task_cls and self.active_peft_config.peft_type.value in (
                        "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING"):
                    _patch_model(self)

            return __init__

        task_cls.__init__ = make_task(task_cls.__init__, task_cls)

    for cls in (lora.Linear, ia3.Linear):
        orig_init = cls.__init__

        def make(orig_init):
            @functools.wraps(orig_init)
            def __init__(self, *args, **kwargs):
                orig_init(self, *args, **kwargs)
                STATS.created.add(self)

            return __init__

        cls.__init__ = make(orig_init)


# ------------------------------------------------------------------------------------------- hub substitution
_NAMED = {  # hub ids without the class in their name -> architecture
    "gpt2": "GPT2LMHeadModel",
    "openai-community/gpt2": "GPT2LMHeadModel",
    "bert-base-uncased": "BertModel",
    "google-bert/bert-base-uncased": "BertModel",
    "peft-internal-testing/opt-125m": "OPTForCausalLM",
    "facebook/opt-125m": "OPTForCausalLM",
}
_SMALL = {  # applied where the config has the attribute
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "word_embed_proj_dim": 32, "embed_dim": 32,
    "intermediate_size": 64, "ffn_dim": 64, "d_ff": 64, "n_inner": 64, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "num_decoder_layers": 2,
    "encoder_layers": 2, "decoder_layers": 2, "num_attention_heads": 4, "n_head": 4, "num_heads": 4,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "num_key_value_heads": 2, "d_kv": 8,
    "head_dim": 8, "rotary_dim": 4, "vocab_size": 1024,
}


def _arch_for(model_id) -> str | None:
    if not isinstance(model_id, str) or os.path.exists(model_id):
        return None
    if model_id in _NAMED:
        return _NAMED[model_id]
    # tiny-random-OPTForCausalLM, tiny-random-gpt2, tiny-dummy-qwen2, tiny-LlamaForSequenceClassification-3.2
    m = re.search(r"/tiny-(?:random-|dummy-)?([A-Za-z][A-Za-z0-9]*)", model_id)
    if not m:
        return None
    arch = m.group(1)
    return {"qwen2": "Qwen2ForCausalLM"}.get(arch, arch)


def _small_config(arch: str, kwargs: dict):
    import transformers

    cls = getattr(transformers, arch, None)
    cfg_cls = getattr(cls, "config_class", None) or getattr(transformers, arch.replace("Model", "") + "Config", None)
    if cfg_cls is None:
        # e.g. "tiny-random-gpt2": a model type
        cfg_cls = type(transformers.AutoConfig.for_model(arch.lower()))
    keys = cfg_cls().to_dict()
    cfg_kwargs = {k: v for k, v in _SMALL.items() if k in keys}
    if "pad_token_id" in keys and keys.get("pad_token_id") is not None and keys["pad_token_id"] >= 1024:
        cfg_kwargs["pad_token_id"] = 1
    for k in ("bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id"):
        if isinstance(keys.get(k), int) and keys[k] >= 1024:
            cfg_kwargs[k] = 2
    if keys.get("is_encoder_decoder") and keys.get("decoder_start_token_id") is None:
        cfg_kwargs["decoder_start_token_id"] = keys.get("pad_token_id") or 0  # T5's hub configs set it
    for k in ("num_labels", "problem_type"):
        if k in kwargs:
            cfg_kwargs[k] = kwargs[k]
    return cls, cfg_cls(**cfg_kwargs)


def _build(model_id: str, arch: str, cls, kwargs: dict):
    """A small random model of the id's architecture, as ``cls.from_pretrained(model_id, **kwargs)`` would give."""
    import torch
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    arch_cls, config = _small_config(arch, kwargs)
    STATS.substituted[model_id] = STATS.substituted.get(model_id, 0) + 1
    with torch.device("meta"):  # size check first: a multimodal config (sub-configs at full size) would OOM
        probe = cls.from_config(config) if issubclass(cls, _BaseAutoModelClass) else cls(config)
    n = sum(p.numel() for p in probe.parameters())
    if n > 5_000_000:
        raise RuntimeError(f"compat.plugin: no small substitute for {model_id!r} ({n / 1e6:.0f}M parameters)")
    seed = sum(map(ord, model_id)) % (2**31)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if issubclass(cls, _BaseAutoModelClass):
            model = cls.from_config(config)
        else:
            model = cls(config)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        model = model.to(dtype)
    model.name_or_path = model_id
    model.config._name_or_path = model_id
    return model.eval()


def _install_hub_substitution():
    import transformers
    from transformers.modeling_utils import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def wrap_model(orig):
        fn = orig.__func__

        @functools.wraps(fn)
        def from_pretrained(cls, model_id=None, *args, **kwargs):
            arch = _arch_for(model_id)
            if arch is None or args:
                return fn(cls, model_id, *args, **kwargs)
            return _build(model_id, arch, cls, kwargs)

        return classmethod(from_pretrained)

    PreTrainedModel.from_pretrained = wrap_model(PreTrainedModel.from_pretrained)
    _BaseAutoModelClass.from_pretrained = wrap_model(_BaseAutoModelClass.from_pretrained)
    for name in dir(transformers):  # Auto classes that define their own from_pretrained
        if name.startswith("AutoModel"):
            c = getattr(transformers, name, None)
            if isinstance(c, type) and "from_pretrained" in vars(c):
                c.from_pretrained = wrap_model(vars(c)["from_pretrained"])

    orig_cfg = transformers.AutoConfig.from_pretrained.__func__

    @functools.wraps(orig_cfg)
    def config_from_pretrained(cls, model_id=None, *args, **kwargs):
        arch = _arch_for(model_id)
        if arch is None or args:
            return orig_cfg(cls, model_id, *args, **kwargs)
        return _small_config(arch, kwargs)[1]

    transformers.AutoConfig.from_pretrained = classmethod(config_from_pretrained)


# ------------------------------------------------------------------------------------------------ pytest hooks
def pytest_addoption(parser):
    g = parser.getgroup("fastpeft-compat")
    g.addoption("--compat-stats", default=None, help="write fused-layer counts (JSON) here at session end")
    g.addoption("--compat-methods", default=None,
                help="comma list of PEFT config classes to keep (e.g. LoraConfig,IA3Config); tests parametrized "
                     "only by other configs are deselected")


def pytest_configure(config):
    _install_hub_substitution()
    if MODE == "patched":
        _install_patching()


_CONFIG_IN_ID = re.compile(r"([A-Za-z0-9]+Config)-config_kwargs")


def pytest_collection_modifyitems(config, items):
    keep_opt = config.getoption("--compat-methods")
    if not keep_opt:
        return
    keep = set(keep_opt.split(","))
    selected, deselected = [], []
    for item in items:
        names = set(_CONFIG_IN_ID.findall(item.nodeid))
        (selected if not names or names & keep else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    STATS.current = {"fused": 0, "distinct": 0, "calls": 0}
    yield
    rec = STATS.current
    STATS.current = None
    if MODE == "patched":
        escaped = [m for m in STATS.created if m not in STATS.seen]
        rec["escaped"] = len(escaped)
        STATS.escaped_total += len(escaped)
        for m in escaped:
            STATS.seen.add(m)  # count each once
    STATS.per_test[item.nodeid] = rec


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--compat-stats") or os.environ.get("FASTPEFT_COMPAT_STATS")
    if not path:
        return
    per = STATS.per_test
    out = {
        "mode": MODE,
        "fastpeft_file": getattr(sys.modules.get("fastpeft"), "__file__", None),
        "tests": len(per),
        "tests_with_fused": sum(1 for r in per.values() if r["fused"]),
        "patch_calls": STATS.patch_calls,
        "fused_total": STATS.fused_total,
        "fused_distinct": STATS.fused_distinct,
        "escaped_total": STATS.escaped_total,
        "substituted_hub_models": STATS.substituted,
        "per_test": per,
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=0)

"""Prefix tuning, patched vs PEFT eager, on tiny models of every family the prefix path covers.

Logits, loss and the gradient of every prefix parameter (with and without ``prefix_projection``), on eager and sdpa
bases; greedy generate with padded batches (tokens and scores); sliding windows; gradient checkpointing equal to
none (PEFT refuses it); a KV cache of real tokens only; ``disable_adapter``, ``unpatch``, save/load, the report.
"""

from __future__ import annotations


import pytest
import torch

import fastpeft
from fastpeft.testing import OpCounter, assert_close

from prefix_models import (DECODERS, FAMILIES, assert_same_generate, generate_inputs, grads, inputs, patched_pair,
                           prefix_model)

PATCHED = [f for f in FAMILIES if f != "bloom"]
ATTN = {f: ("eager",) if f == "gemma2" else ("eager", "sdpa") for f in PATCHED}  # Gemma2 has no sdpa
CASES = [pytest.param(f, a, id=f"{f}-{a}") for f in PATCHED for a in ATTN[f]]


def _pair(family, **kw):
    return patched_pair(prefix_model, family, **kw)


def _check_train(ref, pat, x):
    ref.train(), pat.train()
    out_r, out_p = ref(**x), pat(**x)
    out_r.loss.backward()
    out_p.loss.backward()
    logits = "logits" if hasattr(out_r, "logits") else "start_logits"
    assert_close(getattr(out_p, logits), getattr(out_r, logits), name=logits)
    assert_close(out_p.loss, out_r.loss, name="loss")
    g_r, g_p = grads(ref), grads(pat)
    assert g_r.keys() == g_p.keys() and any("prompt_encoder" in n for n in g_r)
    for name in g_r:
        assert_close(g_p[name], g_r[name], name=name)


@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "projection"])
@pytest.mark.parametrize("family,attn", CASES)
def test_train_parity(family, attn, projection):
    ref, pat = _pair(family, attn=attn, projection=projection)
    with OpCounter() as oc:
        pat(**inputs(family))
    assert oc.names.count("fastpeft.prefix_attention") == 2, "one prefix attention per layer"
    _check_train(ref, pat, inputs(family))


@pytest.mark.parametrize("family,attn", [c for c in CASES if c.values[0] not in ("bert", "roberta")])
def test_generate_parity(family, attn):
    """Greedy generate with a padded batch: the same tokens and scores. The cache holds the real tokens only."""
    ref, pat = _pair(family, attn=attn, p=6)
    out_r, out_p = assert_same_generate(ref, pat, family)
    cache_r, cache_p = out_r.past_key_values, out_p.past_key_values
    if family == "t5":
        cache_r, cache_p = cache_r.self_attention_cache, cache_p.self_attention_cache
    assert cache_r.get_seq_length() == cache_p.get_seq_length() + 6  # PEFT's cache: P prefix columns per row
    k = cache_p.layers[0].keys
    assert k.shape[-2] == cache_p.get_seq_length()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "phi3"])
def test_sliding_window(family):
    """Window 4 < prompt length: the window hides prefix keys exactly as PEFT's mask does."""
    ref, pat = _pair(family, window=4)
    _check_train(ref, pat, inputs(family))
    ref.eval(), pat.eval()
    x = generate_inputs(family)
    out_r = ref.generate(**x, max_new_tokens=6, do_sample=False)
    assert torch.equal(pat.generate(**x, max_new_tokens=6, do_sample=False), out_r)


@pytest.mark.parametrize("task", ["TOKEN_CLS", "QUESTION_ANS"])
def test_encoder_tasks(task):
    ref, pat = _pair("bert", task=task, projection=True)
    _check_train(ref, pat, inputs("bert", task=task))


def test_feature_extraction():
    ref, pat = _pair("roberta", task="FEATURE_EXTRACTION")
    x = inputs("roberta", labels=False, task="FEATURE_EXTRACTION")
    h_r, h_p = ref(**x).last_hidden_state, pat(**x).last_hidden_state
    assert_close(h_p, h_r, name="last_hidden_state")
    h_r.square().mean().backward()
    h_p.square().mean().backward()
    for name, g in grads(ref).items():
        assert_close(grads(pat)[name], g, name=name)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bert"])
def test_gradient_checkpointing(family):
    """Non-reentrant checkpointing (transformers' default) gives the gradients of no checkpointing; PEFT refuses
    it at setup and crashes if it is enabled afterwards (its cache is dropped by the checkpointed layer)."""
    peft, pat = _pair(family, projection=True)
    _, plain = _pair(family, projection=True)
    for model in (peft, pat):
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft.train()
    with pytest.raises(RuntimeError):  # checkpointing is on: PEFT's own path breaks under it
        peft(**inputs(family)).loss.backward()
    _check_train(plain, pat, inputs(family))


def test_position_ids_given():
    """Explicit position_ids are moved by P, as PEFT does."""
    ref, pat = _pair("llama")
    x = inputs("llama", labels=False)
    x["position_ids"] = torch.arange(7).repeat(3, 1) * 2
    assert_close(pat(**x).logits, ref(**x).logits)


def test_disable_adapter_and_unpatch():
    ref, pat = _pair("llama")
    x = inputs("llama", labels=False)
    base_logits = ref.get_base_model()(**x).logits
    with pat.disable_adapter():
        with OpCounter() as oc:
            logits = pat(**x).logits
    assert torch.equal(logits, base_logits) and "fastpeft.prefix_attention" not in oc.names
    assert_close(pat(**x).logits, ref(**x).logits)
    fastpeft.unpatch(pat)
    assert pat.get_base_model().config._attn_implementation == "eager"
    assert "forward" not in pat.__dict__ and "_fastpeft_prefix" not in pat.__dict__
    with OpCounter() as oc:
        assert torch.equal(pat(**x).logits, ref(**x).logits)
    assert "fastpeft.prefix_attention" not in oc.names


def test_save_and_load(tmp_path):
    """A patched model saves PEFT's checkpoint; a loaded (inference-mode) model patches and generates the same."""
    from peft import PeftModel

    from prefix_models import base_model

    ref, pat = _pair("gpt2", projection=True)
    pat.save_pretrained(tmp_path / "pat")
    ref.save_pretrained(tmp_path / "ref")
    a = torch.load(tmp_path / "pat" / "adapter_model.bin") if (tmp_path / "pat" / "adapter_model.bin").exists() \
        else __import__("safetensors.torch").torch.load_file(str(tmp_path / "pat" / "adapter_model.safetensors"))
    b = __import__("safetensors.torch").torch.load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded_r = PeftModel.from_pretrained(base_model("gpt2"), tmp_path / "ref").eval()
    loaded_p = fastpeft.patch(PeftModel.from_pretrained(base_model("gpt2"), tmp_path / "ref").eval())
    assert loaded_p.active_peft_config.inference_mode
    x = generate_inputs("gpt2")
    assert_close(loaded_p(**x).logits, loaded_r(**x).logits)
    assert torch.equal(loaded_p.generate(**x, max_new_tokens=5, do_sample=False),
                       loaded_r.generate(**x, max_new_tokens=5, do_sample=False))


def test_report_and_bloom():
    _, pat = _pair("llama")
    rep = fastpeft.report(pat)
    assert rep.fused == {"prompt_encoder.default": "prefix_tuning.PrefixEncoder"} and not rep.fallback
    assert any("fastpeft_prefix_eager" in n for n in rep.notes)
    bloom = prefix_model("bloom")
    with pytest.warns(UserWarning, match="keep PEFT's forward"):
        fastpeft.patch(bloom)
    assert "AttentionInterface" in fastpeft.report(bloom).fallback["prompt_encoder.default"]
    ref = prefix_model("bloom")
    x = inputs("bloom")
    assert torch.equal(bloom(**x).logits, ref(**x).logits)


def test_decoders_listed():
    assert set(DECODERS) - {"bloom"} <= set(fastpeft.prefix.FAMILIES)


@pytest.mark.parametrize("family,kw", [("llama", {}), ("mistral", {"window": 4}), ("t5", {}), ("gpt2", {})],
                         ids=["llama", "mistral-window", "t5", "gpt2"])
def test_static_cache_generate(family, kw):
    """A static cache holds real tokens only, so it works (PEFT's prefix generate raises on it: KeyError
    'cache_position'); the result equals PEFT's dynamic-cache generate."""
    ref, pat = _pair(family, **kw)
    x = generate_inputs(family)
    out = pat.generate(**x, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(out, ref.generate(**x, max_new_tokens=6, do_sample=False))


def test_compiled_generate():
    """A compiled forward (fullgraph: no graph break) over a static cache generates PEFT's tokens."""
    ref, pat = _pair("llama")
    x = generate_inputs("llama")
    base = pat.get_base_model()
    torch._dynamo.reset()
    base.forward = torch.compile(base.forward, fullgraph=True, dynamic=False)
    try:
        out = pat.generate(**x, max_new_tokens=4, do_sample=False, cache_implementation="static")
    finally:
        del base.forward
        torch._dynamo.reset()
    assert torch.equal(out, ref.generate(**x, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_bf16(family):
    """A bf16 model: patched logits within the error ratio of PEFT's own bf16 logits against the fp32 model."""
    from fastpeft.testing import assert_close_ratio

    oracle, ref, pat = (prefix_model(family) for _ in range(3))
    ref.to(torch.bfloat16), pat.to(torch.bfloat16)
    fastpeft.patch(pat)
    x = inputs(family, labels=False)
    with torch.no_grad():
        assert_close_ratio(pat(**x).logits, ref(**x).logits, oracle(**x).logits, torch.bfloat16, name="logits")


def test_second_adapter():
    """Two prefix adapters: set_adapter switches what the patched model reads, as in PEFT."""
    from peft import PrefixTuningConfig

    models = _pair("llama")
    for model in models:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            model.add_adapter("other", PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
            for param in model.prompt_encoder["other"].parameters():
                torch.nn.init.normal_(param, std=0.5)
    ref, pat = models
    x = inputs("llama", labels=False)
    first = pat(**x).logits
    for model in models:
        model.set_adapter("other")
    assert_close(pat(**x).logits, ref(**x).logits)
    assert not torch.allclose(pat(**x).logits, first)
    gx = {k: x[k] for k in ("input_ids", "attention_mask")}
    assert torch.equal(pat.generate(**gx, max_new_tokens=4, do_sample=False),
                       ref.generate(**gx, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_reentrant_checkpointing(family):
    """Reentrant checkpointing: without projection (the prefix is a view of the embedding table) the gradients
    are those of no checkpointing; with projection a clear error names the fix."""
    _, plain = _pair(family)
    _, pat = _pair(family)
    pat.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    _check_train(plain, pat, inputs(family))
    _, proj = _pair(family, projection=True)
    proj.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant': False"):
        proj.train()(**inputs(family))


def test_t5_layer_layout():
    """With 4 layers PEFT's view/cat/split gives decoder layers 0 and 2 entries (0, 1), layers 1 and 3 entries
    (4, 5) (not 2i, 2i+1): replayed, the gradients land on the same rows of the table."""
    ref, pat = _pair("t5", layers=4)
    _check_train(ref, pat, inputs("t5"))
    grad = grads(pat)["prompt_encoder.default.embedding.weight"].view(5, 8, 4, 8)  # [P, 2 * 4 layers, H, D]
    used = [i for i in range(8) if grad[:, i].abs().sum() > 0]
    assert used == [0, 1, 4, 5]


def test_qa_token_type_ids_dropped_as_peft():
    """PEFT's QA forward names token_type_ids and never passes them on: the patched model drops them too."""
    ref, pat = _pair("bert", task="QUESTION_ANS")
    x = inputs("bert", task="QUESTION_ANS")
    x["token_type_ids"] = (torch.arange(7) >= 3).long().repeat(3, 1)
    _check_train(ref, pat, x)

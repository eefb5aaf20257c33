"""PEFT behaviours a patched model must keep: identity of parameters and checkpoints, merge, disable, adapter
switching, the LoRA options, fallbacks and the report, autocast, idempotence, errors, torch.compile, op counts."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.testing import OpCounter, assert_close, assert_close_ratio, stack_normalized
from models import base_model, lora_config, lora_model, model_inputs

F32, BF16 = torch.float32, torch.bfloat16


def fused_copy(model, backend="torch"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastpeft.patch(copy.deepcopy(model), backend=backend)


def logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def run(model, inputs, params_of=None):
    """(logits, {name: grad}) of one forward/backward; grads read from ``params_of`` (default: ``model``)."""
    params_of = model if params_of is None else params_of
    params_of.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in params_of.named_parameters() if p.requires_grad}


def assert_same_run(actual, expected):
    (la, ga), (le, ge) = actual, expected
    assert_close(la, le, name="logits")
    assert ga.keys() == ge.keys() and ga
    for name in ga:
        assert_close(ga[name], ge[name], name=name)


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@pytest.fixture
def llama():
    return lora_model("llama")


@pytest.fixture
def inputs():
    return model_inputs("llama")


def test_same_parameters_and_state_dict(llama):
    before = {n: id(p) for n, p in llama.named_parameters()}
    grads_before = {n: p.requires_grad for n, p in llama.named_parameters()}
    sd_before = {k: v.clone() for k, v in llama.state_dict().items()}
    fastpeft.patch(llama, backend="torch")
    assert {n: id(p) for n, p in llama.named_parameters()} == before
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == grads_before
    sd = llama.state_dict()
    assert list(sd) == list(sd_before)
    assert all(torch.equal(sd[k], sd_before[k]) for k in sd)
    from peft.tuners.lora import Linear

    assert all(isinstance(m, Linear) and type(m) is not Linear for m in lora_layers(llama))


def test_save_pretrained_loads_in_plain_peft(llama, inputs, tmp_path):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    fm = fused_copy(llama)
    fm.save_pretrained(tmp_path / "fused")
    llama.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert saved.keys() == get_peft_model_state_dict(llama).keys()
    reloaded = PeftModel.from_pretrained(base_model("llama"), tmp_path / "fused").eval()
    assert_close(logits(reloaded, inputs), logits(fm, inputs), name="reloaded logits")


def test_optimizer_step(llama, inputs):
    fm = fused_copy(llama)
    for m in (llama, fm):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            m(**inputs).loss.backward()
            opt.step()
    params = dict(llama.named_parameters())
    for n, p in fm.named_parameters():
        assert_close(p.detach(), params[n].detach(), name=n)
    assert_close(logits(fm, inputs), logits(llama, inputs), name="logits after 2 steps")


def test_merge_and_unload(llama, inputs):
    fm = fused_copy(llama)
    expected = logits(fm, inputs)
    merged = fm.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM" and not lora_layers(merged)
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    assert_close(logits(merged, inputs), expected, name="merged logits")


def test_disable_adapter_equals_base(llama, inputs):
    fm = fused_copy(llama)
    with fm.disable_adapter():
        disabled = logits(fm, inputs)
    assert_close(disabled, logits(base_model("llama"), inputs), name="disabled")
    assert (logits(fm, inputs) - disabled).abs().max() > 1e-2


@pytest.fixture
def two_adapters():
    """A PEFT Llama with adapters "default" and "other" (different weights), and its patched copy."""
    pm = lora_model("llama")
    torch.manual_seed(5)
    pm.add_adapter("other", lora_config("llama", r=8, lora_alpha=4))
    return pm, fused_copy(pm)


def test_set_adapter_switch(two_adapters, inputs):
    pm, fm = two_adapters
    results = []
    for name in ("other", "default", "other"):
        for m in (pm, fm):
            m.set_adapter(name)
        assert_same_run(run(fm.train(), inputs), run(pm.train(), inputs))
        results.append(logits(fm, inputs))
    assert (results[0] - results[1]).abs().max() > 1e-2


def test_two_active_adapters(two_adapters, inputs):
    pm, fm = two_adapters
    for m in (pm, fm):
        m.base_model.set_adapter(["default", "other"])
    assert lora_layers(fm)[0].active_adapters == ["default", "other"]
    assert_same_run(run(fm.train(), inputs), run(pm.train(), inputs))
    pm.set_adapter("default")
    assert (logits(pm, inputs) - logits(fm, inputs)).abs().max() > 1e-2  # the second adapter counts


def test_adapter_added_after_patch(inputs):
    pm = lora_model("llama")
    fm = fused_copy(pm)
    for m in (pm, fm):
        torch.manual_seed(5)
        m.add_adapter("other", lora_config("llama", r=2))
        m.set_adapter("other")
    assert_same_run(run(fm.train(), inputs), run(pm.train(), inputs))


@pytest.mark.parametrize("lora_kwargs", [
    pytest.param(dict(use_rslora=True, r=16, lora_alpha=4), id="rslora"),
    pytest.param(dict(lora_bias=True), id="lora_bias"),
    pytest.param(dict(target_modules=["q_proj", "v_proj"], r=1), id="qv-r1"),
])
def test_lora_options(lora_kwargs, inputs):
    pm = lora_model("llama", **lora_kwargs).train()
    fm = fused_copy(pm)
    assert not fastpeft.report(fm).fallback
    assert_same_run(run(fm, inputs), run(pm, inputs))


def test_live_scale_changes(llama, inputs):
    fm = fused_copy(llama)
    seen = [logits(fm, inputs)]
    for change in (lambda m: m.set_scale("default", 0.3), lambda m: m.scale_layer(2.5),
                   lambda m: m.unscale_layer(None)):
        for m in (llama, fm):
            for layer in lora_layers(m):
                change(layer)
        seen.append(logits(fm, inputs))
        assert_close(seen[-1], logits(llama, inputs), name="after scale change")
    assert (seen[1] - seen[0]).abs().max() > 1e-3
    assert_close(seen[-1], seen[0], name="unscaled back")


def test_merged_state(llama, inputs):
    fm = fused_copy(llama)
    expected = logits(llama, inputs)
    fm.merge_adapter()
    assert all(m.merged for m in lora_layers(fm))
    assert_close(logits(fm, inputs), expected, name="merged")
    fm.unmerge_adapter()
    assert_close(logits(fm, inputs), expected, name="unmerged")


def test_dora_falls_back_and_matches(inputs):
    pm = lora_model("llama", use_dora=True, target_modules=["q_proj", "v_proj"]).train()
    with pytest.warns(UserWarning, match="fastpeft") as record:
        fm = fastpeft.patch(copy.deepcopy(pm), backend="torch")
    assert len([w for w in record if "fastpeft" in str(w.message)]) == 1
    rep = fastpeft.report(fm)
    assert not rep.fused and len(rep.fallback) == 4
    assert all("DoRA" in why and "default" in why for why in rep.fallback.values())
    assert "DoRA" in str(rep) and "model.layers.0.self_attn.q_proj" in str(rep)
    assert_same_run(run(fm, inputs), run(pm, inputs))


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_dora_adapter_added_after_patch(autocast):
    """A variant adapter added after ``patch`` is caught at call time and runs PEFT's forward."""
    pm = lora_model("llama")
    fm = fused_copy(pm)
    for m in (pm, fm):
        torch.manual_seed(3)
        m.add_adapter("dora", lora_config("llama", use_dora=True))
        m.set_adapter("dora")
    inputs = model_inputs("llama", labels=False)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        assert_close(logits(fm, inputs), logits(pm, inputs), name="logits")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_active_adapter_not_on_every_layer(autocast):
    """The active adapter targets q/v only: the other fused layers have no active adapter and compute the base.

    Fails today under autocast: ``_fused`` ends with ``return self.base_layer(x)`` for such layers, but x has
    already been cast to bf16 and autocast switched off, so nn.Linear gets a bf16 x and an fp32 weight
    (RuntimeError: expected m1 and m2 to have the same dtype). See the report."""
    pm = lora_model("llama")
    fm = fused_copy(pm)
    for m in (pm, fm):
        torch.manual_seed(3)
        m.add_adapter("qv", lora_config("llama", target_modules=["q_proj", "v_proj"]))
        m.set_adapter("qv")
    inputs = model_inputs("llama", labels=False)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        expected = logits(pm, inputs)
        actual = logits(fm, inputs)
    if autocast:
        oracle = logits(pm, inputs)
        assert_close_ratio(actual.float(), expected.float(), oracle, BF16, name="logits")
    else:
        assert_close(actual, expected, name="logits")


def test_embedding_lora_falls_back(inputs):
    pm = lora_model("llama", target_modules=["embed_tokens", "q_proj"]).train()
    with pytest.warns(UserWarning, match="1 adapter layer"):
        fm = fastpeft.patch(copy.deepcopy(pm), backend="torch")
    rep = fastpeft.report(fm)
    assert len(rep.fused) == 2
    (name, why), = rep.fallback.items()
    assert name.endswith("embed_tokens") and "Embedding" in why
    assert_same_run(run(fm, inputs), run(pm, inputs))


def test_mixed_batch_adapter_names(two_adapters):
    pm, fm = two_adapters
    inputs = model_inputs("llama", batch=3, labels=False)
    names = ["other", "__base__", "default"]
    expected = logits(pm, inputs, adapter_names=names)
    assert_close(logits(fm, inputs, adapter_names=names), expected, name="mixed batch")
    pm.set_adapter("other")
    assert_close(expected[0], logits(pm, inputs)[0], name="row 0 is adapter 'other'")


def test_autocast_bf16(llama, inputs):
    """Under CPU autocast to bf16: patched vs PEFT, judged against the fp32 run by error ratio (gradients
    together, see ``stack_normalized``)."""
    fm = fused_copy(llama)
    for m in (llama, fm):
        m.train()
    oracle_logits, oracle_grads = run(llama, inputs)
    with torch.autocast("cpu", dtype=BF16):
        fused_logits, fused_grads = run(fm, inputs)
        peft_logits, peft_grads = run(llama, inputs)
    assert fused_logits.dtype == peft_logits.dtype
    assert_close_ratio(fused_logits.float(), peft_logits.float(), oracle_logits, BF16, name="logits")
    assert all(fused_grads[name].dtype == peft_grads[name].dtype == F32 for name in oracle_grads)
    assert_close_ratio(stack_normalized(fused_grads, oracle_grads), stack_normalized(peft_grads, oracle_grads),
                       stack_normalized(oracle_grads, oracle_grads), BF16, name="adapter gradients")


def test_patch_twice_and_unpatch(llama, inputs):
    from peft.tuners.lora import Linear

    expected = logits(llama, inputs)
    fastpeft.patch(llama, backend="torch")
    classes = [type(m) for m in lora_layers(llama)]
    rep1 = str(fastpeft.report(llama))
    fastpeft.patch(llama, backend="auto")
    assert [type(m) for m in lora_layers(llama)] == classes
    assert {m._fastpeft_backend for m in lora_layers(llama)} == {0}
    assert str(fastpeft.report(llama)) == rep1.replace("backend=torch", "backend=auto")
    assert_close(logits(llama, inputs), expected, name="patched twice")
    fastpeft.unpatch(llama)
    assert all(type(m) is Linear and not hasattr(m, "_fastpeft_backend") for m in lora_layers(llama))
    assert fastpeft.report(llama) is None
    assert torch.equal(logits(llama, inputs), expected)


def test_report_string(llama):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back, so no warning at all
        fastpeft.patch(llama, backend="torch")
    text = str(fastpeft.report(llama))
    assert text.splitlines()[0] == "fastpeft patch report (backend=torch): 14 fused, 0 on PEFT's forward"
    assert "  fused lora.Linear: 14" in text.splitlines()
    assert "adapter_names= mixed batches" in text
    assert set(fastpeft.report(llama).fused.values()) == {"lora.Linear"}


def test_bad_backend_name(llama):
    with pytest.raises(ValueError, match=r"backend='cuda'; expected one of \['auto', 'torch', 'triton'\]"):
        fastpeft.patch(llama, backend="cuda")
    assert fastpeft.report(llama) is None


_NO_INTERPRETER = textwrap.dedent("""
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model
    import fastpeft
    from fastpeft.ops.linear import TRITON, lora_linear

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
        def forward(self, x):
            return self.lin(x)

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["lin"]))
    try:
        fastpeft.patch(model, backend="triton")
    except RuntimeError as e:
        print("PATCH:", e)
    try:
        lora_linear(torch.randn(2, 8), torch.randn(8, 8), None, torch.randn(2, 8), torch.randn(8, 2), backend=TRITON)
    except RuntimeError as e:
        print("OP:", e)
""")


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _NO_INTERPRETER], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    patch_line = next(line for line in lines if line.startswith("PATCH:"))
    op_line = next(line for line in lines if line.startswith("OP:"))
    assert "TRITON_INTERPRET=1" in patch_line and "backend='auto'" in patch_line
    assert "TRITON_INTERPRET=1" in op_line and "backend='auto'" in op_line


def test_dynamo_no_graph_breaks(llama):
    fm = fused_copy(llama)
    inputs = model_inputs("llama", labels=False)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(fm)(**inputs)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1
    torch._dynamo.reset()


def test_compile_aot_eager_same_results(llama, inputs):
    fm = fused_copy(llama).train()
    torch._dynamo.reset()
    compiled = torch.compile(fm, backend="aot_eager", fullgraph=True)
    try:
        assert_same_run(run(compiled, inputs, params_of=fm), run(llama.train(), inputs))
    finally:
        torch._dynamo.reset()


def decode_step_ops(model, inputs):
    """Non-view ops of one no-grad decode step (one token against the prefilled KV cache)."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        with OpCounter() as log:
            model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return log.names


def test_decode_step_op_count(llama):
    inputs = model_inputs("llama", labels=False)
    fm = fused_copy(llama)
    base, peft, fused = (decode_step_ops(m, inputs) for m in (base_model("llama"), llama, fm))
    assert fused.count("fastpeft.lora_linear") == len(fastpeft.report(fm).fused) == 14
    assert len(fused) == len(base)
    assert len(peft) > len(base)


def test_patched_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """torch.save of a whole patched model: the fused classes are importable by name, so a fresh process loads
    it without having patched anything, and it still runs fused with the same logits."""
    model = fastpeft.patch(lora_model("llama"))
    inputs = model_inputs("llama", labels=False)
    with torch.no_grad():
        ref = model(**inputs).logits
    torch.save({"model": model, "inputs": inputs, "ref": ref}, tmp_path / "m.pt")
    code = textwrap.dedent(f"""
        import torch
        d = torch.load({str(tmp_path / "m.pt")!r}, weights_only=False)
        m = d["model"]
        kinds = {{type(mod).__qualname__ for mod in m.modules()}}
        assert any(k.startswith("Fused_") for k in kinds), kinds
        with torch.no_grad():
            assert torch.equal(m(**d["inputs"]).logits, d["ref"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]

"""Never silently different from PEFT (issue 9): offload, hooks, torch.func, in-place ops after a layer, names,
bad input, pre-Ampere GPUs, saved bytes. Each test here failed on the main of 2026-12-02 (f5d39cd)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastpeft
from fastpeft.testing import OpCounter, assert_close
from models import base_model, lora_model, model_inputs

F32 = torch.float32


def patched(model, backend="torch"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastpeft.patch(model, backend=backend)


def fused_ops(fn) -> int:
    """How many fused ops a call ran (0: every adapter layer took PEFT's forward)."""
    with OpCounter() as c:
        fn()
    return c.ops["fastpeft.lora_linear.default"] + c.ops["fastpeft.ia3_linear.default"]


def ia3_llama(**kw):
    from peft import IA3Config, get_peft_model

    cfg = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
               init_ia3_weights=False)
    cfg.update(kw)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        return get_peft_model(base_model("llama"), IA3Config(**cfg)).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def grads(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(got, ref):
    assert got.keys() == ref.keys() and ref
    for n in ref:
        assert_close(got[n], ref[n], name=n)


# ---------------------------------------------------------------------------------------------------------------
# 1. accelerate offload


@pytest.mark.parametrize("when", ["before-patch", "after-patch"])
def test_accelerate_cpu_offload_matches_peft(when):
    """cpu_offload keeps the weights on `meta` between calls and wraps each layer's forward: a fused read of the
    weights would compute garbage. Every wrapped layer must run PEFT's forward (the hook loads the weights)."""
    from accelerate import cpu_offload

    model = lora_model("llama")
    inputs = model_inputs("llama", labels=False)
    ref = logits(model, inputs)
    if when == "before-patch":
        cpu_offload(model.base_model.model, execution_device="cpu")
        patched(model)
        rep = fastpeft.report(model)
        assert not rep.fused and all("accelerate" in why for why in rep.fallback.values()), str(rep)
    else:
        patched(model)
        cpu_offload(model.base_model.model, execution_device="cpu")
    assert fused_ops(lambda: logits(model, inputs)) == 0
    assert_close(logits(model, inputs), ref, name="logits under offload")


def test_accelerate_offload_bias_free_linear():
    """The reproduction of the issue: a bias-free Linear returned uninitialised memory."""
    from accelerate import cpu_offload
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 8))
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["0", "1"], init_lora_weights=False))
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    cpu_offload(model.base_model.model, execution_device="cpu")
    patched(model)
    with torch.no_grad():
        assert_close(model(x), ref)


# ---------------------------------------------------------------------------------------------------------------
# 3. hooks


def _zero_output(module, args, out):
    return torch.zeros_like(out)


def _double_input(module, args):
    return (args[0] * 2,)


def _lora_sub(model, which):
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    return {"lora_A": layer.lora_A["default"], "lora_B": layer.lora_B["default"], "base_layer": layer.base_layer,
            "lora_dropout": layer.lora_dropout["default"]}[which]


@pytest.mark.parametrize("which", ["lora_A", "lora_B", "base_layer", "lora_dropout"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_sublayer_hooks_fire_as_in_peft(which, kind):
    """A hook on a sub-layer PEFT calls (registered after patching) fires exactly as in PEFT."""
    model = lora_model("llama")
    inputs = model_inputs("llama", labels=False)
    fm = patched(copy.deepcopy(model))
    for m in (model, fm):
        sub = _lora_sub(m, which)
        if kind == "forward":
            sub.register_forward_hook(_zero_output)
        else:
            sub.register_forward_pre_hook(_double_input)
    ref = logits(model, inputs)
    assert (ref - logits(lora_model("llama"), inputs)).abs().max() > 1e-3  # the hook changes the result
    assert_close(logits(fm, inputs), ref)
    assert fused_ops(lambda: logits(fm, inputs)) == 13  # only the hooked layer left the fused path


def test_hooks_removed_fuse_again():
    model = patched(lora_model("llama"))
    inputs = model_inputs("llama", labels=False)
    h = _lora_sub(model, "lora_B").register_forward_hook(_zero_output)
    assert fused_ops(lambda: logits(model, inputs)) == 13
    h.remove()
    assert fused_ops(lambda: logits(model, inputs)) == 14


def test_global_module_hooks_fire_as_in_peft():
    """``register_module_forward_hook`` fires for every sub-layer call PEFT makes: capture the same calls."""
    model = lora_model("llama")
    inputs = model_inputs("llama", labels=False)
    fm = patched(copy.deepcopy(model))

    def capture(m):
        seen = []
        h = nn.modules.module.register_module_forward_hook(lambda mod, a, out: seen.append(type(mod).__name__))
        try:
            out = logits(m, inputs)
        finally:
            h.remove()
        return out, seen

    (ref, seen_ref), (got, seen_got) = capture(model), capture(fm)
    assert seen_got == seen_ref
    assert_close(got, ref)


def test_backward_hook_on_lora_a_captures_the_same_gradient():
    model = lora_model("llama")
    inputs = model_inputs("llama")
    fm = patched(copy.deepcopy(model))
    caught = []
    for m in (model, fm):
        _lora_sub(m, "lora_A").register_full_backward_hook(lambda mod, gi, go: caught.append(go[0].clone()))
        grads(m, inputs)
    assert len(caught) == 2
    assert_close(caught[1], caught[0])


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_parametrization_registered_after_patch_is_applied(method):
    """A parametrization turns the base layer into another class whose weight is computed on access: the fused
    path must not read the raw parameter."""
    from torch.nn.utils import parametrize

    model = lora_model("llama") if method == "lora" else ia3_llama()
    inputs = model_inputs("llama", labels=False)
    fm = patched(copy.deepcopy(model))
    for m in (model, fm):
        parametrize.register_parametrization(m.base_model.model.model.layers[0].self_attn.v_proj.base_layer,
                                             "weight", _Double())
    assert_close(logits(fm, inputs), logits(model, inputs))


def test_functional_call_with_other_parameters_matches_peft():
    """functional_call swaps the parameters the fused path reads from the module: it must read the swapped ones."""
    from torch.func import functional_call

    model = lora_model("llama")
    inputs = model_inputs("llama", labels=False)
    fm = patched(copy.deepcopy(model))
    other = {n: torch.randn_like(p) for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        ref = functional_call(model, other, (), inputs).logits
        got = functional_call(fm, other, (), inputs).logits
    assert (ref - logits(model, inputs)).abs().max() > 1e-3
    assert_close(got, ref)
    assert fused_ops(lambda: functional_call(fm, other, (), inputs)) == 14


# ---------------------------------------------------------------------------------------------------------------
# 4. torch.func


def _loss_fn(model, inputs):
    from torch.func import functional_call

    def loss(params, ids, labels):
        return functional_call(model, params, (), {"input_ids": ids, "labels": labels}).loss

    return loss


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_torch_func_grad_matches_peft(method):
    from torch.func import grad

    model = lora_model("llama") if method == "lora" else ia3_llama()
    inputs = model_inputs("llama", pad=0)
    fm = patched(copy.deepcopy(model))
    out = []
    for m in (model, fm):
        params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
        out.append(grad(_loss_fn(m, inputs))(params, inputs["input_ids"], inputs["labels"]))
    assert_same_grads(out[1], out[0])


def test_torch_func_per_sample_grads_match_peft():
    from torch.func import grad, vmap

    model = lora_model("llama")
    inputs = model_inputs("llama", pad=0)
    fm = patched(copy.deepcopy(model))
    out = []
    for m in (model, fm):
        params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
        per_row = vmap(grad(_loss_fn(m, inputs)), in_dims=(None, 0, 0))
        out.append(per_row(params, inputs["input_ids"][:, None], inputs["labels"][:, None]))
    assert_same_grads(out[1], out[0])


def test_forward_mode_ad_matches_peft():
    import torch.autograd.forward_ad as fwAD

    model = lora_model("llama")
    fm = patched(copy.deepcopy(model))
    emb = model.get_input_embeddings()(model_inputs("llama", pad=0)["input_ids"]).detach()
    tangent = torch.randn_like(emb)
    out = []
    for m in (model, fm):
        with fwAD.dual_level():
            y = m(inputs_embeds=fwAD.make_dual(emb, tangent)).logits
            out.append(fwAD.unpack_dual(y).tangent.clone())
    assert_close(out[1], out[0])


# ---------------------------------------------------------------------------------------------------------------
# 5. in-place ops after a layer


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("method", ["lora", "ia3-output", "ia3-input"])
def test_inplace_op_after_layer_trains_as_peft(method):
    from peft import IA3Config, LoraConfig, get_peft_model

    torch.manual_seed(0)
    if method == "lora":
        cfg = LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False)
    else:
        ff = ["fc1", "fc2"] if method == "ia3-input" else []
        cfg = IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=ff, init_ia3_weights=False)
    model = get_peft_model(_MLP(), cfg)
    fm = patched(copy.deepcopy(model))
    x = torch.randn(5, 8, requires_grad=True)
    out = []
    for m in (model, fm):
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).square().sum().backward()
        out.append({"x": x.grad.clone(), **{n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}})
    assert_same_grads(out[1], out[0])


def test_inplace_on_the_input_after_a_dropout_layer_is_loud():
    """The one in-place pattern that differs, loudly: with dropout, fastpeft saves x (the mask is regenerated,
    never stored) where PEFT saves its dropped copy, so writing into x after the layer makes autograd raise
    instead of training. At dropout 0 PEFT saves x too and raises the same way."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], lora_dropout=0.5))
    fm = patched(copy.deepcopy(model)).train()
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 1.0
    y = fm(h)
    h.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


# ---------------------------------------------------------------------------------------------------------------
# 6. names


def test_patched_model_prints_and_reports_as_peft():
    model = lora_model("llama")
    status_ref = [s.module_type for s in model.get_layer_status()]
    text_ref, model_ref = str(model), model.get_model_status()
    patched(model)
    assert str(model) == text_ref
    assert [s.module_type for s in model.get_layer_status()] == status_ref == ["lora.Linear"] * 14
    assert model.get_model_status() == model_ref
    from peft.tuners.lora import Linear

    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == Linear.__name__ and type(layer) is not Linear


# ---------------------------------------------------------------------------------------------------------------
# 7. bad input


@pytest.mark.parametrize("obj", [None, "model", 3])
def test_patch_of_a_non_module_is_a_type_error(obj):
    with pytest.raises(TypeError, match=r"fastpeft.patch: expected a torch.nn.Module \(a PeftModel"):
        fastpeft.patch(obj)


@pytest.mark.parametrize("what", ["plain-module", "transformers-model"])
def test_patch_of_a_model_without_peft_layers_warns(what):
    model = nn.Linear(3, 3) if what == "plain-module" else base_model("llama")
    with pytest.warns(UserWarning, match="no PEFT adapter layers found"):
        fastpeft.patch(model)
    rep = fastpeft.report(model)
    assert not rep.fused and "no PEFT adapter layers" in str(rep)


def test_patch_of_a_prompt_learning_model_warns():
    """Prompt learning methods fastpeft does not patch (multitask prompt tuning) warn and name the method;
    prompt tuning is patched silently."""
    from peft import MultitaskPromptTuningConfig, PromptTuningConfig, get_peft_model

    model = get_peft_model(base_model("llama"), MultitaskPromptTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=4, num_tasks=2))
    with pytest.warns(UserWarning, match="MULTITASK_PROMPT_TUNING is not fused"):
        fastpeft.patch(model)
    assert "MULTITASK_PROMPT_TUNING" in str(fastpeft.report(model))
    model = get_peft_model(base_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastpeft.patch(model)
    assert fastpeft.report(model).fused == {"prompt_encoder.default": "prompt_tuning.PromptEmbedding"}


# ---------------------------------------------------------------------------------------------------------------
# 8. pre-Ampere GPUs


class _FakeCuda:
    """Enough of a CUDA tensor for the backend choice: ``is_cuda`` and ``get_device()``."""

    is_cuda = True

    def __init__(self, index):
        self.index = index

    def get_device(self):
        return self.index


@pytest.mark.parametrize("cc,expected", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_auto_backend_uses_triton_only_with_tensor_cores(monkeypatch, cc, expected):
    from fastpeft.ops import linear

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: cc)
    monkeypatch.setattr(linear, "_TENSOR_CORES", {})
    assert linear._use_triton(_FakeCuda(0), linear.AUTO) is expected
    assert linear._use_triton(_FakeCuda(0), linear.TRITON) is True  # asked for explicitly
    assert linear._use_triton(_FakeCuda(0), linear.TORCH) is False


def test_report_names_the_pre_ampere_fallback(monkeypatch):
    import sys

    patch_mod = sys.modules["fastpeft.patch"]  # the module, which `fastpeft.patch` (the function) shadows

    monkeypatch.setattr(patch_mod, "_cuda_devices", lambda model: {0})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    model = patched(lora_model("llama"), backend="auto")
    assert "compute capability 7.5" in str(fastpeft.report(model))


# ---------------------------------------------------------------------------------------------------------------
# 9. saved bytes, parameters included


def _saved_storages(model, inputs) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters included (each counted once)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_saved_bytes_at_most_peft_parameters_included(method):
    """Layer 0's input does not need a gradient: PEFT then saves no base weight for it, and neither may we."""
    model = (lora_model("llama") if method == "lora" else ia3_llama()).train()
    inputs = model_inputs("llama")
    ref = _saved_storages(model, inputs)
    fm = patched(copy.deepcopy(model))
    assert _saved_storages(fm, inputs) <= ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["lora", "ia3-output", "ia3-input"])
def test_input_without_grad_saves_no_base_weight_and_matches_reference(op, backend, dev, poison_empty):
    """The ops' side of the test above: with x needing no gradient, W (but for input scaling), A and l are not saved;
    the stand-ins the
    backward gets for their metadata are NaN-poisoned and never read, and the parameter gradients match."""
    from fastpeft.ops.ia3 import ia3_linear
    from fastpeft.ops.linear import BACKENDS, lora_linear
    from fastpeft.reference import ia3_linear_ref, lora_linear_ref

    code = BACKENDS[backend]
    if backend == "torch":
        dev = "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 40, generator=g).to(dev)
    w = (torch.randn(24, 40, generator=g) / 7).to(dev).requires_grad_(False)
    if op == "lora":
        params = [(torch.randn(4, 40, generator=g) / 7).to(dev), (torch.randn(24, 4, generator=g) / 2).to(dev)]
        fused = lambda a, b: lora_linear(x, w, None, a, b, None, None, 0.5, 0.0, None, False, code)  # noqa: E731
        ref = lambda a, b: lora_linear_ref(x, w, None, a, b, None, 0.5)  # noqa: E731
    else:
        scale_input = op == "ia3-input"
        params = [(torch.rand(40 if scale_input else 24, generator=g) + 0.5).to(dev)]
        fused = lambda l: ia3_linear(x, w, None, l, scale_input, False, code)  # noqa: E731
        ref = lambda l: ia3_linear_ref(x, w, None, l, scale_input)  # noqa: E731
    dy = torch.randn(33, 24, generator=g).to(dev)
    out = []
    for fn in (fused, ref):
        ps = [p.detach().clone().requires_grad_() for p in params]
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            y = fn(*ps)
        y.backward(dy)
        out.append((y.detach(), [p.grad for p in ps], seen))
    (y, grads_f, saved), (y_ref, grads_r, _) = out
    assert_close(y, y_ref)
    for a, e in zip(grads_f, grads_r):
        assert_close(a, e)
    # input scaling's dl = sum x * (dY W) reads W (PEFT's linear on x * l saves it too)
    assert any(t is w for t in saved) == (op == "ia3-input")

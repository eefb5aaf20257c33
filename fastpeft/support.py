"""The support matrix (adapter method x layer type x feature), measured: ``python -m fastpeft.support`` prints it.

Each cell builds a tiny model twice from the same seed -- unpatched PEFT and ``fastpeft.patch`` -- runs the same
forward (and backward where the column is about training) on both, and says what happened:

- ``fused``: a ``fastpeft::`` op ran (counted by ``fastpeft.testing.OpCounter``; under torch.compile, found in the
  captured graph) and the outputs (and gradients) match PEFT's within the fp32 tolerance of ``fastpeft.testing``;
- ``PEFT forward``: no fastpeft op ran and the results match PEFT's;
- ``**WRONG**``: the results differ from PEFT's -- a defect;
- ``**ERROR** (type)``: PEFT runs it, the patched model raises -- a defect;
- ``unsupported (error)``: ``fastpeft.patch`` itself refuses, with an error;
- ``unsupported (PEFT)``: unpatched PEFT itself raises here, so there is nothing to match;
- ``derived`` / ``cited``: not run by this generator (said why in the legend); ``n/a``: the feature has no meaning.

The README's matrix is this module's output (tests/test_support.py fails if they drift). It reports what the code
does today, not what it should do. Adapter weights are random (not PEFT's identity init) so that a skipped adapter
term, hook or offloaded weight changes the result.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["COLUMNS", "ROWS", "matrix", "markdown", "main"]

_SEED = 0


# Tiny models: one adapted layer each (prefix and prompt tuning need a transformers model) ------------------------


class _One(nn.Module):
    """``layer(x)`` then a fixed nonlinearity, so gradients flow through something other than a sum."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.tanh(self.layer(x))


class _FFN(nn.Module):
    """Two linears: IA3 scales ``up``'s output, or ``down``'s input when ``down`` is a feed-forward module."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 6)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _linear():
    return _One(nn.Linear(8, 6)), torch.randn(2, 3, 8)


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    return _One(Conv1D(6, 8)), torch.randn(2, 3, 8)  # Conv1D(nf=out, nx=in)


def _embedding():
    return _One(nn.Embedding(20, 6)), torch.randint(0, 20, (2, 5))


def _conv2d():
    return _One(nn.Conv2d(3, 4, 3)), torch.randn(2, 3, 6, 6)


def _ffn():
    return _FFN(), torch.randn(2, 3, 8)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, max_position_embeddings=32)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config), torch.randint(0, 32, (2, 5))


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], init_lora_weights=False, **kw)


def _ia3(target: str, feedforward: bool):
    def config(**kw):
        from peft import IA3Config

        return IA3Config(target_modules=[target], feedforward_modules=[target] if feedforward else [],
                         init_ia3_weights=False, **kw)
    return config


def _prefix(**kw):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, **kw)


def _prompt(**kw):
    from peft import PromptTuningConfig

    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, **kw)


def _ptuning(**kw):
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, encoder_reparameterization_type="LSTM",
                               encoder_hidden_size=8, **kw)


@dataclass(frozen=True)
class Row:
    method: str
    layer: str
    build: Callable[[], tuple[nn.Module, torch.Tensor]]  # base model and its input
    config: Callable[..., Any]  # PEFT config, keyword overrides
    tuner: bool = True  # adapter layers that fastpeft could patch (False: prompt learning)
    patched: bool = True  # whether fastpeft.patch changes anything (else torch.compile is derived, not run)


ROWS = [
    Row("LoRA", "`nn.Linear`", _linear, _lora),
    Row("LoRA", "GPT-2 `Conv1D`", _conv1d, lambda **kw: _lora(fan_in_fan_out=True, **kw)),
    Row("LoRA", "`nn.Embedding`", _embedding, _lora),
    Row("LoRA", "`nn.Conv2d`", _conv2d, _lora),
    Row("IA3", "`nn.Linear`, output scaling", _ffn, _ia3("up", False)),
    Row("IA3", "`nn.Linear`, feed-forward input scaling", _ffn, _ia3("down", True)),
    Row("IA3", "GPT-2 `Conv1D`, output scaling", _conv1d, _ia3("layer", False)),
    Row("IA3", "`nn.Conv2d`, output scaling", _conv2d, _ia3("layer", False)),
    Row("prefix tuning", "attention (prefix keys and values)", _llama, _prefix, tuner=False),
    Row("prompt tuning", "input embeddings", _llama, _prompt, tuner=False),
    Row("P-tuning", "input embeddings (LSTM encoder)", _llama, _ptuning, tuner=False),
]


# Running one cell ----------------------------------------------------------------------------------------------


class _PatchRefused(Exception):
    pass


def _peft_model(row: Row, config_kw: dict, second_adapter: bool):
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        base, x = row.build()
        model = get_peft_model(base, row.config(**config_kw))
        if second_adapter:
            model.add_adapter("other", row.config(**config_kw))
    return model.eval(), x


def _tuner_layer(model: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next(m for m in model.modules() if isinstance(m, BaseTunerLayer))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _counted(fn):
    """Run ``fn`` under an OpCounter: (its tensors, the fastpeft ops that reached dispatch)."""
    from .testing import OpCounter

    with OpCounter() as counter:
        tensors = fn()
    return tensors, {n for n in counter.names if n.startswith("fastpeft.")}


def _eval(model, x, **kw):
    def fn():
        with torch.no_grad():
            return [_logits(model(x, **kw))]
    return _counted(fn)


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _train(model, x):
    def fn():
        model.train()
        out = _logits(model(x))
        out.float().pow(2).mean().backward()
        return [out.detach()] + [p.grad for _, p in _trainable(model)]
    return _counted(fn)


def _mixed(model, x):
    return _eval(model, x, adapter_names=["default", "other"])  # one adapter per batch row


def _func_grad(model, x):
    """``torch.func.grad`` over ``functional_call``: the gradient of the loss w.r.t. the trainable parameters."""
    from torch.func import functional_call, grad

    params = {n: p.detach() for n, p in _trainable(model)}

    def loss(ps):
        return _logits(functional_call(model, ps, (x,))).float().pow(2).mean()

    def fn():
        g = grad(loss)(params)
        return [g[n] for n in sorted(g)]
    return _counted(fn)


def _compiled(model, x):
    """torch.compile with a backend that records the captured graphs and runs them eagerly (no inductor codegen:
    seconds instead of minutes on CPU; whether the fused op is in the graph is what the cell reports)."""
    import torch._dynamo

    ops: set[str] = set()

    def backend(gm, example_inputs):
        ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = [_logits(compiled(x))]
    torch._dynamo.reset()
    return out, {o for o in ops if o.startswith("fastpeft.")}


def _offload(model):
    from accelerate import cpu_offload

    cpu_offload(model.base_model.model, execution_device="cpu")


def _merge(model):
    model.merge_adapter()


def _hook_lora_a(model):
    _tuner_layer(model).lora_A["default"].register_forward_hook(lambda m, args, out: out * 2)


def _hook_base(model):
    _tuner_layer(model).base_layer.register_forward_hook(lambda m, args, out: out + 1)


def _match(actual: list, expected: list) -> bool:
    from .testing import assert_close

    if len(actual) != len(expected):
        return False
    try:
        for a, e in zip(actual, expected):
            if a is None or e is None:  # a parameter without a gradient must lack it on both sides
                assert a is None and e is None
                continue
            assert_close(a.detach(), e.detach(), dtype=torch.float32)
    except AssertionError:
        return False
    return True


def _case(row: Row, run, *, config_kw=None, before=None, after=None, second_adapter=False, notes=None) -> str:
    """One cell: ``before`` modifies the model ahead of ``fastpeft.patch``, ``after`` follows it (both applied to
    the PEFT reference as well), ``run`` returns (tensors, fastpeft ops seen)."""
    import fastpeft

    def make(patched: bool):
        model, x = _peft_model(row, config_kw or {}, second_adapter)
        if before is not None:
            before(model)
        if patched:
            try:
                fastpeft.patch(model)
            except Exception as e:
                raise _PatchRefused(e) from e
        if after is not None:
            after(model)
        return model, x

    try:
        model, x = make(False)
        expected, _ = run(model, x)
    except Exception as e:
        _note(notes, row, f"PEFT: {type(e).__name__}: {e}")
        return "unsupported (PEFT)"
    try:
        model, x = make(True)
        actual, fused_ops = run(model, x)
    except _PatchRefused as e:
        _note(notes, row, f"fastpeft.patch: {type(e.__cause__).__name__}: {e.__cause__}")
        return "unsupported (error)"
    except Exception as e:
        _note(notes, row, f"{type(e).__name__}: {e}")
        return f"**ERROR** ({type(e).__name__})"
    kind = "fused" if fused_ops else "PEFT forward"
    return kind if _match(actual, expected) else f"**WRONG** ({kind})"


def _note(notes, row, text):
    if notes is not None:
        notes.append(f"{row.method} {row.layer}: {text.splitlines()[0][:200]}")


# Columns --------------------------------------------------------------------------------------------------------


def _quantized(row: Row, notes) -> str:
    """Derived, not measured (bitsandbytes is not installed): PEFT builds its own layer classes for quantized
    bases (``lora.bnb.Linear8bitLt``, ``ia3.bnb.Linear4bit``, GPTQ, ...), and ``patch`` fuses only the exact
    types of its dispatch table, so these keep PEFT's forward as long as the table holds only the plain layers."""
    if row.layer not in ("`nn.Linear`",) and not row.layer.startswith("`nn.Linear`,"):
        return "n/a"
    from .patch import _dispatch_table

    plain = all(cls.__module__.endswith(".layer") for cls in _dispatch_table())
    return "PEFT forward (derived)" if plain else "not tested"


def _distributed(row: Row, notes) -> str:
    # tests/test_distributed.py trains a patched LoRA Llama (nn.Linear layers) under DDP and FSDP2 against PEFT.
    return "fused (cited)" if (row.method, row.layer) == ("LoRA", "`nn.Linear`") else "not tested"


def _only(pred, fn):
    return lambda row, notes: fn(row, notes) if pred(row) else "n/a"


def _is_lora(row):
    return row.method == "LoRA"


def _is_tuner(row):
    return row.tuner


def _untouched(row, notes) -> str:
    """Derived for prompt tuning under torch.compile (tracing a transformers model costs seconds per model):
    ``patch`` swaps no module class of a model without adapter layers, so it runs exactly PEFT's code."""
    import fastpeft

    model, _ = _peft_model(row, {}, False)
    before = [type(m) for m in model.modules()]
    fastpeft.patch(model)
    return "PEFT forward (derived)" if [type(m) for m in model.modules()] == before else "not tested"


def _compile_cell(row, notes):
    return _case(row, _compiled, notes=notes) if row.patched else _untouched(row, notes)


def _mixed_cell(row, notes):
    # PEFT's IA3 model has no forward hooks for ``adapter_names``: PeftModel drops the argument and every row
    # gets the active adapter, patched or not, so there is no mixed batch to support.
    model, _ = _peft_model(row, {}, False)
    if not hasattr(model.base_model, "_enable_peft_forward_hooks"):
        return "n/a (PEFT ignores it)"
    return _case(row, _mixed, second_adapter=True, notes=notes)


def _lora_a_module(row):
    return row.method == "LoRA" and row.layer != "`nn.Embedding`"  # PEFT keeps Embedding's A as a parameter


COLUMNS: list[tuple[str, Callable[[Row, list | None], str]]] = [
    ("eval", lambda row, notes: _case(row, _eval, notes=notes)),
    ("train", lambda row, notes: _case(row, _train, notes=notes)),
    ("merged", _only(_is_tuner, lambda row, notes: _case(row, _eval, after=_merge, notes=notes))),
    ("mixed batch", _only(_is_tuner, _mixed_cell)),
    ("DoRA", _only(_is_lora, lambda row, notes: _case(row, _train, config_kw={"use_dora": True}, notes=notes))),
    ("quantized base", _quantized),
    ("offload, then patch", _only(_is_tuner, lambda row, notes: _case(row, _eval, before=_offload, notes=notes))),
    ("patch, then offload", _only(_is_tuner, lambda row, notes: _case(row, _eval, after=_offload, notes=notes))),
    ("hook on `lora_A`", _only(_lora_a_module, lambda row, notes: _case(row, _eval, after=_hook_lora_a,
                                                                       notes=notes))),
    ("hook on `base_layer`", _only(_is_tuner, lambda row, notes: _case(row, _eval, after=_hook_base,
                                                                       notes=notes))),
    ("torch.compile", _compile_cell),
    ("torch.func", lambda row, notes: _case(row, _func_grad, notes=notes)),
    ("DDP / FSDP", _distributed),
]

LEGEND = """\
Generated by `python -m fastpeft.support` (tests/test_support.py checks this table against it): each cell runs a
tiny model with unpatched PEFT and with `fastpeft.patch` and compares outputs (and gradients for train, DoRA and
torch.func) at fp32 tolerance. `fused`: a fastpeft op ran; `PEFT forward`: PEFT's own forward ran, same results;
`**WRONG**`: results differ from PEFT's; `**ERROR**`: PEFT runs it, the patched model raises; `unsupported
(PEFT)`: PEFT itself raises. Columns: eval is a no-grad forward; train a forward and backward at dropout 0;
merged follows `merge_adapter()`; mixed batch is `adapter_names=` with two adapters (PEFT's IA3 drops the
argument); offload is `accelerate.cpu_offload(model.base_model.model, execution_device="cpu")` before or after
`fastpeft.patch`; the hooks are forward hooks registered after patching that change the output; torch.compile
captures the graph and runs it eagerly (no inductor); torch.func is `torch.func.grad` over `functional_call`. Quantized base is derived, not run
(bitsandbytes is not installed here): PEFT uses its own layer classes for quantized bases and `patch` fuses only
the exact classes of its dispatch table. DDP / FSDP is cited from tests/test_distributed.py (LoRA on a Llama
under DDP and FSDP2, two CPU processes), not run here."""


def matrix(notes: list | None = None) -> list[list[str]]:
    """Rows of cells: method, layer, then one cell per column of ``COLUMNS``."""
    from peft.utils import other  # noqa: F401  (imported before the warnings filter: its import-time warnings)

    out = []
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")  # fallback warnings of patch, PEFT's config warnings: cells say it all
        for row in ROWS:
            out.append([row.method, row.layer] + [fn(row, notes) for _, fn in COLUMNS])
    return out


def markdown(rows: list[list[str]] | None = None) -> str:
    rows = matrix() if rows is None else rows
    head = ["method", "layer"] + [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + LEGEND


BEGIN, END = "<!-- support:begin -->", "<!-- support:end -->"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", help="rewrite the matrix between the support markers of this file")
    args = ap.parse_args(argv)
    notes: list[str] = []
    text = markdown(matrix(notes))
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    if args.readme:
        with open(args.readme) as f:
            doc = f.read()
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(args.readme, "w") as f:
            f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

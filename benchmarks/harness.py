"""The one benchmark harness: workloads, providers, modes, counters and interleaved timing for every adapter method.

Vocabulary
- method: an adapter method and the PEFT config it is benchmarked with (``register_method``), with the workloads
  that apply to it. LoRA, IA3, prefix tuning, prompt tuning and P-tuning (MLP, LSTM) are registered here; a new
  method adds one ``Method`` and gets every workload, provider and counter.
- workload: a mode with its sizes, LoRA dropout, prefix length and model dtype (``Workload``), grouped per
  ``Scale``: "full" is the reference workload of the issues, "smoke" a tiny model for ``--benchmark-disable`` CI
  runs (the same workload names; the prefix workloads keep their B and P and shrink the model and the lengths).
- provider: "base" (the model without adapters: the floor), "peft" (PEFT eager), "fastpeft" (a copy of the same
  PEFT model after ``fastpeft.patch(backend="auto")``: the fused torch path on CPU, the Triton kernels on CUDA).
  For a method whose virtual tokens are input positions (``Method.prompt_in_input``: prompt tuning, P-tuning) the
  base model runs on P + T tokens, the floor of a [prompt | tokens] input; one base runner serves all such methods.
- mode: "decode" (one new token per step against a DynamicCache; teacher-forced tokens, so every provider runs the
  same inputs), "generate" (greedy ``model.generate`` of ``new_tokens`` tokens, timed per decode step inside it:
  the only decode loop that runs PEFT's prefix path; ``benchmarks/generate.py``), "prefill" (no-grad forward over
  the prompt, last-position logits, as ``generate`` does), "forward" (an eval step: no-grad forward over B x T tokens
  with an all-ones mask, every position's logits), "train"
  (zero_grad, forward with labels, backward, AdamW(foreach) step). The base provider's train step is frozen weights
  with gradients w.r.t. the input embeddings: backward through every layer's dX, the floor of adapter training.

Counters (recorded in each case's ``benchmark.extra_info``; one step each, outside timing)
- ``ops``: dispatcher calls seen by a TorchDispatchMode during the step (forward, backward and optimizer alike),
  excluding ``excluded_op``: (1) views: ops whose schema returns an alias of an input that they do not write
  (``Tensor(a)`` returns: view, t, transpose, slice, select, unsqueeze, expand, permute, alias, detach, split...);
  (2) ``aten._unsafe_view``: matmul's reshape of its own fresh mm result, a view that the schema does not mark only
  because the input is known to be unaliased; (3) ``aten._local_scalar_dense``: ``.item()``, a host read of a
  scalar (generate's stopping check). In-place and ``out=`` ops count; a fastpeft custom op counts as one (its inner
  aten calls run below the mode). With this set the issue's 192 (base) / 304 (PEFT) decode ops per generated token
  reproduce exactly (``generate_ops``); counting ``_local_scalar_dense`` too gives 193 / 305.
- ``bytes_touched``: for each counted op, the sum of numel x itemsize of every tensor among its inputs and outputs
  (an in-place op's output counts again, as written). Logical sizes: a broadcast operand counts its full logical
  size and an embedding lookup its whole table, so this bounds traffic from above and ignores cache reuse.
- ``saved_bytes``: bytes of the distinct storages autograd keeps for backward (``saved_tensors_hooks`` pack, each
  storage once), excluding the storages of the model's parameters, views of them included (mm saves ``W.t()``,
  a view, not the Parameter). ``saved_bytes_incl_params`` keeps those: it is the issue's number (235 / 331 MiB),
  whose ``isinstance(t, nn.Parameter)`` filter excluded nothing because autograd packs views of the weights.
- ``saved_scalar_bytes``: the part of ``saved_bytes`` in 0-dim storages (fastpeft's per-layer dropout seeds).
- ``saved_wide_x_bytes``: tensors saved during an adapter layer's forward (a PEFT ``BaseTunerLayer``) with the
  numel of that layer's input x and a wider float dtype than x: an upcast copy of x kept for backward.
- ``peak_mem_bytes`` (CUDA only): ``max_memory_allocated`` during the step minus the allocation before it.
- ``generate_ops`` (decode only): ops per token inside ``model.generate`` (greedy; the difference between
  generating 3 and 2 new tokens): the model's decode ops plus generate's own, provider-independent bookkeeping.
- ``input_copies`` (``prompt_in_input`` methods, forward and train modes): bytes written by copy ops before the
  model's forward (PEFT's task forward building its inputs), by op, apart from those written into the
  ``inputs_embeds`` the model receives (``input_embeds_writes``): ``benchmarks/counters.py::count_inputs``.
- generate mode: ops of its prefill and of a decode step inside generate (and their parts inside the model's
  forward), bytes written by copy ops per decode step (cat, copy_, clone, index_copy...; inside fastpeft's ops
  too), prefix bytes held, KV-cache bytes after generate: ``benchmarks/generate.py`` module docstring.

Timing: ``Bench.interleaved`` runs providers round-robin within a measurement, one step each in a rotating order,
so machine drift hits all of them alike; ratios are medians of per-step paired ratios from the same run. In
generate mode a step is one generate call and its samples are the decode steps inside it (paired by position);
``Timing.calls`` keeps every step's whole time (a generate call with its prefill). ``runs=`` interleaves any set of
runners, of several methods too (``benchmarks/soft_prompt.py``).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from fastpeft.testing import OpCounter, excluded_op

from .counters import SavedCounter, count_inputs, count_ops
from .modes import MODES, Runner, _tokens, generate_ops, make_runner

__all__ = [
    "PROVIDERS", "MODES", "LLAMA_LINEARS", "REFERENCE_MODEL", "SMOKE_MODEL", "Workload", "Scale", "SCALES",
    "ADAPTER_WORKLOADS", "PREFIX_WORKLOADS", "SOFT_PROMPT_WORKLOADS", "Method", "METHODS", "register_method",
    "ProviderUnavailable", "Runner", "Timing", "Bench", "OpCounter", "SavedCounter", "excluded_op", "count_ops",
    "count_inputs", "generate_ops", "default_device", "smoke_or_full", "parity_ok", "MiB",
]

PROVIDERS = ("base", "peft", "fastpeft")
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MiB = 2**20

REFERENCE_MODEL = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=8000)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)


# Workloads and scales


@dataclass(frozen=True)
class Workload:
    name: str  # stable across scales: it is the pytest id
    mode: str  # one of MODES
    batch: int
    seq: int  # prompt length (decode: the prefilled cache) or sequence length (prefill, train)
    dropout: float = 0.0  # adapter dropout, for methods that have one (train mode only)
    dtype: torch.dtype = torch.float32  # model dtype; PEFT keeps adapters in fp32 (autocast_adapter_dtype)
    prefix: int = 0  # virtual tokens, for prompt-learning methods
    new_tokens: int = 0  # generate mode: tokens generated per call

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one timed step: a decode step's B, a generate call's B x new tokens, else B x T."""
        return {"decode": self.batch, "generate": self.batch * self.new_tokens}.get(self.mode, self.batch * self.seq)

    @property
    def tokens_per_sample(self) -> int:
        """Tokens of one interleaved timing sample: in generate mode a sample is one decode step (B tokens)."""
        return self.batch if self.mode == "generate" else self.tokens_per_step


@dataclass(frozen=True)
class Scale:
    name: str
    model: dict  # LlamaConfig kwargs
    workloads: dict[str, Workload]
    steps: dict[str, int]  # timed steps per provider and interleaved round, by mode
    rounds: dict[str, int]  # interleaved rounds, by mode (decode re-prefills its cache every round)
    bench_rounds: dict[str, int]  # pytest-benchmark rounds of the per-provider cases, by mode


ADAPTER_WORKLOADS = ("decode-B1", "decode-B8", "prefill", "train-p0", "train-p0.1", "train-bf16-p0.1")
PREFIX_WORKLOADS = ("generate-B8-P20", "generate-B32-P20", "generate-B8-P64", "generate-B32-P64", "train-P20")
SOFT_PROMPT_WORKLOADS = ("forward-B8-P20", "generate-B8-P20", "train-P20")  # the soft-prompt issue's B=8 T=64 P=20


def _workloads(prompt: int, batch: int, seq: int, gen_prompt: int, new_tokens: int) -> dict[str, Workload]:
    ws = [
        Workload("decode-B1", "decode", 1, prompt),
        Workload("decode-B8", "decode", 8, prompt),
        Workload("prefill", "prefill", batch, seq),
        Workload("train-p0", "train", batch, seq, dropout=0.0),
        Workload("train-p0.1", "train", batch, seq, dropout=0.1),
        Workload("train-bf16-p0.1", "train", batch, seq, dropout=0.1, dtype=torch.bfloat16),
        # prefix tuning (the prefix issue's cases): B x P, generate after a gen_prompt-token prompt; train B=8, P=20
        *(Workload(f"generate-B{b}-P{p}", "generate", b, gen_prompt, prefix=p, new_tokens=new_tokens)
          for p in (20, 64) for b in (8, 32)),
        Workload("train-P20", "train", 8, gen_prompt, prefix=20),
        Workload("forward-B8-P20", "forward", 8, gen_prompt, prefix=20),  # soft prompts: an eval step
    ]
    return {w.name: w for w in ws}


SCALES = {
    "full": Scale("full", REFERENCE_MODEL, _workloads(prompt=32, batch=4, seq=256, gen_prompt=64, new_tokens=32),
                  steps={"decode": 32, "generate": 1, "prefill": 7, "forward": 7, "train": 5},
                  rounds={"decode": 4, "generate": 3, "prefill": 1, "forward": 1, "train": 1},
                  bench_rounds={"decode": 32, "generate": 3, "prefill": 5, "forward": 5, "train": 3}),
    "smoke": Scale("smoke", SMOKE_MODEL, _workloads(prompt=8, batch=2, seq=16, gen_prompt=8, new_tokens=4),
                   steps={"decode": 2, "generate": 1, "prefill": 1, "forward": 1, "train": 1},
                   rounds={"decode": 1, "generate": 1, "prefill": 1, "forward": 1, "train": 1},
                   bench_rounds={"decode": 1, "generate": 1, "prefill": 1, "forward": 1, "train": 1}),
}


# Methods: each adapter method registers the PEFT config it is benchmarked with


@dataclass(frozen=True)
class Method:
    name: str
    config: Callable[[Workload], Any]  # workload -> PEFT config (imports peft lazily)
    workloads: tuple[str, ...] | None = None  # the workload names that apply; None: all of them
    prompt_in_input: bool = False  # virtual tokens are input positions: the base floor runs on P + T tokens


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _lora_config(w: Workload):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA_LINEARS), lora_dropout=w.dropout)


def _ia3_config(w: Workload):
    from peft import IA3Config

    return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def _prefix_config(w: Workload):
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=w.prefix)  # no projection: PEFT's default


def _soft_prompt_config(w: Workload, encoder: str | None = None):
    from peft import PromptEncoderConfig, PromptTuningConfig

    if encoder is None:  # prompt tuning, RANDOM init (PEFT's default)
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=w.prefix)
    return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=w.prefix, encoder_hidden_size=512,
                               encoder_reparameterization_type=encoder)  # 2 layers, dropout 0: PEFT's defaults


register_method(Method("lora", _lora_config, workloads=ADAPTER_WORKLOADS))
register_method(Method("ia3", _ia3_config, workloads=("decode-B1", "decode-B8", "prefill", "train-p0",
                                                      "train-bf16-p0.1")))  # PEFT's Llama defaults; no dropout
register_method(Method("prefix", _prefix_config, workloads=PREFIX_WORKLOADS))  # sdpa base attention
for _name, _encoder in (("prompt", None), ("ptuning-mlp", "MLP"), ("ptuning-lstm", "LSTM")):
    register_method(Method(_name, functools.partial(_soft_prompt_config, encoder=_encoder),
                           workloads=SOFT_PROMPT_WORKLOADS, prompt_in_input=True))


# Models, providers and modes


class ProviderUnavailable(RuntimeError):
    """A provider that cannot run here (fastpeft's Triton kernels on a CUDA machine where they are not built)."""


def default_device() -> str:
    return os.environ.get("FASTPEFT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds per step for each provider; index i of every list comes from the same round-robin turn."""

    providers: tuple[str, ...]
    times: dict[str, list[float]] = field(default_factory=dict)
    calls: dict[str, list[float]] = field(default_factory=dict)  # each step's whole time (generate: with prefill)
    warm: bool = False
    turns: int = 0  # round-robin turns so far: the next turn's rotation

    def __post_init__(self):
        for p in self.providers:
            self.times.setdefault(p, [])
            self.calls.setdefault(p, [])

    def median(self, p: str) -> float:
        return statistics.median(self.times[p])

    def ratios(self, p: str, q: str) -> list[float]:
        return [a / b for a, b in zip(self.times[p], self.times[q])]

    def ratio(self, p: str, q: str) -> float:
        """Median of the paired per-step ratios t_p / t_q."""
        return statistics.median(self.ratios(p, q))

    def spread(self, p: str, q: str) -> tuple[float, float]:
        """Interquartile range of the paired ratios t_p / t_q: how noisy the machine was."""
        r = self.ratios(p, q)
        if len(r) < 4:
            return min(r), max(r)
        q1, _, q3 = statistics.quantiles(r, n=4)
        return q1, q3

    def summary(self, tokens_per_step: int) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": len(self.times[self.providers[0]])}
        for p in self.providers:
            out[f"{p}_median_s"] = self.median(p)
            out[f"{p}_tokens_per_s"] = tokens_per_step / self.median(p)
            for q in ("base", "peft"):
                if q in self.providers and q != p:
                    out[f"{p}_over_{q}"] = self.ratio(p, q)
                    out[f"{p}_over_{q}_iqr"] = list(self.spread(p, q))
        if {"base", "peft", "fastpeft"} <= set(self.providers):
            peft_over = out["peft_over_base"] - 1.0
            # fastpeft's overhead over base as a fraction of PEFT's; undefined where PEFT showed none (noise)
            fast_over = out["fastpeft_over_base"] - 1.0
            out["overhead_fastpeft_over_peft"] = fast_over / peft_over if peft_over > 0 else None
        return out


class Bench:
    """Builds and caches the models of one scale on one device; measures counters and timings."""

    def __init__(self, scale: Scale | str = "full", device: str | None = None, threads: int | None = None,
                 log: Callable[[str], None] | None = None):
        self.scale = SCALES[scale] if isinstance(scale, str) else scale
        self.device = device or default_device()
        if not self.device.startswith("cuda"):
            torch.set_num_threads(threads or int(os.environ.get("FASTPEFT_BENCH_THREADS", "1")))
        self.log = log or (lambda msg: None)
        self._base: dict[torch.dtype, nn.Module] = {}
        self._models: dict[tuple, nn.Module] = {}
        self._runners: dict[tuple, Runner] = {}
        self._counters: dict[tuple, dict[str, Any]] = {}

    def workload(self, name: str) -> Workload:
        return self.scale.workloads[name]

    def workloads(self, method: str) -> list[str]:
        names = METHODS[method].workloads
        return [n for n in self.scale.workloads if names is None or n in names]

    # models

    def base_model(self, dtype: torch.dtype) -> nn.Module:
        if dtype not in self._base:
            from transformers import LlamaConfig, LlamaForCausalLM

            torch.manual_seed(0)
            self._base[dtype] = LlamaForCausalLM(LlamaConfig(**self.scale.model)).to(self.device, dtype)
        return self._base[dtype]

    def model(self, method: str, w: Workload, provider: str) -> nn.Module:
        """The provider's model for a workload (cached: train steps update its adapters as they run)."""
        train = w.mode == "train"
        key = (None if provider == "base" else method, provider, w.dtype, w.dropout if train else 0.0, train,
               0 if provider == "base" else w.prefix)
        if key not in self._models:
            self._models[key] = self.build(method, w, provider)
        return self._models[key]

    def build(self, method: str, w: Workload, provider: str, peft_model: nn.Module | None = None) -> nn.Module:
        """A fresh model. peft and fastpeft get the same base and adapter weights: fastpeft patches a copy of
        ``peft_model`` (default: a fresh PEFT build, identical to every other one)."""
        train = w.mode == "train"
        if provider == "base":
            model = copy.deepcopy(self.base_model(w.dtype)).requires_grad_(False)
            if train:
                model.enable_input_require_grads()
        elif provider == "peft":
            from peft import get_peft_model

            torch.manual_seed(1)
            model = get_peft_model(copy.deepcopy(self.base_model(w.dtype)), METHODS[method].config(w))
            _perturb_trainable(model)
        elif provider == "fastpeft":
            model = copy.deepcopy(peft_model) if peft_model is not None else self.build(method, w, "peft")
            model = _fastpeft_patch(model, self.device)
        else:
            raise ValueError(f"provider {provider!r}; expected one of {PROVIDERS}")
        return model.train(train)

    # modes

    def extra_tokens(self, method: str, w: Workload, provider: str) -> int:
        """Input positions the provider runs beyond the workload's T: the base floor of a ``prompt_in_input``
        method runs on P + T tokens."""
        return w.prefix if provider == "base" and METHODS[method].prompt_in_input else 0

    def _key(self, method: str, w: Workload, provider: str) -> tuple:
        """A runner's (and its counters') key: every method's base provider on the same inputs is one runner."""
        return (None if provider == "base" else method, w.name, provider, self.extra_tokens(method, w, provider))

    def runner(self, method: str, w: Workload, provider: str) -> Runner:
        key = self._key(method, w, provider)
        if key not in self._runners:
            self._runners[key] = make_runner(self.model(method, w, provider), w, self.device,
                                              self.scale.steps["decode"] + self.scale.bench_rounds["decode"] + 4,
                                              extra_tokens=key[-1])
        return self._runners[key]

    def timed_step(self, run: Runner) -> Callable[[Any], Any]:
        """``run.step`` followed by a device sync, for timers that read the host clock (pytest-benchmark)."""
        if not self.device.startswith("cuda"):
            return run.step

        def step(state):
            out = run.step(state)
            torch.cuda.synchronize()
            return out

        return step

    # counters

    def counters(self, method: str, w: Workload | str, provider: str) -> dict[str, Any]:
        """Every counter of one provider on one workload (measured once, then cached: they are deterministic)."""
        w = self.workload(w) if isinstance(w, str) else w
        key = self._key(method, w, provider)
        if key in self._counters:
            return self._counters[key]
        run = self.runner(method, w, provider)
        state = run.prepare()
        run.step(state)  # steady state: optimizer moments and lazy inits exist before counting
        seq = w.seq + key[-1]
        count = count_ops
        if METHODS[method].prompt_in_input and w.mode in ("forward", "train"):
            count = functools.partial(count_inputs, run.model)
        out: dict[str, Any] = {"mode": w.mode, "batch": w.batch, "seq": seq, "dropout": w.dropout,
                               "dtype": str(w.dtype).removeprefix("torch."), "device": self.device,
                               "scale": self.scale.name}
        if w.mode == "generate":
            from .generate import generate_counters

            out.update(prefix=w.prefix, new_tokens=w.new_tokens)
            out.update(generate_counters(run.model, _tokens(run.model.config.vocab_size, w.batch, seq, self.device),
                                         w.new_tokens))
        elif w.mode == "train":
            saved = SavedCounter(run.model)
            with saved:
                ops = count(lambda: run.step(state))
            out.update(saved_bytes=saved.saved_bytes, saved_bytes_incl_params=saved.saved_bytes + saved.param_bytes,
                       saved_scalar_bytes=saved.scalar_bytes, saved_wide_x_bytes=saved.wide_x_bytes)
            saved.close()
        else:
            ops = count(lambda: run.step(state))
        if w.mode != "generate":
            out.update(ops=ops.total, bytes_touched=ops.bytes, op_histogram=dict(ops.ops.most_common()))
            out.update(getattr(ops, "inputs", {}))
        if w.mode == "decode":
            out["generate_ops"] = generate_ops(run.model, w, self.device)
        if self.device.startswith("cuda"):
            state = run.prepare()
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run.step(state)
            _sync(self.device)
            out["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
        if provider == "fastpeft":
            import fastpeft

            rep = fastpeft.report(run.model)
            out["fused_layers"], out["fallback_layers"] = len(rep.fused), len(rep.fallback)
        self._counters[key] = out
        return out

    # timing

    def interleaved_round(self, method: str | None, w: Workload, timing: Timing, steps: int | None = None,
                          runs: dict[str, Runner] | None = None) -> Timing:
        """One round: every provider prepares (untimed), then ``steps`` turns, one step per provider per turn, the
        order rotated every turn. The first round also runs one untimed warm-up step per provider. A generate step
        adds its decode steps' times, not its own (``timing.calls`` gets its own). ``runs`` (label -> runner, the
        labels ``timing.providers``) replaces the method's providers."""
        runs = runs or {p: self.runner(method, w, p) for p in timing.providers}
        states = {p: runs[p].prepare() for p in timing.providers}
        if not timing.warm:
            for p in timing.providers:
                runs[p].step(states[p])
            timing.warm = True
        n = len(timing.providers)
        for _ in range(steps or self.scale.steps[w.mode]):
            k = timing.turns % n
            timing.turns += 1
            for p in timing.providers[k:] + timing.providers[:k]:
                _sync(self.device)
                t0 = time.perf_counter()
                runs[p].step(states[p])
                _sync(self.device)
                timing.calls[p].append(time.perf_counter() - t0)
                if w.mode == "generate":
                    timing.times[p].extend(states[p].token_times)
                else:
                    timing.times[p].append(timing.calls[p][-1])
        return timing

    def interleaved(self, method: str | None, w: Workload | str, providers: tuple[str, ...] = PROVIDERS,
                    rounds: int | None = None, steps: int | None = None,
                    runs: dict[str, Runner] | None = None) -> Timing:
        w = self.workload(w) if isinstance(w, str) else w
        timing = Timing(tuple(runs or providers))
        for _ in range(rounds or self.scale.rounds[w.mode]):
            self.interleaved_round(method, w, timing, steps, runs)
        return timing

    # parity

    def parity(self, method: str, w: Workload | str) -> dict[str, float]:
        """Max |difference| of fastpeft against PEFT on the workload's inputs: logits (eval), and for train mode
        the loss and every trainable gradient (dropout must be 0 there: the two draw different masks)."""
        w = self.workload(w) if isinstance(w, str) else w
        pm = self.build(method, w, "peft")  # fresh: the cached models have taken different train steps
        fm = self.build(method, w, "fastpeft", peft_model=pm)
        ids = _tokens(pm.config.vocab_size, w.batch, w.seq, self.device)
        if w.mode != "train":
            with torch.no_grad():
                a, b = pm(input_ids=ids).logits, fm(input_ids=ids).logits
            return {"logits": (a.double() - b.double()).abs().max().item(), "logits_scale": a.abs().max().item()}
        out = {}
        for m in (pm, fm):
            m.zero_grad(set_to_none=True)
        la, lb = pm(input_ids=ids, labels=ids).loss, fm(input_ids=ids, labels=ids).loss
        la.backward()
        lb.backward()
        out["loss"], out["loss_scale"] = abs(la.item() - lb.item()), abs(la.item())
        ga = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
        gb = {n: p.grad for n, p in fm.named_parameters() if p.grad is not None}
        assert ga.keys() == gb.keys(), "fastpeft and PEFT produced gradients for different parameters"
        out["grads"] = max((ga[n].double() - gb[n].double()).abs().max().item() for n in ga)
        out["grads_scale"] = max(g.abs().max().item() for g in ga.values())
        return out


def _perturb_trainable(model: nn.Module, std: float = 0.02) -> None:
    """Add N(0, std^2) noise to every trainable parameter, so adapters are not the identity (LoRA's B starts at 0)
    and parity checks compare something. Seeded: every build gets the same adapter weights."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * std)


def _fastpeft_patch(model: nn.Module, device: str) -> nn.Module:
    import fastpeft

    if device.startswith("cuda") and importlib.util.find_spec("fastpeft.kernels.lora") is None:
        raise ProviderUnavailable("fastpeft on CUDA needs the Triton kernels (fastpeft.kernels.lora), not built yet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastpeft.patch(model, backend="auto")
    rep = fastpeft.report(model)
    if rep.fallback or not rep.fused:
        raise RuntimeError(f"fastpeft did not fuse every adapter layer; a benchmark would measure PEFT:\n{rep}")
    return model


def smoke_or_full(benchmark_disabled: bool) -> str:
    """The scale of a pytest run: FASTPEFT_BENCH_SCALE wins; otherwise smoke when timing is disabled."""
    return os.environ.get("FASTPEFT_BENCH_SCALE") or ("smoke" if benchmark_disabled else "full")


def parity_ok(diff: dict[str, float], dtype: torch.dtype = torch.float32) -> bool:
    """Whether a ``Bench.parity`` result is within the dtype's tolerance (the one table, fastpeft.testing), each
    difference relative to the largest magnitude of its quantity, as ``fastpeft.testing.assert_close`` judges."""
    from fastpeft.testing import tolerance

    tol = tolerance(dtype)
    return all(diff[k] <= tol.atol + tol.rtol * diff[f"{k}_scale"] for k in ("logits", "loss", "grads")
               if k in diff)

"""``python -m benchmarks.soft_prompt``: the prompt-tuning and P-tuning tables, measured now (also ``python -m
benchmarks.report --method prompt``, or ``ptuning-mlp`` / ``ptuning-lstm``: the three are measured together).

The soft-prompt issue's cases: B=8, T=64, P=20 virtual tokens, P-tuning's encoder hidden 512 (MLP or LSTM head),
on the harness's reference Llama. Seven runs side by side: the base model on P + T tokens (``input_ids`` of length
P + T: the floor of a [prompt | tokens] input), and PEFT eager and fastpeft for each of prompt tuning, P-tuning MLP
and P-tuning LSTM. Three workloads: an eval forward (no grad, all-ones mask, every position's logits), greedy
generate of 32 new tokens (the decode step inside it, and the whole call with its prefill, where the prompt is
built), and a train step (zero_grad, forward with labels, backward, AdamW). Counters (``benchmarks/harness.py``
module docstring): ops, with the ops beyond the base model's by name; the copies made before the model's forward
(PEFT's per-row ``repeat`` of the prompt, its mask and label concatenations) apart from the writes into the
``inputs_embeds`` the model receives; decode ops and copies, KV-cache bytes, greedy tokens; what the train step
saves for backward. Times: all seven runs round-robin in one measurement (``Bench.interleaved(runs=...)``), so the
ratios -- to the base model, to PEFT, and P-tuning's to prompt tuning's -- are medians of paired ratios.

Options: ``--scale smoke`` (a check of this script), ``--rounds`` (interleaved generate calls per run, default 5),
``--forward-steps`` (default 15), ``--train-steps`` (default 10), ``--threads`` (CPU threads, default 1).
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time

import torch

from benchmarks import harness
from benchmarks.harness import MiB

__all__ = ["METHODS", "WORKLOADS", "RUNS", "runs", "extra_ops", "measure", "render", "main"]

METHODS = tuple(m for m, spec in harness.METHODS.items() if spec.prompt_in_input)  # prompt, ptuning-mlp, -lstm
FORWARD, GENERATE, TRAIN = harness.SOFT_PROMPT_WORKLOADS
WORKLOADS = harness.SOFT_PROMPT_WORKLOADS
RUNS = ("base", *(f"{m}:{p}" for m in METHODS for p in ("peft", "fastpeft")))  # labels: "<method>:<provider>"
_NAMES = {"prompt": "prompt tuning", "ptuning-mlp": "P-tuning MLP", "ptuning-lstm": "P-tuning LSTM"}
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _split(label: str) -> tuple[str, str]:
    return (METHODS[0], "base") if label == "base" else tuple(label.split(":"))


def runs(bench: harness.Bench, w: str) -> dict[str, harness.Runner]:
    """The seven runners of a workload, by label (one base floor serves every soft-prompt method)."""
    wl = bench.workload(w)
    return {label: bench.runner(_split(label)[0], wl, _split(label)[1]) for label in RUNS}


def counters(bench: harness.Bench, w: str, label: str) -> dict:
    method, provider = _split(label)
    return bench.counters(method, w, provider)


def extra_ops(c: dict, base: dict) -> dict[str, int]:
    """Ops of a run beyond the base model's, by overload (negative: an op of the base's that the run does not make)."""
    d = collections.Counter(c["op_histogram"])
    d.subtract(base["op_histogram"])
    return {k: v for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])) if v}


def measure(bench: harness.Bench, rounds: int, forward_steps: int, train_steps: int) -> dict:
    """Parity, every counter and the interleaved times of the three workloads on ``bench``."""
    r: dict = {"counters": {}, "timing": {}, "parity": {}}
    log("parity: fastpeft vs PEFT per method (fp32 eval logits over P + T positions; train step: loss, gradients)")
    for m in METHODS:
        for w in (FORWARD, TRAIN):
            r["parity"][m, w] = bench.parity(m, w)
    r["parity_ok"] = all(harness.parity_ok(d) for d in r["parity"].values())
    if not r["parity_ok"]:
        log(f"PARITY FAILED: {r['parity']}")
    for w in WORKLOADS:
        for label in RUNS:
            log(f"counters: {w} {label}")
            r["counters"][w, label] = counters(bench, w, label)
        n, steps = {FORWARD: (1, forward_steps), GENERATE: (rounds, None), TRAIN: (1, train_steps)}[w]
        log(f"timing: {w}, {len(RUNS)} runs interleaved ({n} round(s))")
        r["timing"][w] = bench.interleaved(None, w, rounds=n, steps=steps, runs=runs(bench, w))
    return r


def ratios(t: harness.Timing) -> dict[str, float]:
    """The paired ratios of one interleaved measurement: each run to the base floor, fastpeft to PEFT, and
    P-tuning's runs to prompt tuning's of the same provider."""
    out = {f"{label}_over_base": t.ratio(label, "base") for label in RUNS[1:]}
    for m in METHODS:
        out[f"{m}:fastpeft_over_peft"] = t.ratio(f"{m}:fastpeft", f"{m}:peft")
        if m != METHODS[0]:
            for p in ("peft", "fastpeft"):
                out[f"{m}:{p}_over_prompt"] = t.ratio(f"{m}:{p}", f"{METHODS[0]}:{p}")
    return out


def _ratio(t: harness.Timing, p: str, q: str) -> str:
    lo, hi = t.spread(p, q)
    return f"{t.ratio(p, q):.3f}x ({lo:.2f}-{hi:.2f})"


def _bytes(v: float) -> str:
    return f"{v / MiB:.2f} MiB" if v >= MiB / 10 else f"{v / 1024:.1f} KiB" if v else "0"


def _more(v: float) -> str:
    return f"{v / MiB:+.2f} MiB"


def _copies(d: dict) -> str:
    return ", ".join(f"{k.removeprefix('aten.')} {_bytes(v)}" for k, v in sorted(d.items())) or "0"


def _table(rows: list[tuple[str, list[str]]]) -> list[str]:
    head = "| measurement | base, P+T tokens | " + " | ".join(
        f"{_NAMES[m]}, {'PEFT' if p == 'peft' else 'fastpeft'}" for m, p in map(_split, RUNS[1:])) + " |"
    return [head, "|" + "---|" * (len(RUNS) + 1)] + [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]


def _time_rows(t: harness.Timing, what: str, fmt) -> list[tuple[str, list[str]]]:
    def to_peft(label):
        m, p = _split(label)
        return _ratio(t, label, f"{m}:peft") if p == "fastpeft" else "1" if p == "peft" else ""

    def to_prompt(label):
        m, p = _split(label)
        return _ratio(t, label, f"{METHODS[0]}:{p}") if m != METHODS[0] and p != "base" else ""

    col = lambda f: [f(label) for label in RUNS]  # noqa: E731
    return [(f"{what} (median)", col(lambda x: fmt(t.median(x)))),
            (f"{what}: ratio to base", col(lambda x: "1" if x == "base" else _ratio(t, x, "base"))),
            (f"{what}: ratio to PEFT (same method)", col(to_peft)),
            (f"{what}: ratio to prompt tuning (same provider)", col(to_prompt))]


def _op_lines(c: dict, w: str) -> list[str]:
    base = c[w, "base"]
    out = []
    for label in RUNS[1:]:
        m, p = _split(label)
        d = extra_ops(c[w, label], base)
        out.append(f"- {_NAMES[m]}, {'PEFT' if p == 'peft' else 'fastpeft'}: "
                   + ", ".join(f"{v:+d} {k.removesuffix('.default')}" for k, v in d.items()))
    return out


def render(bench: harness.Bench, r: dict) -> str:
    import peft
    import transformers

    c, t, m = r["counters"], r["timing"], bench.scale.model
    wf, wg, wt = (bench.workload(w) for w in WORKLOADS)
    col = lambda w, f: [f(c[w, label]) for label in RUNS]  # noqa: E731
    ms = lambda v: f"{v * 1e3:.2f} ms"  # noqa: E731
    worst = {k: max(d[k] for (_, w), d in r["parity"].items() if k in d) for k in ("logits", "loss", "grads")}
    lines = [
        f"### fastpeft prompt tuning and P-tuning vs PEFT ({bench.scale.name} workload, measured "
        f"{time.strftime('%Y-%m-%d')})",
        "",
        f"Llama hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} KV), vocab {m['vocab_size']}, random "
        f"weights; P={wf.prefix} virtual tokens, B={wf.batch}, T={wf.seq}; P-tuning encoder hidden 512 (MLP: 3 "
        f"linears; LSTM: 2-layer biLSTM + 2 linears), PEFT's defaults otherwise. The base model runs on P + T = "
        f"{wf.seq + wf.prefix} tokens. Device {bench.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s)); torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}. Times: the seven runs round-robin in one measurement, medians; ratios are "
        f"medians of paired ratios (interquartile range in parentheses).",
        "",
        f"Parity, fastpeft vs PEFT (fp32, all three methods): max |logit diff| {worst['logits']:.2e}, train step "
        f"max |loss diff| {worst['loss']:.2e}, max |grad diff| {worst['grads']:.2e}: "
        f"{'within' if r['parity_ok'] else '**outside**'} the fp32 tolerance.",
        "",
        f"Eval forward ({len(t[FORWARD].times['base'])} steps per run)",
        "",
    ]
    base = c[FORWARD, "base"]
    rows = [
        ("ops per forward", col(FORWARD, lambda x: str(x["ops"]))),
        ("ops over the base model's", col(FORWARD, lambda x: f"{x['ops'] - base['ops']:+d}")),
        ("bytes touched (logical, every op's operands; over the base model's)",
         col(FORWARD, lambda x: f"{_bytes(x['bytes_touched'])} ({_more(x['bytes_touched'] - base['bytes_touched'])})")),
        ("copies before the model, besides its input (by op)", col(FORWARD, lambda x: _copies(x["input_copies"]))),
        ("writes into the model's input embeddings", col(FORWARD, lambda x: _copies(x["input_embeds_writes"]))),
        *_time_rows(t[FORWARD], "forward time", ms),
    ]
    lines += _table(rows) + ["", "Ops beyond the base model's, by name:"] + _op_lines(c, FORWARD)
    gb = c[GENERATE, "base"]
    rows = [
        ("prefill ops inside generate (model forward)",
         col(GENERATE, lambda x: f"{x['prefill_ops']} ({x['prefill_forward_ops']})")),
        ("decode-step ops inside generate (model forward)",
         col(GENERATE, lambda x: f"{x['decode_step_ops']} ({x['decode_forward_ops']})")),
        ("decode-step ops over the base model's",
         col(GENERATE, lambda x: f"{x['decode_step_ops'] - gb['decode_step_ops']:+d}")),
        ("bytes copied per decode step", col(GENERATE, lambda x: _bytes(x["copy_bytes_per_step"]))),
        ("KV-cache bytes after generate", col(GENERATE, lambda x: _bytes(x["kv_cache_bytes"]))),
        ("greedy tokens equal PEFT's", [""] + [
            ("yes" if c[GENERATE, label]["generated_sha1"] == c[GENERATE, f"{_split(label)[0]}:peft"]["generated_sha1"]
             else "**no**") if _split(label)[1] == "fastpeft" else "" for label in RUNS[1:]]),
        *_time_rows(t[GENERATE], "decode step time", ms),
        *_time_rows(harness.Timing(t[GENERATE].providers, times=t[GENERATE].calls), "generate call time", ms),
    ]
    lines += ["", f"Generate: {wg.seq}-token prompt (base: {wg.seq + wg.prefix}), {wg.new_tokens} greedy new tokens "
                  f"({len(t[GENERATE].calls['base'])} calls per run, {len(t[GENERATE].times['base'])} decode steps)",
              ""] + _table(rows) + ["", "Decode-step ops beyond the base model's, by name:"] + _op_lines(c, GENERATE)
    rows = [
        ("saved for backward", col(TRAIN, lambda x: _bytes(x["saved_bytes"]))),
        ("saved incl. views of the frozen weights", col(TRAIN, lambda x: _bytes(x["saved_bytes_incl_params"]))),
        ("ops per step (forward, backward, AdamW)", col(TRAIN, lambda x: str(x["ops"]))),
        ("copies before the model, besides its input (by op)", col(TRAIN, lambda x: _copies(x["input_copies"]))),
        *_time_rows(t[TRAIN], "train step time", lambda v: f"{v:.3f} s"),
    ]
    lines += ["", f"Train step B={wt.batch}, P={wt.prefix}, T={wt.seq} ({len(t[TRAIN].times['base'])} steps per run; "
                  f"the base model: frozen weights, gradient w.r.t. the input embeddings)", ""] + _table(rows)
    lines += ["", "Counter definitions: `benchmarks/harness.py`, `benchmarks/counters.py` and `benchmarks/generate.py` "
                  "module docstrings."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", choices=sorted(harness.SCALES))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved generate calls per run (default 5)")
    ap.add_argument("--forward-steps", type=int, default=None, help="timed eval forwards per run (default 15)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed train steps per run (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: FASTPEFT_BENCH_THREADS or 1)")
    args = ap.parse_args(argv)
    full = args.scale == "full"
    bench = harness.Bench(args.scale, threads=args.threads, log=log)
    log(f"device {bench.device}, scale {args.scale}")
    r = measure(bench, args.rounds or (5 if full else 1), args.forward_steps or (15 if full else 2),
                args.train_steps or (10 if full else 2))
    print(render(bench, r) + "\n", flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

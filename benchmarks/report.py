"""``python -m benchmarks.report``: the README table, measured now on the reference workload (no pytest).

Prints, per method, a markdown table of base model / PEFT / fastpeft side by side -- decode ops and bytes per token,
decode and prefill time ratios, host time per layer call, train-step saved bytes, ops and time at dropout 0 and
0.1, the fp32 copies of x a bf16 model saves -- and the figures derived from it, all from one run. Progress goes to
stderr. Every number is measured here.

Options: ``--method lora|ia3|prefix|prompt|ptuning-mlp|ptuning-lstm|all`` (default all), ``--scale smoke`` runs the
tiny model (a check of this script), ``--decode-rounds`` (for prefix and the soft prompts: interleaved generate calls
per provider), ``--train-steps``. The prefix tables are ``benchmarks/prefix.py``'s: generate-mode counters and
per-step decode times per (B, P). Prompt tuning and both P-tuning heads are measured together, once, in
``benchmarks/soft_prompt.py``'s tables (eval forward, generate, train step).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from benchmarks import harness
from benchmarks.harness import MiB

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _ratio(t: harness.Timing, p: str, q: str) -> str:
    """Median paired ratio with its interquartile range (the run's noise)."""
    lo, hi = t.spread(p, q)
    return f"{t.ratio(p, q):.3f}x (IQR {lo:.2f}-{hi:.2f})"


def _train_workloads(bench: harness.Bench, method: str) -> list[str]:
    return [w for w in ("train-p0", "train-p0.1") if w in bench.workloads(method)]


def measure(bench: harness.Bench, method: str, decode_rounds: int, train_steps: int) -> dict:
    """Every number of one method's report, measured on ``bench``."""
    r: dict = {"counters": {}, "timing": {}, "method": method}
    METHOD = method  # noqa: N806

    def counters(workload: str, providers=harness.PROVIDERS):
        for p in providers:
            log(f"counters: {workload} {p}")
            r["counters"][workload, p] = bench.counters(METHOD, workload, p)

    log("parity: fastpeft vs PEFT (fp32 prefill logits; train step at dropout 0: loss and gradients)")
    r["parity"] = {w: bench.parity(METHOD, w) for w in ("prefill", "train-p0")}
    r["parity_ok"] = all(harness.parity_ok(d) for d in r["parity"].values())
    if not r["parity_ok"]:
        log(f"PARITY FAILED: {r['parity']}; speed targets will be marked as not met")

    for w in ("decode-B1", "decode-B8"):
        counters(w)
        log(f"timing: {w}, {decode_rounds} rounds x {bench.scale.steps['decode']} tokens, providers interleaved")
        r["timing"][w] = bench.interleaved(METHOD, w, rounds=decode_rounds)
    counters("prefill")
    log("timing: prefill, providers interleaved")
    r["timing"]["prefill"] = bench.interleaved(METHOD, "prefill")

    for w in _train_workloads(bench, method):
        counters(w)
        log(f"timing: {w}, {train_steps} steps per provider, interleaved")
        r["timing"][w] = bench.interleaved(METHOD, w, rounds=1, steps=train_steps)
    if "train-bf16-p0.1" in bench.workloads(method):
        counters("train-bf16-p0.1", providers=("peft", "fastpeft"))
    log("host time per layer call at decode size (one layer, in = out = 64, M = 1)")
    from benchmarks.host import layer_host_us

    r["host_us"] = layer_host_us(method, bench.device)
    return r


def _findings(bench: harness.Bench, r: dict) -> list[str]:
    """Figures derived from the table's measurements, one sentence each."""
    c, t = r["counters"], r["timing"]
    out = []
    over = {w: (t[w].ratio("peft", "base") - 1, t[w].ratio("fastpeft", "base") - 1) for w in ("decode-B1", "decode-B8")}
    parts = [f"B={bench.workload(w).batch}: PEFT {po * 100:+.1f}%, fastpeft {fo * 100:+.1f}%"
             + (f" ({fo / po:.2f} of PEFT's)" if po > 0 else " (PEFT showed none: noise)")
             for w, (po, fo) in over.items()]
    out.append("Decode time over the base model, " + "; ".join(parts) + ".")
    if ("train-p0.1", "fastpeft") in c:
        f1, p0 = c["train-p0.1", "fastpeft"], c["train-p0", "peft"]
        extra = f1["saved_bytes"] - p0["saved_bytes"]
        scalars = f1["saved_scalar_bytes"] - p0["saved_scalar_bytes"]
        out.append(f"Saved for backward at dropout 0.1, fastpeft: {f1['saved_bytes'] / MiB:.2f} MiB, {extra:+d} B "
                   f"against PEFT's at dropout 0 ({scalars} B of it in 0-dim dropout seeds): no mask and no dropped "
                   f"copy of x are kept.")
    return out


def render(bench: harness.Bench, r: dict) -> str:
    c, t = r["counters"], r["timing"]
    import peft
    import transformers

    m, method = bench.scale.model, r["method"]
    adapter = ("LoRA r=16 alpha=32 on q,k,v,o,gate,up,down" if method == "lora" else
               "IA3 on k_proj, v_proj (output scaling) and down_proj (feed-forward, input scaling)")
    lines = [
        f"### fastpeft {method.upper() if method == 'ia3' else 'LoRA'} vs PEFT ({bench.scale.name} workload, "
        f"measured {time.strftime('%Y-%m-%d')})",
        "",
        f"Llama hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} KV), vocab {m['vocab_size']}; {adapter}. "
        f"Device {bench.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)); torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}. Providers run "
        f"round-robin in one run; times are per-provider medians, ratios the median of per-step paired ratios "
        f"with their interquartile range.",
        "",
    ]
    pp, pt = r["parity"]["prefill"], r["parity"]["train-p0"]
    lines += [f"Parity, fastpeft vs PEFT (fp32): max |logit diff| {pp['logits']:.2e} (logits up to "
              f"{pp['logits_scale']:.2f}); train step: |loss diff| {pt['loss']:.2e}, max |grad diff| "
              f"{pt['grads']:.2e} (grads up to {pt['grads_scale']:.2e}): "
              f"{'within' if r['parity_ok'] else '**outside** (the times below compare different results)'} the fp32 "
              f"tolerance of `fastpeft.testing`.", ""]

    def row(name, fmt, key_fn):
        vals = [key_fn(p) for p in harness.PROVIDERS]
        return f"| {name} | " + " | ".join(fmt(v) for v in vals) + " |"

    ms = lambda v: f"{v * 1e3:.2f} ms"  # noqa: E731
    lines += ["| measurement | base | PEFT | fastpeft |", "|---|---|---|---|"]
    lines.append(row("decode ops per token, model forward", str, lambda p: c["decode-B1", p]["ops"]))
    lines.append(row("decode ops per token inside generate()", str, lambda p: c["decode-B1", p]["generate_ops"]))
    lines.append(row("decode bytes touched per token, B=1", lambda v: f"{v / MiB:.1f} MiB",
                     lambda p: c["decode-B1", p]["bytes_touched"]))
    for w in ("decode-B1", "decode-B8"):
        b = bench.workload(w).batch
        lines.append(row(f"decode time per step, B={b}", ms, lambda p: t[w].median(p)))
        lines.append(row(f"decode time ratio to base, B={b}", lambda v: v,
                         lambda p: "1" if p == "base" else _ratio(t[w], p, "base")))
    hu = r["host_us"]
    lines.append(row("host time per layer call at decode size (one layer, in = out = 64, M = 1)",
                     lambda v: f"{v:.1f} us", lambda p: hu[p]))
    lines.append(row("the same, above the base layer (the adapter's host overhead)", lambda v: v,
                     lambda p: "0" if p == "base" else f"{hu[p] - hu['base']:.1f} us"))
    wp = bench.workload("prefill")
    lines.append(row(f"prefill time ratio to base, B={wp.batch} T={wp.seq}", lambda v: v,
                     lambda p: "1" if p == "base" else _ratio(t["prefill"], p, "base")))
    for w in _train_workloads(bench, method):
        wt = bench.workload(w)
        tag = f"train step B={wt.batch} T={wt.seq} dropout {wt.dropout:g}"
        lines.append(row(f"{tag}: saved for backward", lambda v: f"{v / MiB:.2f} MiB",
                         lambda p: c[w, p]["saved_bytes"]))
        lines.append(row(f"{tag}: saved incl. views of the frozen weights (mm saves `W.t()`)",
                         lambda v: f"{v / MiB:.2f} MiB", lambda p: c[w, p]["saved_bytes_incl_params"]))
        lines.append(row(f"{tag}: ops per step", str, lambda p: c[w, p]["ops"]))
        lines.append(row(f"{tag}: time", lambda v: f"{v:.3f} s", lambda p: t[w].median(p)))
        lines.append(row(f"{tag}: time ratio to PEFT", lambda v: v,
                         lambda p: "1" if p == "peft" else _ratio(t[w], p, "peft")))
    if ("train-bf16-p0.1", "fastpeft") in c:
        lines.append(f"| bf16 model, fp32 adapters: fp32 copies of x saved | n/a | "
                     f"{c['train-bf16-p0.1', 'peft']['saved_wide_x_bytes'] / MiB:.2f} MiB | "
                     f"{c['train-bf16-p0.1', 'fastpeft']['saved_wide_x_bytes'] / MiB:.2f} MiB |")
    lines += [""] + [f"- {line}" for line in _findings(bench, r)]
    lines += ["", "Counter definitions: `benchmarks/harness.py` module docstring."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="all", choices=["all", *harness.METHODS])
    ap.add_argument("--scale", default="full", choices=sorted(harness.SCALES))
    ap.add_argument("--decode-rounds", type=int, default=None, help="interleaved decode rounds (default: 5 full)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed train steps per provider (default: 10 full)")
    args = ap.parse_args(argv)
    full = args.scale == "full"
    bench = harness.Bench(args.scale, log=log)
    log(f"device {bench.device}, scale {args.scale}")
    methods = list(harness.METHODS) if args.method == "all" else [args.method]
    soft_done = False
    for method in methods:
        rounds, steps = args.decode_rounds or (5 if full else 1), args.train_steps or (10 if full else 2)
        if method == "prefix":
            from benchmarks import prefix

            print(prefix.render(bench, prefix.measure(bench, rounds, steps)) + "\n", flush=True)
            continue
        if harness.METHODS[method].prompt_in_input:
            from benchmarks import soft_prompt

            if not soft_done:
                r = soft_prompt.measure(bench, rounds, 15 if full else 2, steps)
                print(soft_prompt.render(bench, r) + "\n", flush=True)
            soft_done = True
            continue
        r = measure(bench, method, rounds, steps)
        print(render(bench, r) + "\n", flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks.prefix``: the prefix-tuning tables, measured now (also ``python -m benchmarks.report
--method prefix``).

Base model, PEFT eager prefix tuning and fastpeft side by side, one table per (B, P) of the generate workloads
(64-token prompt, 32 greedy new tokens on the full scale) and one for the train step (B=8, P=20, 64 tokens): the
counters of ``benchmarks/generate.py`` (prefix bytes held, bytes copied per decode step, KV-cache bytes after
generate, prefill and decode-step ops), what the train step saves for backward, and times from one run with the
providers interleaved: the decode step inside generate (median over every step of every round) and the train step
(forward, backward, AdamW), with their paired ratios to PEFT and to the base model. Every number is measured here.

Options: ``--scale smoke`` (a check of this script), ``--rounds`` (interleaved generate calls per provider,
default 5), ``--train-steps`` (default 10), ``--threads`` (CPU threads, default 1 as the harness).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from benchmarks import harness
from benchmarks.harness import MiB

__all__ = ["measure", "render", "main"]

METHOD = "prefix"
GENERATE = [w for w in harness.PREFIX_WORKLOADS if w.startswith("generate")]
TRAIN = "train-P20"
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def measure(bench: harness.Bench, rounds: int, train_steps: int) -> dict:
    """Parity, every counter and the interleaved times of the prefix workloads on ``bench``."""
    r: dict = {"counters": {}, "timing": {}}
    log("parity: fastpeft vs PEFT (fp32 logits over the B=32 P=64 prompt; train step: loss and prefix gradient)")
    r["parity"] = {w: bench.parity(METHOD, w) for w in ("generate-B32-P64", TRAIN)}
    r["parity_ok"] = all(harness.parity_ok(d) for d in r["parity"].values())
    if not r["parity_ok"]:
        log(f"PARITY FAILED: {r['parity']}")
    for w in [*GENERATE, TRAIN]:
        for p in harness.PROVIDERS:
            log(f"counters: {w} {p}")
            r["counters"][w, p] = bench.counters(METHOD, w, p)
        steps = train_steps if w == TRAIN else None
        n = rounds if w != TRAIN else 1
        log(f"timing: {w}, providers interleaved ({n} round(s))")
        r["timing"][w] = bench.interleaved(METHOD, w, rounds=n, steps=steps)
    return r


def _ratio(t: harness.Timing, p: str, q: str) -> str:
    lo, hi = t.spread(p, q)
    return f"{t.ratio(p, q):.3f}x (IQR {lo:.2f}-{hi:.2f})"


def _table(rows: list[tuple[str, list[str]]]) -> list[str]:
    out = ["| measurement | base | PEFT | fastpeft |", "|---|---|---|---|"]
    return out + [f"| {name} | " + " | ".join(vals) + " |" for name, vals in rows]


def _bytes(v: float) -> str:
    return f"{v / MiB:.2f} MiB" if v >= MiB / 10 else f"{v / 1024:.1f} KiB" if v else "0"


def render(bench: harness.Bench, r: dict) -> str:
    import peft
    import transformers

    c, t, m = r["counters"], r["timing"], bench.scale.model
    w0 = bench.workload(GENERATE[0])
    pg, pt = r["parity"]["generate-B32-P64"], r["parity"][TRAIN]
    lines = [
        f"### fastpeft prefix tuning vs PEFT ({bench.scale.name} workload, measured {time.strftime('%Y-%m-%d')})",
        "",
        f"Llama hidden {m['hidden_size']}, intermediate {m['intermediate_size']}, {m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} KV, head dim "
        f"{m['hidden_size'] // m['num_attention_heads']}), vocab {m['vocab_size']}, sdpa attention, random weights; "
        f"PrefixTuningConfig(num_virtual_tokens=P), no projection. Generate: {w0.seq}-token prompt, "
        f"{w0.new_tokens} greedy new tokens ({w0.new_tokens - 1} decode steps). Device {bench.device} "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)); torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}. Times: providers "
        f"round-robin in one run, per-provider medians, ratios the median of per-step paired ratios (IQR).",
        "",
        f"Parity, fastpeft vs PEFT (fp32): max |logit diff| {pg['logits']:.2e} (logits up to "
        f"{pg['logits_scale']:.2f}); train step |loss diff| {pt['loss']:.2e}, max |grad diff| {pt['grads']:.2e} (grads up to "
        f"{pt['grads_scale']:.2e}): {'within' if r['parity_ok'] else '**outside**'} the fp32 tolerance.",
    ]
    ms = lambda v: f"{v * 1e3:.2f} ms"  # noqa: E731
    for w in GENERATE:
        wl = bench.workload(w)
        cc = {p: c[w, p] for p in harness.PROVIDERS}
        col = lambda f: [f(p, cc[p]) for p in harness.PROVIDERS]  # noqa: E731
        same = cc["fastpeft"]["generated_sha1"] == cc["peft"]["generated_sha1"]
        rows = [
            ("prefix bytes held", col(lambda p, x: _bytes(x["prefix_bytes_held"]))),
            ("bytes copied per decode step (cat, copy_, clone, _to_copy...)",
             col(lambda p, x: _bytes(x["copy_bytes_per_step"]))),
            ("  of which aten.cat (cache update, generate's ids)",
             col(lambda p, x: _bytes(x["decode_copies"].get("aten.cat", 0) / x["decode_steps"]))),
            ("KV-cache bytes after generate", col(lambda p, x: _bytes(x["kv_cache_bytes"]))),
            ("prefill ops inside generate (model forward)",
             col(lambda p, x: f"{x['prefill_ops']} ({x['prefill_forward_ops']})")),
            ("decode-step ops inside generate (model forward)",
             col(lambda p, x: f"{x['decode_step_ops']} ({x['decode_forward_ops']})")),
            ("aten ops run inside fastpeft's op per decode step", col(lambda p, x: str(x["decode_inside_ops"]))),
            ("decode step time (median)", col(lambda p, x: ms(t[w].median(p)))),
            ("decode tokens/s", col(lambda p, x: f"{wl.batch / t[w].median(p):.0f}")),
            ("decode step ratio to base", col(lambda p, x: "1" if p == "base" else _ratio(t[w], p, "base"))),
            ("decode step ratio to PEFT", col(lambda p, x: "1" if p == "peft" else _ratio(t[w], p, "peft"))),
        ]
        lines += ["", f"B={wl.batch}, P={wl.prefix} ({len(t[w].times['base'])} decode steps per provider; greedy "
                      f"tokens {'equal to' if same else '**differ from**'} PEFT's)", ""] + _table(rows)
    wt = bench.workload(TRAIN)
    cc = {p: c[TRAIN, p] for p in harness.PROVIDERS}
    col = lambda f: [f(p, cc[p]) for p in harness.PROVIDERS]  # noqa: E731
    rows = [
        ("saved for backward", col(lambda p, x: _bytes(x["saved_bytes"]))),
        ("saved incl. views of the frozen weights", col(lambda p, x: _bytes(x["saved_bytes_incl_params"]))),
        ("ops per step", col(lambda p, x: str(x["ops"]))),
        ("train step time (median)", col(lambda p, x: f"{t[TRAIN].median(p):.3f} s")),
        ("train step ratio to base", col(lambda p, x: "1" if p == "base" else _ratio(t[TRAIN], p, "base"))),
        ("train step ratio to PEFT", col(lambda p, x: "1" if p == "peft" else _ratio(t[TRAIN], p, "peft"))),
    ]
    lines += ["", f"Train step B={wt.batch}, P={wt.prefix}, T={wt.seq} (zero_grad, forward with labels, backward, "
                  f"AdamW; {len(t[TRAIN].times['base'])} steps per provider; the base model: frozen weights, "
                  f"gradient w.r.t. the input embeddings)", ""] + _table(rows)
    lines += ["", "Counter definitions: `benchmarks/generate.py` and `benchmarks/harness.py` module docstrings."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="full", choices=sorted(harness.SCALES))
    ap.add_argument("--rounds", type=int, default=None, help="interleaved generate calls per provider (default 5)")
    ap.add_argument("--train-steps", type=int, default=None, help="timed train steps per provider (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: FASTPEFT_BENCH_THREADS or 1)")
    args = ap.parse_args(argv)
    full = args.scale == "full"
    bench = harness.Bench(args.scale, threads=args.threads, log=log)
    log(f"device {bench.device}, scale {args.scale}")
    r = measure(bench, args.rounds or (5 if full else 1), args.train_steps or (10 if full else 2))
    print(render(bench, r) + "\n", flush=True)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""fastpeft in about a minute: a small Llama built from its config, each adapter fastpeft fuses applied with PEFT,
then patched, checked for parity with PEFT, and timed and measured against it.

    python demo.py          # CPU (1 thread) or CUDA when available; progress on stderr, results on stdout

What it shows, per adapter:
- parity: max |logit diff|, loss and gradient differences at dropout 0, and greedy ``generate`` token equality;
- speed and memory against PEFT and the bare base model: decode time per token and ops per token, a train-step
  time at dropout 0.1, and the bytes autograd saves for backward.

The usage itself is two lines, ``model = get_peft_model(base, config)`` then ``fastpeft.patch(model)``; everything
else here is measurement, done by the benchmark harness (``benchmarks/harness.py``, which defines each counter).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
import torch

from benchmarks import harness
from benchmarks.harness import MiB, Workload

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Adapter:
    name: str
    method: str  # its key in harness.METHODS, which holds the PEFT config
    train: str  # the demo train workload: with dropout for the methods that have one


# One entry per adapter method that fastpeft fuses; prefix and prompt tuning join as entries here.
ADAPTERS = [Adapter("LoRA", "lora", "train-p0.1"), Adapter("IA3", "ia3", "train-p0")]

# The reference model with demo-sized workloads: a short decode, B=4 x T=128 train steps.
DEMO = harness.Scale(
    "demo", harness.REFERENCE_MODEL,
    workloads={w.name: w for w in (
        Workload("decode-B1", "decode", 1, 32),
        Workload("prefill", "prefill", 2, 64),  # parity of eval logits
        Workload("parity", "train", 2, 64),  # parity of loss and gradients (dropout 0)
        Workload("train-p0", "train", 4, 128),
        Workload("train-p0.1", "train", 4, 128, dropout=0.1),
    )},
    # 8 paired train steps: with 3, the median of per-step ratios and the ratio of the median times could disagree
    # in direction on a noisy machine; the rows print the ratio's IQR so a difference inside the noise shows as such.
    steps={"decode": 16, "prefill": 1, "train": 8}, rounds={"decode": 2, "prefill": 1, "train": 1},
    bench_rounds={"decode": 1, "prefill": 1, "train": 1},
)


def describe(config) -> str:
    """The PEFT config in one line: its type and the fields that differ from their defaults."""
    default = type(config)().to_dict()
    fields = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()
              if v != default.get(k) and k not in ("peft_type", "task_type")}
    return f"{type(config).__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(fields.items()))})"


def generate_equal(bench: harness.Bench, method: str, new_tokens: int = 16) -> tuple[bool, list[int]]:
    """Greedy generate from the same prompt with PEFT and with fastpeft: the same tokens?"""
    w = bench.workload("prefill")
    peft_model = bench.build(method, w, "peft")
    fast_model = bench.build(method, w, "fastpeft", peft_model=peft_model)
    prompt = torch.randint(3, peft_model.config.vocab_size, (w.batch, 16),
                           generator=torch.Generator().manual_seed(5)).to(bench.device)
    outs = []
    for m in (peft_model, fast_model):
        with torch.no_grad():
            outs.append(m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0)[:, prompt.shape[1]:])
    return bool(torch.equal(outs[0], outs[1])), outs[1][0].tolist()


def run_adapter(bench: harness.Bench, adapter: Adapter) -> list[str]:
    method = adapter.method
    import fastpeft

    log(f"{adapter.name}: building base, PEFT and fastpeft models")
    fast_model = bench.model(method, bench.workload("prefill"), "fastpeft")
    report = str(fastpeft.report(fast_model))

    log(f"{adapter.name}: parity (logits, loss, gradients, greedy generate)")
    logits = bench.parity(method, "prefill")
    train = bench.parity(method, "parity")
    same_tokens, tokens = generate_equal(bench, method)

    log(f"{adapter.name}: decode, B=1, providers interleaved")
    dec = {p: bench.counters(method, "decode-B1", p) for p in harness.PROVIDERS}
    dt = bench.interleaved(method, "decode-B1")
    wt = bench.workload(adapter.train)
    log(f"{adapter.name}: train step B={wt.batch} T={wt.seq}: counters")
    tr = {p: bench.counters(method, wt, p) for p in harness.PROVIDERS}
    log(f"{adapter.name}: train step, {bench.scale.steps['train']} steps per provider, interleaved")
    tt = bench.interleaved(method, wt)

    config = describe(harness.METHODS[method].config(wt))
    lines = [f"## {adapter.name}", "", f"`{config}`", "", "```", report, "```", "",
             f"Parity with PEFT (fp32): max |logit diff| {logits['logits']:.2e} (logits up to "
             f"{logits['logits_scale']:.2f}); train step at dropout 0: |loss diff| {train['loss']:.2e}, max |grad "
             f"diff| {train['grads']:.2e} (grads up to {train['grads_scale']:.2e}); greedy generate, 16 tokens: "
             f"{'identical' if same_tokens else 'DIFFERENT'} ({tokens[:8]}...).", "",
             "| | base model | PEFT | fastpeft | fastpeft vs PEFT |", "|---|---|---|---|---|"]

    def paired(t: harness.Timing, p: str, q: str) -> str:
        """Median of the paired per-step ratios t_p / t_q, with their IQR, from the same steps as the medians.
        "within noise" where the IQR spans 1 or the ratio and the medians' quotient point different ways."""
        lo, hi = t.spread(p, q)
        r = t.ratio(p, q)
        noise = "; within noise" if lo <= 1.0 <= hi or (r < 1) != (t.median(p) < t.median(q)) else ""
        return f"{r:.2f}x (IQR {lo:.2f}-{hi:.2f}, {len(t.ratios(p, q))} paired steps{noise})"

    def row(name, values, versus):
        return f"| {name} | " + " | ".join(values) + f" | {versus} |"

    lines.append(row("decode ops per token (model forward / inside generate)",
                     [f"{dec[p]['ops']} / {dec[p]['generate_ops']}" for p in harness.PROVIDERS],
                     f"{dec['fastpeft']['ops'] - dec['peft']['ops']:+d} ops"))
    lines.append(row("decode time per token, B=1", [f"{dt.median(p) * 1e3:.2f} ms" for p in harness.PROVIDERS],
                     paired(dt, "fastpeft", "peft")))
    lines.append(row("decode time over the base model", ["1"] + [f"{dt.ratio(p, 'base'):.3f}x" for p in
                                                                ("peft", "fastpeft")], ""))
    dropout = f", dropout {wt.dropout:g}" if wt.dropout else ""
    lines.append(row(f"train step time (B={wt.batch}, T={wt.seq}{dropout})",
                     [f"{tt.median(p):.3f} s" for p in harness.PROVIDERS], paired(tt, "fastpeft", "peft")))
    lines.append(row("train step: saved for backward", [f"{tr[p]['saved_bytes'] / MiB:.1f} MiB" for p in
                                                        harness.PROVIDERS],
                     f"{(tr['fastpeft']['saved_bytes'] - tr['peft']['saved_bytes']) / MiB:+.1f} MiB"))
    lines.append(row("train step: ops", [str(tr[p]["ops"]) for p in harness.PROVIDERS],
                     f"{tr['fastpeft']['ops'] - tr['peft']['ops']:+d} ops"))
    lines += ["", "The base model column is the floor: no adapters (its train step is the frozen model's backward "
              "to the input embeddings). Providers run interleaved, one step each in turn; times are per-provider "
              "medians, ratios the median of the per-step ratios of the same steps, with their interquartile range."]
    return lines


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    bench = harness.Bench(DEMO, log=log)
    log(f"fastpeft demo on {bench.device}; model: Llama {harness.REFERENCE_MODEL}")
    out = []
    for adapter in ADAPTERS:
        out += run_adapter(bench, adapter) + [""]
    log("done")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

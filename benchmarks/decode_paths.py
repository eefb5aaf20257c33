"""``python -m benchmarks.decode_paths [lora|ia3] [B]``: where LoRA / IA3 decode time goes, on the reference model.

A diagnostic, not a provider: the fused model is timed with its layer op swapped for stand-ins, interleaved round
by round with the base model and PEFT, and reported as median ratios to the base model:
- ``fastpeft``: the fused op as shipped (in eager, the op's implementation called directly: ``direct_call``);
- ``dispatched``: the same op forced through the registered custom op (the boxed dispatcher round trip);
- ``inline-aten`` (LoRA): the four aten calls the op's CPU path makes at decode (three ``F.linear``, one ``add_``)
  called inline, with no checks and no op around them: the floor of exact LoRA math with torch's CPU matmuls;
- ``base-linear-only``: the patched layer's forward calling ``F.linear`` alone (no adapter math at all): what the
  patched forward's Python and reading PEFT's state cost.
The gap dispatched - fastpeft is the dispatcher round trip; fastpeft - inline-aten is the op's Python (checks,
backend choice).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import harness
from fastpeft.ops.ia3 import _ia3_linear_op
from fastpeft.ops.linear import _lora_linear_op


def _inline_aten(x, weight, bias, a, b, lora_bias, residual, scaling, p, seed, weight_t, backend):
    if bias is not None or lora_bias is not None or residual is not None or p or weight_t:
        raise NotImplementedError("the inline stand-in covers the reference workload's layers only")
    return F.linear(x, weight).add_(F.linear(F.linear(x, a), b), alpha=scaling)


def _dispatched_lora(x, weight, bias, a, b, lora_bias, residual, scaling, p, seed, weight_t, backend):
    return _lora_linear_op(x, weight, bias, a, b, lora_bias, residual, scaling, p, seed, weight_t, False, backend)[0]


def _dispatched_ia3(x, weight, bias, scale, scale_input, weight_t, save_base, backend):
    return _ia3_linear_op(x, weight, bias, scale, scale_input, weight_t, save_base, backend)[0]


def _linear_only(x, weight, bias, *args):
    return F.linear(x, weight, bias)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    method = argv[0] if argv else "lora"
    batch = int(argv[1]) if len(argv) > 1 else 1
    rounds, steps = 15, 16
    import fastpeft.ia3
    import fastpeft.lora

    module, attr = (fastpeft.lora, "lora_linear") if method == "lora" else (fastpeft.ia3, "ia3_linear")
    shipped = getattr(module, attr)
    variants = {"fastpeft": shipped, "dispatched": _dispatched_lora if method == "lora" else _dispatched_ia3,
                "base-linear-only": _linear_only}
    if method == "lora":
        variants["inline-aten"] = _inline_aten
    bench = harness.Bench("full")
    w = bench.workload(f"decode-B{batch}")
    runners = {p: bench.runner(method, w, p) for p in harness.PROVIDERS}
    states = {p: r.prepare() for p, r in runners.items()}
    names = ["base", "peft", *variants]
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for _ in range(rounds):
            for n in names:
                provider = n if n in ("base", "peft") else "fastpeft"
                setattr(module, attr, variants.get(n, shipped))
                run = runners[provider]
                if states[provider].i > 200:  # keep the KV cache short: every variant decodes at similar lengths
                    states[provider] = run.prepare()
                t0 = time.perf_counter()
                for _ in range(steps):
                    run.step(states[provider])
                times[n].append((time.perf_counter() - t0) / steps)
    finally:
        setattr(module, attr, shipped)
    print(f"{method} decode B={batch}, {rounds} rounds x {steps} tokens, {torch.get_num_threads()} thread(s)")
    for n in names:
        ratio = statistics.median(t / b for t, b in zip(times[n], times["base"]))
        print(f"  {n:17s} {statistics.median(times[n]) * 1e3:7.3f} ms/token   {ratio:.3f}x base")
    return 0


if __name__ == "__main__":
    sys.exit(main())

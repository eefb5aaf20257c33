"""``python -m benchmarks.decode_paths [lora|ia3] [B]``: where LoRA / IA3 decode time goes, on the reference model.

A diagnostic, not a provider: the fused model is timed with its layer op swapped for stand-ins, interleaved round
by round with the base model and PEFT, and reported as median ratios to the base model:
- ``fastpeft``: the fused op as shipped;
- ``inline-aten`` (LoRA): the same three aten calls the op's CPU path makes (``mm``, ``mm``, ``addmm_``) called
  inline, with no custom op around them: the floor of exact LoRA math with torch's CPU matmuls;
- ``op-impl-direct`` (LoRA): the op's own CPU implementation called as a Python function, without the
  dispatcher round trip (what a direct-call fast path for eager CPU would cost);
- ``base-linear-only``: the patched layer's forward calling ``F.linear`` alone (no adapter math at all): what the
  patched forward's Python and reading PEFT's state cost.
The gap fastpeft - op-impl-direct is the dispatcher round trip; op-impl-direct - inline-aten is the op's Python
implementation (checks, reshapes).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import harness


def _inline_aten(x, weight, bias, a, b, lora_bias, residual, scaling, p, seed, weight_t, backend):
    if bias is not None or lora_bias is not None or residual is not None or p or weight_t:
        raise NotImplementedError("the inline stand-in covers the reference workload's layers only")
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(x2, weight.t()).addmm_(torch.mm(x2, a.t()), b.t(), alpha=scaling)
    return y.view(*x.shape[:-1], -1)


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
    variants = {"fastpeft": shipped, "base-linear-only": _linear_only}
    if method == "lora":
        from fastpeft.ops.linear import _lora_linear_impl

        variants["inline-aten"] = _inline_aten
        variants["op-impl-direct"] = lambda *a: _lora_linear_impl(*a[:11], False, a[11])[0]
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

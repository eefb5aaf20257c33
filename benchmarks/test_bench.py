"""Every registered adapter method on the shared harness: each workload x provider timed by pytest-benchmark with
its counters in ``extra_info``; one interleaved (round-robin) measurement per workload for the ratios; and
assertions on the deterministic counters, which hold at every scale (so the ``--benchmark-disable`` smoke run
checks them too). A new method registers itself in ``harness.METHODS`` and adds its own claims below.
"""

import pytest
import torch

from benchmarks import harness, soft_prompt

METHODS = list(harness.METHODS)
WORKLOADS = list(harness.SCALES["full"].workloads)  # the same names at every scale: stable test ids


def _workload(bench: harness.Bench, method: str, name: str) -> harness.Workload:
    if name not in bench.workloads(method):
        pytest.skip(f"{method} does not run workload {name}")
    return bench.workload(name)


def _counters(bench: harness.Bench, method: str, name: str, provider: str) -> dict:
    _workload(bench, method, name)
    try:
        return bench.counters(method, name, provider)
    except harness.ProviderUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("provider", harness.PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("method", METHODS)
def test_step(benchmark, bench, method, workload, provider):
    """One provider's step timed alone (comparable across commits with ``--benchmark-compare``), its counters in
    ``extra_info``. Providers run one after another here, so for ratios read ``test_interleaved``."""
    w = _workload(bench, method, workload)
    if provider == "base" and method in soft_prompt.METHODS[1:]:
        pytest.skip(f"the base floor on P + T tokens is one runner for every soft-prompt method: timed under "
                    f"{soft_prompt.METHODS[0]}")
    counters = _counters(bench, method, workload, provider)
    benchmark.group = f"{method} {workload}"
    benchmark.extra_info.update(counters)
    run = bench.runner(method, w, provider)
    benchmark.pedantic(bench.timed_step(run), args=(run.prepare(),), rounds=bench.scale.bench_rounds[w.mode],
                       warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["tokens_per_s"] = w.tokens_per_step / benchmark.stats.stats.median
    assert counters["ops"] > 0 and counters["bytes_touched"] > 0
    if w.mode == "train":
        assert counters["saved_bytes"] > 0
    if provider == "fastpeft":
        assert counters["fused_layers"] > 0 and counters["fallback_layers"] == 0


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("method", METHODS)
def test_interleaved(benchmark, bench, method, workload):
    """All providers round-robin in one measurement: the ratios (``*_over_base``, ``*_over_peft``) are medians of
    per-step paired ratios. ``benchmark``'s own time is one round of every provider's steps."""
    w = _workload(bench, method, workload)
    if method in soft_prompt.METHODS:
        pytest.skip("soft-prompt methods are interleaved together: test_soft_prompt_interleaved")
    _counters(bench, method, workload, "fastpeft")  # skips where fastpeft cannot run
    timing = harness.Timing(harness.PROVIDERS)
    benchmark.group = f"{method} {workload} interleaved"
    benchmark.pedantic(bench.interleaved_round, args=(method, w, timing), rounds=bench.scale.rounds[w.mode])
    summary = timing.summary(w.tokens_per_sample)
    benchmark.extra_info.update(summary, mode=w.mode, scale=bench.scale.name, device=bench.device)
    assert all(t > 0 for ts in timing.times.values() for t in ts)


@pytest.mark.parametrize("workload", ["decode-B1", "decode-B8"])
@pytest.mark.parametrize("method", METHODS)
def test_decode_ops_equal_base(bench, method, workload):
    """Fused decode dispatches exactly the base model's ops: one fused op replaces each base linear."""
    base, peft, fast = (_counters(bench, method, workload, p) for p in harness.PROVIDERS)
    assert fast["ops"] == base["ops"], (fast["op_histogram"], base["op_histogram"])
    assert fast["generate_ops"] == base["generate_ops"]
    assert peft["ops"] > base["ops"] and peft["generate_ops"] > base["generate_ops"]


def test_lora_dropout_saves_no_mask(bench):
    """With dropout, fastpeft saves no more than PEFT without dropout (the mask is regenerated from a seed), apart
    from the 0-dim seeds themselves; and never more than PEFT at the same dropout."""
    peft0 = _counters(bench, "lora", "train-p0", "peft")
    peft1, fast1 = _counters(bench, "lora", "train-p0.1", "peft"), _counters(bench, "lora", "train-p0.1", "fastpeft")
    assert peft1["saved_bytes"] > peft0["saved_bytes"]  # PEFT's dropout keeps a mask and a dropped copy of x
    assert fast1["saved_bytes"] - fast1["saved_scalar_bytes"] <= peft0["saved_bytes"] - peft0["saved_scalar_bytes"]
    assert fast1["saved_bytes"] <= peft1["saved_bytes"]


def test_lora_bf16_saves_no_fp32_x(bench):
    """bf16 model, fp32 adapters (PEFT's default upcast): PEFT saves an fp32 copy of x per layer, fastpeft none."""
    peft, fast = (_counters(bench, "lora", "train-bf16-p0.1", p) for p in ("peft", "fastpeft"))
    assert peft["saved_wide_x_bytes"] > 0  # the counter sees the copy where it exists
    assert fast["saved_wide_x_bytes"] == 0


@pytest.mark.parametrize("workload", ["train-p0", "train-bf16-p0.1"])
def test_ia3_saves_no_more_than_peft(bench, workload):
    """IA3: what the fused op keeps for backward (x for input scaling; y or the base for output scaling) is never
    more than PEFT's saved base output and x."""
    peft, fast = (_counters(bench, "ia3", workload, p) for p in ("peft", "fastpeft"))
    assert fast["saved_bytes"] <= peft["saved_bytes"]


@pytest.mark.parametrize("workload", ["prefill", "train-p0", "generate-B32-P64", "train-P20", "forward-B8-P20"])
@pytest.mark.parametrize("method", METHODS)
def test_parity(bench, method, workload):
    """Speedups are only meaningful where results match: fastpeft against PEFT on the benchmarked model, fp32."""
    _counters(bench, method, workload, "fastpeft")
    diff = bench.parity(method, workload)
    assert harness.parity_ok(diff, bench.workload(workload).dtype), diff


@pytest.mark.parametrize("method", METHODS)
def test_host_time_per_layer(benchmark, bench, method):
    """Host time of one layer call at decode size per provider (``benchmarks/host.py``), in ``extra_info``: what
    bounds eager decode on a GPU. Recorded, not asserted (timings are the benchmark's, not a test's)."""
    from benchmarks.host import LAYER_METHODS, layer_host_us

    if method not in LAYER_METHODS:
        pytest.skip(f"{method} adapts no layer")
    benchmark.group = f"{method} host time per layer"
    smoke = bench.scale.name != "full"
    us = benchmark.pedantic(layer_host_us, args=(method, bench.device), kwargs=dict(
        rounds=1 if smoke else 9, calls=20 if smoke else 2000), rounds=1)
    benchmark.extra_info.update({f"{p}_us": v for p, v in us.items()})
    assert all(v > 0 for v in us.values())


# Prefix tuning: the generate-mode counters of benchmarks/generate.py, on every (B, P) case

PREFIX_GENERATE = [w for w in harness.PREFIX_WORKLOADS if w.startswith("generate")]


def _prefix(bench, workload) -> tuple[dict, dict, dict]:
    return tuple(_counters(bench, "prefix", workload, p) for p in harness.PROVIDERS)


@pytest.mark.parametrize("workload", PREFIX_GENERATE)
def test_prefix_held_once(bench, workload):
    """fastpeft holds one copy of the prefix (a [Hkv, P, D] key and value per layer, no broadcast view), PEFT one
    per batch row; the base model none."""
    base, peft, fast = _prefix(bench, workload)
    assert base["prefix_bytes_held"] == 0 and fast["prefix_bytes_held"] > 0
    assert fast["prefix_bytes_held"] == fast["prefix_tensor_bytes"]
    assert peft["prefix_bytes_held"] == bench.workload(workload).batch * fast["prefix_bytes_held"]


@pytest.mark.parametrize("workload", PREFIX_GENERATE)
def test_prefix_cache_holds_real_tokens_only(bench, workload):
    """After generate, fastpeft's KV cache is the base model's; PEFT's holds its prefix copies besides."""
    base, peft, fast = _prefix(bench, workload)
    assert fast["kv_cache_bytes"] == base["kv_cache_bytes"]
    assert peft["kv_cache_bytes"] == base["kv_cache_bytes"] + peft["prefix_bytes_held"]


@pytest.mark.parametrize("workload", PREFIX_GENERATE)
def test_prefix_decode_copies_equal_base(bench, workload):
    """A decode step of fastpeft copies what the base model's does (its cache update for the real tokens, op by
    op, fastpeft's op inside included): nothing for the prefix. PEFT's cache update copies its prefix every step."""
    base, peft, fast = _prefix(bench, workload)
    assert fast["decode_copies"] == base["decode_copies"]
    assert peft["decode_copy_bytes"] >= base["decode_copy_bytes"] + peft["decode_steps"] * peft["prefix_bytes_held"]


@pytest.mark.parametrize("workload", PREFIX_GENERATE)
def test_prefix_decode_ops(bench, workload):
    """Inside the model's forward a fastpeft decode step dispatches the base model's ops (one fastpeft op for each
    sdpa call); the whole step and the prefill never more than PEFT's."""
    base, peft, fast = _prefix(bench, workload)
    assert fast["decode_forward_ops"] == base["decode_forward_ops"]
    assert fast["decode_step_ops"] <= peft["decode_step_ops"] and fast["prefill_ops"] <= peft["prefill_ops"]


@pytest.mark.parametrize("workload", PREFIX_GENERATE)
def test_prefix_generates_peft_tokens(bench, workload):
    """Greedy generate: fastpeft's tokens are PEFT's."""
    _, peft, fast = _prefix(bench, workload)
    assert fast["generated_sha1"] == peft["generated_sha1"]


def test_prefix_saves_no_more_than_peft(bench):
    """Train step: what fastpeft keeps for backward (q, k, v, the one prefix copy, O and lse per layer) is no more
    than PEFT's (its B prefix copies inside the concatenated keys and values, the probabilities)."""
    _, peft, fast = _prefix(bench, "train-P20")
    assert fast["saved_bytes"] <= peft["saved_bytes"]


# Prompt tuning and P-tuning: the soft-prompt issue's B=8, T=64, P=20 (encoder hidden 512); the base floor runs on
# P + T tokens. Counters asserted, times recorded (benchmarks/soft_prompt.py prints the tables).

SOFT, (FORWARD, GENERATE, TRAIN) = soft_prompt.METHODS, soft_prompt.WORKLOADS


def _soft(bench, method, workload) -> tuple[dict, dict, dict]:
    return tuple(_counters(bench, method, workload, p) for p in harness.PROVIDERS)


def _prompt_bytes(bench, workload) -> int:
    """One [P, D] prompt in the model dtype."""
    w = bench.workload(workload)
    return w.prefix * bench.scale.model["hidden_size"] * torch.empty((), dtype=w.dtype).element_size()


@pytest.mark.parametrize("method", SOFT)
def test_soft_prompt_forward_ops(bench, method):
    """Eval forward: fastpeft runs the base model's ops on P + T tokens with its embedding lookup replaced by the
    one soft-prompt op, plus the mask's pad (prompt tuning: base + 1, within the issue's + 2); P-tuning adds its
    encoder's ops at batch 1, exactly the ones PEFT's forward adds (on CPU the encoder is not reused across
    forwards, see test_soft_prompt_encoder_runs_once). Always fewer than PEFT's (its repeat, ones and two cats)."""
    base, peft, fast = _soft(bench, method, FORWARD)
    extra = soft_prompt.extra_ops(fast, base)
    assert extra.get("fastpeft.soft_prompt_embed.default") == 1
    prompt = _counters(bench, SOFT[0], FORWARD, "fastpeft")
    peft_prompt = _counters(bench, SOFT[0], FORWARD, "peft")
    assert prompt["ops"] <= base["ops"] + 2, soft_prompt.extra_ops(prompt, base)
    # the encoder as PEFT runs it; + 1: fastpeft's prompt tuning reads the table as a view (no lookup op), while
    # both P-tunings look their input embedding up
    assert fast["ops"] - prompt["ops"] == peft["ops"] - peft_prompt["ops"] + (method != SOFT[0]), extra
    assert fast["ops"] < peft["ops"]


def test_soft_prompt_encoder_runs_once(bench):
    """Eval forward on CPU: the encoder runs once at batch 1 (fastpeft reuses it across forwards only on CUDA:
    on CPU an exact validity check costs what the encoder does, fastpeft/soft_prompt.py); fastpeft's forward
    dispatches fewer ops than PEFT's for every method (no repeat, no ones + cat), the encoders' own ops included."""
    for method in SOFT:
        fast, peft = (_counters(bench, method, FORWARD, who) for who in ("fastpeft", "peft"))
        assert fast["ops"] < peft["ops"], method
        assert "aten.repeat.default" not in fast["op_histogram"]


@pytest.mark.parametrize("method", SOFT)
def test_soft_prompt_no_row_copies(bench, method):
    """Eval forward: fastpeft writes every byte of the model's input embeddings once (the prompt's rows of it
    included), with no per-row prompt copy; PEFT's ``repeat`` writes one prompt per row (B x P x D) before its
    ``cat`` writes the input."""
    base, peft, fast = _soft(bench, method, FORWARD)
    prompt = _prompt_bytes(bench, FORWARD)
    assert sum(fast["input_embeds_writes"].values()) == fast["input_embeds_bytes"] > 0
    assert "aten.repeat" not in fast["input_copies"]
    assert fast["input_copy_bytes"] < peft["input_copy_bytes"]  # the LSTM's own cat/stack run in both
    assert peft["input_copies"]["aten.repeat"] == bench.workload(FORWARD).batch * prompt


@pytest.mark.parametrize("method", SOFT)
def test_soft_prompt_decode(bench, method):
    """Generate: a decode step of fastpeft dispatches at most 2 ops more than the base model's on P + T tokens
    (positions recomputed: PEFT drops ``position_ids``), no more than PEFT's, and copies what PEFT's does; the
    prefill no more ops than PEFT's; the KV cache is the base model's (P + T positions)."""
    base, peft, fast = _soft(bench, method, GENERATE)
    assert fast["decode_step_ops"] <= base["decode_step_ops"] + 2, soft_prompt.extra_ops(fast, base)
    assert fast["decode_step_ops"] <= peft["decode_step_ops"] and fast["prefill_ops"] <= peft["prefill_ops"]
    assert fast["decode_copies"] == peft["decode_copies"]
    assert fast["kv_cache_bytes"] == base["kv_cache_bytes"] == peft["kv_cache_bytes"]


@pytest.mark.parametrize("method", SOFT)
def test_soft_prompt_generates_peft_tokens(bench, method):
    """Greedy generate: fastpeft's tokens are PEFT's (transformers 5.23: PEFT injects the prompt at prefill only)."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("5.24"):
        pytest.skip("PEFT 0.21.2 re-injects the prompt at every decode step on transformers 5.24 (notes §3.2)")
    _, peft, fast = _soft(bench, method, GENERATE)
    assert fast["generated_sha1"] == peft["generated_sha1"]


@pytest.mark.parametrize("method", SOFT)
def test_soft_prompt_train(bench, method):
    """Train step: fastpeft saves no more for backward than PEFT, makes no per-row copy of the prompt, and
    dispatches fewer ops."""
    _, peft, fast = _soft(bench, method, TRAIN)
    assert fast["saved_bytes"] <= peft["saved_bytes"]
    assert "aten.repeat" not in fast["input_copies"] and "aten.repeat" in peft["input_copies"]
    assert fast["ops"] < peft["ops"]


@pytest.mark.parametrize("workload", soft_prompt.WORKLOADS)
def test_soft_prompt_interleaved(benchmark, bench, workload):
    """The base floor and PEFT and fastpeft for each soft-prompt method, all round-robin in one measurement: the
    paired ratios (``soft_prompt.ratios``: to base, fastpeft to PEFT, P-tuning to prompt tuning) in ``extra_info``.
    Recorded, not asserted."""
    w = bench.workload(workload)
    for m in SOFT:
        _counters(bench, m, workload, "fastpeft")  # skips where fastpeft cannot run
    runs = soft_prompt.runs(bench, workload)
    timing = harness.Timing(tuple(runs))
    benchmark.group = f"soft prompts {workload} interleaved"
    benchmark.pedantic(bench.interleaved_round, args=(None, w, timing), kwargs=dict(runs=runs),
                       rounds=bench.scale.rounds[w.mode])
    benchmark.extra_info.update({f"{k}_median_s": timing.median(k) for k in runs}, mode=w.mode,
                                scale=bench.scale.name, device=bench.device, **soft_prompt.ratios(timing))
    if w.mode == "generate":
        calls = harness.Timing(timing.providers, times=timing.calls)
        benchmark.extra_info.update({f"call:{k}": v for k, v in soft_prompt.ratios(calls).items()})
    assert all(t > 0 for ts in timing.times.values() for t in ts)

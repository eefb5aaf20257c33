"""The cost model (benchmarks/cost_model.py) reads fastpeft's plans, does its arithmetic right, and the issue's
targets hold on it, except the forward target on the rows where the design's own floor misses it (a strict xfail
keeps them visible)."""

import pytest
import torch

from benchmarks import cost_model as cm
from fastpeft.kernels._common import CostStep
from fastpeft.kernels.lora import decode_cost_steps
from fastpeft.kernels.lora_split import split_cost_steps

ROWS = [r for gpu in cm.GPUS for r in cm.rows(gpu)]
TARGETS = cm.targets(ROWS)


def test_roofline_arithmetic():
    gpu = dict(bf16=1e12, tf32=5e11, fp32=1e11, hbm=1e9, l2=2e9)
    assert cm.step_us(CostStep("x", "triton", 2_000_000, "bf16", 3, 1000, 0), gpu) == pytest.approx(6.0)
    assert cm.step_us(CostStep("x", "triton", 10, "tf32", 1, 5000, 0), gpu) == pytest.approx(5.0)
    assert cm.step_us(CostStep("x", "triton", 0, "none", 1, 1000, 8000), gpu) == pytest.approx(4.0)


def test_model_reads_the_plans():
    bf16, f32 = torch.bfloat16, torch.float32
    split = split_cost_steps(4096, 4096, 4096, 16, bf16, f32, 0.1, train=True)
    assert cm.fastpeft_steps(4096, 4096, 4096, 16, f32, 0.1, train=True) == split
    assert "cublas_addmm" in [s.name for s in split]
    assert [s.name for s in cm.fastpeft_steps(8, 4096, 4096, 16, bf16, 0.0)] == ["lora_fwd_decode"]
    assert cm.fastpeft_steps(8, 4096, 4096, 16, bf16, 0.0) == decode_cost_steps(8, 4096, 4096, 16, bf16, bf16)
    row = next(r for r in ROWS if (r["gpu"], r["N"], r["r"], r["M"], r["adapters"], r["p"], r["step"]) ==
               ("H100", 4096, 16, 4096, "fp32", 0.1, "train"))
    assert row["dram"]["fastpeft"] == sum(s.dram_bytes for s in split)


def test_never_above_peft():
    fails = [(t["row"], round(t["value"], 3)) for t in TARGETS if t["target"] == "<= PEFT" and not t["ok"]]
    assert not fails, fails


FORWARD = [t for t in TARGETS if t["target"] == "M>=4096 forward <= 1.15x base"]


def test_forward_misses_only_where_the_design_floor_does():
    """The 1.15x forward target fails on the model exactly where ``split_floor_us`` (the base GEMM plus the bytes any
    plan around a whole cuBLAS GEMM must move) is itself above 1.15x, and those rows sit at that floor: the tiles'
    re-reads and MMAs are hidden under the compulsory bytes."""
    fails = {t["row"] for t in FORWARD if not t["ok"]}
    assert fails == {t["row"] for t in FORWARD if t["floor"] > 1.15}
    for t in FORWARD:
        if t["row"].startswith("H100") or not t["ok"]:
            assert t["value"] == pytest.approx(t["floor"], rel=1e-3), t


@pytest.mark.xfail(strict=True, reason="H100 N = K = 4096, r = 64, fp32 adapters: the design floor is 1.153x "
                                       "(benchmarks/cost_model.py docstring)")
def test_forward_target_everywhere():
    fails = [(t["row"], round(t["value"], 3)) for t in FORWARD if not t["ok"]]
    assert not fails, fails


def test_decode_bytes_target():
    fails = [t for t in TARGETS if t["target"] == "decode bytes <= 1.1x base" and not t["ok"]]
    assert not fails, fails


def test_markdown_and_json(tmp_path):
    cm.main(["--markdown", str(tmp_path / "m.md"), "--json", str(tmp_path / "m.json")])
    text = (tmp_path / "m.md").read_text()
    assert "### H100" in text and "### A100" in text and "Targets on the model" in text

"""``python -m benchmarks.gpu_check --dry-run``: the first-GPU check runs every section at tiny shapes on CPU under
Triton's interpreter, writes its markdown and JSON, and its parity verdicts can fail."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastpeft.ops.linear import interpreter_active

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: a bare `pytest` puts only tests/ on the path
    sys.path.insert(0, str(ROOT))
from benchmarks import gpu_check as gc  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for the module: (completed process, JSON report, markdown text)."""
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert (out / "gpu_check.md").is_file() and (out / "gpu_check.json").is_file()
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_dry_run_writes_every_section(dry_run):
    proc, report, md = dry_run
    assert list(report["sections"]) == ["parity", "big", "dropout_mask", "cuda_graph", "times", "host"]
    for key, rows in report["sections"].items():
        assert rows, f"section {key} has no rows"
        assert all(r["status"] in ("PASS", "FAIL", "SKIP", "INFO") for r in rows), key
    assert report["meta"]["dry_run"] and report["meta"]["counts"]["FAIL"] == 0
    assert proc.stdout.strip() == md.strip()  # what it prints is what it writes
    for title, _ in gc.SECTIONS.values():
        assert f"## {title}" in md


def test_parity_rows_pass_and_cover_the_plan(dry_run):
    rows = dry_run[1]["sections"]["parity"]
    assert [r["name"] for r in rows] == [c.name for c in gc.cases(gc.DRY)]
    bad = [f"{r['name']}: {r['reason']}" for r in rows if r["status"] != "PASS"]
    assert not bad, "\n".join(bad)
    for r, c in zip(rows, gc.cases(gc.DRY)):
        grads = [r[t] for t in ("dx", "dA", "dB")]
        if c.m in gc.DRY.bwd_parity_ms:
            assert all(g is not None and g["ok"] for g in grads), r["name"]
        else:
            assert grads == [None] * 3, r["name"]


def test_mask_rows_pass(dry_run):
    rows = dry_run[1]["sections"]["dropout_mask"]
    assert len(rows) == len(gc.DRY.mask[1]) * len(gc.ADAPTER_DTYPES) + 1
    assert all(r["status"] == "PASS" for r in rows), rows


def test_every_skip_names_a_reason(dry_run):
    rows = [r for rs in dry_run[1]["sections"].values() for r in rs]
    assert any(r["status"] == "SKIP" for r in rows)  # the CUDA-only checks, on CPU
    assert all(r["reason"].strip() for r in rows if r["status"] == "SKIP")


def test_time_rows_have_every_provider(dry_run):
    rows = dry_run[1]["sections"]["times"]
    n_bwd = sum(c.m in gc.DRY.bwd_time_ms for c in gc.cases(gc.DRY))
    assert len(rows) == len(gc.cases(gc.DRY)) + n_bwd
    for r in rows:
        assert all(r[f"{p}_us"] > 0 for p in ("cublas", "peft", "unsloth", "fastpeft")), r["name"]


def _env():
    cuda = torch.cuda.is_available() and not interpreter_active()
    if not (cuda or interpreter_active()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    return gc.Env(gc.DRY, "cuda" if cuda else "cpu", gc.TRITON, True, True, cuda)


@pytest.mark.parametrize("fault", ["wrong-seed", "wrong-scaling"])
def test_parity_case_fails_on_a_wrong_op(monkeypatch, fault):
    """The parity verdict can fail: an op that draws another mask, or scales the low-rank term wrongly, is caught."""
    real = gc.lora_linear

    def broken(*args, **kw):
        if fault == "wrong-seed":
            kw["seed"] = kw["seed"] + 1
        else:
            kw["scaling"] *= 1.25
        return real(*args, **kw)

    env = _env()
    case = gc.Case(96, 64, 16, 33, torch.float32, 0.1)
    assert gc.parity_case(case, env)["status"] == "PASS"
    monkeypatch.setattr(gc, "lora_linear", broken)
    row = gc.parity_case(case, env)
    assert row["status"] == "FAIL" and not (row["dA"]["ok"] and row["dB"]["ok"]), row


def test_times_not_judged_without_parity():
    row = gc.time_case(gc.Case(64, 32, 4, 8, torch.bfloat16, 0.0), _env(), False, {}, {})
    assert row["status"] == "SKIP" and "parity" in row["reason"]

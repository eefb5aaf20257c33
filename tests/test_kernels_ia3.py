"""Parity of the fused IA3 launchers (``ia3_fwd`` / ``ia3_bwd``) with the eager reference: y, the stored base
output, dx and dl against ``fastpeft.reference.ia3_linear_ref`` under autograd.

Runs on CUDA, or on CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
fp32 is compared with the fp32 tolerance; anything in lower precision by error ratio against an fp64 oracle
(fastpeft.testing.assert_close_ratio): the kernel may be at most ``ratio`` times as wrong as PEFT's eager path.
"""

import pytest
import torch

from fastpeft.kernels import _common
from fastpeft.kernels.lora import ia3_bwd, ia3_fwd
from fastpeft.reference import base_linear_ref, ia3_linear_ref
from fastpeft.testing import assert_close, assert_close_ratio

pytestmark = pytest.mark.usefixtures("poison_empty")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}


def _case(dev, M, K, N, x_dt, l_dt, scale_input, *, weight_t=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * M + 100 * K + 10 * N)

    def rnd(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dt)

    return dict(
        x=rnd(M, K, dt=x_dt), weight=rnd(*((K, N) if weight_t else (N, K)), dt=x_dt, scale=K**-0.5),
        bias=rnd(N, dt=x_dt) if bias else None,
        l=(torch.rand(K if scale_input else N, generator=g) + 0.5).to(dev, l_dt),  # no zeros: y / l is defined
        dy=rnd(M, N, dt=x_dt), scale_input=scale_input, weight_t=weight_t,
    )


def _reference(c, dtype=None):
    """(y, base, dx, dl) of PEFT's computation, in the inputs' dtypes or all upcast to ``dtype``."""
    cast = (lambda t: t) if dtype is None else (lambda t: t if t is None else t.to(dtype))
    x, l = cast(c["x"]).detach().requires_grad_(), cast(c["l"]).detach().requires_grad_()
    w, b = cast(c["weight"]), cast(c["bias"])
    y = ia3_linear_ref(x, w, b, l, c["scale_input"], c["weight_t"])
    y.backward(cast(c["dy"]))
    return y.detach(), base_linear_ref(x.detach(), w, b, c["weight_t"]), x.grad, l.grad


def _run_and_check(c, store_base=True, saved_is_base=False, need=(True, True)):
    x, w, l, scale_input, weight_t = c["x"], c["weight"], c["l"], c["scale_input"], c["weight_t"]
    y, base = ia3_fwd(x, w, c["bias"], l, scale_input=scale_input, weight_t=weight_t, store_base=store_base)
    saved = x if scale_input else (base if saved_is_base else y)
    dx, dl = ia3_bwd(c["dy"], saved, w, l, scale_input=scale_input, weight_t=weight_t, saved_is_base=saved_is_base,
                     need_dx=need[0], need_dl=need[1])
    assert (base is not None) == (store_base and not scale_input), "base stored iff asked for, output scaling"
    assert (dx is not None) == need[0] and (dl is not None) == need[1]
    assert dl is None or dl.dtype == F32, "dl comes back in fp32 (the op casts it to l's dtype)"
    got = dict(y=y, base=base, dx=dx, dl=None if dl is None else dl.to(l.dtype))
    eager = dict(zip(("y", "base", "dx", "dl"), _reference(c)))
    oracle = dict(zip(("y", "base", "dx", "dl"), _reference(c, torch.float64)))
    for name in ("y", "base", "dx", "dl"):
        if got[name] is None:
            continue
        want_dtype = l.dtype if name == "dl" else x.dtype
        assert got[name].dtype == want_dtype, f"{name}: dtype {got[name].dtype}, expected {want_dtype}"
        # with fp32 x the kernel makes every rounding PEFT makes in y (x rounded to a narrower l's dtype first)
        if x.dtype == F32 and (l.dtype == F32 or name in ("y", "base")):
            assert_close(got[name], eager[name], name=name)
        else:
            assert_close_ratio(got[name], eager[name], oracle[name].to(want_dtype), dtype=want_dtype, name=name)


MODES = [False, True]
MODE_IDS = ["out", "in"]
DTYPES = [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F32), (F16, BF16), (F32, BF16)]  # (x and W, l)
# (M, K, N): M = 1 (decode tiles) and 63 (prefill tiles); K, N not multiples of 16, several K and N tiles
SHAPES = [(1, 40, 72), (63, 72, 40)]


@pytest.mark.parametrize("scale_input", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize("x_dt,l_dt", DTYPES, ids=[f"x{NAMES[x]}-l{NAMES[v]}" for x, v in DTYPES])
def test_dtypes_and_shapes(dev, x_dt, l_dt, M, K, N, scale_input):
    _run_and_check(_case(dev, M, K, N, x_dt, l_dt, scale_input))


FLAGS = {
    "weight_t": (dict(weight_t=True), {}),
    "no-bias": (dict(bias=False), {}),
    "weight_t-no-bias": (dict(weight_t=True, bias=False), {}),
    "no-store-base": ({}, dict(store_base=False)),
    "saved-base": ({}, dict(saved_is_base=True)),
}


# what is saved only varies for output scaling: "saved-base" runs without input scaling
FLAG_CASES = [(name, si) for name in FLAGS for si in MODES if not (name == "saved-base" and si)]


@pytest.mark.parametrize("name,scale_input", FLAG_CASES, ids=[f"{n}-{MODE_IDS[si]}" for n, si in FLAG_CASES])
@pytest.mark.parametrize("x_dt,l_dt", [(F32, F32), (BF16, F32)], ids=["fp32", "bf16x-fp32l"])
def test_flags(dev, x_dt, l_dt, name, scale_input):
    case_flags, run_flags = FLAGS[name]
    _run_and_check(_case(dev, 33, 40, 72, x_dt, l_dt, scale_input, **case_flags), **run_flags)


@pytest.mark.parametrize("scale_input", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("x_dt,l_dt", [(F32, F32), (BF16, F32)], ids=["fp32", "bf16x-fp32l"])
def test_several_m_tiles(dev, x_dt, l_dt, scale_input):
    """More rows than one M tile (BM = 128 for 16-bit prefill): dl sums several rows of partials."""
    assert _common._ia3_config(130, x_dt)[1].BM < 130
    _run_and_check(_case(dev, 130, 136, 72, x_dt, l_dt, scale_input), saved_is_base=not scale_input)


NEEDS = [(True, False), (False, True)]


@pytest.mark.parametrize("scale_input,saved_is_base", [(False, False), (False, True), (True, False)],
                         ids=["out-save_y", "out-save_base", "in"])
@pytest.mark.parametrize("need", NEEDS, ids=["dx", "dl"])
def test_partial_gradients(dev, need, scale_input, saved_is_base):
    _run_and_check(_case(dev, 20, 40, 24, BF16, F32, scale_input), saved_is_base=saved_is_base, need=need)


def test_no_gradient_asked(dev):
    c = _case(dev, 5, 40, 24, F32, F32, False)
    assert ia3_bwd(c["dy"], c["dy"], c["weight"], c["l"], False, False, False, False, False) == (None, None)


@pytest.mark.parametrize("scale_input", MODES, ids=MODE_IDS)
def test_strided_inputs(dev, scale_input):
    """Views are read through their strides: x and dy column slices, W a transposed view, l every other entry."""
    c = _case(dev, 21, 40, 24, F32, F32, scale_input)
    c["x"] = torch.cat([c["x"], c["x"]], dim=1)[:, ::2]
    c["dy"] = c["dy"].t().contiguous().t()
    c["weight"] = c["weight"].t().contiguous().t()
    c["l"] = torch.stack([c["l"], c["l"]], dim=1)[:, 0]
    assert not c["x"].is_contiguous() and not c["weight"].is_contiguous() and c["l"].stride(0) == 2
    _run_and_check(c)


@pytest.mark.parametrize("scale_input", MODES, ids=MODE_IDS)
def test_empty_batch(dev, scale_input):
    c = _case(dev, 5, 40, 24, BF16, F32, scale_input)
    x0, dy0 = c["x"][:0], c["dy"][:0]
    y, base = ia3_fwd(x0, c["weight"], c["bias"], c["l"], scale_input, False, True)
    assert y.shape == (0, 24) and (base is None) == scale_input
    dx, dl = ia3_bwd(dy0, x0 if scale_input else y, c["weight"], c["l"], scale_input, False, False, True, True)
    assert dx.shape == (0, 40) and dl.shape == c["l"].shape and not dl.any()


def test_deterministic(dev):
    for scale_input in MODES:
        c = _case(dev, 70, 72, 40, BF16, F32, scale_input)
        y, _ = ia3_fwd(c["x"], c["weight"], c["bias"], c["l"], scale_input, False, False)
        runs = [ia3_bwd(c["dy"], c["x"] if scale_input else y, c["weight"], c["l"], scale_input, False, False, True,
                        True) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_configs():
    assert _common._ia3_config(8, BF16)[0].BM == 16  # decode tile
    assert _common._ia3_config(4096, BF16)[0].BM > 16
    assert _common._ia3_config(4096, F32) != _common._ia3_config(4096, BF16)  # fp32 operands: narrower tiles


def test_validation(dev):
    c = _case(dev, 4, 40, 24, F32, F32, False)
    x, w, b, l, dy = c["x"], c["weight"], c["bias"], c["l"], c["dy"]
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        ia3_fwd(x[None], w, b, l, False, False, False)
    with pytest.raises(ValueError, match=r"weight: expected a \[K, N\] \(weight_t\) weight with K = 40"):
        ia3_fwd(x, w, b, l, False, True, False)
    with pytest.raises(ValueError, match=r"weight: expected a \[N, K\] weight with N = 24"):
        ia3_bwd(dy, dy, w.t(), l, False, False, False, True, True)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ia3_fwd(x, w.half(), b, l, False, False, False)
    with pytest.raises(TypeError, match="bias: expected dtype"):
        ia3_fwd(x, w, b.half(), l, False, False, False)
    with pytest.raises(ValueError, match=r"l: expected a 1-D IA3 vector of shape \(24,\), out_features"):
        ia3_fwd(x, w, b, l[:, None], False, False, False)
    with pytest.raises(ValueError, match=r"l: expected a 1-D IA3 vector of shape \(40,\), in_features"):
        ia3_fwd(x, w, b, l, True, False, False)
    with pytest.raises(TypeError, match="l: expected dtype"):
        ia3_fwd(x, w, b, l.double(), False, False, False)
    with pytest.raises(TypeError, match="x: expected dtype"):
        ia3_fwd(x.double(), w.double(), None, l, False, False, False)
    with pytest.raises(ValueError, match="one device"):
        ia3_fwd(x, w.to("meta"), b, l, False, False, False)
    with pytest.raises(ValueError, match=r"saved: expected shape \(4, 40\)"):
        ia3_bwd(dy, dy, w, torch.ones(40, device=dev), True, False, False, True, True)
    with pytest.raises(TypeError, match="saved: expected dtype"):
        ia3_bwd(dy, dy.half(), w, l, False, False, False, True, True)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        ia3_bwd(dy.half(), dy.half(), w, l, False, False, False, True, True)


@pytest.mark.parametrize("scale_input", MODES, ids=MODE_IDS)
def test_plan_cache_replays_checked_launches(dev, scale_input):
    """A second call with the same metadata replays the kept plans with its own tensors and matches the reference;
    storing the base (a constexpr) gets its own plan."""
    from fastpeft.kernels import ia3 as ia3_mod

    fwd_plans, bwd_plans = ia3_mod._FWD_PLANS.plans, ia3_mod._BWD_PLANS.plans
    fwd_plans.clear()
    bwd_plans.clear()
    _run_and_check(_case(dev, 40, 24, 36, F32, F32, scale_input, seed=1), store_base=False)
    assert (len(fwd_plans), len(bwd_plans)) == (1, 1)
    _run_and_check(_case(dev, 40, 24, 36, F32, F32, scale_input, seed=2), store_base=False)
    assert (len(fwd_plans), len(bwd_plans)) == (1, 1), "same metadata was planned again"
    _run_and_check(_case(dev, 40, 24, 36, F32, F32, scale_input, seed=3), store_base=True,
                   saved_is_base=not scale_input)
    assert len(fwd_plans) == 2

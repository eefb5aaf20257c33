"""LoRA's split plan (M > 16 and every backward): split reductions, determinism, where the base product runs, and
the dropout seed read from device memory. Parity of the plain launches is in test_kernels_lora.py (its shapes
cover both plans); this file pins what is particular to the split."""

import pytest
import torch

from fastpeft.kernels import lora as lora_mod
from fastpeft.kernels import lora_split
from fastpeft.kernels.lora import lora_bwd, lora_dropout_mask, lora_fwd
from fastpeft.ops.linear import TRITON, _lora_bwd, _lora_fwd
from fastpeft.testing import assert_close_ratio
from torch.utils._python_dispatch import TorchDispatchMode

from test_kernels_lora import _case, _reference, _run_and_check

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def many_splits(monkeypatch):
    """Reductions cut into as many ranges as the shape allows (one loop step each), as on a GPU much wider than the
    interpreter's shapes: the partial sums and their reduction run at test sizes."""
    monkeypatch.setattr(lora_split, "_MIN_STEPS", 1)
    monkeypatch.setattr(lora_split, "_programs", lambda device: 1 << 20)
    for cache in (lora_split._SHRINK_PLANS, lora_split._WGRAD_PLANS):
        cache.plans.clear()
    yield
    for cache in (lora_split._SHRINK_PLANS, lora_split._WGRAD_PLANS):
        cache.plans.clear()


@pytest.mark.parametrize("x_dt,a_dt", [(F32, F32), (BF16, F32), (BF16, BF16)], ids=["fp32", "bf16x-fp32a", "bf16"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_split_reductions(dev, many_splits, x_dt, a_dt, p):
    """K split in the shrink (forward xa and backward g), M split in wgrad (dA, dB): partial sums, then a fixed-order
    sum, match the reference; the plans really split."""
    _run_and_check(_case(dev, 150, 200, 136, 8, x_dt, a_dt), scaling=0.5, p=p, seed=5)
    splits = [S for _, S in lora_split._SHRINK_PLANS.plans.values()] + [
        S for _, S in lora_split._WGRAD_PLANS.plans.values()]
    assert len(splits) == 4 and min(splits) > 1, splits


def test_split_is_deterministic(dev, many_splits):
    c = _case(dev, 150, 200, 72, 8, BF16, F32)
    runs = []
    for _ in range(2):
        y, xa = lora_fwd(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], None, None, 2.0, 0.1, 3)
        runs.append((y, xa, *lora_bwd(c["dy"], c["x"], c["weight"], c["lora_a"], c["lora_b"], xa, 2.0, 0.1, 3)))
    for name, a, b in zip(("y", "xa", "dx", "da", "db"), *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


class _Gemms(TorchDispatchMode):
    """(op, input shapes) of every aten matmul reaching dispatch."""

    NAMES = ("aten.mm", "aten.addmm", "aten.addmm_", "aten.linear", "aten.bmm", "aten.matmul")

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.NAMES:
            self.calls.append((str(func.overloadpacket), [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weight_t", [False, True], ids=["linear", "conv1d"])
def test_base_product_is_one_cublas_gemm_above_decode(dev, weight_t):
    """Inside the op (its implementation, as the registered kernel runs it): at M > 16 the base product is one
    ``addmm_`` into the expand's output, the backward's dY W another; the adapter math is in Triton launches, not
    aten matmuls. At decode the forward is the fused launch alone."""
    M, K, N, R = 40, 72, 24, 8
    c = _case(dev, M, K, N, R, BF16, F32, weight_t=weight_t)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], None, None, 2.0, 0.0, None, weight_t, True,
            TRITON)
    with _Gemms() as gemms:
        y, xa = _lora_fwd(*args)
    assert gemms.calls == [("aten.addmm_", [(M, N), (M, K), (K, N)])], gemms.calls
    with _Gemms() as gemms:
        _lora_bwd(c["dy"], c["x"], c["weight"], c["lora_a"], c["lora_b"], xa, 2.0, 0.0, None, weight_t, True, True,
                  True, TRITON)
    assert gemms.calls == [("aten.addmm_", [(M, K), (M, N), (N, K)])], gemms.calls
    with _Gemms() as gemms:
        _lora_fwd(c["x"][:16], *args[1:])
    assert gemms.calls == [], gemms.calls


@pytest.mark.parametrize("M", [8, 40], ids=["decode", "split"])
def test_seed_is_read_from_device_memory(dev, M):
    """What makes a captured CUDA graph draw a fresh mask per replay: a replayed launch (the same kept plan, the
    same seed tensor) reads the seed's current value. Writing a new value into the seed tensor between two calls
    changes the mask, and each backward regenerates its own forward's mask."""
    p, scaling = 0.3, 0.5
    c = _case(dev, M, 72, 24, 8, F32, F32)
    seed = torch.tensor(11, dtype=torch.int64, device=c["x"].device)
    outs = []
    for value in (11, 12):
        seed.fill_(value)
        y, xa = lora_fwd(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["lora_bias"], None, scaling, p,
                         seed)
        dx, da, db = lora_bwd(c["dy"], c["x"], c["weight"], c["lora_a"], c["lora_b"], xa, scaling, p, seed)
        keep = lora_dropout_mask(value, M, 72, p, c["x"].device)
        eager, oracle = _reference(c, scaling, keep, p), _reference(c, scaling, keep, p, dtype=torch.float64)
        for name, got, e, o in zip(("y", "xa", "dx", "da", "db"), (y, xa, dx, da, db), eager, oracle):
            assert_close_ratio(got, e, o, dtype=F32, name=f"{name} (seed {value})")
        outs.append(y)
    assert not torch.equal(*outs), "a new seed value in the same tensor must draw a new mask"


def test_decode_rows_boundary(dev):
    """16 rows run the fused launch, 17 the split plan: both match the reference at the boundary."""
    assert lora_mod.DECODE_ROWS == 16
    for M in (16, 17):
        _run_and_check(_case(dev, M, 72, 40, 8, BF16, F32), scaling=2.0, p=0.1, seed=2)


def test_cost_steps_follow_the_plans():
    """The cost steps are read off the planned launches. Unsplit (M = 4096: the row blocks fill the device), the
    shrink writes xa itself in A's dtype and the expand reads it, storing nothing more; split (M = 64), the shrink
    writes fp32 partials, the expand reads them (no launch sums them) and stores xa for the backward. The base GEMM
    is cuBLAS's."""
    N, K, R = 4096, 4096, 16
    for M, S_expected in ((4096, 1), (64, 4)):
        steps = lora_split.split_cost_steps(M, N, K, R, BF16, BF16, 0.0)
        names = [s.name for s in steps]
        assert names == ["lora_shrink", "lora_expand", "cublas_addmm"], names
        shrink, expand = steps[0], steps[1]
        assert shrink.flops == 2 * M * K * R and shrink.rate == "bf16"
        S = lora_split.split_specs(M, N, K, R, BF16, BF16, 0.0, False)[0][1]
        assert S == S_expected
        xa_bytes = M * R * 2 if S == 1 else S * M * R * 4  # xa itself, or the fp32 partials
        stored = 0 if S == 1 else M * R * 2  # the expand stores xa only from partials
        assert shrink.dram_bytes == M * K * 2 + R * K * 2 + xa_bytes
        assert expand.dram_bytes == xa_bytes + N * R * 2 + M * N * 2 + stored + N * 2  # + bias
    M = 4096
    train = lora_split.split_cost_steps(M, N, K, R, BF16, F32, 0.1, train=True)
    assert [s.name for s in train if s.engine == "cublas"] == ["cublas_addmm", "cublas_addmm_dx"]
    # bf16 x with fp32 adapters: every thin product runs as three bf16 MMAs on split operands (lora_split_kernels._mma)
    assert all((s.rate, s.passes) == ("bf16", 3) for s in train if s.engine == "triton")
    fp32 = lora_split.split_cost_steps(M, N, K, R, F32, F32, 0.1, train=True)
    assert all((s.rate, s.passes) == ("tf32", 3) for s in fp32 if s.engine == "triton")


@pytest.mark.parametrize("apart", [False, True], ids=["one-launch", "xa-apart"])
@pytest.mark.parametrize("x_dt,a_dt", [(F32, F32), (BF16, F32), (BF16, BF16)], ids=["fp32", "bf16x-fp32a", "bf16"])
def test_decode_plans(dev, monkeypatch, apart, x_dt, a_dt):
    """Both decode plans match the reference with dropout: the one fused launch forming xa per program, and xa's
    partial sums from a shrink launch read by the fused launch (chosen at high rank); and they agree with each
    other to rounding."""
    monkeypatch.setattr(lora_mod, "_xa_apart", lambda *a: apart)
    lora_mod._FWD_PLANS.plans.clear()
    c = _case(dev, 5, 200, 40, 24, x_dt, a_dt, residual=True)
    _run_and_check(c, scaling=2.0, p=0.1, seed=9)
    (plan, was_apart), = lora_mod._FWD_PLANS.plans.values()
    assert was_apart == apart and plan.static["XA_IN"] == apart
    lora_mod._FWD_PLANS.plans.clear()


def test_decode_plan_choice():
    """One launch at rank 16 with 16-bit adapters on a 4096 x 4096 layer (its programs re-read half of W's bytes of
    A), xa apart at rank 64 and without a base weight; the cost steps follow the choice."""
    from fastpeft.kernels.lora import decode_cost_steps

    e = lambda *s, dt=BF16: torch.empty(s, dtype=dt, device="meta")  # noqa: E731
    cfg = lora_mod._fwd_config(1, 4096, 4096, 16, BF16, BF16)
    assert not lora_mod._xa_apart(4096, 4096, 16, cfg, BF16, e(4096, 4096))
    cfg = lora_mod._fwd_config(1, 4096, 4096, 64, BF16, BF16)
    assert lora_mod._xa_apart(4096, 4096, 64, cfg, BF16, e(4096, 4096))
    assert lora_mod._xa_apart(4096, 4096, 16, cfg, BF16, None)
    assert [s.name for s in decode_cost_steps(1, 4096, 4096, 16, BF16, BF16)] == ["lora_fwd_decode"]
    assert [s.name for s in decode_cost_steps(1, 4096, 4096, 64, BF16, BF16)] == ["lora_shrink", "lora_fwd_decode"]

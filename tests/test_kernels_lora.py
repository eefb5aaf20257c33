"""Parity of the fused LoRA kernels (fastpeft.kernels.lora) with the eager reference, forward and backward.

Runs on CUDA, or on CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU);
interpreter shapes are kept small. Low precision is judged by error ratio against an fp64 oracle
(fastpeft.testing.assert_close_ratio): the kernel may be at most ``ratio`` times as wrong as PEFT's eager path.
"""

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastpeft.kernels import lora as lora_mod
from fastpeft.kernels import lora_split
from fastpeft.kernels.adapted_linear import _dropout_keep
from fastpeft.kernels.lora import lora_bwd, lora_dropout_mask, lora_fwd
from fastpeft.reference import lora_linear_ref
from fastpeft.testing import assert_close_ratio

pytestmark = pytest.mark.usefixtures("poison_empty")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = {F32: "fp32", F16: "fp16", BF16: "bf16"}


def _case(dev, M, K, N, R, x_dt, a_dt, *, weight=True, weight_t=False, bias=True, lora_bias=True, residual=False,
          seed=0):
    g = torch.Generator().manual_seed(seed + 1000 * M + 100 * K + 10 * N + R)

    def rnd(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dt)

    w = rnd(*((K, N) if weight_t else (N, K)), dt=x_dt, scale=K**-0.5) if weight else None
    return dict(
        x=rnd(M, K, dt=x_dt), weight=w, bias=rnd(N, dt=x_dt) if weight and bias else None,
        lora_a=rnd(R, K, dt=a_dt, scale=K**-0.5), lora_b=rnd(N, R, dt=a_dt, scale=R**-0.5),
        lora_bias=rnd(N, dt=a_dt) if lora_bias else None, residual=rnd(M, N, dt=x_dt) if residual else None,
        dy=rnd(M, N, dt=x_dt), weight_t=weight_t,
    )


def _reference(c, scaling, keep, p, dtype=None):
    """(y, xa, dx, da, db) of the eager reference, in the inputs' dtypes or all upcast to ``dtype``."""
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
    leaf = {k: None if c[k] is None else cast(c[k]).detach().requires_grad_(k in ("x", "lora_a", "lora_b"))
            for k in ("x", "weight", "bias", "lora_a", "lora_b", "lora_bias", "residual")}
    x, a, b, res = leaf["x"], leaf["lora_a"], leaf["lora_b"], leaf["residual"]
    y = lora_linear_ref(x, leaf["weight"], leaf["bias"], a, b, leaf["lora_bias"], scaling, keep=keep,
                        dropout_p=p, weight_t=c["weight_t"], residual=res)
    y.backward(cast(c["dy"]))
    xd = x.detach().to(a.dtype)
    xd = xd if keep is None else xd * keep.to(xd.dtype) / (1.0 - p)
    xa = F.linear(xd, a.detach())  # the saved intermediate: drop(x) A^T in the adapter dtype, as in the reference
    return y.detach(), xa, x.grad, a.grad, b.grad


def _run_and_check(c, scaling=0.5, p=0.0, seed=7, need=(True, True, True)):
    x, w, a, b = c["x"], c["weight"], c["lora_a"], c["lora_b"]
    y, xa = lora_fwd(x, w, c["bias"], a, b, c["lora_bias"], c["residual"], scaling, p, seed, weight_t=c["weight_t"])
    dx, da, db = lora_bwd(c["dy"], x, w, a, b, xa, scaling, p, seed, weight_t=c["weight_t"], need_dx=need[0],
                          need_da=need[1], need_db=need[2])
    keep = lora_dropout_mask(seed, x.shape[0], x.shape[1], p, x.device) if p > 0 else None
    eager = _reference(c, scaling, keep, p)
    oracle = _reference(c, scaling, keep, p, dtype=torch.float64)
    for name, got, e, o, in zip(("y", "xa", "dx", "da", "db"), (y, xa, dx, da, db), eager, oracle):
        want_dtype = {"y": x.dtype, "dx": x.dtype, "xa": a.dtype, "da": a.dtype, "db": b.dtype}[name]
        if got is None:
            assert name in ("dx", "da", "db") and not need[("dx", "da", "db").index(name)], f"{name} missing"
            continue
        assert got.dtype == want_dtype, f"{name}: dtype {got.dtype}, expected {want_dtype}"
        assert_close_ratio(got, e, o, dtype=want_dtype, name=name)


DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32), (F16, F32)]


@pytest.mark.parametrize("x_dt,a_dt", DTYPE_PAIRS, ids=[f"x{NAMES[x]}-a{NAMES[a]}" for x, a in DTYPE_PAIRS])
def test_dtypes(dev, x_dt, a_dt):
    _run_and_check(_case(dev, 63, 72, 40, 8, x_dt, a_dt, residual=True))


# (M, K, N, R): odd sizes, M = 1 and the decode tile (M <= 16), several M / N / K tiles, ranks 1 .. 200
SHAPES = [(1, 40, 72, 1), (63, 40, 72, 8), (16, 136, 40, 8), (17, 72, 40, 64), (130, 24, 136, 8), (5, 40, 24, 200),
          (40, 24, 40, 256)]


@pytest.mark.parametrize("M,K,N,R", SHAPES, ids=[f"M{m}-K{k}-N{n}-R{r}" for m, k, n, r in SHAPES])
@pytest.mark.parametrize("x_dt,a_dt", [(F32, F32), (BF16, BF16), (BF16, F32)], ids=["fp32", "bf16", "bf16x-fp32a"])
def test_shapes(dev, M, K, N, R, x_dt, a_dt):
    _run_and_check(_case(dev, M, K, N, R, x_dt, a_dt))


FLAGS = {
    "weight_t": dict(weight_t=True),
    "no-bias": dict(bias=False),
    "no-lora-bias": dict(lora_bias=False),
    "residual": dict(residual=True),
    "weight-none-residual": dict(weight=False, residual=True),
    "weight-none": dict(weight=False, lora_bias=False),
    "bare": dict(bias=False, lora_bias=False),
}


@pytest.mark.parametrize("flags", FLAGS.values(), ids=FLAGS.keys())
@pytest.mark.parametrize("x_dt,a_dt", [(F32, F32), (BF16, BF16)], ids=["fp32", "bf16"])
def test_flags(dev, flags, x_dt, a_dt):
    _run_and_check(_case(dev, 33, 40, 72, 8, x_dt, a_dt, **flags))


DROPOUT = [(F32, F32, {}), (BF16, F32, {}), (F16, F32, dict(weight_t=True)), (F16, F16, dict(weight_t=True)),
           (F32, F32, dict(weight=False)), (BF16, BF16, dict(residual=True))]


@pytest.mark.parametrize("x_dt,a_dt,flags", DROPOUT, ids=["fp32", "bf16x-fp32a", "fp16x-fp32a-weight_t",
                                                          "fp16-weight_t", "fp32-no-weight", "bf16-residual"])
@pytest.mark.parametrize("M,K", [(9, 72), (70, 42), (33, 137)], ids=["M9-K72", "M70-K42", "M33-K137"])
def test_dropout_parity(dev, x_dt, a_dt, flags, M, K):
    # K = 42, 137: rows are not whole groups of four Philox lanes
    _run_and_check(_case(dev, M, K, 40, 8, x_dt, a_dt, **flags), p=0.1, seed=1234 + M)


NEEDS = [(False, True, True), (True, False, True), (True, True, False), (False, False, True), (False, True, False),
         (True, False, False)]


@pytest.mark.parametrize("need", NEEDS, ids=["-".join(n for n, f in zip(("dx", "da", "db"), nd) if f) for nd in NEEDS])
def test_partial_gradients(dev, need):
    _run_and_check(_case(dev, 20, 40, 24, 8, F32, F32), p=0.1, need=need)


def test_strided_inputs(dev):
    """Views are read through their strides: x a column slice, W a transposed view, A and B transposed views."""
    c = _case(dev, 21, 40, 24, 8, F32, F32)
    x, w = c["x"], c["weight"]
    c["x"] = torch.cat([x, x], dim=1)[:, ::2]
    c["weight"] = w.t().contiguous().t()
    c["lora_a"] = c["lora_a"].t().contiguous().t()
    c["lora_b"] = c["lora_b"].t().contiguous().t()
    c["dy"] = c["dy"].t().contiguous().t()
    assert not c["x"].is_contiguous() and not c["weight"].is_contiguous()
    _run_and_check(c, p=0.1)


def test_no_xa_and_empty_batch(dev):
    c = _case(dev, 5, 40, 24, 8, F32, F32)
    y, xa = lora_fwd(c["x"], c["weight"], None, c["lora_a"], c["lora_b"], None, None, 1.0, 0.0, 0, store_xa=False)
    assert xa is None and y.shape == (5, 24)
    dx, da, db = lora_bwd(c["dy"], c["x"], c["weight"], c["lora_a"], c["lora_b"], None, 1.0, 0.0, 0, need_db=False)
    assert db is None and dx.shape == (5, 40) and da.shape == (8, 40)
    x0 = c["x"][:0]
    y, xa = lora_fwd(x0, c["weight"], None, c["lora_a"], c["lora_b"], None, None, 1.0, 0.1, 0)
    assert y.shape == (0, 24) and xa.shape == (0, 8)
    dx, da, db = lora_bwd(c["dy"][:0], x0, c["weight"], c["lora_a"], c["lora_b"], xa, 1.0, 0.1, 0)
    assert dx.shape == (0, 40) and not da.any() and not db.any()


def test_dropout_statistics(dev):
    p, M, Kd = 0.1, 96, 256
    keep = lora_dropout_mask(5, M, Kd, p, dev)
    assert keep.dtype == torch.bool and keep.shape == (M, Kd)
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    rows = keep.float().mean(1)  # no row or column is degenerate (e.g. a counter that ignores m or k)
    assert rows.min() > 1 - p - 6 * (p * (1 - p) / Kd) ** 0.5
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    assert not torch.equal(keep, lora_dropout_mask(6, M, Kd, p, dev))
    assert torch.equal(keep, lora_dropout_mask(5, M, Kd, p, dev))
    assert lora_dropout_mask(5, M, Kd, 0.0, dev).all()
    big = lora_dropout_mask(2**40 + 5, M, Kd, p, dev)  # 64-bit seeds use both Philox key words
    assert not torch.equal(big, keep) and not torch.equal(big, lora_dropout_mask(2**40 + 6, M, Kd, p, dev))


def test_dropout_lanes_independent(dev):
    """Neighbouring elements (the four lanes of one Philox draw, and rows) agree about half the time at p = 0.5."""
    M, Kd = 64, 256
    keep = lora_dropout_mask(11, M, Kd, 0.5, dev)
    n = M * (Kd - 1)
    for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:]), (keep[:, :-4], keep[:, 4:])):
        agree = (a == b).float().mean().item()
        assert abs(agree - 0.5) < 5 * (0.25 / n) ** 0.5 * 1.5, agree


@pytest.mark.parametrize("M,Kd", [(3, 72), (40, 72), (21, 42)], ids=["M3-K72", "M40-K72", "M21-K42"])
def test_dropout_masks_agree(dev, M, Kd):
    """Forward and backward draw lora_dropout_mask's mask element for element, whatever their tile shapes.

    With x = 1, A = I (R = K), B = I, dy = 1, s = 1 and no weight: xa = keep / (1 - p) exposes the forward's mask
    and dx = keep / (1 - p) * (g A) with g = 1 exposes the backward's.
    """
    p, seed = 0.25, 99
    x = torch.ones(M, Kd, device=dev)
    eye = torch.eye(Kd, device=dev)
    keep = lora_dropout_mask(seed, M, Kd, p, dev)
    _, xa = lora_fwd(x, None, None, eye, eye, None, None, 1.0, p, seed)
    assert torch.equal(xa != 0, keep)
    assert torch.allclose(xa[keep], torch.full_like(xa[keep], 1 / (1 - p)))
    dx, _, _ = lora_bwd(torch.ones(M, Kd, device=dev), x, None, eye, eye, xa, 1.0, p, seed, need_db=False)
    assert torch.equal(dx != 0, keep)


@triton.jit
def _keep_rows_kernel(out_ptr, row0, K, p, seed, BM: tl.constexpr, BK: tl.constexpr):
    o_m = row0 + tl.arange(0, BM).to(tl.int64)  # [BM]
    o_k = tl.arange(0, BK)  # [BK]
    keep = _dropout_keep(seed, o_m, 0, K, p, BM, BK)  # [BM, BK]
    tl.store(out_ptr + tl.arange(0, BM)[:, None] * BK + o_k[None, :], keep.to(tl.int8))


def test_dropout_index_is_int64(dev):
    """Rows 2^32 / ceil(K / 4) apart would alias if the Philox counter m * ceil(K / 4) + k // 4 wrapped at 32 bits
    (and rows 2^31 / ceil(K / 4) apart flip its sign bit); they must not."""
    Kd, BM = 2048, 16
    out = [torch.zeros(BM, Kd, device=dev, dtype=torch.int8) for _ in range(3)]
    for o, row0 in zip(out, (0, 2**32 // (Kd // 4), 2**31 // (Kd // 4))):
        _keep_rows_kernel[(1,)](o, row0, Kd, 0.5, 3, BM=BM, BK=Kd)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    small = lora_dropout_mask(3, BM, Kd, 0.5, dev)  # same helper, same stream for rows 0..BM
    assert torch.equal(out[0].bool(), small)


def test_dot_precision_follows_allow_tf32():
    meta = dict(device="meta")
    args = [torch.empty(4, 32, **meta), None, None, torch.empty(8, 32, **meta), torch.empty(16, 8, **meta), None,
            None, 1.0, 0.0, 0, False, True]
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert lora_mod._plan_fwd(*args)[0].constexprs["DOT_PREC"] == "tf32x3"
        matmul.allow_tf32 = True
        assert lora_mod._plan_fwd(*args)[0].constexprs["DOT_PREC"] == "tf32"
    finally:
        matmul.allow_tf32 = saved


def test_rank_padding_and_configs():
    assert [lora_mod._block_rank(r) for r in (1, 8, 16, 17, 64, 65, 200, 256)] == [16, 16, 16, 32, 64, 128, 256, 256]
    assert lora_mod._fwd_config(8, 4096, 4096, 16, BF16, BF16).BM == 16  # decode tile
    assert lora_mod._fwd_config(4096, 4096, 4096, 16, BF16, BF16).BM > 16
    ids = [i for i, _ in lora_mod.shipped_configs()]
    assert len(ids) == len(set(ids))


def test_validation(dev):
    c = _case(dev, 4, 40, 24, 8, F32, F32)
    x, w, a, b = c["x"], c["weight"], c["lora_a"], c["lora_b"]
    with pytest.raises(ValueError, match="x: expected a 2-D"):
        lora_fwd(x[None], w, None, a, b, None, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"lora_a: expected shape \(8, 40\)"):
        lora_fwd(x, w, None, a[:, :39], b, None, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match=r"weight: expected shape \(40, 24\)"):
        lora_fwd(x, w, None, a, b, None, None, 1.0, 0.0, 0, weight_t=True)
    with pytest.raises(TypeError, match="weight: expected dtype"):
        lora_fwd(x, w.half(), None, a, b, None, None, 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="lora_b: expected dtype"):
        lora_fwd(x, w, None, a, b.half(), None, None, 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="x: expected dtype"):
        lora_fwd(x.double(), None, None, a, b, None, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="residual: expected shape"):
        lora_fwd(x, w, None, a, b, None, x, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="bias without weight"):
        lora_fwd(x, None, c["bias"], a, b, None, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_fwd(x, w, None, a, b, None, None, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="rank"):
        big = torch.zeros(257, 40, device=dev)
        lora_fwd(x, w, None, big, torch.zeros(24, 257, device=dev), None, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="need_db needs xa"):
        lora_bwd(c["dy"], x, w, a, b, None, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="one device"):
        lora_fwd(x, w.to("meta"), None, a, b, None, None, 1.0, 0.0, 0)


def test_plan_cache_replays_checked_launches(dev):
    """The second call with the same metadata replays the kept plans (no re-planning) with its own tensors and
    runtime scalars, and still matches the reference; runtime scalars are still checked; other metadata (more rows,
    a residual, a transposed weight) gets its own plans. Decode (M = 8) is the fused launch's plan, M = 20 and
    every backward the split kernels' (lora_split)."""
    caches = (lora_mod._FWD_PLANS, lora_split._SHRINK_PLANS, lora_split._EXPAND_PLANS, lora_split._WGRAD_PLANS)
    for cache in caches:
        cache.plans.clear()
    sizes = lambda: tuple(len(cache.plans) for cache in caches)  # noqa: E731
    _run_and_check(_case(dev, 8, 40, 24, 8, F32, F32, seed=1), scaling=0.5, p=0.1, seed=3)
    decode = sizes()
    assert decode == (1, 1, 1, 2), decode  # fused forward; backward: shrink(dy), expand(g A), wgrad for dA and dB
    _run_and_check(_case(dev, 8, 40, 24, 8, F32, F32, seed=2), scaling=2.0, p=0.3, seed=11)
    assert sizes() == decode, "same metadata was planned again"
    _run_and_check(_case(dev, 20, 40, 24, 8, F32, F32, seed=3), scaling=0.5, p=0.1, seed=3)
    split = sizes()
    assert split[0] == 1 and all(s > d for s, d in zip(split[1:], decode[1:])), split
    _run_and_check(_case(dev, 20, 40, 24, 8, F32, F32, seed=4), scaling=2.0, p=0.3, seed=11)
    assert sizes() == split, "same metadata was planned again"
    c = _case(dev, 20, 40, 24, 8, F32, F32, seed=3)
    with pytest.raises(ValueError, match="seed must be in"):
        lora_fwd(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["lora_bias"], None, 1.0, 0.1, -1)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_fwd(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["lora_bias"], None, 1.0, 1.0, 0)
    _run_and_check(_case(dev, 8, 40, 24, 8, F32, F32, seed=4, residual=True), p=0.1)
    _run_and_check(_case(dev, 8, 40, 24, 8, F32, F32, seed=5, weight_t=True), p=0.1)
    assert len(lora_mod._FWD_PLANS.plans) == 3

"""Parity of the prefix-attention kernels (fastpeft.kernels.prefix_attention) with the eager reference, forward and
backward: out, lse, dq, dk, dv and the prefix's dk / dv, against ``torch.autograd.grad`` through
``fastpeft.reference.prefix_attention_ref``.

Runs on CUDA, or on CPU under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU); shapes
are tiny and each case combines several features. Low precision is judged by error ratio against an fp64 oracle
(fastpeft.testing.assert_close_ratio): the kernel may be at most ``ratio`` times as wrong as the eager path in the
same dtype.
"""

import pytest
import torch

from fastpeft.kernels import prefix_attention as pa
from fastpeft.kernels.prefix_attention import prefix_attention_bwd, prefix_attention_fwd
from fastpeft.reference import prefix_attention_ref
from fastpeft.testing import assert_close_ratio

pytestmark = pytest.mark.usefixtures("poison_empty")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
GRADS = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _case(dev, dt, B, H, Hkv, Sq, Skv, P, D, *, mask=None, pad=(), bias=False, seed=0, **kw):
    """Inputs laid out as transformers hands them over: q a [B, H, Sq, D] view of [B, Sq, H, D], k / v the first Skv
    positions of a longer cache, the prefix a view of [P, Hkv, D]. ``mask``: None, "bool" or "float" (causal with
    ``pad`` left-padding tokens per batch row, broadcast over heads through stride 0, as HF's sdpa and eager masks
    are), or "random" (bool per head); ``pad`` rows are fully hidden on the sequence columns."""
    g = torch.Generator().manual_seed(seed + 7919 * Sq + 31 * Skv + P)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dt)

    c = dict(q=rnd(B, Sq, H, D).transpose(1, 2), k=rnd(B, Hkv, Skv + 3, D)[:, :, :Skv],
             v=rnd(B, Hkv, Skv + 3, D)[:, :, :Skv], prefix_k=rnd(P, Hkv, D).transpose(0, 1),
             prefix_v=rnd(P, Hkv, D).transpose(0, 1), dout=rnd(B, Sq, H, D), mask=None, bias=None, prefix_bias=None)
    if mask == "random":
        c["mask"] = (torch.rand(B, H, Sq, Skv, generator=g) > 0.3).to(dev)
    elif mask is not None:
        i = torch.arange(Sq)[:, None] + (Skv - Sq)
        keep = (torch.arange(Skv)[None, :] <= i)[None] & (torch.arange(Skv)[None, :] >= torch.tensor(
            list(pad) + [0] * (B - len(pad)))[:, None])[:, None, :]  # [B, Sq, Skv]
        keep = keep[:, None].expand(B, H, Sq, Skv)  # heads read with stride 0
        c["mask"] = keep.to(dev) if mask == "bool" else torch.zeros(keep.shape).masked_fill(
            ~keep, torch.finfo(F32).min).to(dev)
    if bias:  # T5's position bias: one row for the whole batch, fp32
        c["bias"] = torch.randn(1, H, Sq, Skv, generator=g).to(dev)
        c["prefix_bias"] = torch.randn(1, H, Sq, P, generator=g).to(dev)
    return c, dict(dict(scaling=D**-0.5, causal=False, softcap=0.0, window=0), **kw)


def _reference(c, kw, dtype=None):
    """(out, lse, dq, dk, dv, dprefix_k, dprefix_v) of the reference in the inputs' dtype, or all upcast to dtype."""
    cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    leaves = [cast(c[n]).detach().requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    mask = c["mask"] if c["mask"] is None or c["mask"].dtype == torch.bool else cast(c["mask"])
    out, lse = prefix_attention_ref(*leaves, mask, kw["scaling"], kw["causal"], kw["softcap"], kw["window"],
                                    cast(c["bias"]), cast(c["prefix_bias"]))
    grads = torch.autograd.grad(out, leaves, cast(c["dout"]))
    return (out.detach(), lse.detach()) + grads


def _kernels(c, kw, need=(True, True, True)):
    args = [c[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "mask")]
    rest = (kw["scaling"], kw["causal"], kw["softcap"], kw["window"], c["bias"], c["prefix_bias"])
    out, lse = prefix_attention_fwd(*args, *rest)
    grads = prefix_attention_bwd(c["dout"], *args[:5], out, lse, args[5], *rest, *need)
    return (out, lse) + grads


def _check(c, kw, need=(True, True, True)):
    got = _kernels(c, kw, need)
    eager, oracle = _reference(c, kw), _reference(c, kw, torch.float64)
    dt = c["q"].dtype
    for name, a, e, o in zip(("out", "lse") + GRADS, got, eager, oracle):
        wanted = {"out": True, "lse": True, "dq": need[0], "dk": need[1], "dv": need[1]}.get(name, need[2])
        if not wanted:
            assert a is None, f"{name} computed but not asked for"
            continue
        if name == "lse":  # a row with every column hidden has lse -inf, in the reference too
            hidden = torch.isneginf(o)
            assert torch.equal(torch.isneginf(a), hidden.to(a.device)), "lse: -inf rows differ"
            a, e, o = (t.masked_fill(hidden.to(t.device), 0.0) for t in (a, e, o))
        want_dtype = torch.float32 if name == "lse" else dt
        assert a.dtype == want_dtype, f"{name}: dtype {a.dtype}, expected {want_dtype}"
        assert_close_ratio(a, e, o, dtype=dt, name=name)
    return got


# (id, dtype, B, H, Hkv, Sq, Skv, P, D, options): every feature once or more, odd sizes, GQA ratios 1 / 2 / 4
CASES = [
    ("mha-p1", F32, 2, 2, 2, 5, 13, 1, 8, dict()),
    ("gqa2-p7-bool-leftpad", F16, 2, 4, 2, 13, 13, 7, 8, dict(mask="bool", pad=(0, 4))),
    ("gqa4-p20-float-leftpad-bias", BF16, 2, 4, 1, 5, 13, 20, 16, dict(mask="float", pad=(2,), bias=True)),
    ("gqa2-random-mask-d24", F32, 2, 4, 2, 5, 13, 7, 24, dict(mask="random")),
    ("causal-window-softcap", F16, 1, 4, 2, 13, 13, 7, 8, dict(causal=True, window=4, softcap=5.0)),
    ("causal-bias-softcap", BF16, 2, 2, 1, 13, 13, 20, 8, dict(causal=True, bias=True, softcap=2.0)),
    ("decode-gqa4-bool", BF16, 2, 8, 2, 1, 9, 20, 8, dict(mask="bool", pad=(3,))),
    ("decode-mha-window", F32, 2, 2, 2, 1, 9, 7, 8, dict(window=5)),
    ("decode-gqa2-softcap-bias", F16, 2, 4, 2, 1, 9, 7, 16, dict(causal=True, softcap=3.0, bias=True)),
    ("prefix-only", F32, 2, 2, 1, 3, 0, 7, 8, dict()),
]


@pytest.mark.parametrize("name,dt,B,H,Hkv,Sq,Skv,P,D,opts", CASES, ids=[c[0] for c in CASES])
def test_parity(dev, name, dt, B, H, Hkv, Sq, Skv, P, D, opts):
    _check(*_case(dev, dt, B, H, Hkv, Sq, Skv, P, D, **opts))


@pytest.mark.parametrize("dt", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_dtypes(dev, dt):
    _check(*_case(dev, dt, 2, 4, 2, 5, 13, 7, 8, mask="float", pad=(1,), bias=True, softcap=4.0, window=6))


def test_hidden_rows(dev):
    """window = 1 hides every prefix column in prefill (j <= P - 1 + i), so the left-padding rows of row 1, whose
    sequence columns are all masked, see nothing: out 0, lse -inf, no gradient."""
    c, kw = _case(dev, F32, 2, 2, 1, 5, 5, 7, 8, mask="bool", pad=(0, 3), window=1)
    out, lse, dq = _check(c, kw)[:3]
    assert torch.isneginf(lse[1, :, :3]).all() and torch.isfinite(lse[0]).all()
    assert (out[1, :3] == 0).all() and (dq[1, :, :3] == 0).all()


def test_blocks_and_skips(dev):
    """Several row and key blocks: a block straddling two heads of the GQA fold, causal blocks past the diagonal
    skipped in the forward / dq and rows above it in dk / dv, prefix blocks the window hides for whole row blocks."""
    _check(*_case(dev, F16, 1, 4, 2, 65, 65, 7, 8, causal=True))  # 130 rows, BM 128; 2 key blocks of 64
    _check(*_case(dev, F32, 1, 2, 2, 40, 40, 70, 8, window=30))  # fp32 tiles: BM 64, BN 32; 3 prefix blocks


def test_partial_gradients(dev):
    c, kw = _case(dev, F32, 2, 4, 2, 5, 9, 7, 8, mask="bool", pad=(2,))
    for need in ((True, False, False), (False, True, False), (False, False, True)):
        _check(c, kw, need)
    assert prefix_attention_bwd(c["dout"], c["q"], c["k"], c["v"], c["prefix_k"], c["prefix_v"],
                                *prefix_attention_fwd(*[c[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")],
                                                      None, 1.0, False, 0.0, 0, None, None),
                                None, 1.0, False, 0.0, 0, None, None, False, False, False) == (None,) * 5


def test_dprefix_deterministic(dev):
    """The prefix gradient is reduced over the batch by fixed-order sums, never atomics: reruns are bitwise equal."""
    c, kw = _case(dev, BF16, 4, 4, 2, 5, 9, 7, 8, mask="bool", pad=(1, 2), softcap=3.0)
    first, second = _kernels(c, kw), _kernels(c, kw)
    for name, a, b in zip(GRADS[3:], first[-2:], second[-2:]):
        assert torch.equal(a, b), f"{name} differs between runs"


def test_configs():
    assert [pa._block_d(d) for d in (1, 8, 16, 17, 64, 100, 128, 256)] == [16, 16, 16, 32, 64, 128, 128, 256]
    assert pa._fwd_config(4, 64, False).BM == 16  # decode: the G heads of a kv head in one 16-row block
    assert pa._fwd_config(20, 64, False).BM == 32
    assert pa._fwd_config(4096, 128, False) == pa._CONFIGS[(128, False)][0]
    assert pa._fwd_config(40, 256, False) == pa._CONFIGS[(256, False)][0]  # 40 rows pad to its prefill BM, 64
    ids = [i for i, _ in pa.shipped_configs()]
    assert len(ids) == len(set(ids))


def test_validation(dev):
    c, kw = _case(dev, F32, 2, 4, 2, 5, 9, 7, 8)
    q, k, v, pk, pv = (c[n] for n in ("q", "k", "v", "prefix_k", "prefix_v"))

    def fwd(*a, mask=None, bias=None, prefix_bias=None, softcap=0.0, window=0):
        return prefix_attention_fwd(*a, mask, 1.0, False, softcap, window, bias, prefix_bias)

    with pytest.raises(ValueError, match="q: expected a 4-D"):
        fwd(q[0], k, v, pk, pv)
    with pytest.raises(TypeError, match="k: expected dtype"):
        fwd(q, k.half(), v, pk, pv)
    with pytest.raises(ValueError, match=r"v: expected shape \(2, 2, 9, 8\)"):
        fwd(q, k, v[:, :, :8], pk, pv)
    with pytest.raises(ValueError, match="kv heads that divides the 4"):
        fwd(q, k[:, :0], v[:, :0], pk[:0], pv[:0])
    with pytest.raises(ValueError, match=r"prefix_v: expected shape \(2, 7, 8\)"):
        fwd(q, k, v, pk, pv[:, :6])
    with pytest.raises(ValueError, match=r"mask: expected shape \[1 or 2, 1 or 4, 5, 9\]"):
        fwd(q, k, v, pk, pv, mask=torch.ones(2, 1, 5, 16, dtype=torch.bool, device=dev))
    with pytest.raises(TypeError, match="mask: expected dtype"):
        fwd(q, k, v, pk, pv, mask=torch.ones(2, 1, 5, 9, dtype=torch.int32, device=dev))
    with pytest.raises(ValueError, match=r"prefix_bias: expected shape \[1 or 2, 1 or 4, 5, 7\]"):
        fwd(q, k, v, pk, pv, prefix_bias=torch.zeros(1, 4, 5, 9, device=dev))
    with pytest.raises(ValueError, match="softcap and window"):
        fwd(q, k, v, pk, pv, window=-1)
    for D in (272, 256):  # 256: fp16 / bf16 only
        with pytest.raises(ValueError, match="head dim"):
            big = torch.zeros(1, 1, 1, D, device=dev)
            fwd(big, big, big, big[0], big[0])
    with pytest.raises(ValueError, match="one device"):
        fwd(q, k, v, pk.to("meta"), pv)
    out, lse = fwd(q, k, v, pk, pv)
    with pytest.raises(ValueError, match=r"dout: expected shape \(2, 5, 4, 8\)"):
        prefix_attention_bwd(c["dout"].transpose(1, 2), q, k, v, pk, pv, out, lse, None, 1.0, False, 0.0, 0, None,
                             None)
    with pytest.raises(TypeError, match="lse: expected dtype"):
        prefix_attention_bwd(c["dout"], q, k, v, pk, pv, out, lse.double(), None, 1.0, False, 0.0, 0, None, None)

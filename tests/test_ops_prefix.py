"""Op-level tests of ``fastpeft.ops.prefix.prefix_attention`` (fused torch path) against ``prefix_attention_ref``.

Output, log-sum-exp and dQ, dK, dV, dPrefixK, dPrefixV; P in {1, 7, 20}, odd lengths, decode, GQA ratios 1, 2, 4,
left padding (bool and additive masks), upper-left causal without a mask, sliding window, softcap, position bias,
fp32 / bf16 / fp16; no per-row prefix copy (bytes through dispatch), error messages, ``opcheck``.
"""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops.linear import TORCH
from fastpeft.ops.prefix import prefix_attention
from fastpeft.reference import prefix_attention_ref
from fastpeft.testing import OpCounter, assert_close, assert_close_ratio
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytestmark = pytest.mark.usefixtures("poison_empty")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# (B, H, Hkv, Sq, Skv, P, D, features)
CASES = [
    pytest.param(2, 4, 4, 5, 5, 7, 8, {}, id="mha-prefill-causal-nomask"),
    pytest.param(3, 4, 2, 5, 5, 1, 8, {"mask": "bool"}, id="gqa2-P1-leftpad"),
    pytest.param(3, 8, 2, 13, 13, 20, 16, {"mask": "float"}, id="gqa4-P20-additive"),
    pytest.param(3, 4, 1, 1, 9, 20, 8, {"mask": "bool"}, id="mqa-decode"),
    pytest.param(2, 4, 2, 1, 9, 7, 8, {}, id="decode-nomask"),
    pytest.param(3, 4, 2, 5, 9, 7, 8, {"mask": "bool", "window": 6}, id="window-partial"),
    pytest.param(3, 4, 2, 5, 5, 7, 8, {"mask": "float", "softcap": 2.0}, id="softcap"),
    pytest.param(2, 4, 4, 3, 6, 7, 8, {"mask": "bool", "bias": True, "causal": False}, id="t5-bias"),
    pytest.param(3, 4, 4, 6, 6, 7, 8, {"mask": "bidir", "causal": False}, id="bert-bidirectional"),
    pytest.param(2, 4, 2, 4, 4, 3, 8, {"window": 1, "mask": "bool"}, id="window-hides-all-prefix"),
]


def _mask(kind, b, sq, skv, dtype):
    pad = torch.tensor([0, 2, 1, 3]).repeat(b)[:b]
    j = torch.arange(skv)
    if kind == "bidir":
        m = (j[None, None, :] >= pad[:, None, None]).expand(b, sq, skv)
    else:
        i = torch.arange(sq)[:, None] + skv - sq
        m = (j[None, None, :] >= pad[:, None, None]) & (j <= i)[None]
    m = m[:, None]
    if kind == "float":
        return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)
    return m


def make_case(b, h, hkv, sq, skv, p, d, feats, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    # q as attention modules hand it over: a [B, H, S, D] transpose of the projection's [B, S, H, D]
    q = rnd(b, sq, h, d).transpose(1, 2).requires_grad_()
    k, v = rnd(b, hkv, skv, d).requires_grad_(), rnd(b, hkv, skv, d).requires_grad_()
    pk, pv = rnd(hkv, p, d).requires_grad_(), rnd(hkv, p, d).requires_grad_()
    kw = dict(scaling=d ** -0.5, causal=feats.get("causal", True), softcap=feats.get("softcap", 0.0),
              window=feats.get("window", 0))
    kw["mask"] = _mask(feats["mask"], b, sq, skv, dtype) if "mask" in feats else None
    if feats.get("bias"):
        kw["bias"], kw["prefix_bias"] = rnd(1, h, sq, skv), rnd(1, h, sq, p)
    return (q, k, v, pk, pv), kw


def _as(kw, dtype):
    return {n: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in kw.items()}


def _run(fn, tensors, kw, dout):
    out, lse = fn(*tensors, **kw)
    return (out, lse) + torch.autograd.grad(out, tensors, dout)


NAMES = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")


def _finite_lse(results):
    """lse is -inf on rows that see no column: the same rows in both, then compared as 0 there."""
    lse = results[1]
    return (results[0], lse.masked_fill(torch.isinf(lse), 0.0)) + results[2:], torch.isinf(lse)


@pytest.mark.parametrize("b,h,hkv,sq,skv,p,d,feats", CASES)
def test_parity_fp32(b, h, hkv, sq, skv, p, d, feats):
    tensors, kw = make_case(b, h, hkv, sq, skv, p, d, feats)
    dout = torch.randn(b, sq, h, d, generator=torch.Generator().manual_seed(1))
    got = _run(lambda *a, **k: prefix_attention(*a, **k, backend=TORCH), tensors, kw, dout)
    exp = _run(prefix_attention_ref, tuple(t.detach().double().requires_grad_() for t in tensors),
               _as(kw, torch.float64), dout.double())
    (got, hidden), (exp, hidden_exp) = _finite_lse(got), _finite_lse(exp)
    assert torch.equal(hidden, hidden_exp)
    for name, a, e in zip(NAMES, got, exp):
        assert a.dtype == (F32 if name == "lse" else tensors[0].dtype), name
        assert_close(a, e.to(a.dtype) if name != "lse" else e.float(), F32, name=name)


@pytest.mark.parametrize("dtype", [pytest.param(BF16, id="bf16"), pytest.param(F16, id="fp16")])
@pytest.mark.parametrize("case", [0, 2, 3, 6, 7])
def test_parity_low_precision(dtype, case):
    b, h, hkv, sq, skv, p, d, feats = CASES[case].values
    tensors, kw = make_case(b, h, hkv, sq, skv, p, d, feats, dtype=dtype)
    dout = torch.randn(b, sq, h, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _run(lambda *a, **k: prefix_attention(*a, **k, backend=TORCH), tensors, kw, dout)
    eager = _run(prefix_attention_ref, tuple(t.detach().requires_grad_() for t in tensors), kw, dout)
    oracle = _run(prefix_attention_ref, tuple(t.detach().double().requires_grad_() for t in tensors),
                  _as(kw, torch.float64), dout.double())
    for name, a, e, o in zip(NAMES, got, eager, oracle):
        assert_close_ratio(a, e, o, dtype, name=name)


class _Largest(TorchDispatchMode):
    """The largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numel = max([self.numel] + [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        return out


@pytest.mark.parametrize("train", [False, True], ids=["forward", "backward"])
def test_prefix_never_copied_per_row(train):
    """At decode with D = 64 a per-row prefix copy ([B, Hkv, P, D]) would be the largest tensor in the op by far
    (scores are [B, H, 1, P]; a broadcast matmul against the prefix makes exactly that copy): nothing inside the
    op, forward or backward, may be that large. The op is also one op at dispatch."""
    b, h, hkv, p, d = 8, 4, 2, 64, 64
    (q, k, v, pk, pv), kw = make_case(b, h, hkv, 1, 9, p, d, {"mask": "bool"})
    if not train:
        q, k, v, pk, pv = (t.detach() for t in (q, k, v, pk, pv))
    with torch.no_grad(), OpCounter() as oc:
        torch.ops.fastpeft.prefix_attention.default(q, k, v, pk, pv, kw["mask"], kw["scaling"], True, 0.0, 0, None,
                                                    None, TORCH)
    assert oc.total == 1
    from fastpeft.ops import prefix as ops

    largest = _Largest()
    with largest:
        out, lse = ops._PrefixAttentionFn.apply(q, k, v, pk, pv, kw["mask"], kw["scaling"], True, 0.0, 0, None, None,
                                                TORCH) if train else ops._fwd_torch(q, k, v, pk, pv, kw["mask"],
                                                                                    kw["scaling"], True, 0.0, 0,
                                                                                    None, None)
        if train:
            out.sum().backward()
    assert largest.numel < b * hkv * p * d // 4, f"an op made a tensor of {largest.numel} elements"


def test_fully_hidden_row_is_zero():
    (q, k, v, pk, pv), kw = make_case(1, 2, 2, 2, 2, 3, 8, {})
    kw["mask"] = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    kw["window"] = 1  # hides every prefix column of both rows
    out, lse = prefix_attention(q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(), **kw, backend=TORCH)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_errors():
    (q, k, v, pk, pv), kw = make_case(2, 4, 2, 3, 3, 5, 8, {})
    q, k, v, pk, pv = (t.detach() for t in (q, k, v, pk, pv))
    with pytest.raises(ValueError, match=r"prefix_k, prefix_v \[2, P, 8\]"):
        prefix_attention(q, k, v, pk[:1], pv[:1])
    with pytest.raises(ValueError, match="Hkv dividing"):
        prefix_attention(q, k[:, :1].expand(2, 3, 3, 8), v[:, :1].expand(2, 3, 3, 8), pk, pv)
    with pytest.raises(TypeError, match="expected q's torch.float32"):
        prefix_attention(q, k, v, pk.double(), pv.double())
    with pytest.raises(ValueError, match="over the sequence columns only"):
        prefix_attention(q, k, v, pk, pv, mask=torch.ones(2, 1, 3, 8, dtype=torch.bool))


def test_opcheck():
    tensors, kw = make_case(2, 4, 2, 3, 5, 5, 8, {"mask": "bool"})
    q, k, v, pk, pv = (t.detach() for t in tensors)
    args = (q, k, v, pk, pv, kw["mask"], kw["scaling"], True, 0.0, 0, None, None, TORCH)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    out, lse = prefix_attention(*args[:-1])
    bargs = (torch.randn_like(out), q, k, v, pk, pv, out, lse) + args[5:12] + (True, True, True, TORCH)
    torch.library.opcheck(torch.ops.fastpeft.prefix_attention_backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_auto_routes_wide_fp32_to_torch(monkeypatch):
    """backend="auto" on a GPU sends fp32 head dims over 128 (no spill-free Triton tile) to the torch path."""
    from fastpeft.ops import prefix as ops
    from fastpeft.ops.linear import AUTO, TRITON

    monkeypatch.setattr(ops, "_use_triton", lambda q, backend: True)
    q = torch.empty(1, 1, 1, 256)
    assert not ops._triton(q, AUTO) and ops._triton(q, TRITON)
    assert ops._triton(q.to(torch.bfloat16), AUTO) and ops._triton(q[..., :128], AUTO)

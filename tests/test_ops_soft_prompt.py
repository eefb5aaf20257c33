"""Op-level tests of ``fastpeft.ops.soft_prompt.soft_prompt_embed`` (fused torch path) against
``soft_prompt_embed_ref``: output and gradients (prompt, embeds, a trainable table), odd sizes, fp32 / bf16 / fp16,
an fp32 prompt on a low-precision table, one write of the output, errors, ``opcheck``."""

from __future__ import annotations

import pytest
import torch

from fastpeft.ops.linear import TORCH
from fastpeft.ops.soft_prompt import soft_prompt_embed
from fastpeft.reference import soft_prompt_embed_ref
from fastpeft.testing import OpCounter, assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

pytestmark = pytest.mark.usefixtures("poison_empty")


def _case(b, t, p, d, v, dtype, prompt_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g).to(dtype)
    prompt = torch.randn(p, d, generator=g).to(prompt_dtype).requires_grad_()
    ids = torch.randint(0, v, (b, t), generator=g)
    return prompt, weight, ids


@pytest.mark.parametrize("b,t,p,d", [(1, 1, 1, 8), (3, 7, 5, 24), (8, 13, 20, 40)])
@pytest.mark.parametrize("dtype,prompt_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16-fp32prompt", "fp16", "bf16"])
@pytest.mark.parametrize("source", ["ids", "embeds", "trainable-table"])
def test_parity(b, t, p, d, dtype, prompt_dtype, source):
    """Exact: the op copies and casts (the same roundings as PEFT's cast-then-cat) and sums the prompt's gradient
    over the rows in fp32, as the backward of PEFT's repeat does."""
    prompt, weight, ids = _case(b, t, p, d, 50, dtype, prompt_dtype)
    kw = {"weight": weight, "ids": ids}
    if source == "embeds":
        kw = {"embeds": torch.nn.functional.embedding(ids, weight).requires_grad_()}
    elif source == "trainable-table":
        kw["weight"] = weight.requires_grad_()
    out = soft_prompt_embed(prompt, **kw, backend=TORCH)
    ref_in = {k: (v.detach().requires_grad_() if v.is_floating_point() else v) for k, v in kw.items()}
    ref_prompt = prompt.detach().requires_grad_()
    ref = soft_prompt_embed_ref(ref_prompt, **ref_in)
    assert out.dtype == ref.dtype == dtype and torch.equal(out, ref)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    wrt = [prompt] + [v for v in kw.values() if v.is_floating_point() and v.requires_grad]
    ref_wrt = [ref_prompt] + [v for v in ref_in.values() if v.is_floating_point() and v.requires_grad]
    for a, e in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(ref, ref_wrt, dout)):
        assert a.dtype == e.dtype
        assert_close(a, e, dtype=torch.float32 if a.dtype == torch.float32 else a.dtype)


class _Fresh(TorchDispatchMode):
    """Bytes of the fresh storages ops produce (outputs that alias none of their inputs)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_one_write():
    """The output is the only buffer the op allocates (PEFT: the gathered tokens, the repeated prompt, then the
    concatenation); it is one op at dispatch."""
    from fastpeft.ops.soft_prompt import _fwd

    prompt, weight, ids = _case(8, 64, 20, 32, 100, torch.float32, torch.float32)
    with torch.no_grad(), OpCounter() as oc:
        soft_prompt_embed(prompt, weight, ids, backend=TORCH)
    assert oc.total == 1
    fresh, peft = _Fresh(), _Fresh()
    with torch.no_grad():
        with fresh:
            out = _fwd(prompt.detach(), weight, ids, None, TORCH)
        with peft:
            soft_prompt_embed_ref(prompt.detach(), weight, ids)
    assert fresh.bytes == out.numel() * 4
    assert peft.bytes == out.numel() * 4 + (8 * 64 + 8 * 20) * 32 * 4


def test_errors():
    prompt, weight, ids = _case(2, 3, 4, 8, 10, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="exactly one of ids"):
        soft_prompt_embed(prompt, weight, ids, embeds=torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match=r"expected weight \[V, 8\]"):
        soft_prompt_embed(prompt, weight[:, :4], ids)
    with pytest.raises(ValueError, match="int64 or int32"):
        soft_prompt_embed(prompt, weight, ids.float())
    with pytest.raises(ValueError, match=r"expected the prompt as \[P, D\]"):
        soft_prompt_embed(prompt[None], weight, ids)


def test_opcheck():
    prompt, weight, ids = _case(3, 5, 4, 8, 10, torch.float32, torch.float32)
    for args in ((prompt.detach(), weight, ids, None, TORCH),
                 (prompt.detach(), None, None, torch.randn(3, 5, 8), TORCH)):
        torch.library.opcheck(torch.ops.fastpeft.soft_prompt_embed.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))

"""Parity of the soft-prompt kernel (fastpeft.kernels.soft_prompt) with the eager reference: exact (it copies and
casts, the same roundings as PEFT's cast-then-concatenate). CUDA, or CPU under Triton's interpreter; through the op
with backend="triton" as well, so the op's Triton branch (and its autograd) is what runs."""

import pytest
import torch

from fastpeft.kernels.soft_prompt import _block_d, soft_prompt_embed_fwd
from fastpeft.ops.linear import TRITON
from fastpeft.ops.soft_prompt import soft_prompt_embed
from fastpeft.reference import soft_prompt_embed_ref

pytestmark = pytest.mark.usefixtures("poison_empty")


@pytest.mark.parametrize("b,t,p,d", [(1, 1, 1, 8), (3, 5, 4, 40), (2, 3, 20, 1100)])
@pytest.mark.parametrize("tok_dt,p_dt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.float16, torch.float16)], ids=["fp32", "bf16-fp32prompt", "fp16"])
@pytest.mark.parametrize("from_ids", [True, False], ids=["ids", "embeds"])
def test_kernel_exact(dev, b, t, p, d, tok_dt, p_dt, from_ids):
    g = torch.Generator().manual_seed(b * 100 + d)
    weight = torch.randn(37, d, generator=g).to(dev, tok_dt)
    prompt = torch.randn(p, d, generator=g).to(dev, p_dt)
    ids = torch.randint(0, 37, (b, t), generator=g).to(dev)
    embeds = None if from_ids else torch.randn(b, t + 2, d, generator=g).to(dev, tok_dt)[:, 1:-1]  # strided rows
    out = soft_prompt_embed_fwd(prompt, weight if from_ids else None, ids if from_ids else None, embeds)
    exp = soft_prompt_embed_ref(prompt, weight, ids) if from_ids else soft_prompt_embed_ref(prompt, embeds=embeds)
    assert out.dtype == exp.dtype and torch.equal(out, exp)


def test_op_triton_backend_and_grad(dev):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(20, 24, generator=g).to(dev, torch.bfloat16)
    prompt = torch.randn(5, 24, generator=g).to(dev).requires_grad_()
    ids = torch.randint(0, 20, (3, 4), generator=g).to(dev)
    out = soft_prompt_embed(prompt, weight, ids, backend=TRITON)
    ref_prompt = prompt.detach().requires_grad_()
    ref = soft_prompt_embed_ref(ref_prompt, weight, ids)
    assert torch.equal(out, ref)
    dout = torch.randn(out.shape, generator=g).to(dev, out.dtype)
    (gp,), (gr,) = torch.autograd.grad(out, [prompt], dout), torch.autograd.grad(ref, [ref_prompt], dout)
    assert torch.equal(gp, gr)


def test_block_choice():
    assert [_block_d(d) for d in (1, 8, 16, 100, 1024, 4096)] == [16, 16, 16, 128, 1024, 1024]

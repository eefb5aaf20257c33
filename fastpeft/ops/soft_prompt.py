"""The soft-prompt op: ``fastpeft::soft_prompt_embed``, ``[virtual prompt | token embeddings]`` in one write.

    out[b, :P] = prompt                  (one [P, D] copy read for every row, cast to the tokens' dtype)
    out[b, P:] = weight[ids[b]]          (or ``embeds[b]`` when the caller embedded the tokens itself)

Backward (autograd, two aten calls): ``dprompt = sum_b dout[b, :P]`` in fp32, cast to the prompt's dtype (PEFT's
``repeat`` backward after its cast: the same reduction); ``dembeds = dout[:, P:]``. The embedding table is frozen
on this path: a table that needs a gradient (``modules_to_save``, trainable tokens) is gathered by aten's embedding
first and passed as ``embeds``, so its backward is aten's own.

PEFT writes the token embeddings, then a per-row ``repeat`` of the prompt, then the concatenation of both
(peft_model.py:2162-2170): three writes of which the output is the last. The fused torch path (CPU,
backend="torch") writes the output once: the prompt rows by one broadcast copy, each row's tokens by an
``index_select`` into that row's own contiguous slice (B calls: the rows of a [B, T] gather are not one strided
view of the [B, P + T] output). CUDA runs the Triton kernel (``fastpeft.kernels.soft_prompt``), one launch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear import AUTO, _functorch_level, _lib, _use_triton, direct_call

_forward_ad = torch.autograd.forward_ad

__all__ = ["soft_prompt_embed"]

_lib.define("soft_prompt_embed(Tensor prompt, Tensor? weight, Tensor? ids, Tensor? embeds, int backend) -> Tensor")


def _check(prompt: Tensor, weight: Tensor | None, ids: Tensor | None, embeds: Tensor | None) -> None:
    name = "fastpeft soft_prompt_embed"
    if prompt.dim() != 2:
        raise ValueError(f"{name}: expected the prompt as [P, D], got {tuple(prompt.shape)}")
    if (embeds is None) == (ids is None):
        raise ValueError(f"{name}: expected exactly one of ids (with weight) or embeds")
    if embeds is not None:
        if embeds.dim() != 3 or embeds.shape[-1] != prompt.shape[1]:
            raise ValueError(f"{name}: expected embeds [B, T, {prompt.shape[1]}], got {tuple(embeds.shape)}")
        ref = embeds
    else:
        if weight is None or weight.dim() != 2 or weight.shape[1] != prompt.shape[1]:
            raise ValueError(f"{name}: expected weight [V, {prompt.shape[1]}], got "
                             f"{None if weight is None else tuple(weight.shape)}")
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name}: expected ids [B, T] int64 or int32, got {tuple(ids.shape)} {ids.dtype}")
        ref = weight
    for t, what in ((prompt, "prompt"), (ids, "ids")):
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name}: {what} is on {t.device}, expected {ref.device}")


def _fwd(prompt, weight, ids, embeds, backend):
    _check(prompt, weight, ids, embeds)
    ref = embeds if embeds is not None else weight
    if _use_triton(ref, backend):
        from fastpeft.kernels.soft_prompt import soft_prompt_embed_fwd

        return soft_prompt_embed_fwd(prompt, weight, ids, embeds)
    p, d = prompt.shape
    b, t = (embeds.shape[:2] if embeds is not None else ids.shape)
    out = torch.empty((b, p + t, d), dtype=ref.dtype, device=ref.device)
    out[:, :p].copy_(prompt)  # broadcast over the rows, cast once
    if embeds is not None:
        out[:, p:].copy_(embeds)
    else:
        for row in range(b):
            torch.index_select(weight, 0, ids[row], out=out[row, p:])
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("soft_prompt_embed", _fwd, _key)


@torch.library.register_fake("fastpeft::soft_prompt_embed", lib=_lib)
def _fwd_fake(prompt, weight, ids, embeds, backend):
    ref = embeds if embeds is not None else weight
    b, t = (embeds.shape[:2] if embeds is not None else ids.shape)
    return ref.new_empty((b, prompt.shape[0] + t, prompt.shape[1]))


_fwd_op = torch.ops.fastpeft.soft_prompt_embed.default


class _SoftPromptFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prompt, weight, ids, embeds, backend):
        out = (_fwd if direct_call(ids if ids is not None else embeds) else _fwd_op)(prompt, weight, ids, embeds,
                                                                                   backend)
        ctx.p, ctx.prompt_dtype = prompt.shape[0], prompt.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        p = ctx.p
        dprompt = dembeds = None
        if ctx.needs_input_grad[0]:
            dprompt = dout[:, :p].sum(0, dtype=torch.float32).to(ctx.prompt_dtype)
        if ctx.needs_input_grad[3]:
            dembeds = dout[:, p:]
        return dprompt, None, None, dembeds, None


def soft_prompt_embed(prompt: Tensor, weight: Tensor | None = None, ids: Tensor | None = None,
                      embeds: Tensor | None = None, backend: int = AUTO) -> Tensor:
    """``[prompt | weight[ids]]`` (or ``[prompt | embeds]``) for every row, [B, P + T, D] in the tokens' dtype;
    differentiable in the prompt and ``embeds`` (and in ``weight``, through aten's embedding)."""
    if _functorch_level() is not None or _forward_ad._current_level >= 0:
        # torch.func transforms and forward-mode AD: the op has no batching or forward-AD rule; plain aten does
        from ..reference import soft_prompt_embed_ref

        return soft_prompt_embed_ref(prompt, weight, ids, embeds)
    grad = torch.is_grad_enabled()
    if grad and weight is not None and weight.requires_grad and ids is not None:
        embeds, weight, ids = torch.nn.functional.embedding(ids, weight), None, None
    if grad and (prompt.requires_grad or (embeds is not None and embeds.requires_grad)):
        return _SoftPromptFn.apply(prompt, weight, ids, embeds, backend)
    return (_fwd if direct_call(ids if ids is not None else embeds) else _fwd_op)(prompt, weight, ids, embeds, backend)

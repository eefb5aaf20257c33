"""Triton kernel for ``fastpeft::soft_prompt_embed``: ``out[b] = [prompt | weight[ids[b]]]`` in one launch.

One program per (output row, D block): row ``t < P`` of batch row ``b`` copies prompt row ``t`` (one [P, D] copy
read by every batch row, so it stays in L2), the others gather table row ``ids[b, t - P]`` (or copy
``embeds[b, t - P]``); every value is cast to the output dtype in registers and written once. Pure data movement:
the launch moves ``B (P + T) D`` elements each way, which is the floor of any implementation that materialises
the output. Offsets are int64 (a 256k x 8192 table has more than 2^31 elements). An id outside the table is not
checked here (a host-side check would sync): the fused torch path and aten's embedding raise on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import KernelSpec, _launch

__all__ = ["soft_prompt_embed_fwd", "shipped_configs"]

_MAX_BLOCK_D = 1024
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def soft_prompt_embed_kernel(out_ptr, prompt_ptr, src_ptr, ids_ptr, T, P, D, s_ob, s_ot, s_pp, s_sv, s_sb, s_st,
                             s_ib, s_it, FROM_IDS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // (P + T)
    t = row % (P + T)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    keep = offs < D
    if t < P:
        x = tl.load(prompt_ptr + t * s_pp + offs, mask=keep).to(out_ptr.dtype.element_ty)
    else:
        if FROM_IDS:
            tok = tl.load(ids_ptr + b * s_ib + (t - P) * s_it).to(tl.int64)
            x = tl.load(src_ptr + tok * s_sv + offs, mask=keep).to(out_ptr.dtype.element_ty)
        else:
            x = tl.load(src_ptr + b * s_sb + (t - P) * s_st + offs, mask=keep).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * s_ob + t * s_ot + offs, x, mask=keep)


def _block_d(D: int) -> int:
    return min(max(triton.next_power_of_2(D), 16), _MAX_BLOCK_D)


def _plan(prompt: Tensor, weight: Tensor | None, ids: Tensor | None, embeds: Tensor | None,
          out: Tensor) -> KernelSpec:
    P, D = prompt.shape
    B, T = out.shape[0], out.shape[1] - P
    for t, name in ((prompt, "prompt"), (weight, "weight"), (embeds, "embeds")):
        if t is not None and t.dtype not in _DTYPES:
            raise TypeError(f"fastpeft soft_prompt_embed (triton): {name} is {t.dtype}; expected one of {_DTYPES}")
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"fastpeft soft_prompt_embed (triton): {name} needs unit stride in its last dim")
    from_ids = embeds is None
    src = weight if from_ids else embeds
    block = _block_d(D)
    args = dict(out_ptr=out, prompt_ptr=prompt, src_ptr=src, ids_ptr=ids if from_ids else out, T=T, P=P, D=D,
                s_ob=out.stride(0), s_ot=out.stride(1), s_pp=prompt.stride(0),
                s_sv=src.stride(0) if from_ids else 0, s_sb=0 if from_ids else src.stride(0),
                s_st=0 if from_ids else src.stride(1), s_ib=ids.stride(0) if from_ids else 0,
                s_it=ids.stride(1) if from_ids else 0)
    return KernelSpec("soft_prompt_embed", soft_prompt_embed_kernel, args,
                      dict(FROM_IDS=from_ids, BLOCK_D=block), 4 if block >= 256 else 1, 1,
                      (B * (P + T), triton.cdiv(D, block)))


def soft_prompt_embed_fwd(prompt: Tensor, weight: Tensor | None, ids: Tensor | None,
                          embeds: Tensor | None) -> Tensor:
    """[B, P + T, D] in the dtype of ``weight`` (or ``embeds``); the caller checked shapes and devices."""
    ref = weight if embeds is None else embeds
    B, T = ids.shape if embeds is None else embeds.shape[:2]
    out = torch.empty((B, prompt.shape[0] + T, prompt.shape[1]), dtype=ref.dtype, device=ref.device)
    if out.numel():
        _launch(_plan(prompt, weight, ids, embeds, out), out.device)
    return out


def shipped_configs() -> list[tuple[str, KernelSpec]]:
    """(id, spec) for every BLOCK_D the launcher can pick (16 .. 1024), from ids and from embeds, bf16 tokens with
    an fp32 prompt (PEFT's default: the one cast) and fp16/fp32 where the block is the widest."""
    out = []
    for block in (16, 32, 64, 128, 256, 512, 1024):
        D = block if block < _MAX_BLOCK_D else 4096
        for tok_dt, p_dt in ((torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                             (torch.float32, torch.float32)):
            if block != _MAX_BLOCK_D and tok_dt != torch.bfloat16:
                continue
            prompt = torch.empty((20, D), dtype=p_dt, device="meta")
            weight = torch.empty((32000, D), dtype=tok_dt, device="meta")
            ids = torch.empty((8, 64), dtype=torch.int64, device="meta")
            embeds = torch.empty((8, 64, D), dtype=tok_dt, device="meta")
            o = torch.empty((8, 84, D), dtype=tok_dt, device="meta")
            tag = f"D{block}-{str(tok_dt)[6:]}-prompt-{str(p_dt)[6:]}"
            out.append((f"soft-prompt-ids-{tag}", _plan(prompt, weight, ids, None, o)))
            out.append((f"soft-prompt-embeds-{tag}", _plan(prompt, None, None, embeds, o)))
    return out

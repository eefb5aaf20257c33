"""What the launchers share: the tile config tables and their heuristics, the launch record, argument checks.

No autotuning: one config per (regime, padded rank, operand width), picked by the heuristics below, so every
config that can run is known ahead of time and compiled by tests/test_aot.py (registers, spills, shared memory).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from .adapted_linear import linear_fwd_kernel

__all__ = ["TileConfig", "KernelSpec", "LaunchPlan", "PlanCache", "CostStep", "LAUNCH_OPTIONS"]

# Compile options every launch passes. Triton 3.9 fuses a * b + c into FMAs by default and 3.10 stops doing so:
# pinned here (and by tests/_aot.py, which compiles with these options) so that rounding and what the AOT test
# checks cannot drift with Triton's default.
LAUNCH_OPTIONS = dict(enable_fp_fusion=True)


class TileConfig(NamedTuple):
    BM: int  # rows of x / dy per program
    BN: int  # output columns (fwd, db) or the N step of the loop (dx)
    BK: int  # the K step of the loop (fwd) or output columns (dx, da)
    num_warps: int
    num_stages: int


class CostStep(NamedTuple):
    """One launch of a plan as the cost model (benchmarks/cost_model.py) sees it: what it must compute and move."""
    name: str  # "lora_shrink", "cublas_addmm", ...
    engine: str  # "cublas" | "triton" | "torch"
    flops: int  # 2 x multiply-adds of the math, counted once (``passes`` multiplies it for split precision)
    rate: str  # what the flops run on: "bf16" (fp16 alike), "tf32", "fp32" (no tensor cores), "none"
    passes: int  # MMA passes per product: 1, or 3 for tf32x3
    dram_bytes: int  # each operand read once and each output written once
    l2_bytes: int  # re-reads the grid makes beyond that (programs re-reading a shared operand), served from L2


class KernelSpec(NamedTuple):
    """One launch as the launchers would issue it: enough to compile it ahead of time (tests/test_aot.py)."""
    name: str  # label: "lora_fwd", "lora_bwd_dx", "ia3_fwd", ...
    kernel: object
    args: dict  # runtime arguments by name (tensors may live on the meta device)
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple


# Keys: (decode: M <= 16, BR cap, wide: some dot operand is fp32). LoRA's fused kernel runs the decode rows only
# (M > 16 is the split plan, lora_split.py); bigger ranks get smaller tiles: the [BM, BR] xa accumulator and the
# [BR, *] adapter tiles grow with R and would otherwise spill. Wide rows are small because 3xTF32 holds split operands
# in registers and sm_80's mma.sync takes its A operand from registers. IA3 runs on the rank-64 rows (no low-rank
# epilogue), at decode and, when ia3_fwd is called directly with more rows, prefill.
_FWD_CONFIGS: dict[tuple[bool, int, bool], TileConfig] = {
    (True, 64, False): TileConfig(16, 32, 128, 4, 4),
    (True, 128, False): TileConfig(16, 32, 128, 4, 3),
    (True, 256, False): TileConfig(16, 32, 32, 4, 3),
    (False, 64, False): TileConfig(128, 128, 32, 8, 4),
    (True, 64, True): TileConfig(16, 32, 32, 4, 4),
    (True, 128, True): TileConfig(16, 32, 32, 4, 3),
    (True, 256, True): TileConfig(16, 32, 32, 8, 2),
    (False, 64, True): TileConfig(32, 64, 32, 8, 3),
}
# IA3's dx: output tile [BM, BK], loop over N in steps of BN.
_BWD_DX_CONFIGS: dict[tuple[bool, int, bool], TileConfig] = {
    (True, 64, False): TileConfig(16, 128, 32, 4, 4),
    (False, 64, False): TileConfig(128, 64, 64, 8, 3),
    (True, 64, True): TileConfig(16, 64, 32, 4, 4),
    (False, 64, True): TileConfig(64, 32, 64, 8, 3),
}
_GROUP_M = 8  # programs sharing a weight column block run close together (L2 reuse of W)
_MAX_RANK = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED = not isinstance(linear_fwd_kernel, triton.runtime.jit.JITFunction)


def _block_rank(R: int) -> int:
    """R padded to a power of two >= 16: BR is the reduction dim of the epilogue dots (>= 16 for 16-bit MMA)."""
    return max(16, triton.next_power_of_2(R))


def _config_key(M: int, R: int, x_dtype: torch.dtype, a_dtype: torch.dtype) -> tuple[bool, int, bool]:
    return (M <= 16, max(64, _block_rank(R)), torch.float32 in (x_dtype, a_dtype))


def _fwd_config(M: int, N: int, K: int, R: int, x_dtype: torch.dtype, a_dtype: torch.dtype) -> TileConfig:
    return _FWD_CONFIGS[_config_key(M, R, x_dtype, a_dtype)]


def _ia3_config(M: int, x_dtype: torch.dtype) -> tuple[TileConfig, TileConfig]:
    """(forward, dx) tiles for IA3: LoRA's smallest-rank rows. The vector never enters a dot (it scales a tile
    that is rounded to x's dtype first), so only x's dtype decides the operand width."""
    key = (M <= 16, 64, x_dtype == torch.float32)
    return _FWD_CONFIGS[key], _BWD_DX_CONFIGS[key]


def _dot_precision() -> str:
    """Precision of the dots that take fp32 operands (fp16/bf16 dots ignore it).

    torch.backends.cuda.matmul.allow_tf32 set: plain TF32, as torch. Unset (torch's default): 3xTF32, whose error is
    within fp32 accumulation error, on tensor cores. Not "ieee": Triton lowers IEEE fp32 dots to FMAs that unroll
    the whole K extent into registers (triton-lang/triton#5572), and the epilogue dots here have K = BR up to 256;
    every prefill config then spilled kilobytes (tests/test_aot.py), and FMAs run far below tensor-core rates.
    """
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _check_tensor(name: str, t, shape: tuple, dtypes=_DTYPES) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_device(tensors: dict) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {({k: str(v) for k, v in devices.items()})}")
    _check_launch_device(next(iter(devices.values())))


def _check_launch_device(dev: torch.device) -> None:
    if dev.type != "meta" and dev.type != "cuda" and not (_INTERPRETED and dev.type == "cpu"):
        raise ValueError(f"expected CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {dev}")


def _check_2d(name: str, t) -> None:
    if not isinstance(t, Tensor) or t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")


def _weight_strides(weight, N: int, K: int, dtype, weight_t: bool) -> tuple[int, int]:
    """(stride over N, stride over K) of W; (0, 0) without a base weight."""
    if weight is None:
        return 0, 0
    _check_tensor("weight", weight, (K, N) if weight_t else (N, K), (dtype,))
    return (weight.stride(1), weight.stride(0)) if weight_t else (weight.stride(0), weight.stride(1))


def _meta(t) -> tuple | None:
    """What a launch plan reads from a tensor argument: shape, strides, dtype, device (None stays None)."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


class LaunchPlan(NamedTuple):
    """A checked launch with its per-call arguments left open: the kernel, every argument fixed by the plan key
    (sizes, strides, constexprs) and the launch shape. Replaying it costs a dict merge instead of the checks, the
    config lookup and forty keyword arguments built afresh (about 25 us of host time per call, which is the
    whole budget of an eager decode step's layer on a GPU)."""
    kernel: object
    static: dict
    num_warps: int
    num_stages: int
    grid: tuple

    @classmethod
    def of(cls, spec: KernelSpec, dynamic: frozenset) -> "LaunchPlan":
        static = {k: v for k, v in spec.args.items() if k not in dynamic}
        static.update(spec.constexprs)
        return cls(spec.kernel, static, spec.num_warps, spec.num_stages, spec.grid)

    def launch(self, device: torch.device, dynamic: dict) -> None:
        if self.grid[0] == 0:
            return
        with _on_device(device):
            self.kernel[self.grid](**self.static, **dynamic, num_warps=self.num_warps, num_stages=self.num_stages,
                                   **LAUNCH_OPTIONS)


class PlanCache:
    """Launch plans by key: the metadata of every tensor argument (``_meta``) plus the flags that pick constexprs.
    A key holds no tensor, so the cache keeps no memory alive; it is cleared when full (shapes that vary every
    call, e.g. training on unpadded batches, re-plan as they would without it)."""

    def __init__(self, size: int = 512):
        self.size, self.plans = size, {}

    def get(self, key: tuple):
        return self.plans.get(key)

    def put(self, key: tuple, plan) -> None:
        if len(self.plans) >= self.size:
            self.plans.clear()
        self.plans[key] = plan


def _on_device(device: torch.device):
    """``torch.cuda.device(device)`` only when it is not already current (entering it costs host time)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _launch(spec: KernelSpec, device: torch.device) -> None:
    if spec.grid[0] == 0:
        return
    with _on_device(device):
        spec.kernel[spec.grid](**spec.args, **spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages,
                               **LAUNCH_OPTIONS)

"""The first-GPU check: ``python -m benchmarks.gpu_check --out results/`` (one H100/H200, 3-6 minutes, mostly
first-call Triton compiles in untimed warm-ups, and the big check).

Writes ``gpu_check.md`` (also printed) and ``gpu_check.json`` to ``--out``. Each check is a row: PASS, FAIL, SKIP
(with its reason) or INFO (a number with no target). A FAIL does not stop the run; the exit status is 1 if any row
FAILs. Under test: ``fastpeft.ops.linear.lora_linear`` on a bf16 model (x, W) with fp32 adapters (PEFT's default
autocast) or bf16 ones, dropout 0 and 0.1. Sections and what a FAIL means:

1. parity: Llama-7B projections (N, K) in {(4096, 4096), (11008, 4096)}, r in {16, 64}, M in {1, 8, 64, 4096,
   16384}, backend "triton"; y always, dx, dA, dB at M in {64, 4096}. Judged by error ratio
   (``fastpeft.testing.assert_close_ratio``) against an fp64 oracle (``fastpeft.reference``, the mask of
   ``lora_dropout_mask``): at most ``ratio`` times PEFT's eager low-precision error, plus a floor. FAIL: the kernels
   compute something other than PEFT at a real shape (a tile edge, a config, a dtype path).
2. big: x over 2^31 elements (M = 2^19 + 4099, K = N = 4096, fp32 adapters, p = 0.1), forward and backward (~20 GB),
   checked on row slices (start, the 2^31 edge, middle, end) and dA / dB against a chunked fp64 reference. FAIL:
   32-bit addressing or a 32-bit dropout counter wraps. ``--no-big`` skips it.
3. dropout_mask: with W = 0, A = B = I, x = 1, y and dx are drop(1): the masks that forward and backward drew. Both
   must equal ``lora_dropout_mask(seed)``, and the keep fraction be within 5 sigma of 1 - p. FAIL: backward
   regenerates another mask than forward (wrong gradients under dropout), or the mask is biased.
4. cuda_graph: a training step (p = 0.1, forward and backward) captured by ``torch.cuda.graph`` with its seed drawn
   inside by ``new_seed(device)``. Two replays must draw two seeds and masks; each replay's y and gradients must equal
   an eager step with the seed it read. FAIL: the mask is frozen into the graph, or the seed read is not the one used.
5. times: CUDA events, median of 25 calls after warm-up, each behind a 256 MB L2 flush (a model's next layer has
   other weights) and a ~1 ms GPU sleep (the host runs ahead: GPU time, not launch gaps). cuBLAS ``F.linear(x, W)``
   (the floor; backward: ``dY W``, dX alone), PEFT's ``lora.Linear`` (``get_peft_model``), Unsloth-style ``x W^T``
   plus ``addmm_`` (adapters in x's dtype), fastpeft (backend "auto"). Forward: no_grad, train mode (dropout on);
   backward: ``autograd.grad`` of a retained graph, M in {64, 4096, 16384}. FAIL, the project's targets: fastpeft
   over 3 % slower than PEFT anywhere, or over 1.15x cuBLAS forward at M >= 4096. SKIP where parity did not pass.
6. host: host us per call of ``F.linear`` and ``lora_linear`` at M = 1, no grad: 10 groups of 100 back-to-back calls,
   each behind a GPU sleep so the host never waits on the queue. INFO: above ~15 us a layer, eager decode is
   host-bound.

Sections run as 1, 3, 5, 6, 4, 2 (reported 1-6): a failed capture or an illegal address can leave the CUDA context
unusable, so the checks that may cause one run last.

``--dry-run``: every section at tiny shapes (N, K in {(64, 32), (96, 64)}, r in {4, 16}, M in {1, 8, 33}), about a
minute; on CUDA if present, else on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton's
import) with backend "triton" for parity and masks. It keeps bf16, patching the interpreter's bf16 ``tl.dot`` and
fp32 -> bf16 cast to what the GPU does (``fastpeft.testing.patch_interpreter_bf16``, as the tests do). On CPU the CUDA-only
checks are SKIP with the reason after running what a CPU can (the big check's code at a small shape, the graph
check's eager part); times come from ``time.perf_counter`` and are not judged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import zlib
from dataclasses import asdict, dataclass

import torch

if __name__ == "__main__" and "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's import (fastpeft.kernels imports it)

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fastpeft.kernels.lora import lora_dropout_mask  # noqa: E402
from fastpeft.ops.linear import AUTO, TRITON, interpreter_active, lora_linear, new_seed  # noqa: E402
from fastpeft.reference import lora_linear_ref  # noqa: E402
from fastpeft.testing import assert_close, assert_close_ratio, patch_interpreter_bf16  # noqa: E402

__all__ = ["Plan", "FULL", "DRY", "Case", "Env", "parity_case", "run", "main", "SECTIONS"]

PASS, FAIL, SKIP, INFO = "PASS", "FAIL", "SKIP", "INFO"
X = torch.bfloat16  # the model dtype
ADAPTER_DTYPES = (torch.float32, torch.bfloat16)
DROPOUTS = (0.0, 0.1)
LORA_ALPHA = 16
PEFT_MARGIN, CUBLAS_TARGET, TARGET_M = 1.03, 1.15, 4096


@dataclass(frozen=True)
class Plan:
    projections: tuple  # (N, K)
    ranks: tuple
    ms: tuple
    bwd_parity_ms: tuple
    bwd_time_ms: tuple
    iters: int  # timed calls per provider and case
    warmup: int
    big: tuple  # (M, K, N) of the >2^31-element check
    mask: tuple  # (K = N = R, Ms, fraction mask (M, K))
    graph: tuple  # (M, N, K, R)
    host: tuple  # (N, K, R)


FULL = Plan(((4096, 4096), (11008, 4096)), (16, 64), (1, 8, 64, 4096, 16384), (64, 4096), (64, 4096, 16384), 25, 3,
            (2**19 + 4099, 4096, 4096), (128, (8, 4096), (4096, 4096)), (512, 4096, 4096, 16), (4096, 4096, 16))
DRY = Plan(((64, 32), (96, 64)), (4, 16), (1, 8, 33), (8, 33), (8, 33), 5, 1,
           (300, 64, 64), (32, (8, 33), (64, 64)), (33, 96, 64, 4), (96, 64, 4))

_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class Case:
    n: int
    k: int
    r: int
    m: int
    a_dtype: torch.dtype
    p: float

    @property
    def name(self) -> str:
        return f"N{self.n}-K{self.k}-r{self.r}-M{self.m}-{_NAME[self.a_dtype]}A-p{self.p:g}"

    @property
    def scaling(self) -> float:
        return LORA_ALPHA / self.r

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) % 2**31  # stable across runs and processes (hash() is salted)


@dataclass
class Env:
    plan: Plan
    device: str
    backend: int  # for the parity and mask checks; the times use AUTO
    dry: bool
    big: bool
    cuda: bool = False
    flush: torch.Tensor | None = None  # the L2 flush buffer (CUDA)


def cases(plan: Plan) -> list[Case]:
    return [Case(n, k, r, m, a, p) for n, k in plan.projections for r in plan.ranks for m in plan.ms
            for a in ADAPTER_DTYPES for p in DROPOUTS]


def _row(name: str, status: str, reason: str = "", **numbers) -> dict:
    return dict(name=name, status=status, reason=reason, **numbers)


def _guarded(name: str, fn, *args) -> list[dict]:
    """fn's rows, or one FAIL row naming the exception: one broken case must not hide the others."""
    try:
        out = fn(*args)
        return out if isinstance(out, list) else [out]
    except Exception as e:  # noqa: BLE001 - any error is a finding, reported as the row's reason
        return [_row(name, FAIL, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])]


def _sync(env: Env) -> None:
    if env.cuda:
        torch.cuda.synchronize()


def _tensors(c: Case, device: str):
    """x ~ N(0, 1); W ~ N(0, 1/K); A ~ U(+-1/sqrt(K)) (PEFT's kaiming init); B ~ N(0, 0.02^2) (a trained B)."""
    torch.manual_seed(c.seed)
    x = torch.randn(c.m, c.k, device=device, dtype=X)
    w = torch.randn(c.n, c.k, device=device, dtype=X).mul_(c.k ** -0.5)
    a = torch.empty(c.r, c.k, device=device).uniform_(-c.k ** -0.5, c.k ** -0.5).to(c.a_dtype)
    b = torch.randn(c.n, c.r, device=device).mul_(0.02).to(c.a_dtype)
    dy = torch.randn(c.m, c.n, device=device, dtype=X)
    return x, w, a, b, dy


def _seed(v: int, device: str) -> torch.Tensor:
    """A fixed seed as ``new_seed(device)`` draws one: a 0-dim int64 tensor where the kernels read it (no copy)."""
    return torch.tensor(v, dtype=torch.int64, device=device)


def _run(fn, leaves, dy, bwd: bool) -> list:
    """[y, dx, dA, dB] of ``fn(x, a, b)`` (autograd.grad; grads only with ``bwd``)."""
    leaves = [t.detach().requires_grad_(bwd) for t in leaves]
    with torch.set_grad_enabled(bwd):
        y = fn(*leaves)
        grads = list(torch.autograd.grad(y, leaves, dy)) if bwd else []
    return [y.detach(), *grads]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _judge(got, eager, oracle, dtype, name: str) -> tuple[dict, str]:
    """The report's numbers and assert_close_ratio's verdict ("" or its message)."""
    err, eager_err = _max_err(got, oracle), _max_err(eager, oracle)
    try:
        assert_close_ratio(got, eager, oracle, dtype, name=name)
        msg = ""
    except AssertionError as e:
        msg = str(e)
    return dict(err=err, eager_err=eager_err, ok=not msg), msg


def parity_case(c: Case, env: Env) -> dict:
    """Section 1, one case: fused (backend ``env.backend``) vs PEFT's eager path vs the fp64 oracle, same mask."""
    x, w, a, b, dy = _tensors(c, env.device)
    bwd = c.m in env.plan.bwd_parity_ms
    keep = lora_dropout_mask(c.seed, c.m, c.k, c.p, env.device) if c.p else None
    seed, s, p = _seed(c.seed, env.device), c.scaling, c.p
    fused = _run(lambda x_, a_, b_: lora_linear(x_, w, None, a_, b_, scaling=s, dropout_p=p, seed=seed,
                                                backend=env.backend), (x, a, b), dy, bwd)
    eager = _run(lambda x_, a_, b_: lora_linear_ref(x_, w, None, a_, b_, None, s, keep=keep, dropout_p=p),
                 (x, a, b), dy, bwd)
    w64 = w.double()
    oracle = _run(lambda x_, a_, b_: lora_linear_ref(x_, w64, None, a_, b_, None, s, keep=keep, dropout_p=p),
                  (x.double(), a.double(), b.double()), dy.double(), bwd)
    row, reasons = dict(y=None, dx=None, dA=None, dB=None), []
    for name, dtype, got, e, o in zip(("y", "dx", "dA", "dB"), (X, X, c.a_dtype, c.a_dtype), fused, eager, oracle):
        row[name], msg = _judge(got, e, o, dtype, name)
        if got.dtype != dtype:
            msg, row[name]["ok"] = f"{name} is {got.dtype}, expected {dtype}", False
        if msg:
            reasons.append(msg)
    return _row(c.name, FAIL if reasons else PASS, "; ".join(reasons), **row)


def check_parity(env: Env) -> list[dict]:
    return [r for c in cases(env.plan) for r in _guarded(c.name, parity_case, c, env)]


# --- 2. tensors over 2^31 elements -------------------------------------------------------------------------------

def check_big(env: Env) -> list[dict]:
    """Section 2. On the dry run's small x the code runs and its PASS rows become SKIP: the claim is untested."""
    (m, k, n), dev = env.plan.big, env.device
    if not env.big:
        return [_row("big: x over 2^31 elements", SKIP, "--no-big")]
    r, p, s, seed, huge = 16, 0.1, 1.0, 9876, m * k > 2**31
    torch.manual_seed(seed)
    x = torch.randn(m, k, device=dev, dtype=X)
    w = torch.randn(n, k, device=dev, dtype=X).mul_(k ** -0.5)
    a = torch.empty(r, k, device=dev).uniform_(-k ** -0.5, k ** -0.5)
    b = torch.randn(n, r, device=dev).mul_(0.02)
    leaves = [t.detach().requires_grad_() for t in (x, a, b)]
    y = lora_linear(leaves[0], w, None, leaves[1], leaves[2], scaling=s, dropout_p=p, seed=_seed(seed, dev),
                    backend=env.backend)
    keep = lora_dropout_mask(seed, m, k, p, dev)
    edge, h = (2**31 // k, 128) if huge else (m // 3, 16)  # edge: the first row past 2^31 elements of x
    slices = {"start": slice(0, 2 * h), "2^31 edge": slice(edge - h, edge + h),
              "middle": slice(m // 2 - h, m // 2 + h), "end": slice(m - 2 * h, m)}
    # dy and dx (2 bytes an element each), as much again for the backward's workspaces, and 8 GB to spare
    bwd = not huge or torch.cuda.mem_get_info()[0] > 8 * x.numel() + (8 << 30)
    dy = torch.randn(m, n, device=dev, dtype=X) if bwd else None
    fused = [y.detach(), *torch.autograd.grad(y, leaves, dy)] if bwd else [y.detach()]
    def ref(w_, kp):
        return lambda x_, a_, b_: lora_linear_ref(x_, w_, None, a_, b_, None, s, keep=kp, dropout_p=p)

    rows = []
    for where, sl in slices.items():
        ks, dys = keep[sl], dy[sl] if bwd else x[:0]  # x[:0]: a stand-in that no forward-only _run reads
        eager = _run(ref(w, ks), (x[sl], a, b), dys, bwd)
        oracle = _run(ref(w.double(), ks), (x[sl].double(), a.double(), b.double()), dys.double(), bwd)
        nums = {name: _judge(got[sl], e, o, X, name) for name, got, e, o in zip(("y", "dx"), fused, eager, oracle)}
        reasons = [msg for _, msg in nums.values() if msg]
        frac = ks.float().mean().item()
        if not 0.8 < frac < 0.98:  # 256 x 4096 draws: a sigma of 9e-4 around 0.9
            reasons.append(f"keep fraction {frac:.3f} on these rows")
        rows.append(_row(f"big: rows {sl.start}..{sl.stop} ({where})", FAIL if reasons else PASS, "; ".join(reasons),
                         detail=", ".join(f"{t} err/eager {_cell(v[0])}" for t, v in nums.items()),
                         **{t: v[0] for t, v in nums.items()}, keep_fraction=frac))
    if not bwd:
        rows.append(_row("big: backward", SKIP, "not enough free GPU memory for dy and dx"))
    else:
        del y, fused[0]
        # dA = s (dy B)^T drop(x), dB = s dy^T (drop(x) A^T): sums over every row, so a wrap anywhere shows here
        da, db = (torch.zeros(shape, device=dev, dtype=torch.float64) for shape in ((r, k), (n, r)))
        for i in range(0, m, 16384):
            xd, dyc = x[i:i + 16384].double().mul_(keep[i:i + 16384]).div_(1 - p), dy[i:i + 16384].double()
            da += s * (dyc @ b.double()).t() @ xd
            db += s * dyc.t() @ (xd @ a.double().t())
        for name, got, want in (("dA", fused[1], da), ("dB", fused[2], db)):
            rel = _max_err(got, want) / want.abs().max().item()
            # fp32 sums over 5e5 rows stay near 1e-5; corrupting the 4099 rows past 2^31 moves this by ~1e-1
            rows.append(_row(f"big: {name} over all {m} rows", PASS if rel <= 1e-3 else FAIL,
                             "" if rel <= 1e-3 else f"max err / max |ref| = {rel:.2e} > 1e-3",
                             detail=f"rel err {rel:.2e}", rel_err=rel))
    why = f"dry run: ran at M={m}, K={k}; an x over 2^31 elements needs ~20 GB of GPU memory"
    return rows if huge else [dict(r, status=SKIP, reason=why) if r["status"] == PASS else r for r in rows]


# --- 3. forward / backward dropout masks -------------------------------------------------------------------------

def mask_case(m: int, a_dtype, env: Env) -> dict:
    """W = 0, A = B = I, s = 1, x = 1: y = drop(x) (forward's mask) and, for dy = 1, dx = drop(1) (backward's)."""
    k, p, seed = env.plan.mask[0], 0.1, 4321 + m
    dev = env.device
    x = torch.ones(m, k, device=dev, dtype=X, requires_grad=True)
    eye = torch.eye(k, device=dev, dtype=a_dtype)
    a, b = eye.clone().requires_grad_(), eye.clone().requires_grad_()
    y = lora_linear(x, torch.zeros(k, k, device=dev, dtype=X), None, a, b, scaling=1.0, dropout_p=p,
                    seed=_seed(seed, dev), backend=env.backend)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    keep = lora_dropout_mask(seed, m, k, p, dev)
    bad_fwd, bad_bwd = int(((y != 0) != keep).sum()), int(((dx != 0) != keep).sum())
    scale = 1 / (1 - p)
    bad_val = int(((y[keep].float() - scale).abs() > 1e-2).sum() + ((dx[keep].float() - scale).abs() > 1e-2).sum())
    ok = bad_fwd == bad_bwd == bad_val == 0
    return _row(f"mask: M{m}-K{k}-{_NAME[a_dtype]}A fwd/bwd vs lora_dropout_mask", PASS if ok else FAIL,
                "" if ok else f"{bad_fwd} fwd, {bad_bwd} bwd mask mismatches, {bad_val} kept values != 1/(1-p)",
                detail=f"{bad_fwd} / {bad_bwd} mismatches of {m * k}", fwd_mismatches=bad_fwd,
                bwd_mismatches=bad_bwd, value_mismatches=bad_val)


def mask_fraction(env: Env) -> dict:
    (m, k), p = env.plan.mask[2], 0.1
    keep, other = (lora_dropout_mask(sd, m, k, p, env.device) for sd in (77, 78))
    frac, n = keep.float().mean().item(), m * k
    z = (frac - (1 - p)) / math.sqrt(p * (1 - p) / n)
    differ = (keep != other).float().mean().item()  # two seeds: independent masks differ at 2p(1 - p)
    ok = abs(z) <= 5 and abs(differ - 2 * p * (1 - p)) <= 5 * math.sqrt(2 * p * (1 - p) / n) + 1e-9
    return _row(f"mask: keep fraction M{m}-K{k} p={p}", PASS if ok else FAIL,
                "" if ok else f"keep {frac:.5f} ({z:+.1f} sigma) or seeds 77/78 differ at {differ:.4f}",
                detail=f"keep {frac:.5f} vs {1 - p} ({z:+.1f} sigma); two seeds differ at {differ:.4f}",
                keep_fraction=frac, sigmas=z, seeds_differ=differ)


def check_masks(env: Env) -> list[dict]:
    rows = [r for m in env.plan.mask[1] for a in ADAPTER_DTYPES
            for r in _guarded(f"mask M{m} {_NAME[a]}A", mask_case, m, a, env)]
    return rows + _guarded("mask: keep fraction", mask_fraction, env)


# --- 4. CUDA-graph replay ----------------------------------------------------------------------------------------

def check_graph(env: Env) -> list[dict]:
    m, n, k, r = env.plan.graph
    dev, p = env.device, 0.1
    torch.manual_seed(5)
    x = torch.randn(m, k, device=dev, dtype=X, requires_grad=True)
    w = torch.randn(n, k, device=dev, dtype=X).mul_(k ** -0.5)
    # B at 1/sqrt(R), not 0.02: the low-rank term as large as the base one, so a wrong mask shows in y, not only dA
    a = torch.empty(r, k, device=dev).uniform_(-k ** -0.5, k ** -0.5).requires_grad_()
    b = torch.randn(n, r, device=dev).mul_(r ** -0.5).requires_grad_()
    dy = torch.randn(m, n, device=dev, dtype=X)

    def step(seed):
        y = lora_linear(x, w, None, a, b, scaling=1.0, dropout_p=p, seed=seed, backend=AUTO)
        return [y.detach(), *torch.autograd.grad(y, (x, a, b), dy)]

    def same(got, want) -> str:
        try:
            for name, g_, w_ in zip(("y", "dx", "dA", "dB"), got, want):
                assert_close(g_, w_, name=name)
            return ""
        except AssertionError as e:
            return str(e)

    def distinct(o1, o2) -> float:
        return max(_max_err(u, v) / v.abs().max().item() for u, v in zip(o1, o2))

    if not env.cuda:
        note = ""
        try:
            new_seed(dev)
        except TypeError as e:
            note = f"; new_seed(device) is not there yet ({e}): the GPU run FAILs this check"
        o1, o2, o1b = step(_seed(11, dev)), step(_seed(12, dev)), step(_seed(11, dev))
        bad = same(o1b, o1) or ("" if distinct(o1, o2) > 0.05 else "seeds 11 and 12 gave the same result")
        return [_row("graph: capture and replay", FAIL if bad else SKIP, bad or "torch.cuda.graph needs CUDA: ran the "
                     "eager part (two seeds give two masks, a recompute with the same seed matches)" + note)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: compiles, cuBLAS workspaces, autograd streams
        for _ in range(3):
            step(new_seed(dev))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        seed = new_seed(dev)
        outs = step(seed)
    replays = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((int(seed.item()), [t.clone() for t in outs]))
    (s1, o1), (s2, o2) = replays
    d = distinct(o1, o2)
    ok = s1 != s2 and d > 0.05
    rows = [_row("graph: two replays draw two seeds and masks", PASS if ok else FAIL,
                 "" if ok else f"seeds {s1}, {s2}; outputs differ by {d:.2e} of max", detail=f"seeds {s1}, {s2}; "
                 f"max rel diff {d:.2f}", seeds=[s1, s2], rel_diff=d)]
    for i, (sv, o) in enumerate(replays):
        bad = same(o, step(torch.full_like(seed, sv)))
        rows.append(_row(f"graph: replay {i + 1} = eager step with its seed", FAIL if bad else PASS, bad,
                         detail=f"seed {sv}", seed=sv))
    return rows


# --- 5. times ----------------------------------------------------------------------------------------------------

def _time_us(fn, env: Env) -> float:
    """Median microseconds of ``fn()`` over ``iters`` calls after ``warmup`` (CUDA events, L2 flushed, GPU ahead)."""
    for _ in range(env.plan.warmup):
        fn()
    _sync(env)
    if not env.cuda:
        return statistics.median(_perf_us(fn) for _ in range(env.plan.iters))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(env.plan.iters)]
    for start, end in ev:
        env.flush.zero_()
        torch.cuda._sleep(2_000_000)  # ~1 ms: the host enqueues fn() before the GPU reaches `start`
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev)


def _perf_us(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def _peft_layer(c: Case, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """PEFT's own lora.Linear over an nn.Linear holding W; fp32 adapters by PEFT's default autocast."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=c.r, lora_alpha=LORA_ALPHA, lora_dropout=c.p, target_modules=["0"])
    base = nn.Sequential(nn.Linear(c.k, c.n, bias=False, device=w.device, dtype=w.dtype))
    layer = get_peft_model(base, cfg, autocast_adapter_dtype=c.a_dtype == torch.float32).train().base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(w)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    assert layer.lora_A["default"].weight.dtype == c.a_dtype, layer.lora_A["default"].weight.dtype
    return layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _unsloth(x, w, a, b, s, p):
    """Unsloth's LoRA matmul: the base GEMM, then the low-rank term added in place by addmm_ in x's dtype."""
    out = x @ w.t()
    xd = F.dropout(x, p) if p else x
    return out.addmm_(xd @ a.t(), b.t(), alpha=s)


def time_case(c: Case, env: Env, bwd: bool, parity: dict, cache: dict) -> dict:
    x, w, a, b, dy = _tensors(c, env.device)
    layer, pa, pb = _peft_layer(c, w, a, b)
    ax, bx = a.to(X), b.to(X)
    seed, s, p = _seed(c.seed, env.device), c.scaling, c.p
    def fast(x_, a_, b_):
        return lora_linear(x_, w, None, a_, b_, scaling=s, dropout_p=p, seed=seed, backend=AUTO)

    def unsloth(x_, a_, b_):
        return _unsloth(x_, w, a_, b_, s, p)

    if bwd:
        def grad_fn(fn, x_, a_, b_):
            y = fn(x_, a_, b_)
            return lambda: torch.autograd.grad(y, (x_, a_, b_), dy, retain_graph=True)

        xl, al, bl, axl, bxl = (t.detach().requires_grad_() for t in (x, a, b, ax, bx))
        runs = dict(cublas=lambda: torch.mm(dy, w), peft=grad_fn(lambda x_, *_: layer(x_), xl, pa, pb),
                    unsloth=grad_fn(unsloth, xl, axl, bxl), fastpeft=grad_fn(fast, xl, al, bl))
    else:
        runs = dict(cublas=lambda: F.linear(x, w), peft=lambda: layer(x), unsloth=lambda: unsloth(x, ax, bx),
                    fastpeft=lambda: fast(x, a, b))
    keys = dict(cublas=(c.m, c.n, c.k, bwd), unsloth=(c.m, c.n, c.k, c.r, c.p, bwd))
    us = {}
    with torch.set_grad_enabled(bwd):
        for name, fn in runs.items():
            key = keys.get(name)
            us[name] = cache[key] if key in cache else _time_us(fn, env)
            if key is not None:
                cache[key] = us[name]
    vs_cublas, vs_peft = us["fastpeft"] / us["cublas"], us["fastpeft"] / us["peft"]
    flops = 2 * c.m * c.n * c.k + (4 if bwd else 2) * c.m * c.r * (c.n + c.k)
    reasons = []
    if vs_peft > PEFT_MARGIN:
        reasons.append(f"fastpeft {vs_peft:.2f}x PEFT")
    if not bwd and c.m >= TARGET_M and vs_cublas > CUBLAS_TARGET:
        reasons.append(f"fastpeft {vs_cublas:.2f}x cuBLAS at M >= {TARGET_M}")
    status = FAIL if reasons else PASS
    if parity.get(c.name) != PASS:
        status, reasons = SKIP, [f"parity {parity.get(c.name, 'not run')} for this case: speed not judged"]
    elif env.dry:
        status, reasons = SKIP, ["dry run: tiny shapes" + ("" if env.cuda else " and CPU perf_counter times")
                                 + " are not judged against the GPU targets"]
    return _row(f"{'bwd' if bwd else 'fwd'} {c.name}", status, "; ".join(reasons), mode="bwd" if bwd else "fwd",
                **{f"{k}_us": v for k, v in us.items()}, fastpeft_vs_cublas=vs_cublas, fastpeft_vs_peft=vs_peft,
                fastpeft_tflops=flops / us["fastpeft"] / 1e6)


def check_times(env: Env, parity: dict) -> list[dict]:
    cache: dict = {}
    rows = [r for c in cases(env.plan) for r in _guarded(f"fwd {c.name}", time_case, c, env, False, parity, cache)]
    return rows + [r for c in cases(env.plan) if c.m in env.plan.bwd_time_ms
                   for r in _guarded(f"bwd {c.name}", time_case, c, env, True, parity, cache)]


# --- 6. host time per launch -------------------------------------------------------------------------------------

def _host_us(fn, env: Env, calls: int = 1000, group: int = 100) -> float:
    for _ in range(20):
        fn()
    _sync(env)
    total = 0.0
    for _ in range(calls // group):
        if env.cuda:
            torch.cuda._sleep(20_000_000)  # ~10 ms of GPU work ahead: the host never waits, the queue never drains
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        total += time.perf_counter() - t0
        _sync(env)
    return total / calls * 1e6


def check_host(env: Env) -> list[dict]:
    n, k, r = env.plan.host
    dev = env.device
    x, w = torch.randn(1, k, device=dev, dtype=X), torch.randn(n, k, device=dev, dtype=X)
    calls = {"F.linear": lambda: F.linear(x, w)}
    for dt in ADAPTER_DTYPES:
        a, b = torch.randn(r, k, device=dev, dtype=dt), torch.randn(n, r, device=dev, dtype=dt)
        calls[f"lora_linear {_NAME[dt]}A"] = lambda a=a, b=b: lora_linear(x, w, None, a, b, scaling=2.0, backend=AUTO)
    rows = []
    with torch.no_grad():
        for name, fn in calls.items():
            us = _host_us(fn, env)
            rows.append(_row(f"host: {name} M=1 N{n} K{k}", INFO, "" if env.cuda else "CPU: host and compute together",
                             detail=f"{us:.1f} us/call", us_per_call=us))
    return rows


# --- report ------------------------------------------------------------------------------------------------------

_CHECKS = ["name", "detail", "status", "reason"]
SECTIONS = {  # key: (title, markdown columns)
    "parity": ("1. Parity at real shapes: error / PEFT-eager error against fp64 (error in brackets)",
               ["name", "y", "dx", "dA", "dB", "status", "reason"]),
    "big": ("2. Tensors over 2^31 elements", _CHECKS),
    "dropout_mask": ("3. Forward / backward dropout masks", _CHECKS),
    "cuda_graph": ("4. CUDA-graph replay of a training step with dropout", _CHECKS),
    "times": ("5. Times (us, median; bwd rows: the cuBLAS column is dX = dY W alone)",
              ["name", "cublas_us", "peft_us", "unsloth_us", "fastpeft_us", "fastpeft_vs_cublas", "fastpeft_vs_peft",
               "fastpeft_tflops", "status", "reason"]),
    "host": ("6. Host time per call at M = 1 (no grad)", _CHECKS),
}


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):  # a parity tensor
        return f"{v['err'] / max(v['eager_err'], 1e-30):.2f} ({v['err']:.1e})" + ("" if v["ok"] else " FAIL")
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 0.1 else f"{v:.2g}"
    return str(v).replace("|", "/").replace("\n", " ")


def markdown(report: dict) -> str:
    meta = report["meta"]
    out = [f"# fastpeft gpu_check{' (dry run)' if meta['dry_run'] else ''}", "",
           f"{meta['device_name']}; torch {meta['torch']}, triton {meta['triton']}, peft {meta['peft']}; "
           f"{meta['wall_s']:.0f} s; {meta['counts']}", ""]
    for key, (title, cols) in SECTIONS.items():
        rows = report["sections"][key]
        out += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
        out.append("")
    return "\n".join(out)


def make_env(dry: bool, big: bool = True) -> Env:
    cuda = torch.cuda.is_available() and not interpreter_active()
    if not cuda:
        if not dry:
            raise SystemExit("gpu_check needs CUDA and no TRITON_INTERPRET; --dry-run runs on CPU (interpreted)")
        if not interpreter_active():
            raise SystemExit("gpu_check --dry-run on CPU needs TRITON_INTERPRET=1 before triton is imported")
        patch_interpreter_bf16()  # bf16 dots and casts as on the GPU
        torch.set_num_threads(1)  # tiny CPU matmuls on a shared box: more threads only spin-wait (ms per call)
    env = Env(DRY if dry else FULL, "cuda" if cuda else "cpu", TRITON, dry, big, cuda)
    if cuda:
        env.flush = torch.empty(64 << 20, dtype=torch.int32, device="cuda")  # 256 MB: over any L2
    return env


def run(env: Env) -> dict:
    """Every section, in the order that keeps a dead CUDA context from hiding results (see the module docstring)."""
    import peft
    import triton

    t0, walls, sections = time.perf_counter(), {}, {}

    def timed(key, fn, *args):
        t = time.perf_counter()
        sections[key] = _guarded(key, fn, *args)
        _sync(env)
        walls[key] = time.perf_counter() - t

    timed("parity", check_parity, env)
    timed("dropout_mask", check_masks, env)
    timed("times", check_times, env, {r["name"]: r["status"] for r in sections["parity"]})
    timed("host", check_host, env)
    timed("cuda_graph", check_graph, env)
    timed("big", check_big, env)
    rows = [r for rs in sections.values() for r in rs]
    counts = {s: sum(r["status"] == s for r in rows) for s in (PASS, FAIL, SKIP, INFO)}
    meta = dict(dry_run=env.dry, device=env.device, device_name=torch.cuda.get_device_name() if env.cuda else "CPU "
                "(Triton interpreter)", torch=torch.__version__, triton=triton.__version__, peft=peft.__version__,
                plan=asdict(env.plan), wall_s=time.perf_counter() - t0, section_wall_s=walls, counts=counts)
    return dict(meta=meta, sections={k: sections[k] for k in SECTIONS})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description="The first-GPU check of fastpeft's LoRA op (see the module docstring).")
    ap.add_argument("--out", default="results", help="folder for gpu_check.md and gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes; CPU under TRITON_INTERPRET=1 without CUDA")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=True,
                    help="the >2^31-element check (about 20 GB of GPU memory)")
    args = ap.parse_args(argv)
    report = run(make_env(args.dry_run, args.big))
    os.makedirs(args.out, exist_ok=True)
    md = markdown(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(md)
    return 1 if report["meta"]["counts"][FAIL] else 0


if __name__ == "__main__":
    sys.exit(main())

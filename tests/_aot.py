"""Ahead-of-time compile of every shipped kernel config (LoRA, IA3, prefix attention, soft prompt) for CUDA targets,
no GPU.

Run as a script (``python tests/_aot.py --cc 80 90 -j 2``; ``flag_variants()`` only for the last cc). It must run
without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` returns interpreted functions that cannot be
compiled), so tests call it in a subprocess with that variable removed. Prints one JSON object per (config, cc):
``{"id", "cc", "shared", "regs", "spill_stores", "spill_loads", "stack", "num_warps", "num_stages", "error"}``.

Signatures come from the launchers themselves (each module's ``shipped_configs()`` plans its launches on meta
tensors) and are specialized exactly as a launch would be (ints equal to 1 become constexprs, 16-divisible pointers
and ints get ``tt.divisibility``), so what compiles here is what a GPU launch compiles.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

PTXAS_INFO = re.compile(r"Used (\d+) registers")
PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas() -> str:
    """Triton's bundled newest ptxas (CUDA 13.x): plain ``ptxas`` may be older than the PTX Triton emits."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")


def _signature(spec):
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(spec.kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", spec.constexprs[name]
            continue
        value = spec.args[name]
        ty, attr = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = value
        elif attr:
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    return signature, constexprs, attrs


def flag_variants() -> list:
    """(id, spec): the launches with each optional feature off in turn, which shipped_configs() (all features on)
    does not compile: every constexpr branch of every kernel is compiled at least once. One config per kernel (rank
    64, bf16 x with fp32 adapters: the most operand casts) is enough: the flags do not change the tiles."""
    import torch

    from fastpeft.kernels.lora import _plan_fwd, _plan_mask
    from fastpeft.kernels.lora_split import _plan_expand, _plan_shrink

    M, N, K, R = 16, 4096, 4096, 64
    bf16, f32 = torch.bfloat16, torch.float32
    x, w, bias, a, b, lb, res, seed = (torch.empty(shape, dtype=dt, device="meta") for shape, dt in (
        ((M, K), bf16), ((N, K), bf16), ((N,), bf16), ((R, K), f32), ((N, R), f32), ((N,), f32), ((M, N), bf16),
        ((), torch.int64)))
    full = dict(x=x, weight=w, bias=bias, lora_a=a, lora_b=b, lora_bias=lb, residual=res, scaling=2.0, dropout_p=0.1,
                seed=seed, weight_t=False, store_xa=True)
    fwd = {"no-base": dict(weight=None, bias=None), "no-bias": dict(bias=None), "no-lora-bias": dict(lora_bias=None),
           "no-residual": dict(residual=None), "no-dropout": dict(dropout_p=0.0), "no-xa": dict(store_xa=False),
           "bare": dict(bias=None, lora_bias=None, residual=None, dropout_p=0.0)}
    out = [(f"flags-fwd-{name}", _plan_fwd(**{**full, **over})[0]) for name, over in fwd.items()]
    # the split kernels at a prefill shape: split_specs() has the shrink with dropout, the expand with bias alone and
    # with dropout alone, both wgrad variants; here the rest
    M = 4096
    x, xa, res = (torch.empty(s, dtype=dt, device="meta") for s, dt in (((M, K), bf16), ((M, R), f32), ((M, N), bf16)))
    out.append(("flags-shrink-no-dropout", _plan_shrink(x, a, 1.0, 0.0, None, False)[0]))
    expand = dict(xa=xa, b=b, lora_bias=lb, bias=bias, residual=res, scale=2.0, p=0.1, seed=seed, out_dtype=bf16,
                  transposed=False, xa_dtype=f32)
    for name, over in {"all": {}, "bare": dict(lora_bias=None, bias=None, residual=None, p=0.0, xa_dtype=None)}.items():
        out.append((f"flags-expand-{name}", _plan_expand(**{**expand, **over})[0]))
    out.append(("flags-dropout-mask", _plan_mask(seed, M, K, 0.1, "meta")[0]))
    return out + _ia3_flag_variants() + _prefix_flag_variants()


def _prefix_flag_variants() -> list:
    """Prefix attention's flag combinations beyond shipped_configs() (bf16, D 128, prefill and decode): the bool
    mask, causal with no mask, and no optional feature at all; the tiles do not depend on the flags."""
    import torch

    from fastpeft.kernels.prefix_attention import _meta_specs

    bare = dict(mask=None, bias=False, softcap=0.0, window=0)
    variants = {"bool": dict(mask="bool"), "causal": dict(mask=None, causal=True), "bare": bare}
    out = []
    for name, over in variants.items():
        for Sq, regime in ((2048, "prefill"), (1, "decode")):
            out += [(f"flags-pa-{tag}-{name}-{regime}", spec)
                    for tag, spec in _meta_specs(torch.bfloat16, 128, Sq, backward=Sq > 1, **over)]
    return out


def _ia3_flag_variants() -> list:
    """IA3's flag combinations beyond shipped_configs() (prefill, bf16 x, fp32 vector): no bias, no stored base,
    dx or dl alone, dl from the stored base, the Conv1D weight layout, and fp16 x with a bf16 vector (x rounded
    to the vector's dtype before scaling)."""
    import torch

    from fastpeft.kernels.ia3 import _plan_ia3_bwd, _plan_ia3_fwd

    def launches(x_dt, l_dt, scale_input):
        M, N, K = 4096, 4096, 4096
        x, w, bias, dy = (torch.empty(s, dtype=x_dt, device="meta") for s in ((M, K), (N, K), (N,), (M, N)))
        l = torch.empty(K if scale_input else N, dtype=l_dt, device="meta")
        fwd = dict(x=x, weight=w, bias=bias, l=l, scale_input=scale_input, weight_t=False, store_base=True)
        bwd = dict(dy=dy, saved=x if scale_input else dy, weight=w, l=l, scale_input=scale_input, weight_t=False,
                   saved_is_base=False, need_dx=True, need_dl=True)
        wt = dict(weight=torch.empty((K, N), dtype=x_dt, device="meta"), weight_t=True)
        return fwd, bwd, wt

    out = []
    for scale_input in (False, True):
        mode = "in" if scale_input else "out"
        fwd, bwd, wt = launches(torch.bfloat16, torch.float32, scale_input)
        fwd_var = {"no-bias": dict(bias=None, store_base=False), "wt": wt}
        bwd_var = {"only-dx": dict(need_dl=False), "only-dl": dict(need_dx=False), "wt": wt}
        if not scale_input:
            bwd_var["base"] = dict(saved_is_base=True)
        out += [(f"flags-ia3-fwd-{mode}-{name}", _plan_ia3_fwd(**{**fwd, **over})[0]) for name, over in fwd_var.items()]
        out += [(f"flags-ia3-dx-{mode}-{name}", _plan_ia3_bwd(**{**bwd, **over})[0]) for name, over in bwd_var.items()]
        fwd, bwd, _ = launches(torch.float16, torch.bfloat16, scale_input)
        out += [(f"flags-ia3-fwd-{mode}-fp16x-bf16l", _plan_ia3_fwd(**fwd)[0]),
                (f"flags-ia3-dx-{mode}-fp16x-bf16l", _plan_ia3_bwd(**bwd)[0])]
    return out


@functools.lru_cache(maxsize=1)
def _specs() -> dict:
    from fastpeft.kernels.lora import shipped_configs
    from fastpeft.kernels.prefix_attention import shipped_configs as prefix_shipped_configs
    from fastpeft.kernels.soft_prompt import shipped_configs as soft_prompt_shipped_configs

    return dict(shipped_configs() + prefix_shipped_configs() + soft_prompt_shipped_configs() + flag_variants())


def compile_one(job: tuple[str, int]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastpeft.kernels._common import LAUNCH_OPTIONS  # the options every launch passes

    spec_id, cc = job
    spec = _specs()[spec_id]
    out = dict(id=spec_id, cc=cc, num_warps=spec.num_warps, num_stages=spec.num_stages, error=None)
    try:
        signature, constexprs, attrs = _signature(spec)
        compiled = triton.compile(
            ASTSource(spec.kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
            options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages, **LAUNCH_OPTIONS))
        out["shared"] = compiled.metadata.shared
        arch = "sm_90a" if cc == 90 else f"sm_{cc}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            log = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        regs, spill = PTXAS_INFO.search(log), PTXAS_SPILL.search(log)
        out["regs"] = int(regs.group(1))
        out["stack"], out["spill_stores"], out["spill_loads"] = (int(v) for v in spill.groups())
    except Exception as e:  # reported per config; the test fails on it with the message
        out["error"] = f"{type(e).__name__}: {e}"[-2000:]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90])
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("-k", "--filter", default="", help="only ids containing this substring")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        sys.exit("tests/_aot.py must run without TRITON_INTERPRET")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # every shipped config for every target; the flag variants (same tiles) for the newest target only
    jobs = [(spec_id, cc) for spec_id in _specs() if args.filter in spec_id
            for cc in (args.cc[-1:] if spec_id.startswith("flags-") else args.cc)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for res in pool.map(compile_one, jobs):
            print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

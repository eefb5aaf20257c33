"""Every shipped LoRA, IA3 and prefix-attention kernel config compiles for sm_80 and sm_90a, fits in shared memory,
spills nothing.

No GPU needed: tests/_aot.py compiles each (kernel, config, dtypes, flags) that the launchers' heuristics can pick
(``shipped_configs()`` of ``fastpeft.kernels.lora`` and ``fastpeft.kernels.prefix_attention``) with
``triton.compile(ASTSource(...), target=GPUTarget(...))`` and runs Triton's bundled newest ptxas
(``ptxas-blackwell``) with ``-v`` on the PTX. It runs in a subprocess without TRITON_INTERPRET (the interpreter
replaces ``@triton.jit`` kernels with uncompilable ones), once per session; the per-config tests only read its
results. Run with ``-s`` to see the register / shared-memory table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastpeft.kernels import prefix_attention, soft_prompt
from fastpeft.kernels.lora import shipped_configs

sys.path.insert(0, str(Path(__file__).parent))
import _aot  # noqa: E402  (tests/ is not a package)

CCS = (80, 90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (bytes)
AOT_SCRIPT = Path(__file__).with_name("_aot.py")


def _ptxas_available() -> bool:
    try:
        import triton

        return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell").exists()
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend with ptxas-blackwell needed")

IDS = [spec_id for spec_id, _ in shipped_configs() + prefix_attention.shipped_configs()
       + soft_prompt.shipped_configs()]
FLAG_IDS = [spec_id for spec_id, _ in _aot.flag_variants()]


@pytest.fixture(scope="session")
def aot_results() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(AOT_SCRIPT), "--cc", *map(str, CCS), "-j", str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800,
                          cwd=AOT_SCRIPT.parent.parent)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    results = {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        results[(r["id"], r["cc"])] = r
    _print_table(results)
    return results


def _print_table(results: dict) -> None:
    print(f"\n{'config':42s} {'warps':>5s} {'stages':>6s} | " + " | ".join(
        f"sm_{cc} regs spill(st/ld) smem(KiB)" for cc in CCS))
    for spec_id in IDS + FLAG_IDS:
        row = [results.get((spec_id, cc)) for cc in CCS]
        cells = []
        for r in row:
            if r is None:
                cells.append(f"{'-':>33s}")
            elif r["error"]:
                cells.append(f"{'ERROR':>33s}")
            else:
                cells.append(f"{r['regs']:>12d} {r['spill_stores']:>5d}/{r['spill_loads']:<5d} "
                             f"{r['shared'] / 1024:>9.1f}")
        first = next(r for r in row if r is not None)
        print(f"{spec_id:42s} {first['num_warps']:>5d} {first['num_stages']:>6d} | " + " | ".join(cells))


@pytest.mark.parametrize("spec_id,cc", [(i, cc) for i in IDS for cc in CCS] + [(i, CCS[-1]) for i in FLAG_IDS],
                         ids=[f"{i}-sm{cc}" for i in IDS for cc in CCS] + [f"{i}-sm{CCS[-1]}" for i in FLAG_IDS])
def test_compiles_without_spills(aot_results, spec_id, cc):
    r = aot_results[(spec_id, cc)]
    assert r["error"] is None, f"{spec_id} sm_{cc}: {r['error']}"
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
        f"{spec_id} sm_{cc}: {r['regs']} registers, spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded")
    assert r["shared"] <= SHARED_LIMIT[cc], f"{spec_id} sm_{cc}: {r['shared']} B shared > {SHARED_LIMIT[cc]} B"


def _tile(spec) -> tuple:
    """What decides registers and shared memory beside the rank: kernel, warps, stages, tiles, the dot's dtype (the
    rank's padded BR and the R chunk are compiled at each rank class's largest)."""
    c, a = spec.constexprs, spec.args
    dot = next(a[k] for k in ("a_ptr", "b_ptr", "ref_ptr", "x_ptr", "dy_ptr") if k in a)
    return (spec.name, spec.num_warps, spec.num_stages, dot.dtype) + tuple(c.get(k) for k in ("BM", "BN", "BK", "BC"))


def test_every_heuristic_choice_is_shipped():
    """Every config the heuristics can return is in shipped_configs() (so the test above covers it): LoRA's fused
    decode forward, every launch of the split plan (forward and backward) at prefill and decode row counts, IA3."""
    import torch

    from fastpeft.kernels import _common, lora, lora_split

    shipped = {_tile(s) for _, s in shipped_configs()}
    meta = lambda *shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    for x_dt, a_dt in [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32,) * 2,
                       (torch.float16, torch.float16)]:
        for R in (1, 16, 64, 65, 128, 129, 256):
            for M in (1, 16):
                x, w, a, b = meta(M, 4096, dtype=x_dt), meta(4096, 4096, dtype=x_dt), meta(R, 4096, dtype=a_dt), \
                    meta(4096, R, dtype=a_dt)
                spec = lora._plan_fwd(x, w, None, a, b, None, None, 1.0, 0.0, None, False, True)[0]
                assert _tile(spec) in shipped, (M, R, x_dt, a_dt, _tile(spec))
            for M in (1, 17, 4096, 100_000):
                for spec, _ in lora_split.split_specs(M, 4096, 4096, R, x_dt, a_dt, 0.1, True):
                    assert _tile(spec) in shipped, (M, R, x_dt, a_dt, _tile(spec))
    for x_dt in (torch.float16, torch.bfloat16, torch.float32):
        for M in (1, 16, 17, 4096):
            for name, c in zip(("ia3_fwd", "ia3_bwd_dx"), _common._ia3_config(M, x_dt)):
                assert any(t[:3] == (name, c.num_warps, c.num_stages) and t[4:7] == (c.BM, c.BN, c.BK)
                           for t in shipped), (name, M, x_dt, c)


def test_every_prefix_attention_choice_is_shipped():
    """Every (kernel, tile, BD, dtype) the prefix-attention launchers can pick is in its shipped_configs()."""
    import torch

    pa = prefix_attention

    def key(name, c, BD, dt):
        return name, c.num_warps, c.num_stages, c.BM, c.BN, BD, dt

    shipped = {(s.kernel.__name__, s.num_warps, s.num_stages, s.constexprs.get("BM"), s.constexprs.get("BN"),
                s.constexprs["BD"], s.args["q_ptr" if "q_ptr" in s.args else "do_ptr"].dtype)
               for _, s in pa.shipped_configs()}
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        wide = dt == torch.float32
        for D in (8, 16, 24, 40, 64, 80, 100, 128, 160, 256)[:8 if wide else 10]:
            BD = pa._block_d(D)
            for rows in (1, 4, 16, 17, 32, 33, 64, 65, 128, 4096):
                c = pa._fwd_config(rows, BD, wide)
                assert key("prefix_attention_fwd_kernel", c, BD, dt) in shipped, (rows, D, dt, c)
            _, dkv, dq = pa._CONFIGS[(BD, wide)]
            for name, c in (("prefix_attention_bwd_dkv_kernel", dkv), ("prefix_attention_bwd_dq_kernel", dq)):
                assert key(name, c, BD, dt) in shipped, (name, D, dt)

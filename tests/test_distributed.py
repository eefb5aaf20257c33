"""Data-parallel training on CPU (gloo, 2 processes on 127.0.0.1): a patched LoRA Llama, and a patched
prefix-tuning Llama (with projection) and a P-tuning Llama (LSTM encoder), give the same losses, all-reduced adapter gradients and updated weights as
PEFT's eager model, under DDP and under FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each spawned rank trains both models (PEFT, then patched) for two SGD steps on its own batch and saves what it saw;
the test process compares.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastpeft
from fastpeft.testing import assert_close
import prefix_models
from models import lora_model, model_inputs

WORLD = 2
STEPS = 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value (FSDP2 gradients and parameters are sharded DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# method -> (PeftModel builder, inputs of a seed, layers the report names fused)
METHODS = {"lora": (lambda: lora_model("llama"), lambda seed: model_inputs("llama", seed=seed), 14),
           "prefix": (lambda: prefix_models.prefix_model("llama", projection=True),
                      lambda seed: prefix_models.inputs("llama", seed=seed), 1),
           "ptuning": (lambda: prefix_models.prompt_model("llama", "ptuning", encoder="LSTM"),
                       lambda seed: prefix_models.inputs("llama", seed=seed), 1)}


def _train(rank: int, patched: bool, wrap: str, method: str) -> dict:
    build, batch, _ = METHODS[method]
    model = build().train()
    if patched:
        fastpeft.patch(model, backend="torch")
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        wrapped = fully_shard(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for _, p in trainable], lr=0.5)
    out = {"loss": [], "grads": [], "fused": len(fastpeft.report(model).fused) if patched else 0,
           "param_type": type(trainable[0][1]).__name__}
    for step in range(STEPS):
        inputs = batch(100 * step + rank)  # each rank its own batch
        loss = wrapped(**inputs).loss
        loss.backward()
        out["loss"].append(loss.detach().clone())
        out["grads"].append({n: _full(p.grad).detach().clone() for n, p in trainable})
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["params"] = {n: _full(p).detach().clone() for n, p in trainable}
    return out


def _worker(rank: int, port: int, out_dir: str, wrap: str, method: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {"peft": _train(rank, False, wrap, method), "fused": _train(rank, True, wrap, method)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(tmp_path, monkeypatch, wrap: str, method: str) -> list[dict]:
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only; inherited by the spawned ranks
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), wrap, method), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _check(results: list[dict], param_type: str, method: str) -> None:
    for rank, res in enumerate(results):
        peft, fused = res["peft"], res["fused"]
        assert fused["fused"] == METHODS[method][2]
        assert fused["param_type"] == peft["param_type"] == param_type
        for step in range(STEPS):
            assert_close(fused["loss"][step], peft["loss"][step], name=f"rank {rank} step {step} loss")
            assert fused["grads"][step].keys() == peft["grads"][step].keys()
            for n, g in fused["grads"][step].items():
                assert_close(g, peft["grads"][step][n], name=f"rank {rank} step {step} {n}")
        for n, p in fused["params"].items():
            assert_close(p, peft["params"][n], name=f"rank {rank} updated {n}")
    # the gradients were all-reduced: both ranks hold the same mean gradient although their batches differ
    r0, r1 = results
    assert not torch.equal(r0["fused"]["loss"][0], r1["fused"]["loss"][0])
    for n, g in r0["fused"]["grads"][0].items():
        assert_close(g, r1["fused"]["grads"][0][n], name=f"rank 0 vs rank 1 {n}")


@pytest.mark.parametrize("method", list(METHODS))
def test_ddp_patched_matches_peft(tmp_path, monkeypatch, method):
    _check(_run(tmp_path, monkeypatch, "ddp", method), "Parameter", method)


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_patched_matches_peft(tmp_path, monkeypatch, method):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 fully_shard")
    _check(_run(tmp_path, monkeypatch, "fsdp", method), "DTensor", method)  # sharded: FSDP2 really ran

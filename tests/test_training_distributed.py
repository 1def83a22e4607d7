"""Two processes under torchrun train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_worker import make_problem
from safetensors.torch import load_file

from flowmatch.training import (
    TrainConfig,
    config_to_dict,
    latest_checkpoint,
    load_checkpoint,
    train,
)

WORKER = Path(__file__).with_name("_train_worker.py")


@pytest.mark.slow  # separate processes, each importing torch
def test_two_processes_match_one_process(tmp_path):
    # 4 micro-batches per step: rank 0 takes j = 0, 2 and rank 1 takes j = 1, 3. A clip norm
    # below the gradient norm makes the clipping (after the all-reduce) part of the comparison.
    config = TrainConfig(
        seed=3, steps=6, batch_size=16, micro_batch_size=4, lr=1e-2, grad_clip=0.5,
        log_every=3, checkpoint_every=6, device="cpu",
    )  # fmt: skip
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(WORKER), json.dumps(config_to_dict(config)), str(tmp_path / "ddp"),
        "--dtype", "float64", "--out", str(tmp_path / "ddp.safetensors"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    model, objective, source = make_problem(torch.float64)
    initial = [p.detach().clone() for p in model.parameters()]
    train(model, objective, source, config, tmp_path / "single")

    # float64: the processes add the four micro-batch gradients in another order ((g0 + g2) +
    # (g1 + g3) instead of g0 + g1 + g2 + g3), which changes the last bits (~1e-16 relative);
    # six Adam steps keep such differences far below 1e-12.
    ddp_weights = load_file(tmp_path / "ddp.safetensors")
    for (name, p), p0 in zip(model.named_parameters(), initial, strict=True):
        torch.testing.assert_close(ddp_weights[name], p.detach(), rtol=1e-12, atol=1e-14)
        assert (p - p0).abs().max() > 1e-3  # the weights did move
    ddp_ema = load_checkpoint(latest_checkpoint(tmp_path / "ddp")).ema
    for name, value in load_checkpoint(latest_checkpoint(tmp_path / "single")).ema.items():
        torch.testing.assert_close(ddp_ema[name], value, rtol=1e-12, atol=1e-14)

    records = {}
    for run in ("ddp", "single"):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        records[run] = [json.loads(line) for line in lines]
    assert [r["step"] for r in records["ddp"]] == [3, 6]  # written once, by rank 0
    for a, b in zip(records["ddp"], records["single"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-12 * b["loss"]
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-12 * b["grad_norm"]
        assert a["grad_norm"] > config.grad_clip  # clipping was active
    assert json.loads((tmp_path / "ddp" / "meta.json").read_text())["world_size"] == 2

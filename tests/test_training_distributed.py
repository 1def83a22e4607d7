"""Two processes under torchrun train exactly like one process with the same global batch: per
objective (flow matching, self-distillation and MeanFlow through JVPs, map distillation from a
teacher), under DDP and under FSDP, on one node and on two."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import _torchrun
import pytest
import torch
from _train_worker import OBJECTIVES, make_problem, train_case
from safetensors.torch import load_file

from flowmatch.app.runs import load_run
from flowmatch.training import (
    TrainConfig,
    config_to_dict,
    latest_checkpoint,
    load_checkpoint,
    train,
)

WORKER = Path(__file__).with_name("_train_worker.py")
# float64: the processes add the micro-batch gradients in another order ((g0 + g2) + (g1 + g3)
# instead of g0 + g1 + g2 + g3; FSDP's reduce-scatter and the sharded clip norm regroup sums
# too), which changes the last bits (~1e-16 relative); four Adam steps amplify that by at most
# the conditioning of m / sqrt(v), leaving differences far below 1e-10 (measured: < 1e-13).
TOLERANCE = {"rtol": 1e-10, "atol": 1e-12}


def _config(**changes) -> TrainConfig:
    # 4 micro-batches per step: rank 0 takes j = 0, 2 and rank 1 takes j = 1, 3. A clip norm
    # below the gradient norm makes the clipping (after the reduction) part of the comparison;
    # an EMA decay of 0.5 makes the EMA follow the last steps' weights closely.
    base = dict(
        seed=3, steps=4, batch_size=16, micro_batch_size=4, lr=1e-2, grad_clip=0.5,
        ema_decay=0.5, ema_warmup=False, log_every=2, checkpoint_every=2, keep_checkpoints=None,
        device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


def _start_workers(arguments: list[str], cases: list, run_dir: Path) -> subprocess.Popen:
    """Start ``torchrun ARGUMENTS _train_worker.py --cases CASES RUN_DIR``."""
    return _torchrun.start([*arguments, str(WORKER), "--cases", json.dumps(cases), str(run_dir)])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run: Path, weights: Path, single: Path, model: torch.nn.Module) -> float:
    """The run ``run`` (final weights in ``weights``) equals the one-process run ``single``
    whose trained ``model`` is given; the largest absolute difference of the final weights."""
    got = load_file(weights)
    largest = 0.0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(got[name], value, **TOLERANCE)
        largest = max(largest, (got[name] - value).abs().max().item())
    ema = load_checkpoint(latest_checkpoint(run)).ema
    for name, value in load_checkpoint(latest_checkpoint(single)).ema.items():
        torch.testing.assert_close(ema[name], value, **TOLERANCE)
    a, b = _metrics(run), _metrics(single)
    assert [r["step"] for r in a] == [2, 4]  # written once, by rank 0
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-10 * abs(y["loss"])
        assert abs(x["grad_norm"] - y["grad_norm"]) <= 1e-10 * y["grad_norm"]
    return largest


@pytest.mark.slow  # separate processes, each importing torch
def test_every_objective_on_two_processes_matches_one_process(tmp_path):
    engines = ("ddp", "fsdp")
    cases = [
        [f"{o}-{e}", o, config_to_dict(_config(parallel=e))] for e in engines for o in OBJECTIVES
    ]
    cases.append(["lsd-fsdp-resumed", "lsd", config_to_dict(_config(parallel="fsdp"))])
    process = _start_workers(["--standalone", "--nproc_per_node=2"], cases, tmp_path)

    singles = {}  # the one-process runs, while the two processes train
    for objective in OBJECTIVES:
        singles[objective] = train_case(objective, _config(), str(tmp_path / f"{objective}-one"))
    _torchrun.finish(process, 150)

    for engine in engines:
        for objective, model in singles.items():
            name = f"{objective}-{engine}"
            largest = _assert_same_run(
                tmp_path / name, tmp_path / f"{name}.safetensors",
                tmp_path / f"{objective}-one", model,
            )  # fmt: skip
            print(f"{name}: largest weight difference to one process {largest:.2e}")
    # Sharded checkpoints: a folder of shards per step; an FSDP run resumed from the step-2
    # shards ends where the uninterrupted run ends, and load_run reads its EMA.
    assert (tmp_path / "lsd-fsdp" / "checkpoints" / "ckpt-000002.dcp").is_dir()
    resumed = load_file(tmp_path / "lsd-fsdp-resumed.safetensors")
    for name, value in load_file(tmp_path / "lsd-fsdp.safetensors").items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    run = load_run(tmp_path / "lsd-fsdp", model=OBJECTIVES["lsd"]()[0])
    ema = load_checkpoint(latest_checkpoint(tmp_path / "lsd-one")).ema
    for name, value in run.model.state_dict().items():
        torch.testing.assert_close(value, ema[name], **TOLERANCE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_match_one_process(tmp_path):
    # Two torchrun agents, one per "node", meet at the master's address; world size 2.
    cases = [["fm-ddp", "fm", config_to_dict(_config())]]
    port = _free_port()
    nodes = [
        _start_workers(
            [
                "--nnodes=2",
                f"--node_rank={rank}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
            ],
            cases,
            tmp_path,
        )
        for rank in (0, 1)
    ]
    model = train_case("fm", _config(), str(tmp_path / "fm-one"))
    for node in nodes:
        _torchrun.finish(node, 150)
    _assert_same_run(
        tmp_path / "fm-ddp", tmp_path / "fm-ddp.safetensors", tmp_path / "fm-one", model
    )
    assert json.loads((tmp_path / "fm-ddp" / "meta.json").read_text())["world_size"] == 2


@pytest.mark.slow  # separate processes, each importing torch
def test_two_processes_match_one_process(tmp_path):
    # The default float32-capable worker, 6 steps, micro-batches of 4 over 2 processes.
    config = TrainConfig(
        seed=3, steps=6, batch_size=16, micro_batch_size=4, lr=1e-2, grad_clip=0.5,
        log_every=3, checkpoint_every=6, device="cpu",
    )  # fmt: skip
    arguments = [
        "--standalone", "--nproc_per_node=2", str(WORKER), json.dumps(config_to_dict(config)),
        str(tmp_path / "ddp"), "--dtype", "float64", "--out", str(tmp_path / "ddp.safetensors"),
    ]  # fmt: skip
    _torchrun.finish(_torchrun.start(arguments), 120)

    model, objective, source = make_problem(torch.float64)
    initial = [p.detach().clone() for p in model.parameters()]
    train(model, objective, source, config, tmp_path / "single")
    ddp_weights = load_file(tmp_path / "ddp.safetensors")
    for (name, p), p0 in zip(model.named_parameters(), initial, strict=True):
        torch.testing.assert_close(ddp_weights[name], p.detach(), rtol=1e-12, atol=1e-14)
        assert (p - p0).abs().max() > 1e-3  # the weights did move
    assert json.loads((tmp_path / "ddp" / "meta.json").read_text())["world_size"] == 2

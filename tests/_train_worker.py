"""Tiny models, objectives and a data source for the training tests, and a script that trains
them.

The script runs in its own process, under torchrun for the multi-process tests or alone for the
kill-and-resume test:

    python tests/_train_worker.py CONFIG_JSON RUN_DIR [--resume] [--dtype float64]
        [--sleep SECONDS] [--out WEIGHTS.safetensors]
    python tests/_train_worker.py --cases CASES_JSON RUN_DIR

``--cases`` trains ``[[name, objective, config], ...]`` (an objective of :data:`OBJECTIVES`) in
float64 one after the other, each into ``RUN_DIR/name``, and rank 0 writes the final full weights
to ``RUN_DIR/name.safetensors``; a name ending in ``-resumed`` then deletes the run's last
checkpoint and resumes from the one before. The process group is joined once for all cases.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from flowmatch.losses import MapDistillationObjective, MeanFlowObjective, SelfDistillationObjective
from flowmatch.losses.flow_map_objectives import lsd
from flowmatch.nets import MLP, FlowMapNet
from flowmatch.paths import AffinePath, CondOTSchedule
from flowmatch.training import TrainConfig, config_from_dict, latest_checkpoint, train
from flowmatch.training.checkpoint import sharded_path


class GaussianSource:
    """Data ``x1 ~ N(mean, std^2 I)``."""

    def __init__(self, mean: Tensor, std: float = 0.5) -> None:
        self.mean, self.std = mean, std

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(
            n,
            self.mean.numel(),
            generator=generator,
            dtype=self.mean.dtype,
            device=generator.device,
        )
        return self.mean.to(z.device) + self.std * z


class TinyVelocity(nn.Module):
    """A two-layer MLP velocity field ``v(x, t)``."""

    def __init__(self, dim: int = 2, hidden: int = 16, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden, dtype=dtype), nn.SiLU(), nn.Linear(hidden, dim, dtype=dtype)
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


class CondOTObjective:
    """Conditional flow matching on ``x_t = t x1 + (1 - t) x0``: ``|v(x_t, t) - (x1 - x0)|^2``
    averaged over dimensions; ``sleep`` slows each call down (for the kill test)."""

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep

    def __call__(
        self, model: nn.Module, batch: dict[str, Tensor], step: int, generator: torch.Generator
    ) -> Tensor:
        if self.sleep:
            time.sleep(self.sleep)
        x1 = batch["x1"]
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        t = torch.rand(x1.shape[0], generator=generator, dtype=x1.dtype, device=x1.device)
        x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
        return (model(x_t, t) - (x1 - x0)).square().mean(dim=1)

    def state_dict(self) -> dict[str, float]:
        return {"sigma_min": 0.0}

    def load_state_dict(self, state: dict[str, float]) -> None:
        assert state == {"sigma_min": 0.0}


def make_problem(dtype: torch.dtype = torch.float32, sleep: float = 0.0):
    """The model (initialised from seed 0), objective and data source the tests train."""
    torch.manual_seed(0)
    model = TinyVelocity(dtype=dtype)
    source = GaussianSource(torch.tensor([2.0, -1.0], dtype=dtype))
    return model, CondOTObjective(sleep), source


def _flow_map() -> FlowMapNet:
    torch.manual_seed(0)
    return FlowMapNet(MLP(2, hidden=16, depth=2, time_embed_dim=8, num_times=2)).double()


def _teacher() -> TinyVelocity:
    torch.manual_seed(1)
    return TinyVelocity(dtype=torch.float64)


PATH = AffinePath(CondOTSchedule())
# Each builds (model, objective) in float64, the model initialised from seed 0: flow matching,
# self-distillation through a JVP (with a learned loss weight: objective parameters), MeanFlow
# (a JVP) and Lagrangian map distillation from a fixed teacher velocity.
OBJECTIVES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "fm": lambda: (make_problem(torch.float64)[0], CondOTObjective()),
    "lsd": lambda: (
        _flow_map(),
        SelfDistillationObjective(PATH, lsd, diagonal_fraction=0.5, learned_weight=True).double(),
    ),
    "meanflow": lambda: (_flow_map(), MeanFlowObjective(PATH)),
    "lmd": lambda: (_flow_map(), MapDistillationObjective(PATH, _teacher())),
}


def train_case(
    objective: str, config: TrainConfig, run_dir: str, resume: bool = False
) -> nn.Module:
    """Train ``OBJECTIVES[objective]`` on float64 Gaussian data; the trained model."""
    model, loss = OBJECTIVES[objective]()
    source = GaussianSource(torch.tensor([2.0, -1.0], dtype=torch.float64))
    train(model, loss, source, config, run_dir, resume=resume)
    return model


def _full_weights(model: nn.Module) -> dict[str, Tensor]:
    """The model's full weights (gathered from every process under FSDP)."""
    state = model.state_dict().items()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).contiguous() for k, v in state}


def run_cases(cases: list[list[Any]], run_dir: str) -> None:
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    for name, objective, config_dict in cases:
        config = config_from_dict(TrainConfig, config_dict)
        folder = os.path.join(run_dir, name)
        model = train_case(objective, config, folder)
        if name.endswith("-resumed"):
            if rank == 0:
                last = latest_checkpoint(folder)
                last.unlink()
                shutil.rmtree(sharded_path(last), ignore_errors=True)
            if world_size > 1:
                dist.barrier()
            model = train_case(objective, config, folder, resume=True)
        weights = _full_weights(model)
        if rank == 0:
            save_file(weights, os.path.join(run_dir, f"{name}.safetensors"))
    if world_size > 1:
        del model  # the last DDP / FSDP wrapper holds the group: free it before destroying that
        gc.collect()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--cases", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cases:
        run_cases(json.loads(args.config), args.run_dir)
        return
    config = config_from_dict(TrainConfig, json.loads(args.config))
    model, objective, source = make_problem(getattr(torch, args.dtype), args.sleep)
    train(model, objective, source, config, args.run_dir, resume=args.resume)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        save_file(model.state_dict(), args.out)


if __name__ == "__main__":
    main()

"""A tiny model, objective and data source for the training tests, and a script that trains them.

The script runs in its own process, under torchrun for the multi-process test or alone for the
kill-and-resume test:

    python tests/_train_worker.py CONFIG_JSON RUN_DIR [--resume] [--dtype float64]
        [--sleep SECONDS] [--out WEIGHTS.safetensors]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from flowmatch.training import TrainConfig, config_from_dict, train


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = config_from_dict(TrainConfig, json.loads(args.config))
    model, objective, source = make_problem(getattr(torch, args.dtype), args.sleep)
    train(model, objective, source, config, args.run_dir, resume=args.resume)
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        save_file(model.state_dict(), args.out)


if __name__ == "__main__":
    main()

"""The training loop: objective-agnostic, deterministic, one code path for 1..N processes.

Step ``k`` of a run with ``G = batch_size / micro_batch_size`` micro-batches per step and ``N``
processes; process ``r`` handles the micro-batches ``j = r, r + N, ...``:

    for each of its micro-batches j:
        seed a generator and the global RNG (dropout) from micro_batch_seed(seed, k, j)
        batch = source.sample(micro_batch_size, generator)
        loss_j = mean(objective(model, batch, k, generator)) / (G / N)
        loss_j.backward()          # DDP averages gradients over the N processes after the last j
    clip the global gradient norm; AdamW step at lr(k); EMA update

The gradient is then ``(1 / G) sum_j grad mean_j`` for every ``N``, and every draw is a pure
function of ``(seed, k, j)``: runs on 1 or N processes, and a resumed run, see the same stream.
Host syncs (``.item()``, finiteness checks) happen only at logging, validation and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flowmatch.training import distributed
from flowmatch.training.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    checkpoint_to_resume,
    load_checkpoint,
    prune_checkpoints,
    remove_temporaries,
    save_checkpoint,
)
from flowmatch.training.config import ConfigError, TrainConfig, config_to_dict
from flowmatch.training.ema import EMA
from flowmatch.training.lr import learning_rate
from flowmatch.training.run import Progress, RunDir

# Train-config keys a resumed run may change: they do not alter the stream of updates.
MAY_CHANGE_ON_RESUME = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "val_every",
    "device",
    "num_threads",
)


class Objective(Protocol):
    """``objective(model, batch, step, generator) -> per-sample loss [B]``.

    If the objective is an ``nn.Module``, its trainable parameters are optimised with the model's
    and its ``state_dict`` is checkpointed; otherwise ``state_dict`` returns tensors, numbers and
    strings (an objective without state may omit both methods). ``generator`` lives on the
    training device: draw noise with ``device=generator.device``.
    """

    def __call__(
        self, model: nn.Module, batch: dict[str, Tensor], step: int, generator: torch.Generator
    ) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DataSource(Protocol):
    """``source.sample(n, generator)``: a tensor ``[n, *dims]`` of data, or a dict with ``"x1"``
    (and ``"y"`` for labels). Draw on ``generator.device``, the training device."""

    def sample(self, n: int, generator: torch.Generator) -> Tensor | dict[str, Tensor]: ...


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, step: int, checked_step: int, checkpoint: Path | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        super().__init__(
            f"training diverged: non-finite loss or weights at step {step} (finite at step "
            f"{checked_step}); last good checkpoint: {checkpoint or 'none'}"
        )


@dataclass
class TrainResult:
    """``loss``: mean training loss of the last logging interval (None if no step was taken)."""

    step: int
    loss: float | None
    val_loss: float | None
    ema: EMA
    checkpoint: Path | None
    seconds: float


def micro_batch_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """The 63-bit seed of micro-batch ``index`` of step ``step``: a hash of the four integers.

    BLAKE2b (8-byte digest) of the little-endian int64s ``(seed, step, index, stream)``, top bit
    dropped. Stream 0 seeds the micro-batch's generator (data, objective noise), stream 1 the
    global RNG (dropout), so that the two are not the same random stream.
    """
    key = struct.pack("<4q", seed, step, index, stream)
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class _ObjectiveStep(nn.Module):
    """Model and objective as one module: DDP then synchronises the parameters of both, and
    treats however many model calls the objective makes as one forward pass."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective  # a submodule if it is an nn.Module, else a plain attribute

    def forward(self, batch: dict[str, Tensor], step: int, generator: torch.Generator) -> Tensor:
        return self.objective(self.model, batch, step, generator)


def train(
    model: nn.Module,
    objective: Objective,
    source: DataSource,
    config: Any,
    run_dir: str | Path,
    *,
    resume: bool = False,
    validate: Callable[[nn.Module], float] | None = None,
) -> TrainResult:
    """Train ``model`` on ``objective`` with data from ``source``; write the run to ``run_dir``.

    ``config`` is a ``TrainConfig``, or a dataclass with a ``train: TrainConfig`` field (all of
    it is saved to config.json and checkpoints). With ``resume``, training continues from the
    last checkpoint in ``run_dir`` if there is one. ``validate(ema_model) -> float`` runs every
    ``val_every`` (default: ``log_every``) steps on rank 0. Launch under torchrun for several
    processes.
    """
    train_config = config if isinstance(config, TrainConfig) else getattr(config, "train", None)
    if not isinstance(train_config, TrainConfig):
        raise TypeError("config must be a TrainConfig or a dataclass with a train: TrainConfig")
    world_size = distributed.world_size_from_env()
    if train_config.micro_batches % world_size:
        raise ConfigError(
            f"{train_config.micro_batches} micro-batches per step cannot be split over "
            f"{world_size} processes; choose micro_batch_size so that batch_size / "
            "micro_batch_size is a multiple of the number of processes"
        )
    ctx = distributed.setup(train_config.device)
    try:
        return _train(
            model, objective, source, config, train_config, RunDir(run_dir), ctx, resume, validate
        )
    finally:
        distributed.teardown(ctx)


def _train(
    model: nn.Module,
    objective: Objective,
    source: DataSource,
    config: Any,
    cfg: TrainConfig,
    run: RunDir,
    ctx: distributed.DistContext,
    resume: bool,
    validate: Callable[[nn.Module], float] | None,
) -> TrainResult:
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = ctx.device
    model.to(device).train()
    if isinstance(objective, nn.Module):
        objective.to(device)
    step_module = _ObjectiveStep(model, objective)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(  # fused: one kernel for all tensors, far less overhead
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    ddp = step_module
    if ctx.world_size > 1:  # broadcasts rank 0's initial weights to every process
        ddp = DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)  # an eager copy, made before compiling
    if cfg.compile:
        model.compile()  # in place, so a flow map's methods call the compiled network too

    # Resume: every process reads the last checkpoint; rank 0 alone prepares the run folder.
    config_dict = config_to_dict(config)
    last_checkpoint = checkpoint_to_resume(run.root, resume)
    step = 0
    if last_checkpoint is not None:
        prefix = "" if isinstance(config, TrainConfig) else "train."
        may_differ = tuple(prefix + key for key in MAY_CHANGE_ON_RESUME)
        checkpoint = load_checkpoint(last_checkpoint, config_dict, may_differ)
        _restore(checkpoint, model, ema, optimizer, objective, last_checkpoint)
        step = checkpoint.step
    if ctx.is_main:
        run.create()
        remove_temporaries(run.root)
        remove_temporaries(run.checkpoints)
        run.truncate_metrics(step)
        run.write_config(config_dict)
        run.write_meta(ctx.world_size, step if last_checkpoint is not None else None)
    distributed.barrier(ctx)

    micro_batches = range(ctx.rank, cfg.micro_batches, ctx.world_size)
    last_micro_batch = micro_batches[-1]
    loss_scale = ctx.world_size / cfg.micro_batches
    generator = torch.Generator(device)  # re-seeded per micro-batch, never re-allocated
    global_rngs = [torch.default_generator]
    if device.type == "cuda":
        global_rngs.append(torch.cuda.default_generators[device.index])
    # The sum of step losses since the last log, kept on the device (float64: long intervals).
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    started = interval_start = time.perf_counter()
    logged_step = checked_step = step
    loss = val_loss = None
    with Progress(run, step, cfg.steps, enabled=ctx.is_main) as progress:
        while step < cfg.steps:
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
            val_now = (
                ctx.is_main
                and validate is not None
                and (done % (cfg.val_every or cfg.log_every) == 0 or done == cfg.steps)
            )
            lr = learning_rate(
                step,
                peak=cfg.lr,
                steps=cfg.steps,
                warmup_steps=cfg.warmup_steps,
                schedule=cfg.lr_schedule,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr

            for j in micro_batches:
                generator.manual_seed(micro_batch_seed(cfg.seed, step, j))
                for rng in global_rngs:
                    rng.manual_seed(micro_batch_seed(cfg.seed, step, j, stream=1))
                batch = _as_batch(source.sample(cfg.micro_size, generator), device)
                # DDP all-reduces the gradients after the last micro-batch only.
                sync = j == last_micro_batch or ctx.world_size == 1
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with _autocast(cfg.precision, device):
                        per_sample = ddp(batch, step, generator)
                    if per_sample.dim() != 1:
                        raise ValueError(f"an objective returns a loss [B], got {per_sample.shape}")
                    if per_sample.dtype in (torch.bfloat16, torch.float16):
                        per_sample = per_sample.float()  # the loss is reduced in fp32
                    micro_loss = per_sample.mean()
                    if loss_scale != 1.0:  # mean over the micro-batch / (G / N)
                        micro_loss = micro_loss * loss_scale
                    micro_loss.backward()
                loss_sum += micro_loss.detach()
            if cfg.grad_clip is not None or log_now:  # the norm of the all-reduced gradient
                grad_norm = _clip_grad_norm(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(step)
            step = done
            progress.step()
            if not (log_now or checkpoint_now or val_now):
                continue

            record: dict[str, Any] = {"step": step}
            if log_now or checkpoint_now:  # a sync point, at the same steps on every process
                total = distributed.all_reduce_sum(loss_sum, ctx).item()
                if not math.isfinite(total) or (checkpoint_now and not _all_finite(params)):
                    raise TrainingDiverged(step, checked_step, last_checkpoint)
                checked_step = step
            if log_now:
                now = time.perf_counter()
                loss = total / (ctx.world_size * (step - logged_step))
                speed = (step - logged_step) / (now - interval_start)
                record.update(loss=loss, lr=lr, grad_norm=grad_norm.item(), steps_per_sec=speed)
                loss_sum.zero_()
                logged_step, interval_start = step, now
            if val_now:
                val_loss = float(validate(ema.module))
                record["val_loss"] = val_loss
            # The metrics line goes first: a run killed before the checkpoint is written resumes
            # from an earlier checkpoint and drops this line, never the other way round.
            if len(record) > 1:
                progress.log(record)
            if checkpoint_now:
                last_checkpoint = checkpoint_path(run.checkpoints, step)
                if ctx.is_main:
                    state = Checkpoint(
                        step=step,
                        config=config_dict,
                        model=model.state_dict(),
                        ema=ema.state_dict(),
                        optimizer=optimizer.state_dict(),
                        objective=_objective_state(objective),
                    )
                    save_checkpoint(last_checkpoint, state)
                    prune_checkpoints(run.checkpoints, cfg.keep_checkpoints)
    distributed.barrier(ctx)  # the final checkpoint exists when any process returns
    return TrainResult(step, loss, val_loss, ema, last_checkpoint, time.perf_counter() - started)


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass; the loss and the gradients stay in fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _as_batch(sample: Tensor | dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    batch = sample if isinstance(sample, dict) else {"x1": sample}
    if "x1" not in batch:
        raise ValueError(f"a data source's dict batch needs an 'x1' entry, got {list(batch)}")
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> Tensor:
    """The global 2-norm of the gradients; they are scaled by ``min(1, max_norm / norm)``."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm is not None:  # scaled on device: no host sync
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp_(max=1.0))
    return norm


def _all_finite(params: list[nn.Parameter]) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _objective_state(objective: Objective) -> dict[str, Any]:
    return objective.state_dict() if hasattr(objective, "state_dict") else {}


def _restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    path: Path,
) -> None:
    try:
        model.load_state_dict(checkpoint.model)
        ema.load_state_dict(checkpoint.ema)
        optimizer.load_state_dict(checkpoint.optimizer)
        if hasattr(objective, "load_state_dict"):
            objective.load_state_dict(checkpoint.objective)
    except (RuntimeError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{path} does not fit this model or objective: {reason}") from None

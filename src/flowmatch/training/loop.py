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
import copy
import hashlib
import math
import struct
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from flowmatch.training import distributed, fsdp
from flowmatch.training.checkpoint import (
    RESUMABLE_KEYS,
    Checkpoint,
    CheckpointError,
    check_optimizer_state,
    check_state,
    checkpoint_path,
    checkpoint_to_resume,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from flowmatch.training.config import TrainConfig, config_to_dict
from flowmatch.training.ema import EMA
from flowmatch.training.files import remove_temporaries
from flowmatch.training.lr import learning_rate
from flowmatch.training.run import Progress, RunDir

# A mean loss above this is taken for divergence (flow-matching losses are O(1) per dimension).
MAX_LOSS = 1e10


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
    """The loss, the gradients, the weights or the optimizer state became non-finite (or the loss
    exploded); the last good checkpoint is kept and no later one is written."""

    def __init__(self, step: int, what: str, checkpoint: Path | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        super().__init__(
            f"training diverged at step {step}: {what}; last good checkpoint: "
            f"{checkpoint or 'none'} (lower train.lr or set train.grad_clip)"
        )


@dataclass
class TrainResult:
    """``loss``: mean training loss of the last logging interval (None if no step was taken)."""

    step: int
    loss: float | None
    val_loss: float | None
    ema: EMA | fsdp.ShardedEMA  # under FSDP, ``ema.module`` is full on rank 0 only
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


@dataclass
class _State:
    """What the loop carries from step to step (the checkpoint holds all of it but the timers)."""

    model: nn.Module
    objective: Objective
    wrapped: nn.Module  # model and objective, under DDP or FSDP when there are several processes
    sharded: bool  # FSDP: parameters, gradients, optimizer state and EMA are DTensor shards
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: EMA | fsdp.ShardedEMA
    step: int
    # The log window: the sum of step losses since the last logged step, on the device.
    loss_sum: Tensor
    logged_step: int
    last_checkpoint: Path | None


def train(
    model: nn.Module,
    objective: Objective,
    source: DataSource,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    validate: Callable[[nn.Module], float] | None = None,
    context: dict[str, Any] | None = None,
    read_record: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    resumable_context: Collection[str] = (),
) -> TrainResult:
    """Train ``model`` on ``objective`` with data from ``source``; write the run to ``run_dir``.

    With ``resume``, training continues from the last checkpoint in ``run_dir`` if there is one.
    ``validate(ema_model) -> float`` runs every ``val_every`` (default: ``log_every``) steps on
    rank 0. ``context`` is what else defines the run (JSON-ready sections describing the data,
    network, objective): config.json and every checkpoint hold ``{"train": config, **context}``,
    and a resumed run must agree with it (:func:`~flowmatch.training.checkpoint.resume_conflicts`),
    the stored record read by ``read_record`` (your schema, to give keys added since their
    defaults; default: as stored); the dotted keys of ``context`` in ``resumable_context`` (e.g.
    ``"data.workers"``) may change on resume, as ``RESUMABLE_KEYS`` of ``config`` may.
    Launch under torchrun for several processes, each given the same arguments. With
    ``config.parallel == "fsdp"`` and several processes, ``model`` is sharded in place (its
    parameters become ``DTensor`` shards): read the trained weights from the run folder.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if context is not None and "train" in context:
        raise ValueError("context must not have a 'train' section: that is the TrainConfig")
    record = {"train": config_to_dict(config), **(context or {})}
    resumable = RESUMABLE_KEYS | frozenset(resumable_context)
    micro_size = config.micro_size(distributed.world_size_from_env())
    ctx = distributed.setup(config.device)
    try:
        state = _start(
            model, objective, config, record, RunDir(run_dir), ctx, resume, read_record, resumable
        )
        return _loop(state, source, config, record, RunDir(run_dir), ctx, micro_size, validate)
    finally:
        distributed.teardown(ctx)


def _start(
    model: nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    record: dict[str, Any],
    run: RunDir,
    ctx: distributed.DistContext,
    resume: bool,
    read_record: Callable[[dict[str, Any]], dict[str, Any]] | None,
    resumable: frozenset[str],
) -> _State:
    """Set-up and resume: the model on its device, optimizer, DDP, EMA; every process reads the
    last checkpoint, rank 0 alone prepares the run folder."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = ctx.device
    model.to(device).train()
    if isinstance(objective, nn.Module):
        objective.to(device)
    step_module = _ObjectiveStep(model, objective)
    sharded = cfg.parallel == "fsdp" and ctx.world_size > 1
    wrapped: nn.Module = step_module
    ema: EMA | fsdp.ShardedEMA
    if sharded:  # rank 0's initial weights on every process, then each keeps its shard
        template = copy.deepcopy(model)  # the EMA's full module, an eager copy
        wrapped = fsdp.shard(step_module, cfg.precision)
        ema = fsdp.ShardedEMA(model, template, cfg.ema_decay, cfg.ema_warmup, ctx.is_main)
    else:
        if ctx.world_size > 1:  # broadcasts rank 0's initial weights to every process
            wrapped = DistributedDataParallel(
                step_module, device_ids=[device.index] if device.type == "cuda" else None
            )
        ema = EMA(model, cfg.ema_decay, cfg.ema_warmup)  # an eager copy, made before compiling
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(  # fused: one kernel for all tensors, far less overhead
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )
    if cfg.compile:
        model.compile()  # in place, so a flow map's methods call the compiled network too

    state = _State(
        model=model,
        objective=objective,
        wrapped=wrapped,
        sharded=sharded,
        params=params,
        optimizer=optimizer,
        ema=ema,
        step=0,
        loss_sum=torch.zeros((), dtype=torch.float64, device=device),  # float64: long windows
        logged_step=0,
        last_checkpoint=checkpoint_to_resume(run.root, resume),
    )
    if state.last_checkpoint is not None:
        checkpoint = load_checkpoint(state.last_checkpoint, record, read_record, resumable)
        _restore(checkpoint, state, cfg, ctx, state.last_checkpoint)
    if ctx.is_main:
        run.create()
        remove_temporaries(run.root)
        remove_temporaries(run.checkpoints)
        run.truncate_metrics(state.step)
        run.write_config(record)
        run.write_meta(ctx.world_size, state.step if state.last_checkpoint is not None else None)
    distributed.barrier(ctx)
    return state


def _loop(
    state: _State,
    source: DataSource,
    cfg: TrainConfig,
    record: dict[str, Any],
    run: RunDir,
    ctx: distributed.DistContext,
    micro_size: int,
    validate: Callable[[nn.Module], float] | None,
) -> TrainResult:
    """The optimisation loop: micro-steps, optimizer step, EMA; at intervals, log and check,
    validate, checkpoint."""
    device = ctx.device
    indices = range(ctx.rank, cfg.batch_size // micro_size, ctx.world_size)
    micro_batches = _MicroBatches(source, state.objective, cfg, device, micro_size, indices)
    global_rngs = [torch.default_generator]
    if device.type == "cuda":
        global_rngs.append(torch.cuda.default_generators[device.index])
    started = interval_start = time.perf_counter()
    loss = val_loss = None
    with micro_batches, Progress(run, state.step, cfg.steps, ctx.is_main, cfg.loggers) as progress:
        while state.step < cfg.steps:
            done = state.step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
            val_due = validate is not None and (
                done % (cfg.val_every or cfg.log_every) == 0 or done == cfg.steps
            )
            val_now = ctx.is_main and val_due
            lr = learning_rate(
                state.step,
                peak=cfg.lr,
                steps=cfg.steps,
                warmup_steps=cfg.warmup_steps,
                schedule=cfg.lr_schedule,
            )
            for group in state.optimizer.param_groups:
                group["lr"] = lr

            for j, batch, generator in micro_batches.of_step(state.step):
                for rng in global_rngs:
                    rng.manual_seed(micro_batch_seed(cfg.seed, state.step, j, stream=1))
                _micro_step(state, batch, generator, cfg, ctx, j == indices[-1], micro_size)
            if cfg.grad_clip is not None or log_now:  # the norm of the all-reduced gradient
                grad_norm = _clip_grad_norm(state, cfg.grad_clip, ctx)
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
            state.ema.update(state.step)
            state.step = done
            progress.step()
            if not (log_now or checkpoint_now or val_due):
                continue

            record_line: dict[str, Any] = {"step": done}
            if log_now or checkpoint_now:  # a sync point, at the same steps on every process
                window = distributed.all_reduce_sum(state.loss_sum.clone(), ctx).item()
                mean = window / (ctx.world_size * max(1, done - state.logged_step))
                _check_finite(state, mean, grad_norm if log_now else None, checkpoint_now, ctx)
            if log_now:
                now = time.perf_counter()
                loss = mean
                speed = (done - max(state.logged_step, progress.start_step)) / (
                    now - interval_start
                )
                record_line.update(
                    loss=loss, lr=lr, grad_norm=grad_norm.item(), steps_per_sec=speed
                )
                state.loss_sum.zero_()
                state.logged_step, interval_start = done, now
            if val_due and isinstance(state.ema, fsdp.ShardedEMA):
                state.ema.gather()  # every process: the full EMA on rank 0
            if val_now and validate is not None:
                val_loss = float(validate(state.ema.module))
                record_line["val_loss"] = val_loss
            # The metrics line goes first: a run killed before the checkpoint is written resumes
            # from an earlier checkpoint and drops this line, never the other way round.
            if len(record_line) > 1:
                progress.log(record_line)
            if checkpoint_now:
                _save(state, record, run, cfg, ctx, window if not log_now else 0.0)
    if isinstance(state.ema, fsdp.ShardedEMA):
        state.ema.gather()
    distributed.barrier(ctx)  # the final checkpoint exists when any process returns
    return TrainResult(
        state.step, loss, val_loss, state.ema, state.last_checkpoint, time.perf_counter() - started
    )


class _MicroBatches:
    """The micro-batches ``j`` of a step: ``source.sample`` from a generator seeded by
    ``micro_batch_seed(seed, step, j)``, then the objective's ``prepare`` (its model-free part,
    e.g. the noise and its OT coupling) on the same generator, which the forward pass goes on
    drawing from. With ``train.prefetch`` the next step's are made in a background thread while
    this one trains (a coupling's solver runs beside the network); the numbers are the same."""

    def __init__(
        self,
        source: DataSource,
        objective: Objective,
        cfg: TrainConfig,
        device: torch.device,
        micro_size: int,
        indices: range,
    ) -> None:
        self.source, self.cfg, self.device = source, cfg, device
        self.micro_size, self.indices = micro_size, indices
        self.prepare: Callable[..., dict[str, Tensor]] | None = getattr(objective, "prepare", None)
        self.pool = ThreadPoolExecutor(max_workers=1) if cfg.prefetch else None
        self.pending: tuple[int, Future] | None = None

    def _make(self, step: int) -> list[tuple[int, dict[str, Tensor], torch.Generator]]:
        made = []
        for j in self.indices:
            generator = torch.Generator(self.device)
            generator.manual_seed(micro_batch_seed(self.cfg.seed, step, j))
            batch = _as_batch(self.source.sample(self.micro_size, generator), self.device)
            if self.prepare is not None:
                batch = self.prepare(batch, generator)
            made.append((j, batch, generator))
        return made

    def of_step(self, step: int) -> list[tuple[int, dict[str, Tensor], torch.Generator]]:
        if self.pool is None:
            return self._make(step)
        made = self.pending[1].result() if self.pending and self.pending[0] == step else None
        if made is None:
            made = self._make(step)
        following = step + 1
        self.pending = (
            (following, self.pool.submit(self._make, following))
            if following < self.cfg.steps
            else None
        )
        return made

    def __enter__(self) -> _MicroBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _micro_step(
    state: _State,
    batch: dict[str, Tensor],
    generator: torch.Generator,
    cfg: TrainConfig,
    ctx: distributed.DistContext,
    last: bool,
    micro_size: int,
) -> None:
    """Forward and backward of one micro-batch: ``mean(loss) / (G / N)``; DDP all-reduces the
    gradients after the process's last micro-batch only."""
    wrapped = state.wrapped
    sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if isinstance(wrapped, DistributedDataParallel) and not last:
        sync = wrapped.no_sync()
    elif isinstance(wrapped, FSDPModule):  # FSDP reduce-scatters after the last one only
        wrapped.set_requires_gradient_sync(last)
    with sync:
        with _autocast(cfg.precision, ctx.device):
            per_sample = state.wrapped(batch, state.step, generator)
        if per_sample.dim() != 1:
            raise ValueError(f"an objective returns a loss [B], got {per_sample.shape}")
        if per_sample.dtype in (torch.bfloat16, torch.float16):
            per_sample = per_sample.float()  # the loss is reduced in fp32
        loss_scale = ctx.world_size * micro_size / cfg.batch_size
        micro_loss = per_sample.mean()
        if loss_scale != 1.0:  # mean over the micro-batch / (G / N)
            micro_loss = micro_loss * loss_scale
        micro_loss.backward()
    state.loss_sum += micro_loss.detach()


def _check_finite(
    state: _State, loss: float, grad_norm: Tensor | None, full: bool, ctx: distributed.DistContext
) -> None:
    """Raise ``TrainingDiverged`` if the window's mean loss is not finite or exceeds
    ``MAX_LOSS``, or the gradient norm or (``full``, before a checkpoint) the weights, the EMA or
    the optimizer state are not finite."""
    what = None
    if not math.isfinite(loss):
        what = "the loss is not finite"
    elif loss > MAX_LOSS:
        what = f"the loss {loss:.3g} exceeds {MAX_LOSS:g}"
    elif grad_norm is not None and not bool(torch.isfinite(grad_norm)):
        what = "the gradient norm is not finite"
    elif full and not _all_finite(state, ctx):
        what = "the weights or the optimizer state are not finite"
    if what is not None:
        raise TrainingDiverged(state.step, what, state.last_checkpoint)


def _all_finite(state: _State, ctx: distributed.DistContext) -> bool:
    """Whether the weights, the EMA and the optimizer state are finite (on every process: each
    checks its shards under FSDP)."""
    ema = state.ema
    tensors = [fsdp.local(p.detach()) for p in state.params]
    if isinstance(ema, fsdp.ShardedEMA):
        tensors += ema.local_tensors()
    else:
        tensors += list(ema.module.parameters())
    for entries in state.optimizer.state.values():
        tensors += [fsdp.local(v) for v in entries.values() if isinstance(v, Tensor)]
    finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if state.sharded:
        return int(distributed.all_reduce_sum(finite.long(), ctx).item()) == ctx.world_size
    return bool(finite)


def _save(
    state: _State,
    record: dict[str, Any],
    run: RunDir,
    cfg: TrainConfig,
    ctx: distributed.DistContext,
    window: float,
) -> None:
    """Write the checkpoint of ``state.step`` (rank 0) with the open log window's loss sum;
    under FSDP, every process first writes its shards (:mod:`flowmatch.training.fsdp`)."""
    path = checkpoint_path(run.checkpoints, state.step)
    if isinstance(state.ema, fsdp.ShardedEMA):
        fsdp.save_sharded(path, state.wrapped, state.optimizer, state.ema)
        model, ema = {}, state.ema.full_state_dict()
        optimizer: dict[str, Any] = {"state": {}, "param_groups": []}
        # A module objective's tensors are in the shards (it is part of the wrapped module).
        module = isinstance(state.objective, nn.Module)
        objective = {} if module else _objective_state(state.objective)
    else:
        model, ema = state.model.state_dict(), state.ema.state_dict()
        optimizer = state.optimizer.state_dict()
        objective = _objective_state(state.objective)
    if ctx.is_main:
        checkpoint = Checkpoint(
            step=state.step,
            config=record,
            model=model,
            ema=ema,
            optimizer=optimizer,
            objective=objective,
            log_window={"loss_sum": window, "logged_step": state.logged_step},
        )
        save_checkpoint(path, checkpoint)
        prune_checkpoints(run.checkpoints, cfg.keep_checkpoints)
    state.last_checkpoint = path


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


def _clip_grad_norm(state: _State, max_norm: float | None, ctx: distributed.DistContext) -> Tensor:
    """The global 2-norm of the gradients (over the shards of all processes under FSDP); they
    are scaled by ``min(1, max_norm / norm)``."""
    grads = [fsdp.local(p.grad) for p in state.params if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    if state.sharded:
        norm = distributed.all_reduce_sum(norms.square().sum(), ctx).sqrt()
    else:
        norm = torch.linalg.vector_norm(norms)
    if max_norm is not None:  # scaled on device: no host sync
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp_(max=1.0))
    return norm


def _objective_state(objective: Objective) -> dict[str, Any]:
    return objective.state_dict() if hasattr(objective, "state_dict") else {}


def _restore(
    checkpoint: Checkpoint,
    state: _State,
    cfg: TrainConfig,
    ctx: distributed.DistContext,
    path: Path,
) -> None:
    """Load ``checkpoint`` into ``state`` after checking every tensor against what it is loaded
    into (``CheckpointError`` naming the first that does not fit)."""
    if not 0 <= checkpoint.step <= cfg.steps:
        raise CheckpointError(f"{path} is at step {checkpoint.step}, outside [0, {cfg.steps}]")
    if isinstance(state.ema, fsdp.ShardedEMA):
        fsdp.load_sharded(path, state.wrapped, state.optimizer, state.ema)
        objective = state.objective  # a module objective's tensors were in the shards
        if not isinstance(objective, nn.Module) and hasattr(objective, "load_state_dict"):
            objective.load_state_dict(checkpoint.objective)
    else:
        _restore_full(checkpoint, state, path)
    state.step = checkpoint.step
    window = checkpoint.log_window
    state.logged_step = int(window.get("logged_step", checkpoint.step))
    if ctx.is_main:  # the window's sum is all-reduced over the processes
        state.loss_sum.fill_(float(window.get("loss_sum", 0.0)))


def _restore_full(checkpoint: Checkpoint, state: _State, path: Path) -> None:
    """Load a checkpoint's full state dicts into the model, EMA, optimizer and objective."""
    assert isinstance(state.ema, EMA)
    check_state(path, "model", checkpoint.model, state.model.state_dict())
    check_state(path, "ema", checkpoint.ema, state.ema.state_dict())
    check_optimizer_state(path, checkpoint.optimizer, state.optimizer, checkpoint.step)
    try:
        state.model.load_state_dict(checkpoint.model)
        state.ema.load_state_dict(checkpoint.ema)
        state.optimizer.load_state_dict(checkpoint.optimizer)
        if hasattr(state.objective, "load_state_dict"):
            state.objective.load_state_dict(checkpoint.objective)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        reason = " ".join(str(error).split())
        raise CheckpointError(f"{path} does not fit this model or objective: {reason}") from None

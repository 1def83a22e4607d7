"""Checkpoints: one safetensors file per step, written atomically, read back without unpickling.

A checkpoint ``checkpoints/ckpt-000100.safetensors`` holds the tensors of the model, the EMA, the
optimizer state and the objective under the prefixes ``model/``, ``ema/``, ``optimizer/`` and
``objective/``. Everything else (step, config, optimizer hyper-parameters, the objective's
non-tensor state) is JSON in the safetensors metadata, next to a CRC-32 of the JSON and of every
tensor's bytes, so that a corrupt file is refused rather than silently loaded.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from flowmatch.training.config import MAX_STEPS, ConfigError, TrainConfig, may_change_on_resume
from flowmatch.training.files import RunFileError, atomic_write, read_bytes

FORMAT = "flowmatch.checkpoint/1"
RESUMABLE_KEYS = frozenset(may_change_on_resume(TrainConfig, prefix="train."))
METADATA_KEY = "flowmatch"
_NAME = re.compile(r"ckpt-(\d+)\.safetensors")


class CheckpointError(Exception):
    """A checkpoint is unreadable, corrupt, foreign or written for another config (one line)."""


@dataclass
class Checkpoint:
    """The state of a run after ``step`` optimiser steps; ``config`` is the run's config dict."""

    step: int
    config: dict[str, Any]
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    objective: dict[str, Any]  # the objective's state_dict: tensors, numbers, strings
    # The open logging window: its summed loss and the step logged last (metrics of a resumed
    # run equal those of the uninterrupted one).
    log_window: dict[str, float] = field(default_factory=dict)


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:06d}.safetensors"


def sharded_path(path: str | Path) -> Path:
    """The folder of a ``train.parallel=fsdp`` checkpoint's shards, next to its file."""
    return Path(path).with_suffix(".dcp")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoints in ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the highest step in ``run_dir/checkpoints``, or None."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    return found[-1] if found else None


def checkpoint_to_resume(run_dir: str | Path, resume: bool) -> Path | None:
    """``latest_checkpoint(run_dir)`` if ``resume``; raises ``FileExistsError`` if a run that is
    not resumed would write over checkpoints."""
    last = latest_checkpoint(run_dir)
    if last is not None and not resume:
        raise FileExistsError(
            f"{run_dir} already has checkpoints: resume it, or train into a new folder"
        )
    return last


def prune_checkpoints(directory: str | Path, keep: int | None) -> None:
    """Delete all but the ``keep`` newest checkpoints (all are kept if ``keep`` is None), with
    their folders of shards."""
    if keep is not None:
        for path in list_checkpoints(directory)[:-keep]:
            path.unlink()
            shutil.rmtree(sharded_path(path), ignore_errors=True)


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically."""
    tensors: dict[str, Tensor] = {}
    for prefix, weights in (("model", checkpoint.model), ("ema", checkpoint.ema)):
        tensors.update({f"{prefix}/{k}": v for k, v in weights.items()})
    optimizer_scalars: dict[str, dict[str, Any]] = {}
    for index, entries in checkpoint.optimizer["state"].items():
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                optimizer_scalars.setdefault(str(index), {})[name] = value
    objective_scalars = {}
    for name, value in checkpoint.objective.items():
        if isinstance(value, Tensor):
            tensors[f"objective/{name}"] = value
        else:
            objective_scalars[name] = value
    # safetensors wants contiguous CPU tensors that share no memory (tied weights would).
    tensors = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()
    }
    try:
        state = json.dumps(
            {
                "step": checkpoint.step,
                "config": checkpoint.config,
                "optimizer": {
                    "param_groups": checkpoint.optimizer["param_groups"],
                    "scalars": optimizer_scalars,
                },
                "objective": objective_scalars,
                "log_window": checkpoint.log_window,
            }
        )
    except TypeError as error:
        raise TypeError(f"checkpoint state must be tensors, numbers or strings: {error}") from None
    # One metadata entry: safetensors writes a map's entries in no fixed order, and the same
    # run must give the same bytes.
    entry = {"format": FORMAT, "state": state, "crc32": str(_crc32(state, tensors))}
    metadata = {METADATA_KEY: json.dumps(entry)}
    atomic_write(path, safetensors.torch.save(tensors, metadata=metadata))


def load_checkpoint(
    path: str | Path,
    expected_config: dict[str, Any] | None = None,
    read_record: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    resumable: Collection[str] = RESUMABLE_KEYS,
) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; tensors are on the CPU.

    If ``expected_config`` is given, the checkpoint's config, read by ``read_record`` (e.g. a
    schema that gives keys added since their defaults, raising ``ConfigError`` for a record it
    cannot read; default: as stored), must agree with it under the resume rule
    (:func:`resume_conflicts`, ``resumable`` the keys that may differ). Raises
    ``CheckpointError`` if the file is unreadable, truncated, corrupt, not a flowmatch
    checkpoint, or written with another config.
    """
    path = Path(path)
    try:
        data = read_bytes(path)
    except RunFileError as error:
        raise CheckpointError(str(error)) from None
    try:
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        if METADATA_KEY in metadata:  # else the layout of earlier versions: the same keys
            metadata = json.loads(metadata[METADATA_KEY])
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not a mapping")
    except (ValueError, AttributeError, TypeError):
        raise CheckpointError(f"{path} is not a flowmatch checkpoint") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flowmatch checkpoint ({FORMAT})")
    try:
        tensors = safetensors.torch.load(data)
    except SafetensorError as error:
        raise CheckpointError(f"{path} is truncated or corrupt: {error}") from None
    if metadata.get("crc32") != str(_crc32(metadata.get("state", ""), tensors)):
        raise CheckpointError(f"{path} is corrupt: checksum mismatch")
    try:
        checkpoint = _unflatten(json.loads(metadata["state"]), tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path} is malformed: {type(error).__name__} {error}") from None
    if expected_config is not None:
        try:
            stored = checkpoint.config if read_record is None else read_record(checkpoint.config)
        except ConfigError as error:
            message = f"{path} holds a config this version cannot read: {error}"
            raise CheckpointError(message) from None
        conflicts = resume_conflicts(stored, expected_config, resumable)
        if conflicts:
            raise CheckpointError(f"{path} was written with another config: {'; '.join(conflicts)}")
    return checkpoint


def check_state(path: Path, name: str, got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """``CheckpointError`` unless ``got`` has exactly ``want``'s tensors, each of the same shape
    and dtype and finite."""
    missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has an unknown tensor {extra[0]}"
        raise CheckpointError(f"{path}: the {name} state {which}; it belongs to another network")
    for key, tensor in got.items():
        _check_tensor(path, f"{name}/{key}", tensor, want[key])


def check_optimizer_state(
    path: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer, step: int
) -> None:
    """``CheckpointError`` unless the optimizer ``state`` fits ``optimizer``: its groups hold the
    same parameters, and each parameter's state (present for those updated so far; after
    ``step > 0`` steps, at least one) has tensors of the parameter's shape and dtype, finite,
    and a step count in ``[1, step]``."""
    groups, mine = state.get("param_groups"), optimizer.state_dict()
    theirs = [g.get("params") if isinstance(g, dict) else None for g in groups or [None]]
    if not isinstance(groups, list) or theirs != [g["params"] for g in mine["param_groups"]]:
        raise CheckpointError(f"{path}: the optimizer's parameter groups belong to another network")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    entries = state.get("state", {})
    if step > 0 and not entries:
        raise CheckpointError(f"{path}: the optimizer state is empty after {step} steps")
    for index, entry in entries.items():
        if not (isinstance(index, int) and 0 <= index < len(params)) or not isinstance(entry, dict):
            raise CheckpointError(f"{path}: optimizer state {index!r} belongs to no parameter")
        if not {"exp_avg", "exp_avg_sq", "step"} <= entry.keys():
            raise CheckpointError(f"{path}: the optimizer state of parameter {index} is incomplete")
        for name in ("exp_avg", "exp_avg_sq"):
            _check_tensor(path, f"optimizer/{index}/{name}", entry[name], params[index].detach())
        counted = entry["step"]
        scalar = isinstance(counted, int | float) or (
            isinstance(counted, Tensor) and counted.numel() == 1
        )
        counted = float(counted) if scalar else None
        if counted is None or not 1 <= counted <= step:
            raise CheckpointError(
                f"{path}: optimizer/{index}/step is {counted}, outside [1, {step}]"
            )


def _check_tensor(path: Path, name: str, got: Any, want: Tensor) -> None:
    if not isinstance(got, Tensor):
        raise CheckpointError(f"{path}: {name} is not a tensor")
    if got.shape != want.shape or got.dtype != want.dtype:
        raise CheckpointError(
            f"{path}: {name} is {got.dtype} {tuple(got.shape)}, the network needs "
            f"{want.dtype} {tuple(want.shape)}"
        )
    if got.is_floating_point() and not bool(torch.isfinite(got).all()):
        raise CheckpointError(f"{path}: {name} holds non-finite values")


def _step(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_STEPS:
        raise ValueError(f"step must be an integer in [0, {MAX_STEPS}], got {value!r}")
    return value


def _unflatten(state: dict[str, Any], tensors: dict[str, Tensor]) -> Checkpoint:
    """Rebuild the state dicts from the tensors' prefixed names and the JSON state."""
    groups: dict[str, dict[str, Tensor]] = {
        "model": {},
        "ema": {},
        "optimizer": {},
        "objective": {},
    }
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        groups[prefix][name] = value
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in groups["optimizer"].items():
        index, _, name = key.partition("/")
        optimizer_state.setdefault(int(index), {})[name] = value
    for index, scalars in state["optimizer"]["scalars"].items():
        optimizer_state.setdefault(int(index), {}).update(scalars)
    param_groups = state["optimizer"]["param_groups"]
    for group in param_groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return Checkpoint(
        step=_step(state["step"]),
        config=state["config"],
        model=groups["model"],
        ema=groups["ema"],
        optimizer={"state": optimizer_state, "param_groups": param_groups},
        objective={**groups["objective"], **state["objective"]},
        log_window=dict(state.get("log_window", {})),
    )


def resume_conflicts(
    stored: dict[str, Any], current: dict[str, Any], resumable: Collection[str] = RESUMABLE_KEYS
) -> list[str]:
    """The resume rule: ``"key: stored there, current here"`` for each dotted key whose value
    differs, except the keys in ``resumable``, which do not alter the stream of updates (by
    default ``RESUMABLE_KEYS``, the ``train`` keys of logging, checkpointing, validation,
    device and threads).

    Both configs are dicts of the form ``{"train": TrainConfig dict, **other sections}``; the
    other sections (what the caller recorded about data, network and objective) must agree but
    for the keys of theirs named in ``resumable``.
    """
    a, b = _flatten(stored), _flatten(current)
    return [
        f"{key}: {a.get(key, '<missing>')!r} there, {b.get(key, '<missing>')!r} here"
        for key in sorted(a.keys() | b.keys())
        if key not in resumable and a.get(key, ...) != b.get(key, ...)
    ]


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _crc32(state: str, tensors: dict[str, Tensor]) -> int:
    crc = zlib.crc32(state.encode())
    for key in sorted(tensors):
        tensor = tensors[key]
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy().data, crc)
    return crc

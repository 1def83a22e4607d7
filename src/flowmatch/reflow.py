"""Reflow (Liu, Gong & Liu 2022, Sec. 2): teacher couplings, their cache, straightness.

This module owns the generation of (noise, sample) pairs ``(Z0, Z1 = ODE_teacher(Z0))`` from a
seed, their cache on disk (``<stem>.safetensors`` with ``x0``, ``x1`` and optional labels ``y``,
plus a ``<stem>.json`` sidecar naming how they were made), the objective that retrains on them
(flow matching with the pair's ``x0`` instead of fresh noise, or one-step distillation; the
pairs themselves are the training data source), and the straightness
``S = int_0^1 E|(Z1 - Z0) - dZ_t/dt|^2 dt`` that reflow decreases.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from flowmatch.data.base import draw_device
from flowmatch.losses.flow_matching import cfm_loss
from flowmatch.paths.affine import AffinePath
from flowmatch.paths.schedules import CondOTSchedule, Schedule
from flowmatch.solvers.integrate import integrate, sample
from flowmatch.training.files import RunFileError, atomic_write, read_bytes, read_text
from flowmatch.types import TimeSampler, VelocityField

PAIRS_FORMAT = "flowmatch-reflow-pairs/1"


@dataclass
class ReflowPairs:
    """Coupled pairs ``x0, x1: [n, *dims]``, labels ``y: [n]`` or None, and the sidecar
    ``metadata`` (seed, n, shape, dtype, method, steps, atol, rtol, chunk_size, source_std,
    teacher_id, labels). Also a training data source: ``sample(n, generator)`` draws pairs."""

    x0: Tensor
    x1: Tensor
    metadata: dict[str, Any]
    y: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x1.shape[1:])

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``{"x0", "x1"(, "y")}``: ``n`` pairs drawn uniformly with replacement (indices drawn on
        the generator's device and moved to the pairs', as :class:`~flowmatch.data.ArrayDataset`
        does)."""
        device = draw_device(generator)
        index = torch.randint(self.x1.shape[0], (n,), generator=generator, device=device)
        index = index.to(self.x1.device)
        batch = {"x0": self.x0[index], "x1": self.x1[index]}
        if self.y is not None:
            batch["y"] = self.y[index]
        return batch

    def to(self, device: torch.device | str) -> ReflowPairs:
        y = self.y.to(device) if self.y is not None else None
        return ReflowPairs(self.x0.to(device), self.x1.to(device), self.metadata, y)


def _chunk_seed(seed: int, chunk: int) -> int:
    """Independent 64-bit seed of chunk ``chunk`` of a run seeded ``seed`` (NumPy SeedSequence)."""
    state = np.random.SeedSequence(seed, spawn_key=(chunk,)).generate_state(1, dtype=np.uint64)
    return int(state[0])


def _pair_metadata(
    *,
    seed: int,
    n: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    method: str,
    steps: int | None,
    atol: float,
    rtol: float,
    chunk_size: int,
    source_std: float,
    teacher_id: str,
    labels: bool,
) -> dict[str, Any]:
    return {
        "format": PAIRS_FORMAT,
        "seed": seed,
        "n": n,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "method": method,
        "steps": steps,
        "atol": atol,
        "rtol": rtol,
        "chunk_size": chunk_size,
        "source_std": source_std,
        "teacher_id": teacher_id,
        "labels": labels,
    }


def generate_reflow_pairs(
    velocity: VelocityField,
    n: int,
    shape: tuple[int, ...],
    *,
    seed: int,
    teacher_id: str,
    method: str = "rk4",
    steps: int | None = 32,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    chunk_size: int = 4096,
    schedule: Schedule | None = None,
    labels: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ReflowPairs:
    """Draw ``n`` source points ``x0 ~ schedule.sample_source`` and solve the teacher ODE to t = 1.

    Chunk ``k`` (of ``chunk_size`` samples) draws its noise on the CPU from its own generator
    seeded by ``(seed, k)``, so the pairs are a function of ``(seed, chunk_size)`` whatever the
    device, and a chunk can be regenerated alone. ``labels: [n]`` condition the teacher as ``y``.
    ``teacher_id`` names the teacher (e.g. its checkpoint) in the sidecar.
    """
    schedule = schedule or CondOTSchedule()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must have shape [n] = [{n}], got {list(labels.shape)}")
    x0_chunks, x1_chunks = [], []
    for chunk, start in enumerate(range(0, n, chunk_size)):
        size = min(chunk_size, n - start)
        generator = torch.Generator().manual_seed(_chunk_seed(seed, chunk))
        x0 = schedule.sample_source((size, *shape), generator=generator, dtype=dtype)
        kw = {"y": labels[start : start + size].to(device)} if labels is not None else None
        x1 = sample(
            velocity, x0.to(device), method, steps=steps, atol=atol, rtol=rtol, model_kwargs=kw
        )
        x0_chunks.append(x0)
        x1_chunks.append(x1.cpu())
    metadata = _pair_metadata(
        seed=seed,
        n=n,
        shape=tuple(shape),
        dtype=dtype,
        method=method,
        steps=steps,
        atol=atol,
        rtol=rtol,
        chunk_size=chunk_size,
        source_std=schedule.source_std,
        teacher_id=teacher_id,
        labels=labels is not None,
    )
    y = labels.cpu().clone() if labels is not None else None
    return ReflowPairs(x0=torch.cat(x0_chunks), x1=torch.cat(x1_chunks), metadata=metadata, y=y)


def _files(path: str | Path) -> tuple[Path, Path]:
    stem = Path(path)
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_reflow_pairs(pairs: ReflowPairs, path: str | Path) -> None:
    """Write ``<path>.safetensors`` (``x0``, ``x1``, ``y``) and the ``<path>.json`` sidecar,
    each atomically."""
    tensor_file, sidecar = _files(path)
    tensors = {"x0": pairs.x0.contiguous(), "x1": pairs.x1.contiguous()}
    if pairs.y is not None:
        tensors["y"] = pairs.y.contiguous()
    atomic_write(tensor_file, safetensors.torch.save(tensors))
    atomic_write(sidecar, (json.dumps(pairs.metadata, indent=2, sort_keys=True) + "\n").encode())


def load_reflow_pairs(path: str | Path) -> ReflowPairs:
    """Read pairs written by :func:`save_reflow_pairs`; ``ValueError`` (one line naming the
    file) for a sidecar or tensor file that is not theirs."""
    tensor_file, sidecar = _files(path)
    try:
        metadata = json.loads(read_text(sidecar))
        tensors = safetensors.torch.load(read_bytes(tensor_file))
    except (RunFileError, json.JSONDecodeError, SafetensorError) as error:
        raise ValueError(f"reflow pairs {path}: {error}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != PAIRS_FORMAT:
        raise ValueError(f"{sidecar} is not a {PAIRS_FORMAT} sidecar")
    x0, x1 = tensors.get("x0"), tensors.get("x1")
    if x0 is None or x1 is None or x0.shape != x1.shape or not x0.is_floating_point():
        raise ValueError(f"{tensor_file} does not hold float pairs x0, x1 of one shape")
    if not (torch.isfinite(x0).all() and torch.isfinite(x1).all()):
        raise ValueError(f"{tensor_file} holds non-finite pairs; delete it to generate them again")
    return ReflowPairs(x0=x0, x1=x1, metadata=metadata, y=tensors.get("y"))


def cached_reflow_pairs(
    path: str | Path,
    velocity: VelocityField,
    n: int,
    shape: tuple[int, ...],
    **generate_kwargs: Any,
) -> ReflowPairs:
    """Load the pairs cached at ``path`` if they were made with these settings, else generate
    and cache them. ``generate_kwargs`` are those of :func:`generate_reflow_pairs`; a cache made
    with other settings raises ``ValueError`` (delete it or pick another path)."""
    _, sidecar = _files(path)
    if not sidecar.exists():
        pairs = generate_reflow_pairs(velocity, n, shape, **generate_kwargs)
        save_reflow_pairs(pairs, path)
        return pairs
    pairs = load_reflow_pairs(path)
    labels = generate_kwargs.get("labels")
    requested = _pair_metadata(
        seed=generate_kwargs["seed"],
        n=n,
        shape=tuple(shape),
        dtype=generate_kwargs.get("dtype", torch.float32),
        method=generate_kwargs.get("method", "rk4"),
        steps=generate_kwargs.get("steps", 32),
        atol=generate_kwargs.get("atol", 1e-5),
        rtol=generate_kwargs.get("rtol", 1e-5),
        chunk_size=generate_kwargs.get("chunk_size", 4096),
        source_std=(generate_kwargs.get("schedule") or CondOTSchedule()).source_std,
        teacher_id=generate_kwargs["teacher_id"],
        labels=labels is not None,
    )
    differ = sorted(k for k in requested if pairs.metadata.get(k) != requested[k])
    if (
        labels is not None
        and not differ
        and (pairs.y is None or not torch.equal(pairs.y, labels.cpu()))
    ):
        differ = ["labels"]
    if differ:
        raise ValueError(f"cached pairs at {sidecar} differ from the request in {differ}")
    return pairs


@dataclass
class ReflowObjective:
    """Retrain a velocity on teacher pairs: ``objective(model, batch, step, generator) -> [B]``.

    The batch carries the pairs (``batch["x0"]`` the teacher's start points, ``batch["x1"]`` its
    ends; a :class:`ReflowPairs` data source provides both). ``mode="flow_matching"``:
    :func:`~flowmatch.losses.flow_matching.cfm_loss` with the pair's noise
    ``x0 / schedule.source_std`` instead of fresh noise (k-rectified flow, Liu et al. 2022).
    ``mode="one_step"``: distillation of the coupling into one Euler step,
    ``|x0 + v(x0, 0) - x1|^2``. No state.
    """

    path: AffinePath
    mode: Literal["flow_matching", "one_step"] = "flow_matching"
    time_sampler: TimeSampler | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("flow_matching", "one_step"):
            raise ValueError(
                f"unknown reflow mode {self.mode!r}; use 'flow_matching' or 'one_step'"
            )

    def __call__(
        self,
        model: VelocityField,
        batch: dict[str, Tensor],
        step: int,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        if "x0" not in batch:
            raise ValueError("a reflow batch needs the pairs' 'x0' (use ReflowPairs as the data)")
        x0, x1 = batch["x0"], batch["x1"]
        kw = {"y": batch["y"]} if "y" in batch else {}
        if self.mode == "one_step":
            t0 = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
            residual = x0 + model(x0, t0, **kw) - x1
            return residual.square().flatten(1).mean(1)
        noise = x0 / self.path.schedule.source_std
        return cfm_loss(
            model,
            x1,
            self.path,
            time_sampler=self.time_sampler,
            generator=generator,
            x0=noise,
            model_kwargs=kw,
        )

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"ReflowObjective has no state, got keys {sorted(state)}")


def straightness(
    velocity: VelocityField,
    x0: Tensor,
    steps: int,
    method: str = "rk4",
    model_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """``S = int_0^1 E|(Z1 - Z0) - v(Z_t, t)|^2 dt`` along the ODE from ``x0 [B, *dims]``: a scalar.

    ``|.|^2`` is averaged over dimensions (Liu et al. sum them); the trajectory comes from
    ``steps`` steps of ``method`` and the time integral is the trapezoid rule on its grid.
    Zero iff every trajectory is a straight line run at constant speed.
    """
    kw = model_kwargs or {}
    with torch.no_grad():
        result = integrate(
            velocity, x0, method, steps=steps, model_kwargs=kw, return_trajectory=True
        )
        trajectory, grid = result.trajectory, result.time_grid
        assert trajectory is not None  # return_trajectory=True
        chord = trajectory[-1] - trajectory[0]
        deviation = torch.stack(
            [
                (chord - velocity(z, grid[k].expand(z.shape[0]), **kw))
                .pow(2)
                .reshape(z.shape[0], -1)
                .mean(1)
                .mean()
                for k, z in enumerate(trajectory)
            ]
        )
        return torch.trapezoid(deviation, grid)

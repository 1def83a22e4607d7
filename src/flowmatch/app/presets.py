"""The named presets behind ``flowmatch train --preset NAME``: a ``RunConfig`` each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from flowmatch.app.config import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    ObjectiveConfig,
    PathConfig,
    RunConfig,
)
from flowmatch.training.config import ConfigError, TrainConfig


def _toy(name: str, steps: int = 8000, **train: object) -> RunConfig:
    return RunConfig(
        data=DataConfig(name=name),
        eval=EvalConfig(samples=2000, nll_samples=500),
        train=TrainConfig(
            steps=steps,
            batch_size=512,
            lr=2e-3,
            warmup_steps=200,
            lr_schedule="cosine",
            ema_decay=0.995,
            log_every=100,
            checkpoint_every=2000,
            num_threads=1,  # small matrices: a second thread costs more than it brings
            **train,  # type: ignore[arg-type]
        ),
    )


def _flow_map(base: RunConfig, steps: int) -> RunConfig:
    return dataclasses.replace(
        base,
        objective=ObjectiveConfig(name="lsd"),
        train=dataclasses.replace(base.train, steps=steps, grad_clip=1.0),
    )


def _images(name: str, steps: int, conditional: bool = False) -> RunConfig:
    digits = name == "digits"
    return RunConfig(
        data=DataConfig(name=name, conditional=conditional),
        model=ModelConfig(
            kind="unet",
            channels=32,
            channel_mult=(1, 2) if digits else (1, 2, 2),
            attention_resolutions=(4,) if digits else (7,),
        ),
        eval=EvalConfig(samples=1000, solver="dopri5", nll_samples=200),
        train=TrainConfig(
            steps=steps,
            batch_size=64 if digits else 128,
            lr=1e-3 if digits else 5e-4,
            warmup_steps=100 if digits else 500,
            lr_schedule="cosine",
            grad_clip=1.0,
            ema_decay=0.999,
            log_every=50,
            checkpoint_every=500,
        ),
    )


def _small_unet(base: RunConfig) -> RunConfig:
    """``base`` on a U-Net cut for a CPU (16 channels at 28x28, 32 at 14x14, one residual block
    per level, no attention), trained at batch 64 with a higher learning rate."""
    return dataclasses.replace(
        base,
        model=dataclasses.replace(
            base.model,
            channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(),
            num_groups=8,
        ),
        train=dataclasses.replace(
            base.train, batch_size=64, lr=1e-3, warmup_steps=200, num_threads=1
        ),
    )


@dataclass(frozen=True)
class Preset:
    description: str
    build: Callable[[], RunConfig]


PRESETS: dict[str, Preset] = {
    "checkerboard": Preset(
        "2-D checkerboard, MLP 4x256, CondOT flow matching, 8000 steps of 512 (1-2 min)",
        lambda: _toy("checkerboard"),
    ),
    "eight-gaussians": Preset(
        "2-D ring of eight Gaussians (exact density), MLP, flow matching, 8000 steps",
        lambda: _toy("eight-gaussians"),
    ),
    "moons": Preset("2-D two moons, MLP, flow matching, 8000 steps", lambda: _toy("moons")),
    "rings": Preset(
        "2-D concentric rings (exact density), MLP, flow matching, 8000 steps",
        lambda: _toy("rings"),
    ),
    "spirals": Preset("2-D spirals, MLP, flow matching, 8000 steps", lambda: _toy("spirals")),
    "gmm": Preset(
        "2-D Gaussian mixture with exact log-density (NLL against the truth), 8000 steps",
        lambda: _toy("gmm"),
    ),
    "gaussian-context": Preset(
        "2-D Gaussian whose mean is a continuous 2-D context (x | c ~ N(c, 0.25^2 I), "
        "c uniform on [-2, 2]^2), MLP, flow matching, 3000 steps; sample with --context",
        lambda: _toy("gaussian-context", 3000),
    ),
    "checkerboard-ot": Preset(
        "checkerboard with minibatch exact-OT coupling (straighter paths, fewer steps)",
        lambda: dataclasses.replace(_toy("checkerboard"), path=PathConfig(coupling="exact-ot")),
    ),
    "checkerboard-flowmap": Preset(
        "checkerboard flow map by Lagrangian self-distillation: sample in 1, 2, 4... steps",
        lambda: _flow_map(_toy("checkerboard"), 8000),
    ),
    "eight-gaussians-flowmap": Preset(
        "eight Gaussians flow map by Lagrangian self-distillation",
        lambda: _flow_map(_toy("eight-gaussians"), 8000),
    ),
    "gmm-flowmap": Preset(
        "Gaussian-mixture flow map, trained on both time orders for few-step likelihood",
        lambda: dataclasses.replace(
            _flow_map(_toy("gmm"), 8000), objective=ObjectiveConfig(name="lsd", both_orders=True)
        ),
    ),
    "digits": Preset(
        "scikit-learn 8x8 digits (17 levels, bundled), small U-Net, 2000 steps",
        lambda: _images("digits", 2000),
    ),
    "digits-flowmap": Preset(
        "digits flow map by Eulerian self-distillation (the digits winner of the few-step "
        "table: one jump at flow matching's dopri5 FD), 1000 steps",
        lambda: dataclasses.replace(_images("digits", 1000), objective=ObjectiveConfig(name="esd")),
    ),
    "mnist": Preset(
        "MNIST 28x28 (needs `flowmatch data fetch mnist`), U-Net 1.2M, 4000 steps of 128",
        lambda: _images("mnist", 4000),
    ),
    "mnist-small": Preset(
        "MNIST with a U-Net of 178k parameters for a CPU: 4000 steps of 64 (~17 min, 1 thread)",
        lambda: _small_unet(_images("mnist", 4000)),
    ),
    "mnist-conditional": Preset(
        "class-conditional MNIST with label dropout 0.1 for classifier-free guidance",
        lambda: _images("mnist", 4000, conditional=True),
    ),
    "fashion-mnist": Preset(
        "Fashion-MNIST 28x28 (needs `flowmatch data fetch fashion-mnist`), U-Net, 4000 steps",
        lambda: _images("fashion-mnist", 4000),
    ),
    "mnist-flowmap": Preset(
        "MNIST flow map by Lagrangian self-distillation (U-Net with two time inputs)",
        lambda: _flow_map(_images("mnist", 4000), 4000),
    ),
    "cifar10-paper": Preset(
        "the Flow Matching paper's CIFAR-10 recipe (U-Net 256 ch, batch 256, lr 5e-4, poly decay, "
        "45k warm-up, 391k steps on 2 GPUs); not runnable on a CPU",
        lambda: RunConfig(
            data=DataConfig(name="cifar10"),
            model=ModelConfig(
                kind="unet",
                channels=256,
                channel_mult=(1, 2, 2, 2),
                num_res_blocks=2,
                attention_resolutions=(16,),
                num_heads=4,
                num_head_channels=64,
                num_groups=32,
                dropout=0.0,
            ),
            eval=EvalConfig(samples=50000, solver="dopri5", nll_samples=10000),
            train=TrainConfig(
                steps=391_000,
                batch_size=256,
                lr=5e-4,
                warmup_steps=45_000,
                lr_schedule="poly",
                ema_decay=0.9999,
                log_every=100,
                checkpoint_every=5000,
            ),
        ),
    ),
}


def preset_config(name: str) -> RunConfig:
    """The ``RunConfig`` of a preset; ``ConfigError`` naming the presets for an unknown name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].build()

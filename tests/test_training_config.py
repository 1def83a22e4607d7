"""Config dataclasses: overrides parsed against field types, JSON round trips, one-line errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from flowmatch.training import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)


@dataclass(frozen=True)
class ModelSection:
    hidden: int = 64
    activation: Literal["silu", "relu"] = "silu"
    widths: tuple[int, ...] = (8, 8)
    dropout: float | None = None


@dataclass(frozen=True)
class RunConfig:
    """A top-level config composed of sections, as a command line would define it."""

    name: str = "run"
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_overrides_parse_each_field_type():
    config = apply_overrides(
        TrainConfig(),
        [
            "lr=3e-4",
            "steps=1e5",  # an integral float is accepted for an int
            "betas=0.8,0.95",
            "grad_clip=1.0",
            "lr_schedule=poly",
            "compile=true",
            "keep_checkpoints=none",
            "precision=bf16",
        ],
    )
    assert config.lr == 3e-4 and config.steps == 100_000 and config.betas == (0.8, 0.95)
    assert config.grad_clip == 1.0 and config.lr_schedule == "poly" and config.compile is True
    assert config.keep_checkpoints is None and config.precision == "bf16"
    assert TrainConfig().lr == 1e-3  # the original is untouched


def test_overrides_reach_nested_sections():
    config = apply_overrides(
        RunConfig(),
        [
            "model.hidden=128",
            "model.widths=[4, 5, 6]",
            "model.dropout=0.1",
            "train.seed=7",
            "name=x",
        ],
    )
    assert config.model == ModelSection(hidden=128, widths=(4, 5, 6), dropout=0.1)
    assert config.train.seed == 7 and config.name == "x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lrr=1", "unknown key 'lrr'; valid keys: seed, steps, batch_size"),
        ("lr=fast", "lr must be float, got 'fast'"),
        ("steps=1.5", "steps must be int, got '1.5'"),
        ("compile=maybe", "compile must be bool"),
        ("lr_schedule=linear", "lr_schedule must be one of constant, cosine, poly"),
        ("betas=0.9", "betas must have 2 entries, got 1"),
        ("seed", "is not of the form key=value"),
        ("batch_size=10", "batch_size 10 is not a multiple"),  # __post_init__ runs
        ("micro_batch_size=3", "batch_size 256 is not a multiple of micro_batch_size 3"),
        ("ema_decay=1.0", "ema_decay must lie in [0, 1)"),
    ],
)
def test_bad_overrides_raise_one_line_config_errors(override, message):
    config = TrainConfig(batch_size=256, micro_batch_size=None)
    if override.startswith("batch_size"):
        config = TrainConfig(batch_size=256, micro_batch_size=64)
    with pytest.raises(ConfigError) as error:
        apply_overrides(config, [override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_nested_errors_name_the_section():
    with pytest.raises(
        ConfigError, match=r"unknown key 'model\.depth'; valid keys in model: hidden"
    ):
        apply_overrides(RunConfig(), ["model.depth=3"])
    with pytest.raises(ConfigError, match="model is a section"):
        apply_overrides(RunConfig(), ["model=3"])
    with pytest.raises(ConfigError, match=r"train\.lr must be float"):
        apply_overrides(RunConfig(), ["train.lr=x"])
    with pytest.raises(ConfigError, match=r"train\.steps must lie in \[1, "):
        apply_overrides(RunConfig(), ["train.steps=0"])


def test_json_round_trip_of_nested_config():
    config = apply_overrides(RunConfig(), ["model.widths=3", "train.betas=0.5,0.6"])
    data = json.loads(json.dumps(config_to_dict(config)))
    assert data["train"]["betas"] == [0.5, 0.6]
    assert config_from_dict(RunConfig, data) == config


def test_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(
        ConfigError, match=r"unknown key 'train\.learning_rate'; valid keys in train"
    ):
        config_from_dict(RunConfig, {"train": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match=r"train\.steps must be int, got 10\.0"):
        config_from_dict(RunConfig, {"train": {"steps": 10.0}})
    with pytest.raises(ConfigError, match="compile must be bool, got 1"):
        config_from_dict(TrainConfig, {"compile": 1})
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict(RunConfig, {"model": 3})
    # An int is a valid float, and missing keys take their defaults.
    assert config_from_dict(TrainConfig, {"lr": 1}).lr == 1.0
    assert config_from_dict(RunConfig, {}) == RunConfig()


def test_micro_batch_size_splits_the_global_batch():
    assert TrainConfig(batch_size=256).micro_size() == 256
    assert TrainConfig(batch_size=256).micro_size(world_size=2) == 128
    assert TrainConfig(batch_size=256, micro_batch_size=32).micro_size(world_size=2) == 32
    with pytest.raises(ConfigError, match="does not split over 3 processes"):
        TrainConfig(batch_size=256).micro_size(world_size=3)


@pytest.mark.parametrize(
    "override",
    [
        "seed=-1",
        "seed=1e30",
        "steps=0",
        "batch_size=0",
        "batch_size=1e12",
        "lr=0",
        "lr=inf",
        "lr=nan",
        "eps=inf",
        "weight_decay=-1",
        "betas=0.9,1.0",
        "ema_decay=1",
        "warmup_steps=-1",
        "grad_clip=0",
        "grad_clip=inf",
        "log_every=0",
        "num_threads=0",
        "device=bogus",
    ],
)
def test_train_values_out_of_range_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        apply_overrides(TrainConfig(), [override])

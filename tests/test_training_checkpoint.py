"""Checkpoint files: exact round trips, atomic writes, and refusal of bad or foreign files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flowmatch.training import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flowmatch.training.checkpoint import (
    RESUMABLE_KEYS,
    checkpoint_path,
    prune_checkpoints,
    resume_conflicts,
)
from flowmatch.training.config import ConfigError


def make_checkpoint(step: int = 3) -> Checkpoint:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight  # tied weights share memory in the state dict
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(4, 2)).sum().backward()
        optimizer.step()
    return Checkpoint(
        step=step,
        config={"lr": 1e-3, "betas": [0.8, 0.9], "model": {"hidden": 3}},
        model=model.state_dict(),
        ema={k: v + 1 for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        objective={
            "weight": torch.arange(3.0, dtype=torch.bfloat16),
            "scale": 0.5,
            "kind": "lagrangian",
            "k": 2,
        },
    )


def assert_same(a, b):
    """Equal nested structures; tensors bit for bit, with equal dtypes."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip_is_exact(tmp_path):
    original = make_checkpoint()
    path = tmp_path / "ckpt-000003.safetensors"
    save_checkpoint(path, original)
    loaded = load_checkpoint(path)
    assert loaded.step == 3 and loaded.config == original.config
    assert_same(loaded.model, original.model)
    assert_same(loaded.ema, original.ema)
    assert_same(loaded.objective, original.objective)
    assert_same(loaded.optimizer, original.optimizer)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_latest_and_pruning(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 100, 20):
        save_checkpoint(checkpoint_path(directory, step), make_checkpoint(step))
    (directory / ".ckpt-000200.safetensors.tmp-1").write_bytes(b"partial")  # an interrupted write
    assert latest_checkpoint(tmp_path).name == "ckpt-000100.safetensors"
    prune_checkpoints(directory, keep=2)
    names = sorted(p.name for p in directory.glob("ckpt-*"))
    assert names == ["ckpt-000020.safetensors", "ckpt-000100.safetensors"]


def flip_tensor_byte(data: bytes) -> bytes:
    """Flip one bit pattern in the tensor data (at the end of a safetensors file)."""
    return data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) - 10], "truncated or corrupt"),
        (lambda data: data[:20], "not a flowmatch checkpoint"),
        (flip_tensor_byte, "checksum mismatch"),
        (lambda data: data[-4:] * 0, "not a flowmatch checkpoint"),
        (lambda data: json.dumps({"step": 3}).encode(), "not a flowmatch checkpoint"),
    ],
    ids=["truncated", "header-cut", "flipped-byte", "empty", "json"],
)
def test_damaged_files_raise(tmp_path, damage, message):
    path = tmp_path / "ckpt-000003.safetensors"
    save_checkpoint(path, make_checkpoint())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


def test_foreign_safetensors_and_missing_files_raise(tmp_path):
    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a flowmatch checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(
        CheckpointError, match=r"cannot read .*missing.safetensors: it does not exist"
    ):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_config_mismatch_raises_and_names_the_keys(tmp_path):
    path = tmp_path / "ckpt-000003.safetensors"
    save_checkpoint(path, make_checkpoint())
    config = {"lr": 2e-3, "betas": [0.8, 0.9], "model": {"hidden": 3}}
    with pytest.raises(CheckpointError, match=r"another config: lr: 0\.001 there, 0\.002 here"):
        load_checkpoint(path, expected_config=config)
    config["model"]["hidden"] = 4
    with pytest.raises(CheckpointError, match=r"model\.hidden: 3 there, 4 here"):
        load_checkpoint(path, expected_config=config)


def test_the_stored_record_is_compared_as_read_record_reads_it(tmp_path):
    path = tmp_path / "ckpt-000003.safetensors"
    save_checkpoint(path, make_checkpoint())  # its record has no "model.width"
    config = {**make_checkpoint().config, "model": {"hidden": 3, "width": 8}}
    with pytest.raises(CheckpointError, match=r"model\.width: '<missing>' there, 8 here"):
        load_checkpoint(path, expected_config=config)

    def with_default_width(stored):
        return {**stored, "model": {"width": 8, **stored["model"]}}

    load_checkpoint(path, expected_config=config, read_record=with_default_width)

    def unreadable(stored):
        raise ConfigError("model.hidden: unknown key")

    with pytest.raises(CheckpointError, match="holds a config this version cannot read") as error:
        load_checkpoint(path, expected_config=config, read_record=unreadable)
    assert "\n" not in str(error.value)


def test_the_resume_rule_frees_only_the_train_keys_that_keep_the_stream():
    stored = {"train": {"lr": 1e-3, "log_every": 10, "device": "cpu"}, "data": {"name": "a"}}
    free = {"train": {"lr": 1e-3, "log_every": 5, "device": "cuda"}, "data": {"name": "a"}}
    assert resume_conflicts(stored, free) == []
    changed = {"train": {"lr": 2e-3, "log_every": 10, "device": "cpu"}, "data": {"name": "b"}}
    assert resume_conflicts(stored, changed) == [
        "data.name: 'a' there, 'b' here",
        "train.lr: 0.001 there, 0.002 here",
    ]
    assert {
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.val_every",
        "train.device",
        "train.num_threads",
        "train.loggers",
        "train.prefetch",
    } == RESUMABLE_KEYS

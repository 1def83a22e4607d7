"""Metric writers chosen by train.loggers: CSV and TensorBoard, resumed without duplicate steps."""

import csv
import importlib.util
import json

import pytest

from flowmatch.cli.main import main
from flowmatch.training.config import ConfigError, TrainConfig

TINY = ["model.hidden=16", "model.depth=2", "train.batch_size=16", "train.log_every=5"]


def test_csv_and_tensorboard_resume_without_duplicate_steps(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "20", *TINY]
    tensorboard = importlib.util.find_spec("tensorboard") is not None  # the tensorboard extra
    names = "csv,tensorboard" if tensorboard else "csv"
    loggers = ["train.checkpoint_every=10", f"train.loggers={names}"]
    assert main([*argv, *loggers]) == 0
    # Killed after logging steps 15 and 20 but before the checkpoint of step 20.
    (out / "checkpoints" / "ckpt-000020.safetensors").unlink()
    assert main(["train", "--resume", str(out)]) == 0
    with (out / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows] == [5, 10, 15, 20]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in jsonl])
    if not tensorboard:
        return
    from tensorboard.backend.event_processing import event_accumulator as accumulator

    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [5, 10, 15, 20]
    assert [s.value for s in scalars] == pytest.approx([r["loss"] for r in jsonl], rel=1e-6)


def test_an_unknown_logger_is_one_line():
    with pytest.raises(ConfigError, match="csv, tensorboard"):
        TrainConfig(loggers=("mlflow",))


def test_a_logger_whose_package_is_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r'pip install "flowmatch\[tensorboard\]"'):
        TrainConfig(loggers=("tensorboard",))

"""A run folder written by an earlier version: its config.json and checkpoints lack the keys
added since. It samples, and ``--resume`` continues it to the same bits as a run of this
version, every missing key read at its default (``model.time_scale`` at 1000, what every
network used before the key)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from flowmatch.app.runs import load_run
from flowmatch.cli.main import main
from flowmatch.training import latest_checkpoint, load_checkpoint
from flowmatch.training.checkpoint import save_checkpoint

# keys the runs of the first releases did not record
ADDED_SINCE = [
    ("data", "context_path"),
    ("data", "stream"),
    ("data", "workers"),
    ("model", "time_scale"),
    ("path", "condition_aware"),
    ("path", "condition_weight"),
    ("path", "ot_blocks"),
]
TINY = [
    "model.hidden=16",
    "model.depth=2",
    "train.batch_size=32",
    "train.log_every=2",
    "train.warmup_steps=2",
]


def _strip(record: dict) -> dict:
    for section, key in ADDED_SINCE:
        del record[section][key]
    return record


def _as_earlier_version(run: Path) -> None:
    config = run / "config.json"
    config.write_text(json.dumps(_strip(json.loads(config.read_text()))))
    for path in (run / "checkpoints").glob("*.safetensors"):
        checkpoint = load_checkpoint(path)
        _strip(checkpoint.config)
        save_checkpoint(path, checkpoint)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "full"
    argv = ["train", "--preset", "gmm", "--out", str(out), "train.steps=8", *TINY]
    assert main([*argv, "train.checkpoint_every=4"]) == 0
    return out


def test_a_run_of_an_earlier_version_resumes_to_the_same_bits(full_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(full_run, old)
    (old / "checkpoints" / "ckpt-000008.safetensors").unlink()
    _as_earlier_version(old)
    assert "time_scale" not in load_checkpoint(latest_checkpoint(old)).config["model"]
    assert main(["train", "--resume", str(old)]) == 0
    resumed = load_checkpoint(latest_checkpoint(old))
    full = load_checkpoint(latest_checkpoint(full_run))
    assert resumed.step == full.step == 8
    for name, value in full.ema.items():
        assert torch.equal(resumed.ema[name], value), name
    assert resumed.config["model"]["time_scale"] == 1000.0  # recorded from now on


def test_a_run_of_an_earlier_version_samples(full_run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(full_run, old)
    _as_earlier_version(old)
    assert load_run(old).config.model.time_scale == 1000.0
    assert main(["sample", str(old), "--n", "4", "--out", str(tmp_path / "s.npy")]) == 0


def test_resuming_an_earlier_run_with_another_value_still_names_the_key(full_run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(full_run, old)
    _as_earlier_version(old)
    assert main(["train", "--resume", str(old), "model.time_scale=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.time_scale: 1000.0 there, 1.0 here" in err and len(err.splitlines()) == 1

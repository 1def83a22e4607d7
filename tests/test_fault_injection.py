"""Faults a run meets in the wild: kills at random moments (mid-write included), crafted
checkpoints, malformed run files, failing disks and diverging runs. Each ends in the same bits
after a resume, or in one line on stderr with exit status 2 (1 for a diverged run), the last
good checkpoint intact and no temporary file left behind."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowmatch.cli.main import main
from flowmatch.training import (
    TrainConfig,
    config_to_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flowmatch.training import files as run_files

WORKER = Path(__file__).with_name("_train_worker.py")
# Logging and checkpoint intervals that do not line up: a resume lands inside a log window.
CONFIG = TrainConfig(
    seed=3, steps=120, batch_size=32, micro_batch_size=16, lr=1e-2, grad_clip=1.0,
    log_every=7, checkpoint_every=10, keep_checkpoints=2, device="cpu",
)  # fmt: skip
TINY = ["model.hidden=16", "model.depth=2", "train.batch_size=32", "train.log_every=5"]


def _worker(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(WORKER), json.dumps(config_to_dict(CONFIG)), str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*command, *extra], env=env, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]


def _metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "steps_per_sec"} for x in lines]


@pytest.mark.slow  # separate processes, each importing torch
def test_kills_at_random_moments_resume_to_the_same_bits_and_metrics(tmp_path):
    full = _worker(tmp_path / "full", "--out", str(tmp_path / "full.safetensors"))
    _finish(full)
    expected = load_file(tmp_path / "full.safetensors")
    rng = random.Random(0)
    for trial in range(4):
        run = tmp_path / f"killed-{trial}"
        killed = _worker(run, "--sleep", "0.003")
        # Wait for a first checkpoint, then kill after a random further delay: some kills land
        # while a checkpoint or a metrics line is being written.
        deadline = time.monotonic() + 60
        while latest_checkpoint(run) is None and killed.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=30)
        resumed = _worker(run, "--resume", "--out", str(tmp_path / f"resumed-{trial}.st"))
        _finish(resumed)
        actual = load_file(tmp_path / f"resumed-{trial}.st")
        assert all(torch.equal(expected[k], actual[k]) for k in expected), trial
        assert _metrics(run) == _metrics(tmp_path / "full"), trial
        assert not list(run.rglob(".*.tmp-*"))


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "gmm"
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "10", *TINY]
    assert main([*argv, "train.checkpoint_every=5", "train.keep_checkpoints=5"]) == 0
    return out


def _one_line(capsys, argv: list[str], code: int = 2) -> str:
    """The one error line of ``argv`` (training progress lines may precede it)."""
    assert main(argv) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("flowmatch ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def _craft(run: Path, **changes) -> None:
    """Rewrite the last checkpoint with a valid checksum (as anyone can with our writer)."""
    path = latest_checkpoint(run)
    checkpoint = load_checkpoint(path)
    save_checkpoint(path, replace(checkpoint, **{k: f(checkpoint) for k, f in changes.items()}))


def _moments(c, mutate):
    state = {i: dict(e) for i, e in c.optimizer["state"].items()}
    mutate(state)
    return {**c.optimizer, "state": state}


def _first(c):
    return next(iter(c.ema))


CRAFTED = {
    "moments of another shape": {
        "optimizer": lambda c: _moments(c, lambda s: s[0].update(exp_avg=torch.zeros(3, 3)))
    },
    "moments of another dtype": {
        "optimizer": lambda c: _moments(c, lambda s: s[0].update(exp_avg=s[0]["exp_avg"].double()))
    },
    "infinite moments": {
        "optimizer": lambda c: _moments(
            c, lambda s: s[0].update(exp_avg_sq=s[0]["exp_avg_sq"] + float("inf"))
        )
    },
    "empty optimizer state": {"optimizer": lambda c: {**c.optimizer, "state": {}}},
    "optimizer step count too high": {
        "optimizer": lambda c: _moments(c, lambda s: s[0].update(step=torch.tensor(1e6)))
    },
    "ema as float64": {"ema": lambda c: {k: v.double() for k, v in c.ema.items()}},
    "ema as int64": {"ema": lambda c: {k: v.long() for k, v in c.ema.items()}},
    "ema as bool": {"ema": lambda c: {k: v.bool() for k, v in c.ema.items()}},
    "all-NaN ema": {"ema": lambda c: {k: v * float("nan") for k, v in c.ema.items()}},
    "ema missing a tensor": {"ema": lambda c: {k: v for k, v in c.ema.items() if k != _first(c)}},
    "ema with a foreign tensor": {"ema": lambda c: {**c.ema, "extra.weight": torch.zeros(2)}},
    "model of another shape": {
        "model": lambda c: {k: v[..., :1].clone() for k, v in c.model.items()}
    },
    "step far beyond the run": {"step": lambda c: 10**12},
    "negative step": {"step": lambda c: -5},
}


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_checkpoints_are_refused_with_one_line(run, name, capsys):
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    _craft(run, **CRAFTED[name])
    crafted = latest_checkpoint(run).read_bytes()
    _one_line(capsys, ["train", "--resume", str(run), "--max-steps", "10"])
    if "ema" in CRAFTED[name] or "step" in CRAFTED[name]:
        _one_line(capsys, ["sample", str(run), "--n", "4", "--solver", "euler"])
    # Nothing was written, the crafted file included.
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after.keys() == before.keys() and latest_checkpoint(run).read_bytes() == crafted


MALFORMED = {
    "spec.json": [b"[1, 2]", b'{"nope": 1}', b'{"shape": [0]}', b"\xff\xfe"],
    "config.json": [b"\x00\x81binary", b"[]", b'{"train": "fast"}'],
    "meta.json": [b"[]", b"{"],
}


@pytest.mark.parametrize(("name", "content"), [(n, c) for n, cs in MALFORMED.items() for c in cs])
def test_malformed_run_files_are_one_line(run, name, content, capsys):
    (run / name).write_bytes(content)
    # spec.json is read by sample (a resume writes it anew); meta.json by a resume only.
    commands = {
        "spec.json": [["sample", str(run), "--n", "4"]],
        "config.json": [["sample", str(run), "--n", "4"], ["train", "--resume", str(run)]],
        "meta.json": [["train", "--resume", str(run)]],
    }[name]
    for argv in commands:
        line = _one_line(capsys, argv)
        assert name in line, line


def test_foreign_metrics_lines_are_skipped_and_kept_out(run, capsys):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"nostep": 1}\n5\n{"step": "x"}\n')
    assert main(["train", "--resume", str(run), "train.log_every=1"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]


def test_checkpoint_metadata_that_is_not_a_mapping_is_one_line(run, capsys):
    path = latest_checkpoint(run)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"] = {"flowmatch": "[1, 2]"}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + size :])
    assert "not a flowmatch checkpoint" in _one_line(capsys, ["sample", str(run), "--n", "4"])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_disk_is_one_line_with_the_last_checkpoint_intact(tmp_path, code, capsys):
    out = tmp_path / "gmm"
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        # Two per atomic write (file, folder): spec, config, meta, the first checkpoint; then
        # the disk fails, at the second checkpoint.
        if len(calls) > 8:
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "20", *TINY]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_files.os, "fsync", failing_fsync)
        line = _one_line(capsys, [*argv, "train.checkpoint_every=5"])
    reason = {errno.ENOSPC: "disk is full", errno.EROFS: "read-only", errno.EACCES: "permission"}
    assert "cannot write" in line and "ckpt-000010.safetensors" in line and reason[code] in line
    assert not list(out.rglob(".*.tmp-*"))  # the partial file was removed
    assert load_checkpoint(latest_checkpoint(out)).step == 5  # and the good one is intact


def test_a_folder_where_a_file_belongs_is_one_line(run, capsys):
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").mkdir()
    line = _one_line(capsys, ["train", "--resume", str(run), "train.log_every=1"])
    assert "metrics.jsonl" in line and "folder" in line
    blocker = run / "samples.npz"
    blocker.mkdir()
    assert "samples.npz" in _one_line(capsys, ["sample", str(run), "--n", "4"])


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    argv = ["train", "--preset", "gmm", "--out", str(blocker / "run"), "--max-steps", "2", *TINY]
    assert "file" in _one_line(capsys, argv)


DIVERGING = {
    "huge learning rate": ["train.lr=1e3", "train.warmup_steps=0", "train.lr_schedule=constant"],
    "exploding loss": ["train.lr=1e4", "train.warmup_steps=0", "train.grad_clip=none"],
}


@pytest.mark.parametrize("name", DIVERGING)
def test_a_diverging_run_stops_and_keeps_only_finite_checkpoints(tmp_path, name, capsys):
    out = tmp_path / "gmm"
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "300", *TINY]
    line = _one_line(capsys, [*argv, "train.checkpoint_every=10", *DIVERGING[name]], code=1)
    assert "diverged at step" in line and "last good checkpoint" in line
    for path in (out / "checkpoints").iterdir():
        checkpoint = load_checkpoint(path)
        tensors = [*checkpoint.model.values(), *checkpoint.ema.values()]
        tensors += [v for e in checkpoint.optimizer["state"].values() for v in e.values()]
        assert all(torch.isfinite(t).all() for t in tensors), path
    if latest_checkpoint(out) is not None:  # "latest" samples to finite points
        assert main(["sample", str(out), "--n", "50", "--solver", "euler", "--steps", "4"]) == 0


def test_an_interrupted_command_is_one_line_with_exit_status_1(run, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("flowmatch.app.training.train", interrupt)
    line = _one_line(capsys, ["train", "--resume", str(run), "train.log_every=1"], code=1)
    assert "interrupted" in line and "--resume" in line


@pytest.mark.parametrize(
    ("weights", "sidecar"),
    [(b"junk", b'{"config": {}}'), (b"junk", b"\xff\xfe"), (b"\x08" * 16, b"[1]")],
)
def test_malformed_feature_files_and_reflow_caches_are_one_line_value_errors(
    tmp_path, weights, sidecar
):
    from flowmatch.metrics.features import load_feature_file
    from flowmatch.reflow import load_reflow_pairs

    for stem, load in (("lenet", load_feature_file), ("pairs", load_reflow_pairs)):
        (tmp_path / f"{stem}.safetensors").write_bytes(weights)
        (tmp_path / f"{stem}.json").write_bytes(sidecar)
        target = tmp_path / (f"{stem}.safetensors" if stem == "lenet" else stem)
        with pytest.raises(ValueError) as error:
            load(target)
        assert "\n" not in str(error.value) and stem in str(error.value)

"""A run killed with SIGKILL and resumed ends with the same weights, bit for bit, as a run that
was never interrupted, and its metrics.jsonl reads as if nothing had happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowmatch.training import TrainConfig, config_to_dict, latest_checkpoint, load_checkpoint

WORKER = Path(__file__).with_name("_train_worker.py")
CONFIG = TrainConfig(
    seed=5, steps=200, batch_size=32, micro_batch_size=16, lr=1e-2, grad_clip=1.0,
    log_every=10, checkpoint_every=50, keep_checkpoints=2, device="cpu",
)  # fmt: skip


def worker(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, str(WORKER), json.dumps(config_to_dict(CONFIG)), str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*command, *extra], env=env, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]


@pytest.mark.slow  # separate processes, each importing torch
def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    full = worker(tmp_path / "full", "--out", str(tmp_path / "full.safetensors"))
    # 2 ms per micro-batch: the kill lands well before the 200 steps end.
    killed = worker(tmp_path / "killed", "--sleep", "0.002")
    deadline = time.monotonic() + 60
    while latest_checkpoint(tmp_path / "killed") is None:
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(latest_checkpoint(tmp_path / "killed")).step
    assert interrupted_at < CONFIG.steps

    resumed = worker(
        tmp_path / "killed", "--resume", "--out", str(tmp_path / "resumed.safetensors")
    )
    finish(resumed)
    finish(full)

    expected, actual = (
        load_file(tmp_path / "full.safetensors"),
        load_file(tmp_path / "resumed.safetensors"),
    )
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    final = [load_checkpoint(latest_checkpoint(tmp_path / run)) for run in ("full", "killed")]
    assert all(torch.equal(final[0].ema[k], final[1].ema[k]) for k in final[0].ema)
    assert all(
        torch.equal(final[0].optimizer["state"][i][k], final[1].optimizer["state"][i][k])
        for i in final[0].optimizer["state"]
        for k in ("exp_avg", "exp_avg_sq")
    )

    def metrics(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "steps_per_sec"} for x in lines]

    # Records after the resumed step were dropped and written again: no gap, no duplicate.
    assert metrics("killed") == metrics("full")
    resumes = json.loads((tmp_path / "killed" / "meta.json").read_text())["resumes"]
    assert [r["step"] for r in resumes] == [interrupted_at]

"""torchrun from a test, with the workers' stacks in the failure if the run hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# One thread a worker; PYTHONFAULTHANDLER makes a worker print every thread's stack on SIGABRT.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def start(arguments: list[str]) -> subprocess.Popen:
    """``python -m torch.distributed.run ARGUMENTS``, its output captured."""
    command = [sys.executable, "-m", "torch.distributed.run", *arguments]
    return subprocess.Popen(
        command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen, timeout: float) -> None:
    """Wait for ``process`` and assert it succeeded. One still running after ``timeout``
    seconds has its workers aborted, so that each prints where its threads are, and the test
    fails with those stacks."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in _children(process.pid):
            os.kill(pid, signal.SIGABRT)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
        pytest.fail(f"torchrun ran past {timeout} s; the workers' stacks:\n{stderr[-8000:]}")
    assert process.returncode == 0, stderr[-3000:]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc; none where there is no /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        if parent == pid:
            found.append(int(stat.parent.name))
    return found

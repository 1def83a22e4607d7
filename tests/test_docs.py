"""Every ```python block of README.md and docs/*.md runs as written (the blocks of one file in
order, sharing their names), and the README's own-data commands run through the CLI."""

import re
import runpy
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowmatch.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.M | re.S)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A fresh folder as the working directory, with the tiny run the README's examples read
    (``demo.sh`` writes the real one)."""
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--preset", "checkerboard", "--max-steps", "2", "train.log_every=1"]
    assert main([*argv, "--out", "runs/checkerboard", "model.hidden=16"]) == 0
    return tmp_path


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path, in_tmp):
    if "import flow_matching" in path.read_text() or "from flow_matching" in path.read_text():
        pytest.importorskip("flow_matching")  # the dev extra installs it
    namespace: dict = {}
    for code in blocks(path, "python"):
        exec(compile(code, str(path), "exec"), namespace)


def test_readme_own_data_commands_run(in_tmp, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    np.save("points.npy", rng.normal(size=(200, 3)).astype(np.float32))
    for k in range(2):
        Path(f"pngs/c{k}").mkdir(parents=True)
        for i in range(25):  # 10 % of 50 files: 5 test images
            pixels = np.full((16, 16), 40 + 150 * k, np.uint8) + rng.integers(0, 30, (16, 16))
            Image.fromarray(pixels.astype(np.uint8)).save(f"pngs/c{k}/{i}.png")
    section = (ROOT / "README.md").read_text().split("### Your own data")[1]
    commands = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    assert len(commands) == 6
    for line in commands:
        words = shlex.split(line.replace("--max-steps 2000", "--max-steps 2"))
        if words[0] == "python":  # the feature classifier, a few epochs
            monkeypatch.setattr(sys, "argv", [words[1], *words[2:], "--epochs", "2"])
            runpy.run_path(str(ROOT / words[1]), run_name="__main__")
        else:
            assert main([*words[1:], *(["eval.nll_samples=20"] if "train" in words else [])]) == 0
    out = capsys.readouterr().out
    assert "held-out rows" in out and "features: lenet-pngs" in out
    assert len(list(Path("runs/pngs/pngs").glob("*.png"))) == 64

"""The user's own data end to end: arrays of any item shape and folders of images, trained from
the command line, sampled as PNGs and evaluated on held-out data; extras named when missing."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.app.evaluation import SamplingProgress
from flowmatch.app.runs import load_run
from flowmatch.cli.main import main
from flowmatch.data import load_image_set, split_images
from flowmatch.extras import MissingExtra, require
from flowmatch.metrics import energy_distance
from flowmatch.metrics.features import LeNet, LeNetConfig, save_feature_extractor

TINY_MLP = ["model.hidden=16", "model.depth=2", "train.batch_size=32", "train.log_every=5"]
TINY_UNET = [
    "model.channels=8",
    "model.num_groups=4",
    "model.attention_resolutions=8",
    "train.batch_size=8",
    "train.log_every=2",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of 16x16 grayscale PNGs, 10 each: dark and bright."""
    root = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    for k, base in enumerate((30, 200)):
        (root / f"class{k}").mkdir()
        for i in range(10):
            pixels = np.clip(base + rng.normal(0, 20, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{k}" / f"{i:02d}.png")
    return root


def test_folder_split_is_seeded_disjoint_and_reproducible(folder):
    train = load_image_set("folder", folder, "train", test_fraction=0.25)
    test = load_image_set("folder", folder, "test", test_fraction=0.25)
    assert len(train.images) == 15 and len(test.images) == 5
    again = load_image_set("folder", folder, "test", test_fraction=0.25)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in rows for x in test.images)
    whole = load_image_set("folder", folder, "train")
    assert len(whole.images) == 20 and whole.labels.tolist() == [0] * 10 + [1] * 10
    with pytest.raises(ValueError, match=r"data\.test_fraction"):
        split_images(whole, "test", 0.0)


def test_digits_preset_on_16x16_folder_names_the_key_to_set(folder, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["train", "--preset", "digits", "data.name=folder", f"data.path={folder}"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.attention_resolutions" in err and "[16, 8]" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_folder_run_trains_samples_pngs_and_evaluates_in_user_features(folder, tmp_path, capsys):
    out = tmp_path / "folder-run"
    argv = ["train", "--preset", "digits", "data.name=folder", f"data.path={folder}"]
    argv += ["data.test_fraction=0.25", "--out", str(out), "--max-steps", "2"]
    assert main([*argv, *TINY_UNET]) == 0
    # One PNG per sample, in [0, 255]; the .npz clamped to [-1, 1].
    pngs = tmp_path / "pngs"
    argv = ["sample", str(out), "--n", "3", "--solver", "euler", "--steps", "2"]
    assert main([*argv, "--png-dir", str(pngs)]) == 0
    assert "clamped to the data range [-1, 1]" in capsys.readouterr().out
    files = sorted(pngs.iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    arrays = np.load(out / "samples.npz")
    assert arrays["samples"].min() >= -1 and arrays["samples"].max() <= 1
    first = np.asarray(Image.open(files[0]))
    assert first.shape == (16, 16) and np.array_equal(first, arrays["pixels"][0, 0])
    # A LeNet of the user's choosing, written as the training script writes it.
    torch.manual_seed(0)
    lenet = LeNet(LeNetConfig(name="mine", levels=256, image_size=16, channels=(4, 8)))
    weights = save_feature_extractor(lenet, tmp_path / "features", {"test_accuracy": None})
    argv = ["eval", str(out), "--solver", "euler", "--steps", "2", "--no-nll", "--json"]
    capsys.readouterr()
    assert main([*argv, "--features", str(weights)]) == 0
    row = json.loads(capsys.readouterr().out)["quality"][0]
    assert row["extractor"] == "lenet-mine" and row["n"] == 5  # 25% of 20 files
    assert row["frechet_distance"] >= 0
    # Without an extractor: one line naming the flags.
    assert main(["eval", str(out), "--solver", "euler", "--steps", "2", "--no-nll"]) == 2
    assert "--features FILE" in capsys.readouterr().err


def test_array_of_matrices_trains_and_is_evaluated_on_held_out_rows(tmp_path, capsys):
    data = np.random.default_rng(0).normal(size=(200, 4, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    out = tmp_path / "matrices"
    argv = ["train", "--preset", "gmm", "data.name=array", f"data.path={tmp_path / 'x.npy'}"]
    assert main([*argv, "--out", str(out), "--max-steps", "10", *TINY_MLP]) == 0
    run = load_run(out)
    assert run.spec.shape == (4, 5)
    capsys.readouterr()
    argv = ["eval", str(out), "--solver", "euler", "--steps", "2", "--n", "500", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["quality"][0]
    assert row["n"] == 20 and row["reference"].startswith("20 held-out rows")  # 10% of 200
    assert row["w2"] is not None and row["mmd"] is not None
    # The noise level: 20 distinct training rows against the 20 held-out rows.
    generator = torch.Generator().manual_seed(1)
    rows = torch.from_numpy(data)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    held_out, train = rows[order[:20]], rows[order[20:]]
    reference = held_out[torch.randperm(20, generator=generator)]
    other = train[torch.randperm(180, generator=generator)[:20]]
    assert row["energy_noise"] == pytest.approx(float(energy_distance(other, reference)))
    assert np.isfinite(report["likelihood"]["nll"])


def test_array_without_held_out_rows_is_refused_in_one_line(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(50, 3)))
    out = tmp_path / "r"
    argv = ["train", "--preset", "gmm", "data.name=array", f"data.path={tmp_path / 'x.npy'}"]
    assert main([*argv, "data.val_fraction=0", "--out", str(out), "--max-steps", "2"]) == 0
    assert main(["eval", str(out), "--solver", "euler", "--steps", "2", "--no-nll"]) == 2
    assert "data.val_fraction" in capsys.readouterr().err


def test_a_missing_extra_is_named():
    with pytest.raises(MissingExtra, match=r'pip install "flowmatch\[plot\]"'):
        require("flowmatch_no_such_module", "plot")


def test_sampling_progress_reports_each_tenth_of_time_with_an_eta(capsys):
    progress = SamplingProgress("sampling 4 (euler)", quiet_for=0.0)
    field = progress.wrap(lambda x, t: torch.zeros_like(x))
    x = torch.zeros(4, 2)
    for k in range(20):  # 20 Euler steps from t = 0
        field(x, torch.full((4,), k / 20))
    progress.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[1].split("%")[0] for line in lines] == [
        str(10 * k) for k in range(1, 10)
    ]
    assert lines[0].startswith("sampling 4 (euler): 10% of t, 3 NFE") and "eta" in lines[0]
    quiet = SamplingProgress("sampling", quiet_for=60.0)
    quiet.wrap(lambda x, t: x)(x, torch.full((4,), 0.5))
    assert capsys.readouterr().err == ""


def test_digits_without_scikit_learn_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if not installed
    out = tmp_path / "digits"
    assert main(["train", "--preset", "digits", "--out", str(out), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "flowmatch[digits]"' in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_pictures_without_matplotlib_name_the_extra_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "flowmatch.plotting", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    out = tmp_path / "r"
    argv = ["train", "--preset", "gmm", "--out", str(out), "--max-steps", "5", *TINY_MLP]
    assert main(argv) == 0 and not (out / "loss.png").exists()
    with pytest.raises(MissingExtra, match=r"flowmatch\[plot\]"):
        require("flowmatch.plotting", "plot")

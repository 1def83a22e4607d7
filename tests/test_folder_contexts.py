"""A folder of images with a table of one context vector per file: the CSV and JSON tables, the
pairing of each image with its context through the test split, streaming and label dropout, a
run trained, sampled and evaluated from the command line, and every bad table one line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.app import evaluation
from flowmatch.app.build import DataSpec, build_data
from flowmatch.app.config import DataConfig, ModelConfig, ObjectiveConfig, RunConfig
from flowmatch.app.runs import load_run
from flowmatch.cli.main import main
from flowmatch.data import ImageDataset, StreamingImageFolder, load_image_set, to_pixels
from flowmatch.metrics.features import LeNet, LeNetConfig, save_feature_extractor

N = 12
NAMES = [f"{'a' if i < N // 2 else 'b'}/img_{i:03d}.png" for i in range(N)]
TINY_UNET = [
    "model.channels=8",
    "model.num_groups=4",
    "model.channel_mult=1,2",
    "model.attention_resolutions=4",
    "train.batch_size=8",
    "train.log_every=1",
]


def _context(i: int) -> list[float]:
    return [float(i), 0.5 * i - 1.0]


def _contexts_of(pixels: torch.Tensor) -> torch.Tensor:
    """The contexts of images ``uint8 [n, 1, 8, 8]`` by the index they encode: their pixels
    are all ``10 + 20 i``."""
    index = (pixels[:, 0, 0, 0].long() - 10) // 20
    return torch.tensor([_context(i) for i in index.tolist()])


GOOD = {name: _context(i) for i, name in enumerate(NAMES)}
FIRST = NAMES[0]  # a/img_000.png


def _csv(rows: dict, header: str = "file,c0,c1") -> str:
    return header + "\n" + "".join(",".join(map(str, [k, *v])) + "\n" for k, v in rows.items())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 grayscale 8x8 PNGs in two sub-folders, image ``i`` of pixels ``10 + 20 i``, with its
    context ``(i, i / 2 - 1)`` in a CSV and a JSON table beside the folder."""
    root = tmp_path_factory.mktemp("ctx")
    images = root / "pngs"
    for i, name in enumerate(NAMES):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 10 + 20 * i, np.uint8)).save(images / name)
    (root / "contexts.csv").write_text(_csv(dict(reversed(GOOD.items()))))  # any row order
    (root / "contexts.json").write_text(json.dumps(GOOD))
    return images


@pytest.mark.parametrize("table", ["contexts.csv", "contexts.json"])
def test_each_drawn_image_comes_with_its_context_in_both_splits(folder, table):
    seen = []
    for split in ("train", "test"):
        data = load_image_set("folder", folder, split, 0.25, folder.parent / table)
        assert data.contexts.shape == (9 if split == "train" else 3, 2)
        assert torch.equal(data.contexts, _contexts_of(data.images))
        # the split of the folder without its table
        assert torch.equal(data.images, load_image_set("folder", folder, split, 0.25).images)
        seen.append({tuple(c) for c in data.contexts.tolist()})
        batch = ImageDataset(data).sample_labelled(40, torch.Generator().manual_seed(1))
        assert torch.equal(batch.context, _contexts_of(to_pixels(batch.x1, 256)))
    assert seen[0].isdisjoint(seen[1]) and len(seen[0] | seen[1]) == N


def test_a_flat_folder_with_one_number_per_file(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8), 10 + 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    table = tmp_path / "c.json"
    table.write_text(json.dumps({"./0.png": 0.5, "1.png": [1.5], "2.png": 2}))
    data = load_image_set("folder", tmp_path, "train", 0.0, table)
    assert data.labels is None and data.contexts.tolist() == [[0.5], [1.5], [2.0]]


@pytest.mark.parametrize("dequantize", [True, False])
def test_streamed_batches_and_contexts_equal_the_loaded_folders(folder, dequantize):
    table = folder.parent / "contexts.csv"
    for split in ("train", "test"):
        loaded = ImageDataset(load_image_set("folder", folder, split, 0.25, table), dequantize)
        streamed = StreamingImageFolder(
            folder, split, 0.25, dequantize=dequantize, context_path=table
        )
        for seed in (0, 1):
            a = streamed.sample_labelled(10, torch.Generator().manual_seed(seed))
            b = loaded.sample_labelled(10, torch.Generator().manual_seed(seed))
            assert torch.equal(a.x1, b.x1) and torch.equal(a.context, b.context)


def test_the_training_source_drops_whole_contexts_and_streams_the_same(folder):
    def data(stream):
        cfg = DataConfig(
            name="folder",
            path=str(folder),
            context_path=str(folder.parent / "contexts.json"),
            test_fraction=0.25,
            stream=stream,
        )
        objective = ObjectiveConfig(label_dropout=0.5)
        return build_data(RunConfig(data=cfg, model=ModelConfig(kind="unet"), objective=objective))

    loaded, streamed = data(False), data(True)
    assert loaded.spec == DataSpec((1, 8, 8), levels=256, context_dim=2) == streamed.spec
    batch = loaded.train.sample(400, torch.Generator().manual_seed(0))
    dropped = batch["context"].isnan().any(1)
    assert dropped.equal(batch["context"].isnan().all(1)) and 0.4 < dropped.float().mean() < 0.6
    kept = _contexts_of(to_pixels(batch["x1"][~dropped], 256))
    assert torch.equal(batch["context"][~dropped], kept)
    again = streamed.train.sample(400, torch.Generator().manual_seed(0))
    assert torch.equal(again["x1"], batch["x1"])
    torch.testing.assert_close(again["context"], batch["context"], rtol=0, atol=0, equal_nan=True)


@pytest.fixture(scope="module")
def folder_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ctx"
    argv = ["train", "--preset", "digits", "data.name=folder", f"data.path={folder}"]
    argv += [f"data.context_path={folder.parent / 'contexts.csv'}", "data.test_fraction=0.5"]
    argv += ["objective.label_dropout=0.5", "eval.nll_samples=4"]
    assert main([*argv, "--out", str(out), "--max-steps", "3", *TINY_UNET]) == 0
    return out


def test_a_folder_run_trains_on_its_contexts_and_samples_at_given_ones(folder_run, tmp_path):
    run = load_run(folder_run)
    assert run.spec.context_dim == 2 and run.spec.shape == (1, 8, 8)
    assert run.model.context_embed.context_dim == 2
    lines = (folder_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert run.model.context_embed.null.abs().sum() > 0  # dropped contexts reached the network
    path = tmp_path / "c.npy"
    np.save(path, np.array([3.0, 0.5]))
    out = tmp_path / "s.npz"
    argv = ["sample", str(folder_run), "--n", "3", "--solver", "euler", "--steps", "2"]
    assert main([*argv, "--context", str(path), "--out", str(out)]) == 0
    assert np.load(out)["samples"].shape == (3, 1, 8, 8)
    assert main([*argv, "--context", str(path), "--guidance", "2", "--out", str(out)]) == 0
    assert main([*argv, "--out", str(tmp_path / "none.npz")]) == 2  # no --context


def test_eval_samples_at_the_test_images_contexts(
    folder, folder_run, tmp_path, monkeypatch, capsys
):
    torch.manual_seed(0)
    lenet = LeNet(LeNetConfig(name="mine", levels=256, image_size=8, channels=(4, 8)))
    weights = save_feature_extractor(lenet, tmp_path / "features", {"test_accuracy": None})
    seen = []
    generate = evaluation.generate
    monkeypatch.setattr(
        evaluation, "generate", lambda *a, **k: seen.append(k["contexts"]) or generate(*a, **k)
    )
    argv = ["eval", str(folder_run), "--solver", "euler", "--steps", "2", "--json"]
    capsys.readouterr()
    assert main([*argv, "--features", str(weights)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quality"][0]["n"] == 6  # the 6 test images, each at its own context
    test = load_image_set("folder", folder, "test", 0.5, folder.parent / "contexts.csv")
    assert len(seen) == 1 and torch.equal(seen[0], test.contexts)
    assert np.isfinite(report["bits_per_dim"]["bpd"]) and "per_context" not in report


def _json(first: str) -> str:
    """The good JSON table with the raw text ``first`` as the first file's context."""
    return f'{{"{FIRST}": {first}, ' + json.dumps({k: GOOD[k] for k in NAMES[1:]})[1:]


TABLES = {  # case: (file name, contents (None: no file), the message)
    "missing": ("absent.csv", None, "no such file"),
    "suffix": ("c.txt", "file,c\n", "expected a .csv or .json table"),
    "binary": ("c.csv", b"\xff\xfe\x00", "cannot read as text"),
    "empty csv": ("c.csv", "", "header row"),
    "header only path": ("c.csv", "file\n", "header row"),
    "csv field": ("c.csv", "file,c\n" + "x" * 200_000 + ",1\n", "not a CSV table"),
    "csv not a number": ("c.csv", _csv({**GOOD, FIRST: ["abc", 1]}), "'abc' is not a number"),
    "csv nan": ("c.csv", _csv({**GOOD, FIRST: ["nan", 1]}), "is not finite"),
    "csv float32 overflow": ("c.csv", _csv({**GOOD, FIRST: [1e39, 1]}), "is not finite"),
    "csv unequal": ("c.csv", _csv({**GOOD, FIRST: [1]}), "has 2 columns, the header 3"),
    "csv missing row": (
        "c.csv",
        _csv(dict(list(GOOD.items())[:-1])),
        "no context row for 'b/img_011.png'",
    ),
    "csv unknown row": (
        "c.csv",
        _csv({**GOOD, "c/img_999.png": [1, 1]}),
        "'c/img_999.png' names no image of the folder",
    ),
    "csv duplicate": ("c.csv", _csv(GOOD) + f"{FIRST},1,1\n", f"two rows for '{FIRST}'"),
    "json syntax": ("c.json", "{", "not valid JSON"),
    "json deep": ("c.json", "[" * 100_000, "not valid JSON"),
    "json not an object": ("c.json", "[1, 2]", "expected a JSON object"),
    "json string": ("c.json", json.dumps({**GOOD, FIRST: "1"}), "not a number or a list"),
    "json bool": ("c.json", json.dumps({**GOOD, FIRST: [True, 1]}), "not a number or a list"),
    "json empty list": ("c.json", json.dumps({**GOOD, FIRST: []}), "not a number or a list"),
    "json nan": ("c.json", json.dumps({**GOOD, FIRST: [float("nan"), 1]}), "is not finite"),
    "json huge": ("c.json", _json("[1" + "0" * 5000 + ", 1]"), "is not finite"),
    "json unequal": (
        "c.json",
        json.dumps({**GOOD, NAMES[1]: [1.0]}),
        f"'{NAMES[1]}' has 1 values, '{FIRST}' 2",
    ),
    "json duplicate": ("c.json", _json(f'[0, 0], "{FIRST}": [1, 1]'), f"two rows for '{FIRST}'"),
    "json duplicate path": ("c.json", json.dumps({**GOOD, f"./{FIRST}": [0, 0]}), "two rows"),
    "json missing row": ("c.json", "{}", f"no context row for '{FIRST}' (and 11 more files)"),
}


@pytest.mark.parametrize("case", list(TABLES), ids=list(TABLES))
def test_bad_tables_are_one_line_and_write_nothing(case, folder, tmp_path, capsys):
    name, content, message = TABLES[case]
    table = tmp_path / name
    if isinstance(content, bytes):
        table.write_bytes(content)
    elif content is not None:
        table.write_text(content)
    out = tmp_path / "never"
    argv = ["train", "--preset", "digits", "data.name=folder", f"data.path={folder}"]
    argv += [f"data.context_path={table}", "--out", str(out), "--max-steps", "1", *TINY_UNET]
    if case == "csv missing row":
        argv.append("data.stream=true")  # the streamed folder checks its table alike
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["data.conditional=true"], "conditional=true (class labels) and context_path"),
        (["data.name=digits"], "context_path applies to name=array or name=folder"),
    ],
)
def test_contexts_with_labels_or_on_a_shipped_set_are_refused(
    keys, message, folder, tmp_path, capsys
):
    out = tmp_path / "never"
    argv = ["train", "--preset", "digits", "data.name=folder", f"data.path={folder}"]
    if keys == ["data.name=digits"]:
        argv = argv[:3]  # the bundled digits, which take no path
    argv += [f"data.context_path={folder.parent / 'contexts.csv'}", *keys, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()

"""An image folder streamed from disk: the batches of the folder loaded into memory, decoded on
demand (in the calling process or in DataLoader workers), and memory that does not grow with
the folder."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from flowmatch.cli.main import main
from flowmatch.data import ImageDataset, StreamingImageFolder, load_image_set
from flowmatch.data import images as images_module


def _write_folder(root, per_class, size, seed=0):
    """Two classes of ``size x size`` RGB PNGs of uniform noise."""
    rng = np.random.default_rng(seed)
    for k in range(2):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{k}" / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("pngs"), per_class=15, size=8)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("dequantize", [True, False])
def test_streamed_batches_equal_the_loaded_folders(folder, workers, dequantize):
    for split in ("train", "test"):
        loaded = ImageDataset(load_image_set("folder", folder, split, 0.2), dequantize=dequantize)
        streamed = StreamingImageFolder(folder, split, 0.2, dequantize=dequantize, workers=workers)
        assert len(streamed) == len(loaded) == (24 if split == "train" else 6)
        assert streamed.shape == loaded.shape == (3, 8, 8)
        for seed in (0, 1):
            a = streamed.sample_labelled(10, torch.Generator().manual_seed(seed))
            b = loaded.sample_labelled(10, torch.Generator().manual_seed(seed))
            assert torch.equal(a.x1, b.x1) and torch.equal(a.label, b.label)


def test_streaming_decodes_only_the_drawn_files(folder, monkeypatch):
    reads = []
    read_image = images_module._read_image
    monkeypatch.setattr(images_module, "_read_image", lambda p: reads.append(p) or read_image(p))
    streamed = StreamingImageFolder(folder, "train", 0.2)
    assert len(reads) == 1  # the first file, for the shape
    generator = torch.Generator().manual_seed(3)
    index = torch.randint(len(streamed), (7,), generator=torch.Generator().manual_seed(3))
    streamed.sample(7, generator)
    assert reads[1:] == [streamed.files[i] for i in index.tolist()]
    assert not any(
        isinstance(v, torch.Tensor) and v.dtype == torch.uint8 for v in vars(streamed).values()
    )


@pytest.mark.parametrize("workers", [0, 1])
def test_a_file_of_another_size_is_one_line_naming_it(tmp_path, workers):
    root = _write_folder(tmp_path / "pngs", per_class=3, size=8)
    odd = root / "class1" / "0002.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(odd)
    streamed = StreamingImageFolder(root, workers=workers)
    with pytest.raises(ValueError, match=r"0002\.png: shape \[3, 4, 4\] differs") as error:
        streamed.read(torch.arange(6))
    assert len(str(error.value).splitlines()) == 1
    (root / "class0" / "0001.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"0001\.png: cannot read as an image"):
        streamed.read(torch.arange(6))


TINY_UNET = [
    "model.channels=8",
    "model.num_groups=4",
    "model.channel_mult=1,2",
    "model.attention_resolutions=4",
    "train.batch_size=8",
    "train.log_every=1",
]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_streamed_folder_trains_the_weights_of_the_loaded_one(folder, tmp_path, workers):
    weights = []
    for stream in ("data.stream=false", f"data.stream=true data.workers={workers}"):
        out = tmp_path / stream.split()[0]
        argv = ["train", "--preset", "digits", "data.name=folder", f"data.path={folder}"]
        argv += ["data.conditional=true", *stream.split(), "--out", str(out), "--max-steps", "2"]
        assert main([*argv, *TINY_UNET]) == 0
        (checkpoint,) = sorted((out / "checkpoints").glob("*.safetensors"))
        weights.append(safetensors.torch.load_file(checkpoint))
    assert weights[0].keys() == weights[1].keys()
    # The batches are the same bits either way (above). Decoded in a worker, the images reach
    # the network through other buffers, and the gradients differ in their last bits (grad
    # norm 0.47837257 against 0.47837254 here).
    tolerance = 0.0 if workers == 0 else 1e-6
    assert all(
        torch.allclose(weights[0][k], weights[1][k], rtol=0.0, atol=tolerance) for k in weights[0]
    )


def test_a_run_may_switch_to_streaming_on_resume_and_ends_at_the_same_bits(folder, tmp_path):
    argv = ["train", "--preset", "digits", "data.name=folder", f"data.path={folder}"]
    argv += ["train.steps=4", "train.checkpoint_every=2", "train.warmup_steps=1", *TINY_UNET]
    assert main([*argv, "--out", str(tmp_path / "loaded")]) == 0
    assert main([*argv, "--out", str(tmp_path / "switched"), "--max-steps", "4"]) == 0
    (tmp_path / "switched" / "checkpoints" / "ckpt-000004.safetensors").unlink()
    assert main(["train", "--resume", str(tmp_path / "switched"), "data.stream=true"]) == 0
    ends = [
        safetensors.torch.load_file(tmp_path / run / "checkpoints" / "ckpt-000004.safetensors")
        for run in ("loaded", "switched")
    ]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    config = json.loads((tmp_path / "switched" / "config.json").read_text())
    assert config["data"]["stream"] is True  # the record follows the resumed run


MEASURE = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from flowmatch.data import StreamingImageFolder
    from flowmatch.data.images import load_image_folder

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    streamed = StreamingImageFolder(sys.argv[1])
    generator = torch.Generator().manual_seed(0)
    streamed.sample(32, generator)
    start, most = resident_mib(), 0.0
    for _ in range(40):  # 1280 draws: more than half the folder
        batch = streamed.sample(32, generator)
        most = max(most, resident_mib() - start)
    loaded = load_image_folder(sys.argv[1])
    print(json.dumps({"streaming": most, "loading": resident_mib() - start - most}))
    """
)


def test_streaming_memory_stays_flat_where_loading_grows_with_the_folder(tmp_path):
    root = _write_folder(tmp_path / "pngs", per_class=1000, size=64)  # 2000 PNGs
    cap_mib = 2000 * 3 * 64 * 64 / 2**20  # the decoded folder: 23.4 MiB
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and keeps
    # freed batches in its heap, which the resident size would count.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(
        [sys.executable, str(script), str(root)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    growth = json.loads(done.stdout)
    assert growth["streaming"] < cap_mib / 8  # about one batch: 32 images of 48 KiB
    assert growth["loading"] > cap_mib


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["data.stream=true"], "stream=true reads a folder of images (name=folder), not gmm"),
        (["data.workers=2"], "workers decode a streamed folder: set data.stream=true"),
        (["data.workers=-1"], "workers"),
    ],
)
def test_stream_keys_out_of_place_are_one_line(keys, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["train", "--preset", "gmm", "--out", str(out), *keys]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()

"""Image loaders, the pixel <-> model-space map, and fetch's checksum handling (no network)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.data import fetch as fetch_module
from flowmatch.data.base import Dataset
from flowmatch.data.fetch import IDX_SHA256, fetch, write_verified
from flowmatch.data.images import (
    ImageData,
    ImageDataset,
    load_cifar10,
    load_digits,
    load_idx,
    load_image_folder,
    load_image_set,
    load_mnist,
    to_model_space,
    to_pixels,
)

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# ---- pixel map -------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_pixel_cells_tile_the_interval(levels):
    # y = 2 (v + u) / L - 1 must put the L cells side by side on [-1, 1], which is what makes
    # bits/dim = -log p(y) / (D ln 2) + log2(L / 2) correct.
    v = torch.arange(levels)
    left = to_model_space(v, levels, 0.0).double()
    right = to_model_space(v, levels, 1.0).double()
    assert left[0] == -1.0 and right[-1] == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(right - left, torch.full_like(left, 2 / levels))
    torch.testing.assert_close(left[1:], right[:-1])
    # u = 0 exactly sits on a cell boundary, where float32 round-off may pick the cell below
    for u in (1e-3, 0.5, 0.999):
        assert torch.equal(to_pixels(to_model_space(v, levels, u), levels), v.to(torch.uint8))


def _constant_images(n: int, levels: int) -> ImageData:
    """Image i is filled with pixel value i % levels and labelled i % levels."""
    values = torch.arange(n) % levels
    images = values.to(torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 3, 2).contiguous()
    return ImageData(images=images, labels=values, levels=levels)


def test_dataset_dequantises_within_the_pixel_cell_and_keeps_labels_aligned():
    levels = 7
    dataset = ImageDataset(_constant_images(50, levels), dequantize=True)
    assert isinstance(dataset, Dataset)
    assert dataset.shape == (1, 3, 2) and len(dataset) == 50
    batch = dataset.sample_labelled(4000, torch.Generator().manual_seed(0))
    assert batch.x1.shape == (4000, 1, 3, 2) and batch.x1.dtype == torch.float32
    pixels = batch.label.reshape(-1, 1, 1, 1).expand_as(batch.x1)
    assert torch.equal(to_pixels(batch.x1, levels).long(), pixels)
    u = (batch.x1.double() + 1) * levels / 2 - pixels
    # u ~ U[0, 1): mean 1/2 and variance 1/12; with 24000 draws the standard errors are 0.002
    # (mean) and 0.0006 (variance), so 0.01 / 0.003 are 5 standard errors.
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003


def test_dataset_without_dequantisation_gives_cell_centres_and_is_reproducible():
    levels = 5
    dataset = ImageDataset(_constant_images(20, levels), dequantize=False)
    batch = dataset.sample_labelled(64, torch.Generator().manual_seed(3))
    centre = 2 * (batch.label.double() + 0.5) / levels - 1
    torch.testing.assert_close(batch.x1.double()[:, 0, 0, 0], centre)
    again = dataset.sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(again, batch.x1)


# ---- scikit-learn digits -----------------------------------------------------------------


def test_digits_split_is_fixed_and_complete():
    from sklearn.datasets import load_digits as sklearn_load_digits

    train, test = load_digits("train"), load_digits("test")
    assert train.images.shape == (1500, 1, 8, 8) and test.images.shape == (297, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.levels == 17 and int(train.images.max()) == 16
    reference = sklearn_load_digits()
    assert np.array_equal(torch.cat([train.images, test.images]).squeeze(1), reference.images)
    assert np.array_equal(torch.cat([train.labels, test.labels]), reference.target)
    assert load_image_set("digits", split="test").labels.equal(test.labels)
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


# ---- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.tobytes()


def _write_fake_idx(directory, rng) -> dict[str, bytes]:
    """Write small IDX files under the MNIST names, half raw and half gzipped."""
    contents = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        images = rng.integers(0, 256, size=(n, 5, 4), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        contents[f"{prefix}-images-idx3-ubyte"] = _idx_bytes(images, 0x803)
        contents[f"{prefix}-labels-idx1-ubyte"] = _idx_bytes(labels, 0x801)
    for i, (name, data) in enumerate(contents.items()):
        if i % 2:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return contents


def test_idx_round_trip_raw_and_gzip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    (tmp_path / "im").write_bytes(_idx_bytes(images, 0x803))
    (tmp_path / "lb.gz").write_bytes(gzip.compress(_idx_bytes(labels, 0x801)))
    data = load_idx(tmp_path / "im", tmp_path / "lb")
    assert data.images.shape == (3, 1, 5, 4) and data.levels == 256
    assert np.array_equal(data.images[:, 0].numpy(), images)
    assert data.labels.tolist() == [7, 0, 9] and data.labels.dtype == torch.int64


def test_idx_errors_are_one_line_and_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="flowmatch data fetch mnist --dir"):
        load_mnist(tmp_path)
    labels = np.zeros(30, dtype=np.uint8)
    (tmp_path / "lb").write_bytes(_idx_bytes(labels, 0x801))
    (tmp_path / "swapped").write_bytes(_idx_bytes(labels, 0x801))
    with pytest.raises(ValueError, match="magic 0x00000801, expected 0x00000803"):
        load_idx(tmp_path / "swapped", tmp_path / "lb")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((3, 2, 2), np.uint8), 0x803)[:-1])
    with pytest.raises(ValueError, match="data bytes for shape"):
        load_idx(tmp_path / "short", tmp_path / "lb")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="cannot decompress") as error:
        load_idx(tmp_path / "bad", tmp_path / "lb")
    assert "\n" not in str(error.value)


def test_mnist_loader_checks_the_known_checksums(tmp_path, monkeypatch):
    contents = _write_fake_idx(tmp_path, np.random.default_rng(1))
    with pytest.raises(ValueError, match="not the mnist file"):
        load_mnist(tmp_path)
    fake = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    monkeypatch.setitem(IDX_SHA256, "mnist", fake)
    train, test = load_mnist(tmp_path, "train"), load_image_set("mnist", tmp_path, "test")
    assert train.images.shape == (6, 1, 5, 4) and test.images.shape == (4, 1, 5, 4)


def test_fetch_writes_only_verified_files_and_skips_when_present(tmp_path, monkeypatch):
    contents = {name: bytes([i]) * 16 for i, name in enumerate(IDX_NAMES)}
    archives = {name: gzip.compress(data) for name, data in contents.items()}
    target = tmp_path / "mnist"
    with pytest.raises(ValueError, match="does not match its sha256"):
        write_verified("mnist", archives, target)
    assert not target.exists()
    with pytest.raises(ValueError, match="lacks"):
        write_verified("mnist", dict(list(archives.items())[:3]), target)

    fake = {name: hashlib.sha256(data).hexdigest() for name, data in contents.items()}
    monkeypatch.setitem(IDX_SHA256, "mnist", fake)
    write_verified("mnist", archives, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)

    def no_download(cache):
        raise AssertionError("fetch downloaded although the files were present")

    monkeypatch.setattr(fetch_module, "_mnist_archives", no_download)
    assert fetch("mnist", target) == target
    with pytest.raises(ValueError, match="holds mnist"):
        fetch("fashion-mnist", target)
    with pytest.raises(ValueError, match="cannot fetch 'cifar10'"):
        fetch("cifar10", tmp_path)


# ---- CIFAR-10 ----------------------------------------------------------------------------


def _cifar_batches(rng, sizes):
    return [
        (rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, size=n))
        for n in sizes
    ]


def _write_cifar(directory, batches, binary, old_numpy_names=False):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, (data, labels) in zip(names, batches, strict=True):
        if binary:
            records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
            (directory / f"{name}.bin").write_bytes(records.tobytes())
        else:
            batch = {b"batch_label": b"x", b"labels": labels.tolist(), b"data": data}
            # protocol 3 writes module names as text (GLOBAL opcode); the original batches, written
            # with numpy 1, name numpy.core.multiarray where numpy 2 writes numpy._core.multiarray
            blob = pickle.dumps(batch, protocol=3)
            if old_numpy_names:
                blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            (directory / name).write_bytes(blob)


@pytest.mark.parametrize(
    ("binary", "old_numpy_names"), [(False, False), (False, True), (True, False)]
)
def test_cifar10_both_formats_give_channel_major_images(tmp_path, binary, old_numpy_names):
    batches = _cifar_batches(np.random.default_rng(2), [2, 3, 1, 2, 2, 3])
    _write_cifar(tmp_path, batches, binary, old_numpy_names)
    train, test = load_cifar10(tmp_path, "train"), load_cifar10(tmp_path, "test")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    data = np.concatenate([b[0] for b in batches[:5]])
    labels = np.concatenate([b[1] for b in batches[:5]])
    # record layout: 1024 red, then 1024 green, then 1024 blue bytes, each row-major
    assert train.images[4, 1, 2, 5].item() == data[4, 1024 + 2 * 32 + 5]
    assert np.array_equal(train.images.reshape(10, -1).numpy(), data)
    assert np.array_equal(train.labels.numpy(), labels) and train.levels == 256


def test_cifar10_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    batches = _cifar_batches(np.random.default_rng(3), [1] * 6)
    _write_cifar(tmp_path, batches, binary=False)
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload()}, protocol=3))
    with pytest.raises(ValueError, match=r"refusing (posix|os)\.system") as error:
        load_cifar10(tmp_path)
    assert not marker.exists() and "\n" not in str(error.value)


def test_cifar10_missing_or_truncated_batches(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar"):
        load_cifar10(tmp_path, "test")
    batches = _cifar_batches(np.random.default_rng(4), [1] * 6)
    _write_cifar(tmp_path, batches, binary=True)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(ValueError, match="3073-byte records"):
        load_cifar10(tmp_path, "test")


# ---- image folders -----------------------------------------------------------------------


def test_image_folder_reads_png_and_jpeg_and_labels_subfolders(tmp_path):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(np.full((6, 5, 3), 200, np.uint8)).save(tmp_path / "b.JPG", quality=95)
    Image.fromarray(np.dstack([rgb, np.full((6, 5), 9, np.uint8)])).save(tmp_path / "c.png")
    data = load_image_folder(tmp_path)
    assert data.images.shape == (3, 3, 6, 5) and data.labels is None and data.levels == 256
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), rgb)  # PNG is lossless
    assert np.array_equal(data.images[2].permute(1, 2, 0).numpy(), rgb)  # alpha dropped
    assert abs(data.images[1].float().mean().item() - 200) < 2  # JPEG of a flat image

    classes = tmp_path / "classes"
    for k, name in enumerate(["cat", "dog"]):
        (classes / name).mkdir(parents=True)
        for i in range(k + 1):
            Image.fromarray(np.full((4, 4), 10 * k + i, np.uint8)).save(classes / name / f"{i}.png")
    labelled = load_image_set("folder", classes)
    assert labelled.images.shape == (3, 1, 4, 4) and labelled.labels.tolist() == [0, 1, 1]
    assert labelled.images[:, 0, 0, 0].tolist() == [0, 10, 11]


def test_image_folder_requires_equal_sizes(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="same size"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")

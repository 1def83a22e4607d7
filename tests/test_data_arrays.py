"""User arrays: loading .npy / .pt as data only, one-line errors, the seeded split, and
``ArrayDataset`` drawing rows with replacement from the given generator only."""

import numpy as np
import pytest
import torch

from flowmatch.data import ArrayDataset, Dataset, load_array, load_array_dataset, split_rows


def row_ids(x: torch.Tensor) -> set[int]:
    """Rows built as ``[i, i + 0.5]`` are identified by their first entry."""
    return {int(v) for v in x[:, 0]}


def rows(n: int) -> np.ndarray:
    return np.stack([np.arange(n), np.arange(n) + 0.5], axis=1)


def test_round_trip_npy_and_pt(tmp_path):
    data = rows(10)
    np.save(tmp_path / "a.npy", data)
    torch.save(torch.from_numpy(data), tmp_path / "a.pt")
    for name in ("a.npy", "a.pt"):
        loaded = load_array(tmp_path / name)
        assert loaded.dtype == torch.float32
        torch.testing.assert_close(loaded, torch.from_numpy(data).float(), atol=0, rtol=0)
    images = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    np.save(tmp_path / "images.npy", images)
    assert load_array(tmp_path / "images.npy", torch.float64).shape == (2, 3, 4, 4)


def write(path, value):
    if path.suffix == ".npy":
        np.save(path, value, allow_pickle=True)
    else:
        torch.save(value, path)
    return path


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("missing.npy", None, "no such file"),
        ("a.csv", "x", "expected a .npy or .pt file"),
        ("text.npy", np.array([["a", "b"]]), "expected integer or float"),
        ("objects.npy", np.array([[{"a": 1}]], dtype=object), "cannot read as a plain array"),
        ("flags.pt", torch.ones(3, 2, dtype=torch.bool), "expected integer or float"),
        ("dict.pt", {"x": torch.ones(3, 2)}, "expected one tensor"),
        ("flat.npy", np.arange(5.0), "at least 2 axes"),
        ("empty.pt", torch.ones(0, 2), "N >= 1"),
        ("nan.npy", np.array([[1.0, np.nan]]), "NaN or infinite"),
    ],
)
def test_one_line_errors(tmp_path, name, value, message):
    path = tmp_path / name
    if value is not None:
        if path.suffix in (".npy", ".pt"):
            write(path, value)
        else:
            path.write_text(value)
    with pytest.raises(ValueError, match=message) as error:
        load_array(path)
    text = str(error.value)
    assert "\n" not in text and name in text


class Payload:
    """An arbitrary class: unpickling it would run code, which weights_only refuses."""


def test_pickled_pt_is_refused(tmp_path):
    path = tmp_path / "code.pt"
    torch.save(Payload(), path)
    with pytest.raises(ValueError, match="pickled objects other than tensors"):
        load_array(path)


def test_split_is_seeded_disjoint_and_complete():
    data = torch.from_numpy(rows(50))
    split = split_rows(data, val_fraction=0.2, seed=7)
    assert len(split.validation) == 10 and len(split.train) == 40
    train, val = row_ids(split.train.data), row_ids(split.validation.data)
    assert train.isdisjoint(val) and train | val == set(range(50))
    again = split_rows(data, val_fraction=0.2, seed=7)
    assert torch.equal(again.validation.data, split.validation.data)
    assert row_ids(split_rows(data, 0.2, seed=8).validation.data) != val
    assert split_rows(data, 0.0).validation is None
    # A positive fraction always holds out at least one row.
    assert len(split_rows(data[:3], 0.01).validation) == 1


def test_too_few_rows(tmp_path):
    np.save(tmp_path / "one.npy", rows(1))
    with pytest.raises(ValueError, match="too few rows") as error:
        load_array_dataset(tmp_path / "one.npy", val_fraction=0.1)
    assert "one.npy" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="val_fraction"):
        split_rows(torch.ones(4, 2), val_fraction=1.0)


def test_array_dataset_sampling():
    data = torch.from_numpy(rows(20))
    dataset = ArrayDataset(data)
    assert isinstance(dataset, Dataset) and dataset.shape == (2,) and len(dataset) == 20
    global_state = torch.get_rng_state()
    drawn = dataset.sample(100, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), global_state), "drew from the global generator"
    # Indices are torch.randint on the CPU with the caller's generator.
    index = torch.randint(20, (100,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, data[index])
    # With replacement and uniform: 20000 draws over 20 rows, each count Binomial(20000, 1/20),
    # within 5 standard deviations.
    many = dataset.sample(20_000, torch.Generator().manual_seed(1))
    counts = torch.bincount(many[:, 0].long(), minlength=20).double()
    assert ((counts - 1000).abs() < 5 * (20_000 * 0.05 * 0.95) ** 0.5).all()
    with pytest.raises(ValueError, match=r"\[N, \*dims\]"):
        ArrayDataset(torch.ones(5))

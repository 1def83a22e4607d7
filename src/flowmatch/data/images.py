"""Image sets read from local files, and the map between integer pixels and model space.

Every loader returns ``ImageData(images: uint8 [N, C, H, W], labels: int64 [N] | None, levels)``
and never downloads: MNIST and Fashion-MNIST come from ``flowmatch.data.fetch`` (or the user's
own IDX files), scikit-learn's digits ship inside its wheel, CIFAR-10 and image folders are the
user's files. A folder may come with a table of one context vector per file
(:func:`~flowmatch.data.contextual.load_context_table`): ``ImageData.contexts`` float ``[N, C]``.

Pixels ``v in {0, ..., L-1}`` (``L = levels``) map to model space ``[-1, 1]`` by

    y = 2 (v + u) / L - 1,    u ~ U[0, 1) (uniform dequantisation) or u = 1/2 (cell centre),

so the ``L`` cells tile ``[-1, 1]`` exactly and a density ``p(y)`` gives
``bits/dim = -log p(y) / (D ln 2) + log2(L / 2)`` (a uniform density on ``[-1, 1]^D`` gives
``log2 L``, 8 for 8-bit images). ``to_pixels`` inverts the map for every ``u in [0, 1)`` (up to
float round-off within about 1e-6 of a cell boundary).
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowmatch.data.base import draw_device
from flowmatch.data.contextual import load_context_table
from flowmatch.data.fetch import IDX_SHA256
from flowmatch.extras import require

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
DIGITS_TRAIN_SIZE = 1500
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageData:
    """Images ``uint8 [N, C, H, W]`` with values below ``levels``; ``labels`` int64 ``[N]``,
    ``contexts`` float ``[N, C']`` (a folder with a context table)."""

    images: Tensor
    labels: Tensor | None
    levels: int
    contexts: Tensor | None = None


@dataclass(frozen=True)
class ImageBatch:
    """A batch in model space: ``x1`` float ``[n, C, H, W]`` in ``[-1, 1]``, ``label`` ``[n]``,
    ``context`` ``[n, C']``."""

    x1: Tensor
    label: Tensor | None
    context: Tensor | None = None


def to_model_space(pixels: Tensor, levels: int, noise: Tensor | float = 0.5) -> Tensor:
    """``y = 2 (v + u) / L - 1`` for pixels ``v`` and offsets ``u = noise`` in ``[0, 1)``.

    Returns float32 unless ``noise`` is a tensor of another floating dtype.
    """
    dtype = noise.dtype if isinstance(noise, Tensor) else torch.float32
    return (pixels.to(dtype) + noise) * (2.0 / levels) - 1.0


def to_pixels(y: Tensor, levels: int) -> Tensor:
    """The pixel cell of ``y``: ``v = clamp(floor((y + 1) L / 2), 0, L - 1)`` as uint8."""
    if levels > 256:
        raise ValueError(f"to_pixels returns uint8, so levels must be <= 256, got {levels}")
    y = y.to(torch.promote_types(y.dtype, torch.float32))
    v = torch.floor((y + 1.0) * (levels / 2.0))
    return v.clamp(0, levels - 1).to(torch.uint8)


class ImageDataset:
    """Images kept as uint8 on ``device`` and mapped to ``[-1, 1]`` one batch at a time.

    ``sample`` draws indices uniformly with replacement (and the dequantisation offsets when
    ``dequantize``) on the CPU with ``generator``, so a CPU generator works for any device.
    Without dequantisation every pixel maps to its cell centre (``u = 1/2``).
    """

    def __init__(
        self,
        data: ImageData,
        dequantize: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.images = data.images.to(device)
        self.labels = None if data.labels is None else data.labels.to(device)
        self.contexts = None if data.contexts is None else data.contexts.to(device)
        self.levels = data.levels
        self.dequantize = dequantize
        self.dtype = dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> ImageBatch:
        """``n`` images in model space with their labels and contexts (``None`` where the set
        has none)."""
        device = draw_device(generator)
        index = torch.randint(self.images.shape[0], (n,), generator=generator, device=device)
        if self.dequantize:
            noise = torch.rand(
                (n, *self.shape), generator=generator, dtype=self.dtype, device=device
            )
            noise = noise.to(self.images.device)
        else:
            noise = torch.full((), 0.5, dtype=self.dtype, device=self.images.device)
        index = index.to(self.images.device)
        x1 = to_model_space(self.images[index], self.levels, noise)
        label = None if self.labels is None else self.labels[index]
        context = None if self.contexts is None else self.contexts[index]
        return ImageBatch(x1=x1, label=label, context=context)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, C, H, W]`` images in model space (``sample_labelled(...).x1``)."""
        return self.sample_labelled(n, generator).x1


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_digits(split: str = "train") -> ImageData:
    """scikit-learn's 8x8 digits (1797 images, values 0..16, so 17 levels), ``[N, 1, 8, 8]``.

    Fixed split in the file's order: the first 1500 images train, the last 297 test.
    """
    _check_split(split)
    bunch = require("sklearn.datasets", "digits").load_digits()  # ships with scikit-learn
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    part = slice(None, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    return ImageData(images=images[part].contiguous(), labels=labels[part].contiguous(), levels=17)


def _read_idx_bytes(path: Path, hint: str) -> bytes:
    """The decompressed bytes of ``path`` or ``path.gz`` (the raw file wins if both exist)."""
    candidates = [path, path.with_name(path.name + ".gz")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{path}[.gz] not found: {hint}")
    try:
        raw = found.read_bytes()
        return gzip.decompress(raw) if found.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{found}: cannot decompress ({error}): {hint}") from error


def _parse_idx(data: bytes, magic: int, path: Path, hint: str) -> np.ndarray:
    """IDX: big-endian int32 magic, one int32 size per axis, then uint8 values."""
    ndim = 3 if magic == IDX_IMAGES_MAGIC else 1
    header_bytes = 4 * (1 + ndim)
    if len(data) < header_bytes:
        raise ValueError(f"{path}: too short for an IDX header: {hint}")
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim)
    if header[0] != magic:
        raise ValueError(
            f"{path}: IDX magic {int(header[0]):#010x}, expected {magic:#010x}: {hint}"
        )
    dims = tuple(int(d) for d in header[1:])
    if len(data) != header_bytes + int(np.prod(dims)):
        raise ValueError(f"{path}: {len(data) - header_bytes} data bytes for shape {dims}: {hint}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes).reshape(dims)


def _idx_pair(
    images_bytes: bytes, labels_bytes: bytes, images_path: Path, labels_path: Path, hint: str
) -> ImageData:
    images = _parse_idx(images_bytes, IDX_IMAGES_MAGIC, images_path, hint)
    labels = _parse_idx(labels_bytes, IDX_LABELS_MAGIC, labels_path, hint)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images: {hint}"
        )
    return ImageData(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        levels=256,
    )


def load_idx(
    images_path: str | Path, labels_path: str | Path, hint: str = "check the file"
) -> ImageData:
    """An IDX image file (magic 0x803, ``[N, H, W]``) and its label file (magic 0x801, ``[N]``).

    Each path may also exist with a ``.gz`` suffix added. ``hint`` ends every error message.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    images_bytes = _read_idx_bytes(images_path, hint)
    labels_bytes = _read_idx_bytes(labels_path, hint)
    return _idx_pair(images_bytes, labels_bytes, images_path, labels_path, hint)


def _load_fetched_idx(name: str, directory: str | Path, split: str) -> ImageData:
    """Read one split of a fetchable IDX set and check it against the known checksums."""
    _check_split(split)
    directory = Path(directory)
    hint = f"run `flowmatch data fetch {name} --dir {directory}`"
    prefix = "train" if split == "train" else "t10k"
    paths = [directory / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    contents = []
    for path in paths:
        data = _read_idx_bytes(path, hint)
        if hashlib.sha256(data).hexdigest() != IDX_SHA256[name][path.name]:
            raise ValueError(f"{path}: not the {name} file (sha256 differs): {hint}")
        contents.append(data)
    return _idx_pair(contents[0], contents[1], paths[0], paths[1], hint)


def load_mnist(directory: str | Path, split: str = "train") -> ImageData:
    """MNIST (60000 train / 10000 test, ``[N, 1, 28, 28]``, 256 levels) from the IDX files in
    ``directory`` (``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, raw or ``.gz``), checked
    against their sha256.
    """
    return _load_fetched_idx("mnist", directory, split)


def load_fashion_mnist(directory: str | Path, split: str = "train") -> ImageData:
    """Fashion-MNIST, same layout and file names as ``load_mnist``."""
    return _load_fetched_idx("fashion-mnist", directory, split)


_NDARRAY_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
# Everything a CIFAR-10 batch pickle refers to; numpy 1 wrote numpy.core, numpy 2 numpy._core.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NDARRAY_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only what a CIFAR-10 batch pickle holds: numpy arrays and their dtypes."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR-10 batch holds only numpy arrays"
            ) from None


def _read_cifar_pickle(path: Path, hint: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as file:
            batch = _CifarUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({error}): {hint}") from error
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}: {hint}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise ValueError(f"{path}: 'data' is not a uint8 array [N, 3072]: {hint}")
    if data.shape[1] != CIFAR10_RECORD_BYTES - 1 or labels is None or len(labels) != len(data):
        raise ValueError(f"{path}: expected 'data' [N, 3072] and N 'labels': {hint}")
    return data, np.asarray(labels, dtype=np.int64)


def _read_cifar_binary(path: Path, hint: str) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD_BYTES:
        raise ValueError(
            f"{path}: {raw.size} bytes is not a whole number of {CIFAR10_RECORD_BYTES}-byte "
            f"records: {hint}"
        )
    records = raw.reshape(-1, CIFAR10_RECORD_BYTES)
    return records[:, 1:], records[:, 0].astype(np.int64)


def load_cifar10(directory: str | Path, split: str = "train") -> ImageData:
    """CIFAR-10 (``[N, 3, 32, 32]``, 256 levels, labels 0..9) from ``directory`` holding either
    the python batches (``data_batch_1..5``, ``test_batch``; read with an unpickler that admits
    only numpy arrays) or the binary ones (the same names with ``.bin``: records of 1 label byte
    and 3072 pixel bytes, channel-major).
    """
    _check_split(split)
    directory = Path(directory)
    hint = (
        "download cifar-10-python.tar.gz or cifar-10-binary.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html and extract its batches there"
    )
    names = CIFAR10_TRAIN_BATCHES if split == "train" else (CIFAR10_TEST_BATCH,)
    binary = not (directory / names[0]).is_file() and (directory / f"{names[0]}.bin").is_file()
    parts = []
    for name in names:
        path = directory / (f"{name}.bin" if binary else name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {hint}")
        parts.append(_read_cifar_binary(path, hint) if binary else _read_cifar_pickle(path, hint))
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{directory}: CIFAR-10 labels must lie in 0..9: {hint}")
    return ImageData(
        images=torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()),
        labels=torch.from_numpy(labels),
        levels=256,
    )


def _read_image(path: Path) -> np.ndarray:
    """One 8-bit image as ``[C, H, W]``: grayscale modes give C = 1, colour modes C = 3."""
    pil = require("PIL.Image", "images")

    try:
        with pil.open(path) as image:
            if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(f"{path}: mode {image.mode} is not 8-bit")
            array = np.asarray(image.convert("L" if image.mode in ("1", "L", "LA") else "RGB"))
    except OSError as error:  # PIL's UnidentifiedImageError is one
        raise ValueError(f"{path}: cannot read as an image ({error})") from error
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass(frozen=True)
class ImageFiles:
    """The image files of a folder, sorted by path, their labels (``None``: unlabelled) and
    contexts ``[N, C]`` (``None``: no context table)."""

    files: list[Path]
    labels: Tensor | None
    contexts: Tensor | None = None


def list_image_folder(directory: str | Path, context_path: str | Path | None = None) -> ImageFiles:
    """The PNG/JPEG files in ``directory`` without reading them: the files directly in it
    (unlabelled), else those in its sub-folders, labelled by the sub-folder's sorted index;
    with their rows of the context table ``context_path`` (:func:`load_context_table`, keyed
    by the path relative to ``directory``) when given."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such folder of images")

    def images_in(folder: Path) -> list[Path]:
        return sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )

    files = images_in(directory)
    classes = sorted(p for p in directory.iterdir() if p.is_dir()) if not files else []
    labels: list[int] | None = None
    if classes:
        labelled = [(f, k) for k, folder in enumerate(classes) for f in images_in(folder)]
        files, labels = [f for f, _ in labelled], [k for _, k in labelled]
    if not files:
        raise ValueError(f"{directory}: no .png/.jpg/.jpeg images found")
    contexts = None
    if context_path is not None:
        names = [f.relative_to(directory).as_posix() for f in files]
        contexts = load_context_table(context_path, names)
    label_tensor = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    return ImageFiles(files, label_tensor, contexts)


def _check_same_shape(path: Path, array: np.ndarray, first: Path, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(
            f"{path}: shape {list(array.shape)} differs from {list(shape)} of {first}; all "
            "images must have the same size and channels"
        )


def load_image_folder(directory: str | Path, context_path: str | Path | None = None) -> ImageData:
    """PNG/JPEG files of one size (8-bit, 256 levels) in ``directory``, sorted by path.

    Images directly in ``directory`` are unlabelled; images in sub-folders (and none directly)
    are labelled by the index of their sub-folder in sorted order. Alpha is dropped; a grayscale
    file in a colour set, or sizes that differ, raise ``ValueError``. ``context_path``: the
    table of their contexts (:func:`list_image_folder`).
    """
    listed = list_image_folder(directory, context_path)
    arrays = [_read_image(f) for f in listed.files]
    for path, array in zip(listed.files, arrays, strict=True):
        _check_same_shape(path, array, listed.files[0], arrays[0].shape)
    images = torch.from_numpy(np.stack(arrays))
    return ImageData(images=images, labels=listed.labels, levels=256, contexts=listed.contexts)


def split_index(n: int, split: str, test_fraction: float, seed: int = 0) -> Tensor | None:
    """The items of ``split`` ("train" or "test") among ``n`` under a seeded permutation: the
    first ``round(test_fraction * n)`` (at least 1 if the fraction is positive) are the test
    split. ``None`` at fraction 0: every item trains, in order (the test split is then a
    ``ValueError``)."""
    _check_split(split)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    if n_test == 0:
        if split == "test":
            raise ValueError("the folder has no test split: set data.test_fraction above 0")
        return None
    if n - n_test < 1:
        raise ValueError(f"too few images ({n}) for a test fraction of {test_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_test] if split == "test" else order[n_test:]


def split_images(data: ImageData, split: str, test_fraction: float, seed: int = 0) -> ImageData:
    """The ``split`` ("train" or "test") of ``data`` by :func:`split_index`.

    For a folder the items are its files sorted by path, so the same folder, fraction and seed
    give the same split; at fraction 0 every item trains.
    """
    index = split_index(data.images.shape[0], split, test_fraction, seed)
    if index is None:
        return data  # everything trains, in file order
    labels = None if data.labels is None else data.labels[index]
    contexts = None if data.contexts is None else data.contexts[index]
    return ImageData(data.images[index], labels, data.levels, contexts)


class _Decoder(torch.utils.data.Dataset):
    """Decodes file ``i`` of ``files`` to uint8 ``[C, H, W]``; a file that does not read
    comes back as its error message (raised by the caller, in one line)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray | str:
        try:
            return _read_image(self.files[index])
        except ValueError as error:
            return str(error)


class _Pending:
    """The batch sampler of a persistent DataLoader: the index chunks of the current call."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


class StreamingImageFolder:
    """A folder's ``split`` read from disk on demand: the files are listed and split once
    (:func:`split_index`, as :func:`load_image_set` splits a loaded folder), and ``sample``
    decodes only the files it draws, in ``workers`` DataLoader processes (0: in the calling
    process). Nothing decoded is kept between calls, so a folder larger than memory trains.

    The indices and dequantisation offsets are drawn from ``generator`` exactly as
    :class:`ImageDataset` draws them, so both give the same batches of the same split (with
    the contexts of ``context_path``, read once); the items come back on the CPU. Every file
    must have the size and channels of the first.
    """

    levels = 256

    def __init__(
        self,
        directory: str | Path,
        split: str = "train",
        test_fraction: float = 0.0,
        dequantize: bool = True,
        workers: int = 0,
        dtype: torch.dtype = torch.float32,
        context_path: str | Path | None = None,
    ) -> None:
        listed = list_image_folder(directory, context_path)
        index = split_index(len(listed.files), split, test_fraction)
        files, labels, contexts = listed.files, listed.labels, listed.contexts
        if index is not None:
            files = [files[i] for i in index.tolist()]
            labels = None if labels is None else labels[index]
            contexts = None if contexts is None else contexts[index]
        self.files, self.labels, self.contexts = files, labels, contexts
        self.dequantize, self.dtype, self.workers = dequantize, dtype, workers
        self._decoder = _Decoder(files)
        self._shape = tuple(_read_image(files[0]).shape)
        self._pending = _Pending()
        self._loader: torch.utils.data.DataLoader | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the first file."""
        return self._shape

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: Tensor) -> Tensor:
        """The files at ``index`` decoded, uint8 ``[n, C, H, W]`` on the CPU."""
        chosen = index.tolist()
        if self.workers == 0:
            arrays = [self._decoder[i] for i in chosen]
        else:
            if self._loader is None:  # the workers start once and serve every later call
                self._loader = torch.utils.data.DataLoader(
                    self._decoder,
                    batch_sampler=self._pending,
                    num_workers=self.workers,
                    collate_fn=list,
                    persistent_workers=True,
                    generator=torch.Generator(),  # the workers' seeds: not the global RNG
                )
            size = -(-len(chosen) // self.workers)
            self._pending.chunks = [chosen[i : i + size] for i in range(0, len(chosen), size)]
            arrays = [array for chunk in self._loader for array in chunk]
        for i, array in zip(chosen, arrays, strict=True):
            if isinstance(array, str):
                raise ValueError(array)
            _check_same_shape(self.files[i], array, self.files[0], self._shape)
        return torch.from_numpy(np.stack(arrays))

    def sample_labelled(self, n: int, generator: torch.Generator | None = None) -> ImageBatch:
        """``n`` images in model space with their labels and contexts (``None`` where the
        folder has none)."""
        device = draw_device(generator)
        index = torch.randint(len(self.files), (n,), generator=generator, device=device)
        if self.dequantize:
            noise = torch.rand(
                (n, *self.shape), generator=generator, dtype=self.dtype, device=device
            ).cpu()
        else:
            noise = torch.full((), 0.5, dtype=self.dtype)
        index = index.cpu()
        x1 = to_model_space(self.read(index), self.levels, noise)
        label = None if self.labels is None else self.labels[index]
        context = None if self.contexts is None else self.contexts[index]
        return ImageBatch(x1=x1, label=label, context=context)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n, C, H, W]`` images in model space (``sample_labelled(...).x1``)."""
        return self.sample_labelled(n, generator).x1


IMAGE_SETS = ("digits", "mnist", "fashion-mnist", "cifar10", "folder")


def load_image_set(
    name: str,
    directory: str | Path | None = None,
    split: str = "train",
    test_fraction: float = 0.0,
    context_path: str | Path | None = None,
) -> ImageData:
    """One of ``IMAGE_SETS`` by name; ``directory`` holds its files (unused for "digits").

    A "folder" has no split of its own: ``split_images`` with ``test_fraction`` (seed 0) makes
    one; the others have their fixed train and test splits. ``context_path``: a folder's table
    of contexts (:func:`list_image_folder`).
    """
    if context_path is not None and name != "folder":
        raise ValueError(f"a context table applies to an image folder, not to {name}")
    if name == "digits":
        return load_digits(split)
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; choose one of {', '.join(IMAGE_SETS)}")
    if directory is None:
        raise ValueError(f"the {name} image set needs the directory that holds its files")
    if name == "folder":
        return split_images(load_image_folder(directory, context_path), split, test_fraction)
    loader = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}
    return loader[name](directory, split)

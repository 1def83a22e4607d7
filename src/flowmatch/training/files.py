"""Files of a run folder: atomic writes that never go through a symlink, and guarded reads.

``atomic_write(path, data)`` leaves ``path`` holding either its old content or all of ``data``,
and replaces a symlink at ``path`` instead of writing to what it points to. ``read_bytes(path,
root)`` reads only a regular file inside ``root`` (a symlink that leads out of it, a FIFO, a
device or a folder is refused without blocking), up to a size limit. Both raise ``RunFileError``
with one line that names the file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

# No run file comes near this (the largest are checkpoints of the paper-size U-Net, ~2 GB).
MAX_READ_BYTES = 64 << 30


class RunFileError(OSError):
    """A run file cannot be read or written (the message is one line naming the file)."""


def describe_os_error(path: str | Path, error: OSError, action: str) -> str:
    """One line for ``error`` raised while doing ``action`` ("write", "read") on ``path``."""
    hints = {
        errno.ENOSPC: "the disk is full: free space and run the command again",
        errno.EDQUOT: "the disk quota is exceeded: free space and run the command again",
        errno.EACCES: "permission denied: choose a folder you can write to",
        errno.EPERM: "permission denied: choose a folder you can write to",
        errno.EROFS: "the file system is read-only: choose another folder",
        errno.EISDIR: "it is a folder: move it away",
        errno.ENOTDIR: "a part of its path is not a folder",
        errno.ENOENT: "it does not exist",
    }
    reason = hints.get(error.errno or 0, error.strerror or type(error).__name__)
    return f"cannot {action} {path}: {reason}"


def check_inside(path: str | Path, root: str | Path) -> Path:
    """``path`` resolved, if it lies inside ``root`` (symlinks followed); else ``RunFileError``."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise RunFileError(f"{path} leads out of {root} (a symlink?): remove it")
    return resolved


def atomic_write(path: str | Path, data: bytes, root: str | Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically; with ``root``, ``path``'s folder must lie in it.

    A temporary file in the same folder (created exclusively, never through a symlink) is
    written, fsynced and renamed over ``path``, and the folder is fsynced so that the rename
    survives a crash. On failure the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    if root is not None:
        check_inside(path.parent, root)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() and not path.is_symlink():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # a leftover of a killed run with the same pid
        fd = os.open(tmp, flags | os.O_EXCL, 0o644)
        try:
            with open(fd, "wb", closefd=False) as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.close(fd)
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(error, RunFileError):
            raise
        raise RunFileError(describe_os_error(path, error, "write")) from None


def read_bytes(
    path: str | Path, root: str | Path | None = None, max_bytes: int = MAX_READ_BYTES
) -> bytes:
    """The bytes of the regular file ``path`` (inside ``root`` if given), at most ``max_bytes``.

    Opened without blocking, so a FIFO or a device is refused rather than waited on or read
    without end.
    """
    target = check_inside(path, root) if root is not None else Path(path)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise RunFileError(describe_os_error(path, error, "read")) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise RunFileError(f"cannot read {path}: it is {kind}")
        if info.st_size > max_bytes:
            raise RunFileError(f"cannot read {path}: {info.st_size} bytes, more than {max_bytes}")
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            return f.read(info.st_size + 1)[:max_bytes]
    except RunFileError:
        raise
    except OSError as error:
        raise RunFileError(describe_os_error(path, error, "read")) from None
    finally:
        os.close(fd)


def read_text(path: str | Path, root: str | Path | None = None, max_bytes: int = 1 << 26) -> str:
    """``read_bytes`` decoded as UTF-8; a binary file is ``RunFileError`` naming it."""
    data = read_bytes(path, root, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is not a text file (not UTF-8)") from None


def remove_temporaries(directory: str | Path) -> None:
    """Delete the temporary files an interrupted atomic write left behind."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)

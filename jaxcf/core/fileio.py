"""File helpers that never leave half a file and never read without a bound.

- :func:`atomic_write_bytes`: a temporary file in the same folder, fsynced, then ``os.replace``.
- :func:`replace_directory`: a whole folder written beside its target, then swapped in by a rename,
  so a failed write (a full disk, a kill) leaves the previous folder as it was.
- :func:`replaceable`: whether a folder may be replaced at all: no write deletes what it did not
  create (only a missing or empty folder, or one of jaxcf's own of the same kind, is replaced).
- :func:`read_regular`: reads a regular file of at most a given size; a FIFO, a device or a folder is
  refused before anything blocks or grows without limit.
- :func:`strict_json`: NaN and infinities as null, so that what jaxcf writes is JSON.

What does not live here: formats (``jaxcf.training.checkpoint``, ``jaxcf.serving.export``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class UnsafeFileError(ValueError):
    """A file that is not a regular file, or larger than the caller allows; the message is one line."""


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain_permissions(path: Path, mode: int = 0o666) -> None:
    # mkstemp/mkdtemp create 0600/0700 entries; give them what a plain open()/mkdir() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Writes to a temporary file in the same folder, then ``os.replace``: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        _plain_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staging_directory(target: Path) -> Iterator[Path]:
    """A new empty folder beside ``target`` to write into; removed if the block raises.

    Use with :func:`replace_directory` to put it in place once complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".new"))
    _plain_permissions(staging, 0o777)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def replace_directory(staging: Path, target: Path) -> None:
    """Puts the complete folder ``staging`` at ``target``, replacing any folder there as a whole.

    Every file in ``staging`` is fsynced first. Where the kernel can swap two paths atomically
    (Linux 3.15+), readers see the old folder or the new one, never neither; elsewhere the old one is
    renamed aside first, so there is a moment without ``target``, but never a mixed or partial one.
    The old folder is deleted afterwards.
    """
    staging, target = Path(staging), Path(target)
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_directory(staging)
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old folder
    else:
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.rmdir(old)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(target.parent)


def replaceable(target: Path, owned: Callable[[Path], bool], what: str) -> str | None:
    """Why ``target`` must not be replaced by a new ``what`` folder, or None when it may be.

    It may be when it does not exist, or is an empty folder, or a folder that ``owned`` recognises as
    one jaxcf wrote of the same kind (holding nothing else). A symlink, a file, the current directory
    (or one above it) and any other folder are refused: replacing them would delete what jaxcf did not
    create.

    Args:
      target: the folder to write.
      owned: ``folder -> bool``: whether the existing folder is a ``what`` jaxcf wrote, holding nothing else.
      what: the kind of folder, for the message ("model export", "report").

    Returns:
      None, or a one-line reason that names what to do.
    """
    target = Path(target)
    if str(target) in ("", "."):
        return f"{what} folder {str(target)!r}: give the name of a new folder (not the current directory)"
    if target.is_symlink():
        return f"{target} is a symbolic link; give the name of a new folder (links are never replaced)"
    if not target.exists():
        return None
    if not target.is_dir():
        return f"{target} is a file; give the name of a new folder (files are never replaced)"
    try:
        here = Path.cwd().resolve()
        if target.resolve() == here or target.resolve() in here.parents:
            return f"{target} is the current directory or one above it; give the name of a new folder"
        if not any(target.iterdir()) or owned(target):
            return None
    except OSError as err:
        return f"{target}: cannot be inspected ({err.strerror}); give the name of a new folder"
    return (f"{target} exists and is not a {what} jaxcf wrote (it holds other files); give the name of a new "
            "folder, or move that one away yourself")


def read_regular(path: Path, max_bytes: int, exact: int | None = None, dir_fd: int | None = None) -> bytes:
    """The bytes of a regular file, refusing anything else before reading.

    The file is opened without blocking (a FIFO with no writer would block an ordinary open) and
    checked with ``fstat`` on the open descriptor, so it cannot be swapped between the check and the
    read. At most ``max_bytes + 1`` bytes are read.

    Args:
      path: the file.
      max_bytes: the largest size accepted.
      exact: when given, the size the file must have.
      dir_fd: read ``path`` relative to this open directory (a folder replaced meanwhile cannot mix in).

    Raises:
      FileNotFoundError, PermissionError, OSError: as ``open`` raises them.
      UnsafeFileError: not a regular file, larger than ``max_bytes``, or not ``exact`` bytes long.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0), dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise UnsafeFileError(f"{path}: {info.st_size} bytes, more than the {max_bytes} allowed")
        if exact is not None and info.st_size != exact:
            raise UnsafeFileError(f"{path}: {info.st_size} bytes, expected {exact}")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 24, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    payload = b"".join(chunks)
    if len(payload) > max_bytes or (exact is not None and len(payload) != exact):
        raise UnsafeFileError(f"{path}: changed size while being read ({len(payload)} bytes)")
    return payload


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so that ``json.dumps`` writes JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value

"""Writing files and folders so that a reader never sees half of one, and nothing is lost by a crash.

Every module that writes output goes through these helpers:
  - `atomic_write_text` / `atomic_write_bytes`: a temporary file beside the target, fsync, rename;
  - `staging_directory`: build a folder under a temporary name, then `replace_directory` swaps it
    in. The old folder is renamed aside first and removed only after the new one is in place, so
    at every instant one complete folder answers to the name;
  - `refuse_non_empty`: the one rule for output folders (empty, or --overwrite / --resume given).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_and_replace(staging: str, path: Path) -> None:
    with open(staging, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(data)
        _fsync_and_replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """`with atomic_file(path) as handle:` writes a large file in pieces; it appears under `path`
    only if the block finishes without an exception."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            yield handle
        _fsync_and_replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def temporary_path_beside(path: str | os.PathLike) -> Path:
    """A fresh file name in `path`'s folder, for writers (safetensors) that want a name, not a handle.
    Pair it with `commit_file`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    return Path(name)


def commit_file(staging: str | os.PathLike, path: str | os.PathLike) -> Path:
    """fsync a finished temporary file and rename it onto `path`."""
    _fsync_and_replace(str(staging), Path(path))
    return Path(path)


def replace_directory(staging: Path, directory: Path) -> None:
    """Move a finished `staging` folder to `directory`, replacing any old one so that one complete
    folder answers to the name at every instant (the old one is renamed aside, never deleted first)."""
    staging, directory = Path(staging), Path(directory)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
        try:
            os.replace(staging, directory)
        except BaseException:
            os.replace(old, directory)  # put the old folder back, so a failed swap loses nothing
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)


@contextlib.contextmanager
def staging_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """`with staging_directory(out) as staging:` fills a temporary sibling folder; when the block
    ends without an exception it replaces `out` (see `replace_directory`). On error `out` is untouched."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield staging
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_non_empty_directory(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.iterdir())


def refuse_non_empty(out: str | os.PathLike, allowed: bool, hint: str = "pass --overwrite to replace it") -> None:
    """The one rule for output paths: a file is refused, a non-empty folder only unless `allowed`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if is_non_empty_directory(out) and not allowed:
        raise FileExistsError(f"{out} is not empty; {hint}")


def read_json(path: str | os.PathLike, what: str = "file"):
    """json.loads of a small file, with errors that name the file (and the line of bad JSON)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text file ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None

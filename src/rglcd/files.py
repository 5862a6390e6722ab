"""Files and folders: the user cache, and files and folders written atomically (a crash, a full disk or a kill never
leaves a half-written one where a finished one belongs)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """``$RGLCD_CACHE`` or ``~/.cache/rglcd``: world data, trained models and runs made on this machine."""
    return Path(os.environ.get("RGLCD_CACHE", Path.home() / ".cache" / "rglcd"))


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield ``out.partial`` (cleared, not created) to write into; when the block ends it replaces ``out``.

    An exception removes it and leaves ``out`` as it was; a kill leaves only ``out.partial``, which the next write
    clears.
    """
    out = Path(out)
    partial = partial_folder(out)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield ``NAME.partial.SUFFIX`` beside ``path`` (the suffix kept for writers that choose a format by it, such as
    PIL) to write into; when the block ends it replaces ``path``.

    An exception (a full disk) removes it and leaves ``path`` as it was; a kill leaves only the partial file.
    """
    path = Path(path)
    partial = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)


def partial_folder(out: str | Path) -> Path:
    """Where :func:`atomic_folder` writes ``out`` until it is complete (processes that write into it alongside the
    one holding the context need the path)."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents (a byte-order mark dropped); a missing file, a folder or bytes that are not UTF-8
    are a ValueError that says which, for the caller to name the option."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except IsADirectoryError:
        raise ValueError(f"{path}: a folder, not a text file") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None

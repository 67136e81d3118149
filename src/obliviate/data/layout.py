"""Benchmark directories on disk: the one rule every writer (QA benchmark, MUSE, hazard) follows.

A writer fills a directory with its files and then its manifest, last, so a crash leaves no manifest.
Rewriting one is allowed only with ``overwrite`` and only over a previous benchmark of the same kind:
the files its manifest lists are removed, the user's other files stay, and nothing outside the
directory is ever touched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inside(directory: Path, file: Any) -> Path | None:
    """``directory / file`` when ``file`` is a relative path that stays inside it, else None."""
    if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
        return None
    return directory / file


def prepare_benchmark_directory(directory: Path, *, overwrite: bool, manifest: str, what: str,
                                listed_files: Callable[[Any], Iterable[Any]]) -> None:
    """Make ``directory`` ready for a new benchmark of kind ``what`` whose manifest is ``manifest``.

    A new or empty directory is created. A non-empty one is refused (FileExistsError) unless
    ``overwrite`` is given and it holds a previous ``manifest``; then the files ``listed_files(old
    manifest)`` names are removed, and the manifest itself. An unreadable old manifest removes only
    itself."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if not directory.exists() or not any(directory.iterdir()):
        directory.mkdir(parents=True, exist_ok=True)
        return
    manifest_path = directory / manifest
    if not overwrite:
        raise FileExistsError(f"{directory} is not empty; pass --overwrite (overwrite=True) to replace the "
                              f"{what} in it")
    if not manifest_path.is_file():
        raise FileExistsError(f"{directory} is not empty and holds no {manifest}; refusing to overwrite a "
                              f"directory that is not a {what}")
    try:
        old_files = list(listed_files(json.loads(manifest_path.read_text(encoding="utf-8"))))
    except (ValueError, AttributeError, KeyError, TypeError, RecursionError):
        old_files = []  # bad JSON or UTF-8, or the wrong shape: only the manifest is replaced
    for file in old_files:
        path = inside(directory, file)
        if path is not None and not path.is_dir():
            path.unlink(missing_ok=True)
    manifest_path.unlink()

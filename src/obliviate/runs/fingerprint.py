"""Fingerprints: sha256 of data rows, files, model directories and options.

A run stores the fingerprint of its inputs and options (``fingerprint.json``); ``--resume`` compares
it with the fingerprint of what it is given now and refuses when they differ, so a resumed run is
the run it claims to be.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from obliviate.runs.files import json_default

MODEL_CARD = "README.md"


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj`` that hashes are taken over: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=json_default)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_hash(config: Any) -> str:
    """sha256 of the canonical JSON of a resolved config (key order does not matter)."""
    return sha256_text(canonical_json(config))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | Path, exclude: Iterable[str] = ()) -> str:
    """sha256 fingerprint of a file or a directory.

    A file: sha256 of its bytes. A directory: sha256 over its regular files (symlinked files are
    followed, symlinked directories are not, empty directories do not count) in order of their
    relative POSIX path; each file contributes ``path (UTF-8) + NUL + size (8 bytes, big-endian) +
    bytes``, so renaming, moving, adding or changing any file changes the fingerprint.
    ``exclude`` lists relative paths to leave out (a model card describes the model's fingerprint,
    so it cannot be part of it).
    """
    path = Path(path)
    if path.is_file():
        return _sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"cannot fingerprint {path}: no such file or directory")
    skip = set(exclude)
    files = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = Path(root) / name
            rel = full.relative_to(path).as_posix()
            if rel not in skip and full.is_file():
                files.append((rel, full))
    h = hashlib.sha256()
    for rel, full in sorted(files):
        h.update(rel.encode("utf-8") + b"\0" + full.stat().st_size.to_bytes(8, "big"))
        with full.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: str | Path) -> str:
    """Fingerprint of a checkpoint directory: every file except the model card."""
    return sha256_path(model_dir, exclude=(MODEL_CARD,))


def dataset_fingerprint(ds: Any) -> dict[str, Any]:
    """sha256 of a dataset's rows as canonical JSON (content, not file bytes, so any format gives
    one value). ``ds`` has ``examples`` (each with ``to_json()``), ``source`` and ``skipped``."""
    h = hashlib.sha256()
    for ex in ds.examples:
        row = {k: v for k, v in ex.to_json().items() if k != "row"}
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return {"source": ds.source, "n": len(ds), "skipped": ds.skipped, "sha256": h.hexdigest()}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": leaf}`` (lists and empty mappings stay values)."""
    if not isinstance(obj, dict):
        return {prefix: obj} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every entry that differs between two fingerprints."""
    a, b = flatten(json.loads(canonical_json(stored))), flatten(json.loads(canonical_json(current)))
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {_short(a.get(key, '<absent>'))} -> {_short(b.get(key, '<absent>'))}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=json_default) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]

"""The fingerprint of a model given by its spec (local directory, embedded default, hub id)."""

from __future__ import annotations

from pathlib import Path

from obliviate.models.loading import resolve_model_path
from obliviate.runs.fingerprint import model_fingerprint


def model_sha256(spec: str | Path) -> str | None:
    """sha256 of a local model directory's files (None for a hub id that is not downloaded)."""
    try:
        path = Path(resolve_model_path(str(spec)))
    except (OSError, ValueError):
        return None
    return model_fingerprint(path) if path.is_dir() else None

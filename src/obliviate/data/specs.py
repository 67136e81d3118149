"""Telling local paths from hub ids, and the hub's reachability, so that a typo fails at once.

A spec for data or a model is a local path or a Hugging Face hub id (``name`` or ``org/name``). A path
that does not exist must be reported as missing, never tried on the hub (which, offline, retries for
a minute before it fails); a hub id that is not cached is only tried when the hub can be reached.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants

# Suffixes that make a spec a local path even when nothing is there (never a hub id).
PATH_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".yaml", ".yml", ".safetensors", ".gguf", ".bin")
PROBE_SECONDS = 3.0


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` means a local file or directory rather than a hub id: it exists, is absolute,
    starts with '.', '/' or '~', holds a backslash, empty parts or more than one '/', ends with a file
    suffix, or its first part exists here (``runs/targt`` when ``runs/`` exists)."""
    if not spec:
        return False
    path = Path(spec)
    if path.exists() or path.is_absolute() or spec.startswith((".", "/", "~")) or "\\" in spec:
        return True
    parts = spec.split("/")
    if len(parts) > 2 or "" in parts or path.suffix.lower() in PATH_SUFFIXES:
        return True
    return len(parts) == 2 and Path(parts[0]).exists()


def missing_path_reason(spec: str) -> str:
    """"no such file or directory", plus the deepest folder on the way that exists (it shows the typo)."""
    path = Path(spec).expanduser()
    parent = path.parent
    while parent != parent.parent and not parent.exists():
        parent = parent.parent
    if parent.exists() and parent != Path("."):
        missing = path.relative_to(parent).parts[0]
        return f"no such file or directory ({parent} has no {missing!r})"
    return "no such file or directory"


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now (offline mode, or no connection within a few seconds), else None.

    A direct TCP probe, skipped behind a proxy (where only the proxy may connect)."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"cannot connect to {host}: {exc.strerror or exc}"
    return None

"""Run directories: one folder per run holding config, environment, logs, metrics and checkpoints.

Nothing is lost: files are written atomically (temp file, fsync, rename), an existing run is never
overwritten without ``overwrite=True``, and ``resume=True`` reopens an interrupted run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


class RunExistsError(FileExistsError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write beside, fsync, rename: a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int | None = None) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for name in ("obliviate", "torch", "transformers", "accelerate", "peft", "safetensors", "numpy", "scipy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": git_commit(),
        "seed": seed,
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import torch

        env["cuda"] = torch.cuda.is_available()
        env["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()
        env["torch_threads"] = torch.get_num_threads()
    except Exception:  # pragma: no cover
        pass
    return env


class RunDir:
    """A run folder. ``RunDir.create(path, overwrite=..., resume=...)`` is the one way to open one.

    ``writer=False`` gives a read-only view whose writes are skipped: what the non-main processes of
    a multi-process run hold, so that one process writes each file."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    @staticmethod
    def check(path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
        """Raise as ``create`` would, without changing anything."""
        path = Path(path)
        if overwrite and resume:
            raise ValueError("choose either --overwrite or --resume, not both")
        if path.exists() and any(path.iterdir()):
            if not resume and not overwrite:
                raise RunExistsError(
                    f"run directory {path} already exists; pass --overwrite to replace it or --resume to continue it"
                )
        elif resume:
            raise FileNotFoundError(f"cannot resume: run directory {path} does not exist")

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False, resume: bool = False) -> "RunDir":
        path = Path(path)
        cls.check(path, overwrite, resume)
        if path.exists() and any(path.iterdir()):
            if resume:
                return cls(path)
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict[str, Any], seed: int | None = None) -> None:
        if not self.writer:
            return
        atomic_write_text(self.file("config.yaml"), yaml.safe_dump(config, sort_keys=False))
        atomic_write_json(self.file("environment.json"), environment(seed))

    def write_json(self, name: str, obj: Any) -> Path:
        if not self.writer:
            return self.file(name)
        return atomic_write_json(self.file(name), obj)

    def read_json(self, name: str) -> Any:
        return read_json(self.file(name))

    def has(self, name: str) -> bool:
        return self.file(name).exists()

    def log(self, record: dict[str, Any], name: str = "log.jsonl") -> None:
        """Append one line of the per-step log (append-only; a torn last line is ignored on read)."""
        if not self.writer:
            return
        with self.file(name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")

    def read_log(self, name: str = "log.jsonl") -> list[dict[str, Any]]:
        if not self.has(name):
            return []
        rows = []
        for line in self.file(name).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def rewrite_log(self, rows: list[dict[str, Any]], name: str = "log.jsonl") -> None:
        if not self.writer:
            return
        atomic_write_text(self.file(name), "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))

    def set_status(self, status: str, **extra: Any) -> None:
        self.write_json("status.json", {"status": status, "time": time.time(), **extra})

    def status(self) -> str | None:
        return self.read_json("status.json")["status"] if self.has("status.json") else None

"""Run directories: one folder per run holding its config, fingerprint, environment, status, logs,
results and checkpoints; the one place that creates, resumes, overwrites and closes them.

- ``RunDir.open(path, kind=..., fingerprint=..., overwrite=..., resume=...)`` is the one way to start
  a run. A new run writes ``run.json`` (what kind of run, which top-level entries it wrote) and
  ``fingerprint.json`` (its inputs and options). ``resume`` continues a run only when the fingerprint
  is the same, and says which entries differ otherwise. ``overwrite`` refuses folders that are not
  runs and runs that hold one of the inputs, and removes only what runs write.
- ``with run.running(): ...`` is the one lifecycle: status ``running`` -> ``done`` / ``failed`` /
  ``interrupted`` (SIGINT, SIGTERM), recorded in ``status.json`` and in the run registry.
- Every name that becomes a path (``run.file("eval", label + ".json")``) stays inside the folder.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from obliviate.errors import UserError
from obliviate.processes import processes
from obliviate.runs.files import atomic_write_json, atomic_write_text, environment, json_default, read_json
from obliviate.runs.fingerprint import differences
from obliviate.runs.registry import record_finish, record_result, record_start

MARKER = "run.json"
FINGERPRINT = "fingerprint.json"
STATUS = "status.json"
# The top-level entries runs write (the format); ``--overwrite`` removes these and the names a run
# recorded in run.json, and leaves anything else a user put in the folder.
RUN_ENTRIES = frozenset({
    MARKER, FINGERPRINT, STATUS, "config.yaml", "environment.json", "data.json", "log.jsonl", "train_stats.json",
    "model", "checkpoints", "tracking", "eval", "attacks", "privacy.json", "metrics.json", "summary.md",
    "trajectory.json", "report", "target", "oracle", "unlearn", "wagle_mask.safetensors", "guard_weights.json",
    "bench.yaml", "leaderboard.json", "leaderboard.md", "cells", "evals", "benchmark", "id_ood.json", "id_ood.csv",
    "id_ood_examples.csv", "audit.json", "audit.html",
})
_NAME_CHARS = "A-Za-z0-9_.+=-"
_SAFE = re.compile(rf"^[A-Za-z0-9_][{_NAME_CHARS}]*$")


class RunError(UserError):
    """A run directory is in the way, missing, or not the run it is said to be."""


class RunExistsError(RunError, FileExistsError):
    pass


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) stopped a run; its status says ``interrupted`` and ``--resume`` continues it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def safe_name(name: str, what: str = "name") -> str:
    """``name`` if it is a plain file name (letters, digits, ``_ . + = -``, not starting with a dot),
    else a RunError: names given by users become paths inside run directories and must stay there."""
    if not isinstance(name, str) or not _SAFE.match(name) or name in (".", ".."):
        raise RunError(f"{what} {name!r} is not a plain name: use letters, digits, '_', '-', '.', '+', '=' "
                       "(it becomes a file name inside the run directory)")
    return name


def plain_name(text: str) -> str:
    """``text`` made a plain name where it can be: characters outside a name's become ``_`` and leading
    dots go (for names built from option values, such as bench cell labels)."""
    return re.sub(rf"[^{_NAME_CHARS}]", "_", text).lstrip(".")


def input_paths(specs: Iterable[Any]) -> list[Path]:
    """Local paths among input specs (``DIR:split`` gives DIR; hub ids and None give nothing)."""
    out = []
    for spec in specs:
        if spec is None or not isinstance(spec, (str, Path)):
            continue
        text = str(spec)
        for candidate in (text, text.rsplit(":", 1)[0] if ":" in text else None):
            if candidate and Path(candidate).exists():
                out.append(Path(candidate))
                break
    return out


class RunDir:
    """A run folder. ``RunDir.open(...)`` starts or resumes one; ``RunDir(path)`` only reads.

    ``writer=False`` gives a view whose writes are skipped: what the non-main processes of a
    multi-process run hold, so that one process writes each file."""

    def __init__(self, path: str | Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer
        self._written: set[str] | None = None

    # -- opening ------------------------------------------------------------------------------

    @staticmethod
    def is_run(path: str | Path) -> bool:
        path = Path(path)
        return any((path / name).is_file() for name in (MARKER, STATUS, "config.yaml"))

    @classmethod
    def check(cls, path: str | Path, *, overwrite: bool = False, resume: bool = False,
              fingerprint: dict[str, Any] | None = None, inputs: Iterable[Any] = ()) -> str:
        """What ``open`` would do (``new``, ``resume`` or ``overwrite``), or the RunError it would raise;
        changes nothing."""
        path = Path(path)
        if overwrite and resume:
            raise RunError("choose either --overwrite or --resume, not both")
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} is a file, not a directory: give --out a directory (new or a run's)")
        if not path.exists() or not any(path.iterdir()):
            return "new"  # --resume on nothing starts the run
        if not cls.is_run(path):
            raise RunError(f"{path} exists and is not a run directory (no {MARKER}, {STATUS} or config.yaml); "
                           "refusing to write into it or delete it: choose another --out")
        if resume:
            cls._check_fingerprint(path, fingerprint)
            return "resume"
        if not overwrite:
            raise RunExistsError(f"run directory {path} already exists; pass --overwrite to replace it or "
                                 "--resume to continue it")
        root = path.resolve()
        for given in input_paths(inputs):
            if given.resolve() == root or root in given.resolve().parents:
                raise RunError(f"--overwrite would delete an input: {given} is inside {path}; "
                               "write the new run to another --out")
        return "overwrite"

    @staticmethod
    def _check_fingerprint(path: Path, fingerprint: dict[str, Any] | None) -> None:
        if fingerprint is None:
            return
        stored_file = path / FINGERPRINT
        if not stored_file.is_file():
            raise RunError(f"cannot resume {path}: it has no {FINGERPRINT} (an older run, or not started), so "
                           "there is no way to check it is the same run; use --overwrite to start again")
        try:
            stored = read_json(stored_file)
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot resume {path}: {FINGERPRINT} is unreadable ({exc}); use --overwrite") from None
        diff = differences(stored, json.loads(json.dumps(fingerprint, default=json_default)))
        if diff:
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise RunError(f"cannot resume {path}: the inputs or options differ from the run's ({shown}); "
                           "resume with the same ones, or use --overwrite to start a new run")

    @classmethod
    def open(cls, path: str | Path, *, kind: str, fingerprint: dict[str, Any] | None = None,
             overwrite: bool = False, resume: bool = False, inputs: Iterable[Any] = ()) -> "RunDir":
        """Start (or resume) a run at ``path``. Under several processes every one checks (so all raise
        alike), the main one writes, the others get a view that does not write."""
        inputs = list(inputs)
        state = processes()
        mode = cls.check(path, overwrite=overwrite, resume=resume, fingerprint=fingerprint, inputs=inputs)
        state.wait_for_everyone()  # nobody reads the directory while the main process replaces it
        run = cls(path, writer=state.is_main_process)
        if run.writer:
            if mode == "overwrite":
                run._remove_run_entries()
            run.path.mkdir(parents=True, exist_ok=True)
            if mode != "resume":
                atomic_write_json(run.path / MARKER, {"kind": kind, "created": time.time(), "written": []})
                if fingerprint is not None:
                    atomic_write_json(run.path / FINGERPRINT, fingerprint)
        state.wait_for_everyone()
        return run

    def _remove_run_entries(self) -> None:
        recorded = set(self._read_marker().get("written", []))
        for entry in self.path.iterdir():
            if entry.name in RUN_ENTRIES or entry.name in recorded:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def _read_marker(self) -> dict[str, Any]:
        try:
            marker = read_json(self.path / MARKER)
            return marker if isinstance(marker, dict) else {}
        except (OSError, ValueError):
            return {}

    # -- files --------------------------------------------------------------------------------

    def file(self, *parts: str) -> Path:
        """A path inside the run; every part is one plain name (``file("eval", "oracle.json")``), or a
        ``/``-separated relative path of plain names."""
        names = [p for part in parts for p in str(part).split("/")]
        for name in names:
            safe_name(name, "path part")
        self._remember(names[0])
        return self.path.joinpath(*names)

    def _remember(self, top: str) -> None:
        """Record a top-level entry this run writes, so ``--overwrite`` may remove it later."""
        if not self.writer or top in RUN_ENTRIES or not (self.path / MARKER).is_file():
            return
        if self._written is None:
            self._written = set(self._read_marker().get("written", []))
        if top not in self._written:
            self._written.add(top)
            marker = self._read_marker()
            marker["written"] = sorted(self._written)
            atomic_write_json(self.path / MARKER, marker)

    def write_config(self, config: dict[str, Any], seed: int | None = None) -> None:
        if not self.writer:
            return
        atomic_write_text(self.file("config.yaml"), yaml.safe_dump(config, sort_keys=False))
        atomic_write_json(self.file("environment.json"), environment(seed))

    def write_json(self, name: str, obj: Any) -> Path:
        if not self.writer:
            return self.file(name)
        return atomic_write_json(self.file(name), obj)

    def write_text(self, name: str, text: str) -> Path:
        if not self.writer:
            return self.file(name)
        return atomic_write_text(self.file(name), text)

    def read_json(self, name: str) -> Any:
        return read_json(self.file(name))

    def has(self, name: str) -> bool:
        return self.file(name).exists()

    def log(self, record: dict[str, Any], name: str = "log.jsonl") -> None:
        """Append one line of the per-step log (append-only; a torn last line is ignored on read)."""
        if not self.writer:
            return
        with self.file(name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=json_default) + "\n")

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
        atomic_write_text(self.file(name), "".join(json.dumps(r, default=json_default) + "\n" for r in rows))

    # -- lifecycle ----------------------------------------------------------------------------

    def set_status(self, status: str, **extra: Any) -> None:
        self.write_json(STATUS, {"status": status, "time": time.time(), **extra})

    def status(self) -> str | None:
        try:
            return self.read_json(STATUS)["status"] if self.has(STATUS) else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextlib.contextmanager
    def running(self, kind: str, *, resume: bool = False,
                parent_dir: str | Path | None = None) -> Iterator["Lifecycle"]:
        """running -> done (the block returned), failed (it raised) or interrupted (SIGINT/SIGTERM);
        each recorded in status.json and the run registry. Yields a :class:`Lifecycle` on which the
        block names finished sub-runs (``life.children``)."""
        life = Lifecycle()
        self.set_status("running")
        run_id = record_start(self.path, kind=kind, resume=resume, parent_dir=parent_dir) if self.writer else None
        with _signals_raise_interrupt():
            try:
                yield life
            except KeyboardInterrupt as exc:
                self.set_status("interrupted", reason=str(exc) or "SIGINT")
                record_finish(run_id, "interrupted")
                raise
            except BaseException as exc:
                self.set_status("failed", error=f"{type(exc).__name__}: {exc}")
                record_finish(run_id, "failed")
                raise
        self.set_status("done")
        record_finish(run_id, "done", children=life.children)

    def record_result(self, result_file: Path, kind: str, **fields: Any) -> None:
        """Record a result written into this run (an evaluation, an attack) in the run registry."""
        if self.writer:
            record_result(result_file, kind, parent_dir=self.path, **fields)


class Lifecycle:
    """What a run's block tells its lifecycle: the sub-run directories it finished."""

    def __init__(self) -> None:
        self.children: list[Path] = []


@contextlib.contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`RunInterrupted` (as SIGINT raises KeyboardInterrupt), so a run that is
    stopped says so instead of staying "running" forever. Signal handlers live on the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise RunInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

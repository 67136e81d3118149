"""The run registry: one SQLite table that remembers every run, and the one path by which runs
record themselves in it (``record_start`` / ``record_finish`` / ``record_result``, called by the run
lifecycle in ``runs.rundir``).

A row per run directory (finetune, unlearn, eval, attack, pipeline, ...): where it is, what it ran
(kind, benchmark, method, model, the hash of its resolved config), fingerprints of its output model and
of its data, its metrics, status and times, and the run that contains it (a pipeline's sub-runs).

Several processes may finish at once, so every write is one short ``BEGIN IMMEDIATE`` transaction
on a WAL-mode database with a busy timeout, retried with jittered back-off while the file is locked.
WAL needs a local filesystem (not NFS); point ``OBLIVIATE_REGISTRY`` at a local path.
``OBLIVIATE_REGISTRY=off`` disables recording; a registry problem while recording is a warning, never
fatal: it must not cost anyone a finished training run.
"""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import sqlite3
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml
from platformdirs import user_data_dir

from obliviate.errors import UserError
from obliviate.runs.files import json_default
from obliviate.runs.fingerprint import canonical_json, config_hash, flatten, model_fingerprint

# ----------------------------------------------------------------------------------------------
# Reading the run-directory contract (config.yaml, status.json, metrics.json, data.json, ...)

SUB_RUNS = ("target", "oracle", "unlearn")


class RunFileError(UserError, ValueError):
    """A run-directory file that is missing or does not follow the contract."""


def read_json_file(path: str | Path, required: bool = False) -> Any:
    path = Path(path)
    if not path.exists():
        if required:
            raise RunFileError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def read_config(run_dir: str | Path, required: bool = True) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        if required:
            raise RunFileError(f"{path}: missing (is {run_dir} a run directory?)")
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RunFileError(f"{path}: not valid YAML ({e})") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RunFileError(f"{path}: expected a mapping at the top level, got {type(config).__name__}")
    return config


def find_in_run(run_dir: str | Path, rel: str) -> Path | None:
    """``run_dir/rel``, or for a demo run the first sub-run (unlearn, then target, oracle) holding it."""
    run_dir = Path(run_dir)
    for base in (run_dir, run_dir / "unlearn", run_dir / "target", run_dir / "oracle"):
        if (base / rel).exists():
            return base / rel
    return None


def unlearn_run_dir(run_dir: str | Path) -> Path:
    """The run that produced the unlearned model: a demo's unlearn/ sub-run, else the run itself."""
    run_dir = Path(run_dir)
    return run_dir / "unlearn" if (run_dir / "unlearn" / "config.yaml").exists() else run_dir


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    """metrics.json of a run, or of a demo's unlearn/ sub-run; {} when there is none."""
    run_dir = Path(run_dir)
    return read_json_file(run_dir / "metrics.json") or read_json_file(unlearn_run_dir(run_dir) / "metrics.json") or {}


def _name(value: Any) -> str | None:
    """A config entry given as a string or as a mapping with a name/path."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("name", "path", "id"):
            if isinstance(value.get(key), str):
                return value[key]
    return str(value)


def run_identity(run_dir: str | Path, config: dict[str, Any] | None = None) -> dict[str, str | None]:
    """kind, benchmark, method and model of a run, read from its config (and a demo's unlearn/)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir, required=False) if config is None else config
    config = config or {}
    data = config.get("data")
    data = data if isinstance(data, dict) else {}
    ident = {
        "kind": _name(config.get("command")),
        "benchmark": _name(config.get("benchmark")) or _name(data.get("benchmark")),
        "method": _name(config.get("method")),
        "model": _name(config.get("model")),
    }
    if ident["method"] is None and (run_dir / "unlearn" / "config.yaml").exists():
        sub = run_identity(run_dir / "unlearn")
        ident["method"] = sub["method"]
        ident["benchmark"] = ident["benchmark"] or sub["benchmark"]
    return ident


def data_fingerprints(data_manifest: dict[str, Any] | None) -> dict[str, str]:
    """role -> sha256 from a data.json manifest."""
    out = {}
    for role, spec in (data_manifest or {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("sha256"), str):
            out[role] = spec["sha256"]
    return out


# ----------------------------------------------------------------------------------------------
# Processes (crash detection)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (Linux only), None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_start_time(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (guards against pid reuse), Linux only."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether ``pid`` still runs (and is the same process when its start time was recorded)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] in ("Z", "X"):  # zombie / dead: exited, not yet reaped
        return False
    return start_time is None or fields[19] == start_time


# ----------------------------------------------------------------------------------------------
# The registry

STATUSES = ("running", "done", "failed", "interrupted", "crashed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    kind TEXT,
    benchmark TEXT,
    method TEXT,
    model TEXT,
    config_hash TEXT,
    config TEXT,
    model_sha256 TEXT,
    data_sha256 TEXT,
    metrics TEXT,
    status TEXT NOT NULL,
    started REAL,
    finished REAL,
    parent_id TEXT,
    pid INTEGER,
    pid_start TEXT,
    host TEXT
);
CREATE INDEX IF NOT EXISTS runs_benchmark ON runs (benchmark, method);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, host);
"""
_JSON_COLUMNS = ("config", "data_sha256", "metrics")
FILTERS = ("kind", "benchmark", "method", "model", "status", "parent_id", "config_hash", "host")


@dataclass
class RunRecord:
    """One registry row. ``data_sha256`` maps a data role (forget, retain, ...) to its fingerprint."""

    id: str
    path: str
    status: str
    kind: str | None = None
    benchmark: str | None = None
    method: str | None = None
    model: str | None = None
    config_hash: str | None = None
    config: dict[str, Any] | None = None
    model_sha256: str | None = None
    data_sha256: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    started: float | None = None
    finished: float | None = None
    parent_id: str | None = None
    pid: int | None = None
    pid_start: str | None = None
    host: str | None = None

    def summary(self, label: str = "unlearned") -> dict[str, Any]:
        """The flat metrics row of one evaluated model (empty when absent)."""
        models = (self.metrics or {}).get("models") or {}
        row = models.get(label)
        return row if isinstance(row, dict) else {}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    """Runs side by side: metric ``label.key`` -> values, and the config entries that differ."""

    runs: list[RunRecord]
    metrics: dict[str, list[Any]]
    config_diff: dict[str, list[Any]]


class RegistryError(UserError, RuntimeError):
    """The registry cannot be read or written (corrupt, locked, unwritable); the message says which file."""


def default_registry_path() -> Path:
    """``$OBLIVIATE_REGISTRY`` if set, else ``<user data dir>/obliviate/runs.db``."""
    env = os.environ.get("OBLIVIATE_REGISTRY")
    if env:
        return Path(env).expanduser()

    return Path(user_data_dir("obliviate")) / "runs.db"


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _is_lock_error(e: sqlite3.OperationalError) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


class Registry:
    """The run registry at ``path`` (default :func:`default_registry_path`)."""

    def __init__(self, path: str | Path | None = None, timeout: float = 30.0, retries: int = 8):
        self.path = Path(path) if path is not None else default_registry_path()
        self.timeout = timeout
        self.retries = retries
        self._ready = False

    # -- connections and transactions -----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        return conn

    def _retry(self, fn: Callable[[sqlite3.Connection], Any], write: bool) -> Any:
        """Run ``fn`` in one transaction (``BEGIN IMMEDIATE`` for writes), retrying while locked."""
        if not self._ready:
            self._attempt(self._enable_wal, begin=None)
            self._attempt(lambda c: [c.execute(s) for s in _SCHEMA.split(";") if s.strip()], "BEGIN IMMEDIATE")
            self._ready = True
        return self._attempt(fn, "BEGIN IMMEDIATE" if write else "BEGIN")

    def _attempt(self, fn: Callable[[sqlite3.Connection], Any], begin: str | None) -> Any:
        for attempt in range(self.retries + 1):
            conn = self._connect()
            try:
                if begin:
                    conn.execute(begin)
                out = fn(conn)
                if conn.in_transaction:
                    conn.execute("COMMIT")
                return out
            except sqlite3.OperationalError as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if not _is_lock_error(e) or attempt == self.retries:
                    raise RegistryError(f"run registry {self.path}: {e}") from e
                time.sleep(min(2.0, 0.01 * 2 ** attempt) * (0.5 + random.random()))
            except sqlite3.DatabaseError as e:  # not a database, malformed: nothing to retry
                raise RegistryError(f"run registry {self.path}: {e} (move the file away or point "
                                    "OBLIVIATE_REGISTRY / --registry at another one)") from e
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                conn.close()

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RegistryError(f"run registry {self.path}: could not enable WAL mode (got {mode})")

    def integrity_check(self) -> str:
        return self._retry(lambda c: c.execute("PRAGMA integrity_check").fetchone()[0], write=False)

    # -- rows -----------------------------------------------------------------------------------

    @staticmethod
    def _record(row: sqlite3.Row) -> RunRecord:
        values = dict(row)
        for key in _JSON_COLUMNS:
            values[key] = json.loads(values[key]) if values[key] is not None else None
        values["data_sha256"] = values["data_sha256"] or {}
        return RunRecord(**values)

    @staticmethod
    def _upsert(conn: sqlite3.Connection, rec: RunRecord) -> None:
        values = rec.to_dict()
        for key in _JSON_COLUMNS:
            values[key] = json.dumps(values[key], default=json_default) if values[key] is not None else None
        columns = ", ".join(values)
        marks = ", ".join(f":{k}" for k in values)
        # REPLACE also drops a row holding the same path under another id (an overwritten directory).
        conn.execute(f"INSERT OR REPLACE INTO runs ({columns}) VALUES ({marks})", values)

    def _find(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        rows = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchall()
        if not rows:
            rows = conn.execute("SELECT * FROM runs WHERE id LIKE ? ESCAPE '\\'",
                                (run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",
                                 )).fetchall()
        if not rows:
            raise KeyError(f"no run '{run_id}' in the registry {self.path}")
        if len(rows) > 1:
            raise KeyError(f"run id prefix '{run_id}' is ambiguous: {', '.join(r['id'] for r in rows[:5])}")
        return self._record(rows[0])

    # -- recording ------------------------------------------------------------------------------

    def record_start(self, run_dir: str | Path, *, kind: str | None = None, parent_id: str | None = None,
                     resume: bool = False, started: float | None = None, pid: int | None = None,
                     host: str | None = None) -> str:
        """Record a run that starts now (call it after config.yaml is written); returns its id.

        One row per run directory: starting a run in a directory that is already registered
        replaces that row (the directory was overwritten), unless ``resume`` keeps its id and
        start time. ``kind`` etc. default to what config.yaml says.
        """
        path = Path(run_dir).resolve()
        config = read_config(path, required=False)
        ident = run_identity(path, config)
        data = read_json_file(path / "data.json")
        pid = os.getpid() if pid is None else pid

        def start(conn: sqlite3.Connection) -> str:
            old = conn.execute("SELECT * FROM runs WHERE path = ?", (str(path),)).fetchone()
            keep = old is not None and resume
            rec = RunRecord(
                id=old["id"] if keep else _new_id(), path=str(path), status="running",
                kind=kind or ident["kind"], benchmark=ident["benchmark"], method=ident["method"],
                model=ident["model"], config_hash=config_hash(config) if config else None,
                config=config or None, data_sha256=data_fingerprints(data),
                started=old["started"] if keep else (time.time() if started is None else started),
                parent_id=parent_id or (old["parent_id"] if keep else None), pid=pid,
                pid_start=process_start_time(pid) if pid > 0 else None,
                host=socket.gethostname() if host is None else host)
            self._upsert(conn, rec)
            return rec.id

        return self._retry(start, write=True)

    def record_finish(self, run_id: str, status: str | None = None, fingerprint_model: bool = True) -> RunRecord:
        """Record the end of a run from its directory: status (argument, else status.json, else
        done), metrics.json, data.json fingerprints and the sha256 of ``model/`` when present."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not '{status}'")
        rec = self.get_run(run_id)
        path = Path(rec.path)
        status_file = read_json_file(path / "status.json") or {}
        status = status or status_file.get("status") or "done"
        if status == "running":  # the process says it is done but status.json was never updated
            status = "done"
        metrics = read_json_file(path / "metrics.json")
        data = read_json_file(path / "data.json")
        config = read_config(path, required=False)  # completed during the run (e.g. attribution files)
        model_sha = model_fingerprint(path / "model") if fingerprint_model and (path / "model").is_dir() else None
        finished = status_file.get("time") if status_file.get("status") == status else None

        def finish(conn: sqlite3.Connection) -> RunRecord:
            current = self._find(conn, rec.id)
            current.status = status
            current.finished = float(finished) if isinstance(finished, (int, float)) else time.time()
            current.metrics = metrics if metrics is not None else current.metrics
            if config:
                current.config, current.config_hash = config, config_hash(config)
            current.data_sha256 = data_fingerprints(data) or current.data_sha256
            current.model_sha256 = model_sha or current.model_sha256
            self._upsert(conn, current)
            return current

        return self._retry(finish, write=True)

    def record_result(self, result_file: str | Path, kind: str, *, metrics: dict[str, Any] | None = None,
                      method: str | None = None, model: str | None = None, config: dict[str, Any] | None = None,
                      parent_dir: str | Path | None = None) -> str:
        """Record a finished run that writes one result file into another run's directory (an
        evaluation's ``eval/<label>.json``, an attack's ``attacks/<name>.json``): one row keyed by
        that file, a child of the registered run at ``parent_dir`` when there is one."""
        path = Path(result_file).resolve()
        now = time.time()

        def record(conn: sqlite3.Connection) -> str:
            parent = None
            if parent_dir is not None:
                row = conn.execute("SELECT id FROM runs WHERE path = ?", (str(Path(parent_dir).resolve()),)).fetchone()
                parent = row["id"] if row is not None else None
            old = conn.execute("SELECT id FROM runs WHERE path = ?", (str(path),)).fetchone()
            rec = RunRecord(id=old["id"] if old is not None else _new_id(), path=str(path), status="done", kind=kind,
                            method=method, model=model, config=config,
                            config_hash=config_hash(config) if config else None, metrics=metrics, started=now,
                            finished=now, parent_id=parent, pid=os.getpid(), host=socket.gethostname())
            self._upsert(conn, rec)
            return rec.id

        return self._retry(record, write=True)

    def add_run(self, run_dir: str | Path, parent_id: str | None = None) -> str:
        """Register a run that already ended (and a demo's sub-runs, as its children); idempotent."""
        path = Path(run_dir).resolve()
        if not (path / "config.yaml").exists():
            raise RunFileError(f"{path}: no config.yaml, not a run directory")
        env = read_json_file(path / "environment.json") or {}
        started = None
        if isinstance(env.get("time"), str):
            try:
                started = time.mktime(time.strptime(env["time"][:19], "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                started = None
        run_id = self.record_start(path, parent_id=parent_id, resume=True, started=started, pid=-1, host="")
        self.record_finish(run_id)
        for sub in SUB_RUNS:
            if (path / sub / "config.yaml").exists():
                self.add_run(path / sub, parent_id=run_id)
        return run_id

    def mark_crashed(self, run_id: str | None = None) -> list[str]:
        """Close runs left "running" whose process is gone; returns the ids changed.

        Only runs started on this host can be checked. A dead run whose status.json says done or
        failed gets that status (it ended but never reported); any other becomes "crashed".
        """
        host = socket.gethostname()
        if run_id is not None:
            candidates = [self.get_run(run_id)]
        else:
            candidates = self.list_runs(status="running", host=host)
        changed = []
        for rec in candidates:
            if rec.status != "running" or rec.host != host or rec.pid is None or rec.pid < 0:
                continue
            if process_alive(rec.pid, rec.pid_start):
                continue
            file_status = (read_json_file(Path(rec.path) / "status.json") or {}).get("status") \
                if Path(rec.path).exists() else None
            if file_status in ("done", "failed", "interrupted"):
                self.record_finish(rec.id, status=file_status)
            else:
                self._retry(functools.partial(_mark_crashed, run_id=rec.id), write=True)
            changed.append(rec.id)
        return changed

    # -- queries --------------------------------------------------------------------------------

    def id_for_path(self, run_dir: str | Path) -> str | None:
        """The id of the run registered at ``run_dir``, or None."""
        path = str(Path(run_dir).resolve())
        row = self._retry(lambda c: c.execute("SELECT id FROM runs WHERE path = ?", (path,)).fetchone(), write=False)
        return row["id"] if row is not None else None

    def get_run(self, run_id: str) -> RunRecord:
        """A run by id or unique id prefix."""
        return self._retry(lambda c: self._find(c, run_id), write=False)

    def list_runs(self, limit: int | None = None, **filters: str | None) -> list[RunRecord]:
        """Runs, newest first; ``filters`` are exact matches on any of :data:`FILTERS`."""
        unknown = set(filters) - set(FILTERS)
        if unknown:
            raise ValueError(f"unknown filter(s) {', '.join(sorted(unknown))}; use {', '.join(FILTERS)}")
        where = [(k, v) for k, v in filters.items() if v is not None]
        sql = "SELECT * FROM runs"
        if where:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k, _ in where)
        sql += " ORDER BY started DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self._retry(lambda c: c.execute(sql, [v for _, v in where]).fetchall(), write=False)
        return [self._record(r) for r in rows]

    def compare(self, ids: Sequence[str]) -> Comparison:
        """Metrics (every ``label.key`` any run has) and differing config entries, run by run."""
        runs = [self.get_run(i) for i in ids]
        flat = [flatten(((r.metrics or {}).get("models") or {})) for r in runs]
        metrics = {k: [f.get(k) for f in flat] for k in sorted(set().union(*flat))} if flat else {}
        configs = [flatten(r.config or {}) for r in runs]
        keys = sorted(set().union(*configs)) if configs else []
        diff = {k: [c.get(k) for c in configs] for k in keys if len({canonical_json(c.get(k)) for c in configs}) > 1}
        return Comparison(runs=runs, metrics=metrics, config_diff=diff)





def _mark_crashed(conn: sqlite3.Connection, run_id: str) -> None:
    conn.execute("UPDATE runs SET status = 'crashed', finished = ? WHERE id = ? AND status = 'running'",
                 (time.time(), run_id))

# ----------------------------------------------------------------------------------------------
# Recording (never fatal)


def registry() -> Registry | None:
    """The run registry, or None when ``OBLIVIATE_REGISTRY=off`` or it cannot be opened (warned)."""
    if os.environ.get("OBLIVIATE_REGISTRY", "").lower() == "off":
        return None
    try:
        return Registry()
    except Exception as exc:  # noqa: BLE001 - see the module docstring
        warnings.warn(f"run registry unavailable: {exc}", stacklevel=2)
        return None


def record_start(run_dir: Path, *, kind: str, resume: bool, parent_dir: str | Path | None = None) -> str | None:
    reg = registry()
    if reg is None:
        return None
    try:
        parent_id = reg.id_for_path(parent_dir) if parent_dir is not None else None
        return reg.record_start(run_dir, kind=kind, parent_id=parent_id, resume=resume)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"run registry: could not record the start of {run_dir}: {exc}", stacklevel=2)
        return None


def record_finish(run_id: str | None, status: str, children: Iterable[Path] = ()) -> None:
    """The end of a run, and its finished sub-runs as children."""
    reg = registry() if run_id is not None else None
    if reg is None or run_id is None:
        return
    try:
        reg.record_finish(run_id, status=status)
        for child in children:
            reg.add_run(child, parent_id=run_id)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"run registry: could not record the end of the run: {exc}", stacklevel=2)


def record_result(result_file: Path, kind: str, **fields: Any) -> None:
    """An evaluation or attack (a result file in a run directory)."""
    reg = registry()
    if reg is None:
        return
    try:
        reg.record_result(result_file, kind, **fields)
    except Exception as exc:  # noqa: BLE001 - a result on disk matters more than its registry row
        warnings.warn(f"run registry: could not record {result_file}: {exc}", stacklevel=2)

"""Audit records for deletion requests: which data was removed from which model, with what evidence.

``certify(run_dir, settings)`` gathers, for one unlearn (or demo) run: sha256 fingerprints of the
model before and after and of the forget and retain data, the exact configs, the code version, the
metrics, and the two-sided verdict (``evaluation.verdict``: per criterion under-unlearned /
indistinguishable / over-unlearned / not measured, with its statistic, uncertainty and evidence file).
The entries form a hash chain: ``hash_i = sha256(hash_{i-1} + canonical_json(entry_i without
prev/hash))`` starting from 64 zeros, and the record's ``head`` is the last hash. ``verify(record_path)``
re-checks the chain, re-derives every call from its stored numbers, and re-hashes every file the
record names. Records of the earlier format (``obliviate.audit/1``: pass/fail per user threshold)
are still verified, by their own rules.

A chain shows that a record was not edited after it was written, not who wrote it: anyone can
recompute a whole chain. Keep the head hash somewhere else as well (the model card, a ticket, the
registry) and pass it to ``verify(..., expected_head=...)``.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import yaml

import obliviate
from obliviate.data.qa import DataError
from obliviate.data.sources import as_dataset
from obliviate.errors import UserError
from obliviate.evaluation.verdict import (
    FAIL,
    NOT_MEASURED,
    SAME,
    Settings,
    judge,
    judge_threshold,
    overall_call,
    rejudge,
    run_evidence,
    threshold_verdict,
)
from obliviate.reporting.tables import format_number
from obliviate.runs import atomic_write_json, atomic_write_text, git_commit
from obliviate.runs.fingerprint import (
    MODEL_CARD,
    canonical_json,
    config_hash,
    dataset_fingerprint,
    sha256_path,
    sha256_text,
)
from obliviate.runs.registry import (
    SUB_RUNS,
    _name,
    read_config,
    read_json_file,
    read_metrics,
    unlearn_run_dir,
)

FORMAT = "obliviate.audit/2"
FORMATS = ("obliviate.audit/1", FORMAT)  # verify reads both; certify writes the last
TWO_SIDED = "two-sided"  # the ``op`` of a criterion check (a data check's is "==")
GENESIS = "0" * 64


class AuditError(UserError, ValueError):
    """A run that cannot be certified, or a file that is not a well-formed audit record."""


# ----------------------------------------------------------------------------------------------
# Gathering the evidence


def _file_entry(role: str, path: Path, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "file", "role": role, "path": str(path.resolve()), "sha256": sha256_path(path, exclude),
            "exclude": list(exclude), "source": "hashed"}


def _model_before(run_dir: Path, config: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    if (run_dir / "target" / "model").is_dir():
        return _file_entry("model_before", run_dir / "target" / "model", (MODEL_CARD,))
    spec = _name(config.get("model"))
    if spec and Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if (path / "model").is_dir() and not (path / "config.json").exists():
            path = path / "model"  # a run directory was given as the model
        return _file_entry("model_before", path, (MODEL_CARD,) if path.is_dir() else ())
    recorded = config.get("model_sha256") or env.get("model_sha256")
    return {"type": "file", "role": "model_before", "path": None, "spec": spec, "sha256": recorded,
            "source": "recorded" if recorded else "missing"}


def data_fingerprint(source: str, skip_bad: bool = False) -> str | None:
    """The data.json fingerprint of a QA file as a run computes it now (None if it no longer loads)."""
    try:
        return dataset_fingerprint(as_dataset(source, skip_bad=skip_bad))["sha256"]
    except DataError:
        return None


def _data_entries(manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A file entry per data role, and per local file a check that its rows still are what the run used.

    data.json's ``sha256`` fingerprints the rows (``runs.fingerprint.dataset_fingerprint``), so the check
    recomputes that; the entry's own ``sha256`` is of the file's bytes, which ``verify`` re-hashes.
    """
    entries, checks = [], []
    for role, spec in manifest.items():
        if not isinstance(spec, dict):
            continue
        recorded, source = spec.get("sha256"), spec.get("source")
        entry = {"type": "file", "role": f"{role}_data", "path": None, "spec": source, "sha256": None,
                 "content_sha256": recorded, "n": spec.get("n"), "source": "recorded" if recorded else "missing"}
        if isinstance(source, str) and Path(source).is_file():
            entry.update(path=str(Path(source).resolve()), sha256=sha256_path(source), exclude=[], source="hashed")
            current = data_fingerprint(source, skip_bad=bool(spec.get("skipped")))
            checks.append({"name": f"{role}_data_unchanged", "op": "==", "threshold": recorded, "value": current,
                           "verdict": judge_threshold("==", current, recorded)})
        entries.append(entry)
    return entries, checks


def verdict_checks(run_dir: str | Path, settings: Settings) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One ``check`` per criterion of the run's two-sided verdict (``evaluation.verdict.judge`` of the
    files the run holds) with ``op`` "two-sided" and ``verdict`` its call, and the verdict itself."""
    verdict = judge(run_evidence(run_dir), settings)
    checks = [{"name": c["name"], "op": TWO_SIDED, **{k: v for k, v in c.items() if k not in ("name", "call")},
               "verdict": c["call"]} for c in verdict["criteria"]]
    return checks, verdict


def record_call(checks: list[dict[str, Any]], gaps: list[str]) -> str:
    """The record's verdict: ``fail`` when a data check fails (the data is no longer what the run
    used), else the two-sided overall call of the criteria (``evaluation.verdict.overall_call``),
    ``incomplete`` instead of indistinguishable when evidence is missing (``gaps``, an unchecked file)."""
    data = [c["verdict"] for c in checks if c.get("op") != TWO_SIDED]
    if FAIL in data:
        return FAIL
    call = overall_call([c["verdict"] for c in checks if c.get("op") == TWO_SIDED])
    if call == SAME and (gaps or NOT_MEASURED in data):
        return "incomplete"
    return call


def certify(run_dir: str | Path, settings: Settings | None = None) -> dict[str, Any]:
    """Build the hash-chained audit record of a deletion carried out by ``run_dir``."""
    settings = settings or Settings()
    run_dir = Path(run_dir).resolve()
    config = read_config(run_dir)
    unlearn = unlearn_run_dir(run_dir)
    unlearn_config = read_config(unlearn)
    env = read_json_file(unlearn / "environment.json") or read_json_file(run_dir / "environment.json") or {}
    if not (unlearn / "model").is_dir():
        raise AuditError(f"{unlearn / 'model'}: missing; certify needs the unlearned checkpoint")
    manifest = read_json_file(run_dir / "data.json") or read_json_file(unlearn / "data.json") or {}

    gaps = []
    files = [_model_before(run_dir, unlearn_config, env), _file_entry("model_after", unlearn / "model", (MODEL_CARD,))]
    data_files, checks = _data_entries(manifest)
    files += data_files
    if files[0]["sha256"] is None:
        gaps.append(f"no fingerprint of the model before unlearning (config model: {files[0].get('spec')!r})")
    if not any(f["role"] == "forget_data" and f["content_sha256"] for f in files):
        gaps.append("no fingerprint of the forget data (data.json has no forget.sha256)")

    configs = [{"type": "config", "run": ".", "sha256": config_hash(config), "config": config}]
    for sub in SUB_RUNS:
        if (run_dir / sub / "config.yaml").exists():
            sub_config = read_config(run_dir / sub)
            configs.append({"type": "config", "run": sub, "sha256": config_hash(sub_config), "config": sub_config})

    criteria, verdict = verdict_checks(run_dir, settings)
    checks += criteria
    if verdict["call"] == NOT_MEASURED:
        gaps.append("no criterion could be measured (the run needs an evaluation with forget and holdout sets)")
    metrics = read_metrics(run_dir)

    entries = [
        {"type": "request", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": str(run_dir),
         "settings": settings.to_json(),
         "certifier": {"obliviate": obliviate.__version__, "git_commit": git_commit()}},
        *files,
        *configs,
        {"type": "code", "git_commit": env.get("git_commit"), "versions": env.get("versions") or {},
         "python": env.get("python"), "platform": env.get("platform"), "seed": env.get("seed")},
        {"type": "metrics", "models": metrics.get("models") or {}},
        *({"type": "check", **c} for c in checks),
        {"type": "verdict", "verdict": record_call(checks, gaps), "gaps": gaps, "model": verdict["model"],
         "under": verdict["under"], "over": verdict["over"], "alpha": verdict["alpha"],
         "alpha_per_criterion": verdict["alpha_per_criterion"], "n_tests": verdict["n_tests"]},
    ]
    return chain(entries)


# ----------------------------------------------------------------------------------------------
# The hash chain


def entry_hash(prev: str, entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("prev", "hash")}
    return sha256_text(prev + canonical_json(body))


def chain(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    prev, entries = GENESIS, []
    for seq, body in enumerate(bodies):
        entry = {"seq": seq, **body, "prev": prev}
        entry["hash"] = prev = entry_hash(prev, entry)
        entries.append(entry)
    return {"format": FORMAT, "head": prev, "entries": entries}


def record_verdict(record: dict[str, Any]) -> str | None:
    for entry in record.get("entries", []):
        if entry.get("type") == "verdict":
            return entry.get("verdict")
    return None


def link_previous(record: dict[str, Any], head: str, path: str | Path | None = None,
                  request: int | None = None) -> dict[str, Any]:
    """``record`` with a ``previous`` entry after its request entry, rechained: the head hash of the
    record of the previous deletion request on the same model (``obliviate forget``'s ledger, one per
    model lineage), so each record commits to its predecessor and requests cannot be dropped from or
    reordered in the lineage without a hash failing. ``verify`` checks that head against the previous
    record's file when it is there. Sign (``signing.sign``) after linking."""
    bodies = [{k: v for k, v in e.items() if k not in ("seq", "prev", "hash")} for e in record["entries"]]
    link = {"type": "previous", "head": head, "record": str(Path(path).resolve()) if path is not None else None,
            "request": request}
    return chain(bodies[:1] + [link] + bodies[1:])


def _previous_problems(entries: list[dict[str, Any]], rehash: bool) -> list[str]:
    """A ``previous`` entry whose record file is there must name that record's head."""
    problems = []
    for entry in entries:
        if entry.get("type") != "previous" or not entry.get("record") or not rehash:
            continue
        path = Path(entry["record"])
        previous = read_json_file(path) if path.is_file() else None
        if not isinstance(previous, dict):
            problems.append(f"previous record {path} is missing or unreadable, cannot check the link")
        elif previous.get("head") != entry.get("head"):
            problems.append(f"previous record {path} has head {previous.get('head')}, not the linked "
                            f"{entry.get('head')} (it was replaced after this record was written)")
    return problems


# Fields every entry of a type must have, with their JSON types; a record without them is malformed
# (an AuditError), while wrong values in well-formed entries are what verify reports.
_STR: tuple[type, ...] = (str,)
_OPT_STR: tuple[type, ...] = (str, type(None))
_LIST: tuple[type, ...] = (list,)
_ENTRY_FIELDS: dict[str | None, dict[str, tuple[type, ...]]] = {
    None: {"seq": (int,), "type": _STR, "prev": _STR, "hash": _STR},
    "check": {"name": _STR, "op": _STR, "verdict": _OPT_STR},
    "verdict": {"verdict": _OPT_STR},
    "file": {"role": _STR, "path": _OPT_STR, "sha256": _OPT_STR},
    "previous": {"head": _STR},
}
_TYPE_NAMES = {str: "text", int: "an integer", list: "a list", type(None): "null"}


def _check_shape(record: Any, where: str) -> None:
    """Raise AuditError naming the first missing or mistyped field of a record."""
    if not isinstance(record, dict) or record.get("format") not in FORMATS:
        raise AuditError(f"{where}: not an audit record of format {' or '.join(FORMATS)} (write one with "
                         "`obliviate certify`)")
    for key, kinds in (("head", _STR), ("entries", _LIST)):
        if not isinstance(record.get(key), kinds):
            raise AuditError(f"{where}: malformed audit record: '{key}' must be {_TYPE_NAMES[kinds[0]]}")
    for i, entry in enumerate(record["entries"]):
        if not isinstance(entry, dict):
            raise AuditError(f"{where}: malformed audit record: entry {i} must be an object, got "
                             f"{type(entry).__name__}")
        required = {**_ENTRY_FIELDS[None], **_ENTRY_FIELDS.get(entry.get("type"), {})}
        for key, kinds in required.items():
            if key not in entry:
                raise AuditError(f"{where}: malformed audit record: entry {i} ({entry.get('type', '?')}) "
                                 f"has no '{key}'")
            if not isinstance(entry[key], kinds) or isinstance(entry[key], bool):
                raise AuditError(f"{where}: malformed audit record: entry {i} ({entry.get('type', '?')}): '{key}' "
                                 f"must be {' or '.join(_TYPE_NAMES[k] for k in kinds)}, got {entry[key]!r:.60}")
        if entry["type"] == "verdict" and not (isinstance(entry.get("gaps", []), list)
                                               and all(isinstance(g, str) for g in entry.get("gaps", []))):
            raise AuditError(f"{where}: malformed audit record: entry {i} (verdict): 'gaps' must be a list of texts")
        if entry["type"] == "file" and not (isinstance(entry.get("exclude") or [], list)
                                            and all(isinstance(x, str) for x in entry.get("exclude") or [])):
            raise AuditError(f"{where}: malformed audit record: entry {i} (file): 'exclude' must be a list of texts")


def verify(record_path: str | Path, expected_head: str | None = None, rehash: bool = True) -> list[str]:
    """Problems with a record (empty list: intact): chain links and hashes, the head, every check's
    call re-derived from its stored numbers (a format-1 record's: value against threshold), the
    overall verdict, and (``rehash``) every named file.

    A file that is not a well-formed record (missing, not JSON, fields missing or of the wrong type)
    raises AuditError: there is nothing to verify."""
    try:
        record = read_json_file(record_path, required=True)
    except (ValueError, RecursionError) as e:  # RunFileError, invalid UTF-8, nesting beyond Python's limit
        raise AuditError(f"{record_path}: not an audit record ({e})" if not str(e).startswith(str(record_path))
                         else f"{e}; not an audit record") from None
    _check_shape(record, str(record_path))
    problems, prev = [], GENESIS
    entries = record["entries"]
    for i, entry in enumerate(entries):
        where = f"entry {i} ({entry.get('type', '?')}{':' + str(entry['role']) if 'role' in entry else ''})"
        if entry.get("seq") != i:
            problems.append(f"{where}: sequence number {entry.get('seq')!r}, expected {i} "
                            "(entries removed or reordered)")
        if entry.get("prev") != prev:
            problems.append(f"{where}: does not link to the previous entry's hash")
        try:
            rehashed = entry_hash(entry["prev"], entry)
        except ValueError:  # text no file could hold (a lone surrogate): it was not written by certify
            rehashed = None
        if rehashed != entry["hash"]:
            problems.append(f"{where}: content does not match its hash (edited after it was written)")
        prev = entry.get("hash", "")
    if record.get("head") != prev:
        problems.append("head hash does not match the last entry (entries appended or removed)")
    if expected_head is not None and record.get("head") != expected_head:
        problems.append(f"head hash {record.get('head')} differs from the expected {expected_head}")

    checks = [e for e in entries if e.get("type") == "check"]
    verdicts = [e for e in entries if e.get("type") == "verdict"]
    problems += (_recheck_v1 if record["format"] == FORMATS[0] else _recheck)(checks, verdicts)

    problems += _previous_problems(entries, rehash)
    if rehash:
        for entry in entries:
            if entry.get("type") != "file" or not entry.get("path"):
                continue
            path = Path(entry["path"])
            if not path.exists():
                problems.append(f"{entry['role']}: {path} no longer exists, cannot re-hash it")
            elif sha256_path(path, entry.get("exclude") or ()) != entry.get("sha256"):
                problems.append(f"{entry['role']}: {path} has changed since it was certified (sha256 differs)")
    return problems


def _recheck(checks: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> list[str]:
    """Every call re-derived from its stored numbers, the Bonferroni level from the number of tests,
    and the overall verdict from the checks."""
    problems = []
    for c in checks:
        try:
            again = rejudge(c) if c.get("op") == TWO_SIDED else judge_threshold(c["op"], c.get("value"),
                                                                                 c.get("threshold"))
        except (ValueError, TypeError, KeyError) as e:
            again = f"unjudgeable ({e})"
        if again != c.get("verdict"):
            problems.append(f"check {c.get('name')}: verdict {c.get('verdict')!r} but its numbers give {again!r}")
    if len(verdicts) != 1:
        return problems + [f"expected one verdict entry, found {len(verdicts)}"]
    v = verdicts[0]
    tested = [c for c in checks if c.get("op") == TWO_SIDED and c.get("value") is not None
              and c.get("alpha") is not None]
    per = v.get("alpha_per_criterion")
    if v.get("n_tests") != len(tested) or not isinstance(v.get("alpha"), (int, float)) \
            or not isinstance(per, (int, float)) or abs(per - v["alpha"] / max(len(tested), 1)) > 1e-12:
        problems.append(f"the verdict's alpha {v.get('alpha')!r} over {v.get('n_tests')!r} tests does not match "
                        f"{len(tested)} measured criteria judged at {per!r} each")
    elif any(c["alpha"] != per for c in tested):
        problems.append(f"a criterion was judged at another level than alpha / tests = {per}")
    if v.get("verdict") != record_call(checks, v.get("gaps") or []):
        problems.append(f"overall verdict {v.get('verdict')!r} does not follow from the checks")
    return problems


def _recheck_v1(checks: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> list[str]:
    """A format-1 record: every check against its threshold, the overall pass / fail / incomplete."""
    problems = []
    for c in checks:
        try:
            again = judge_threshold(c.get("op", ""), c.get("value"), c.get("threshold"))
        except (ValueError, TypeError) as e:
            again = f"unjudgeable ({e})"
        if again != c.get("verdict"):
            problems.append(f"check {c.get('name')}: verdict {c.get('verdict')!r} but value {c.get('value')!r} "
                            f"{c.get('op')} {c.get('threshold')!r} gives {again!r}")
    if len(verdicts) != 1:
        problems.append(f"expected one verdict entry, found {len(verdicts)}")
    elif verdicts[0].get("verdict") != threshold_verdict(checks, verdicts[0].get("gaps") or []):
        problems.append(f"overall verdict {verdicts[0].get('verdict')!r} does not follow from the checks")
    return problems


# ----------------------------------------------------------------------------------------------
# Writing


def write_record(record: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the record as JSON at ``path`` and a readable page next to it (``.html``)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "audit.json"
    atomic_write_json(path, record)
    page = atomic_write_text(path.with_suffix(".html"), render_record_html(record))
    return path, page


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.4}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f3f3f3}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto}.pass{color:#176f2c;font-weight:600}
.fail{color:#b00020;font-weight:600}.other{color:#8a6d00;font-weight:600}
.banner{padding:.8em 1.2em;border-radius:6px;font-size:1.3em;margin-bottom:1em}
.banner.pass{background:#e3f4e6}.banner.fail{background:#fde7ea}.banner.other{background:#fff6d6}
"""


def _cls(verdict: str | None) -> str:
    good, bad = ("pass", SAME), ("fail", "under-unlearned", "over-unlearned", "under- and over-unlearned")
    return "pass" if verdict in good else "fail" if verdict in bad else "other"


def _interval(values: Any) -> str:
    if not values:
        return ""
    return "[" + ", ".join("-inf" if v is None and i == 0 else "inf" if v is None else format_number(v)
                           for i, v in enumerate(values)) + "]"


def _check_row(c: dict[str, Any]) -> str:
    """A criterion (two-sided: value, interval, band, p-value, evidence) or a data/threshold check."""
    if c.get("op") == TWO_SIDED:
        detail = [format_number(c.get("value")), _interval(c.get("interval")), _interval(c.get("band")),
                  format_number(c.get("p_value")), c.get("evidence") or c.get("note") or ""]
    else:
        limit = c.get("threshold")
        required = (_interval(limit) if c["op"] == "within" and isinstance(limit, list) else
                    f"{c['op']} {_short(limit)}")
        detail = [_short(c.get("value")), "", required, "", ""]
    return (f"<tr><td>{_e(c['name'])}</td><td class='{_cls(c['verdict'])}'>{_e(c['verdict'])}</td>"
            + "".join(f"<td>{_e(d)}</td>" for d in detail) + "</tr>")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _short(value: Any) -> str:
    """A number formatted, or a sha256 cut to 12 characters (the full ones are in the fingerprint table)."""
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "…"
    return format_number(value)


def render_record_html(record: dict[str, Any]) -> str:
    entries = record["entries"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_type.setdefault(e.get("type", "?"), []).append(e)
    request = (by_type.get("request") or [{}])[0]
    verdict = (by_type.get("verdict") or [{}])[0]
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Audit record</title>",
           f"<style>{_CSS}</style></head><body>",
           "<h1>Unlearning audit record</h1>",
           f"<div class='banner {_cls(verdict.get('verdict'))}'>Verdict: <b>{_e(verdict.get('verdict'))}</b></div>",
           f"<p>Run <code>{_e(request.get('run'))}</code>, certified {_e(request.get('created'))} by obliviate "
           f"{_e((request.get('certifier') or {}).get('obliviate'))}. Record head hash: "
           f"<code>{_e(record.get('head'))}</code></p>"]
    for link in by_type.get("previous", []):  # a later deletion request on the same model (obliviate forget)
        out.append(f"<p>Follows the record of request {_e(link.get('request'))} on the same model: head "
                   f"<code>{_e(link.get('head'))}</code> (<code>{_e(link.get('record'))}</code>)</p>")
    for gap in verdict.get("gaps") or []:
        out.append(f"<p class='other'>Missing: {_e(gap)}</p>")
    out.append("<h2>Criteria</h2><p>Forget set against never-seen holdout rows: under-unlearned (still known), "
               "indistinguishable, over-unlearned (less likely than never-seen), not measured.</p>"
               "<table><tr><th>criterion</th><th>call</th><th>value</th><th>interval</th><th>band / required</th>"
               "<th>p-value</th><th>evidence</th></tr>")
    out += [_check_row(c) for c in by_type.get("check", [])]
    out.append("</table><h2>Fingerprints (sha256)</h2><table><tr><th>what</th><th>where</th><th>sha256</th>"
               "<th>how</th></tr>")
    for f in by_type.get("file", []):
        where = f.get("path") or f.get("spec")
        rows = f" ({_e(f['n'])} rows)" if f.get("n") is not None else ""
        shas = [("file", f.get("sha256")), ("rows", f.get("content_sha256"))]
        sha = "<br>".join(f"{kind}: <code>{_e(v)}</code>" if "content_sha256" in f else f"<code>{_e(v)}</code>"
                          for kind, v in shas if v)
        out.append(f"<tr><td>{_e(f['role'])}{rows}</td><td><code>{_e(where)}</code></td><td>{sha or 'none'}</td>"
                   f"<td>{_e(f.get('source'))}</td></tr>")
    out.append("</table>")
    for code in by_type.get("code", []):
        versions = ", ".join(f"{k} {v}" for k, v in (code.get("versions") or {}).items() if v)
        out.append(f"<h2>Code</h2><p>git commit <code>{_e(code.get('git_commit'))}</code>; {_e(versions)}; "
                   f"Python {_e(code.get('python'))}; seed {_e(code.get('seed'))}</p>")
    for m in by_type.get("metrics", []):
        models = m.get("models") or {}
        keys = sorted({k for row in models.values() if isinstance(row, dict) for k in row})
        if keys:
            out.append("<h2>Metrics</h2><table><tr><th>metric</th>"
                       + "".join(f"<th>{_e(label)}</th>" for label in models) + "</tr>")
            for k in keys:
                out.append(f"<tr><td>{_e(k)}</td>" + "".join(
                    f"<td>{_e(format_number((row or {}).get(k)) if (row or {}).get(k) is not None else '')}</td>"
                    for row in models.values()) + "</tr>")
            out.append("</table>")
    for c in by_type.get("config", []):
        out.append(f"<h2>Config ({_e(c['run'])})</h2><p>sha256 <code>{_e(c['sha256'])}</code></p>"
                   f"<pre>{_e(yaml.safe_dump(c['config'], sort_keys=False))}</pre>")
    out.append("<h2>Hash chain</h2><table><tr><th>#</th><th>entry</th><th>hash</th></tr>")
    for e in entries:
        out.append(f"<tr><td>{_e(e.get('seq'))}</td><td>{_e(e.get('type'))} {_e(e.get('role') or e.get('name') or '')}"
                   f"</td><td><code>{_e(e.get('hash'))}</code></td></tr>")
    out.append("</table><p>Check it with <code>obliviate verify RECORD.json</code>.</p></body></html>\n")
    return "\n".join(out)

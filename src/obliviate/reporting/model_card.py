"""Model cards for unlearned checkpoints.

The card says what was forgotten by fingerprint only: the sha256 and row count of the forget data,
never its content and never its file name (a file name can itself name the person whose data was
removed). It lists the method, the metrics and the audit record's head hash, so a reader can check
the card against the record with ``obliviate verify``. The card is not part of the model's
fingerprint (``registry.model_fingerprint`` leaves README.md out), so writing it after
certification changes nothing that was certified.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import obliviate
from obliviate.reporting.audit import record_verdict
from obliviate.reporting.tables import format_number
from obliviate.runs import atomic_write_text
from obliviate.runs.fingerprint import MODEL_CARD, config_hash, model_fingerprint
from obliviate.runs.registry import _name, read_config, read_json_file, read_metrics, unlearn_run_dir

# Metrics shown on the card, in this order, when present.
CARD_METRICS = ("forget_quality", "model_utility", "forget_rouge", "forget_probability", "forget_truth_ratio",
                "retain_rouge", "retain_probability", "mia_auc_mink", "privleak")


def model_card_info(run_dir: str | Path, record: Mapping[str, Any] | None = None,
                    record_path: str | Path | None = None) -> dict[str, Any]:
    """Everything the card shows, read from a run directory (and its audit record, if any)."""
    run_dir = Path(run_dir)
    unlearn = unlearn_run_dir(run_dir)
    config = read_config(unlearn)
    manifest = read_json_file(run_dir / "data.json") or read_json_file(unlearn / "data.json") or {}
    metrics = read_metrics(run_dir)
    base = _name(config.get("model"))
    info: dict[str, Any] = {
        "method": _name(config.get("method")),
        # a local path says nothing to a reader of the card (and may be private): show hub ids only
        "base_model": base if base and not Path(base).expanduser().exists() else None,
        "model_sha256": model_fingerprint(unlearn / "model") if (unlearn / "model").is_dir() else None,
        "config_sha256": config_hash(config),
        "data": {role: {"sha256": spec.get("sha256"), "n": spec.get("n")}
                 for role, spec in manifest.items() if isinstance(spec, dict)},
        "metrics": metrics.get("models") or {},
        "obliviate_version": obliviate.__version__,
    }
    if record is not None:
        before: dict[str, Any] = next((e for e in record["entries"] if e.get("role") == "model_before"), {})
        info["base_model_sha256"] = before.get("sha256")
        info["audit"] = {"head": record["head"], "verdict": record_verdict(dict(record)),
                         "record": Path(record_path).name if record_path else None}
    return info


def render_model_card(info: Mapping[str, Any]) -> str:
    lines = ["---", "library_name: transformers", "tags:", "- obliviate", "- machine-unlearning"]
    if info.get("base_model"):
        lines.append(f"base_model: {info['base_model']}")
    lines += ["---", "", "# Unlearned model", ""]
    method = info.get("method") or "an unlearning method"
    source = f"`{info['base_model']}`" if info.get("base_model") else "a local checkpoint"
    lines += [f"This checkpoint was produced by [obliviate](https://pypi.org/project/obliviate/) "
              f"{info.get('obliviate_version', '')} by applying `{method}` to {source}"
              + (f" (sha256 `{info['base_model_sha256']}`)." if info.get("base_model_sha256") else "."), ""]
    lines += ["## What was forgotten", "",
              "Data is identified by fingerprint only (sha256 of its rows, as recorded in the run's data.json); "
              "its content and file names are deliberately not listed.", "",
              "| data | sha256 | rows |", "|---|---|---|"]
    for role, spec in (info.get("data") or {}).items():
        what = "forgotten" if role == "forget" else "kept (used to preserve utility)" if role == "retain" else role
        lines.append(f"| {role} ({what}) | `{spec.get('sha256')}` | {format_number(spec.get('n'))} |")
    metrics = info.get("metrics") or {}
    labels = [label for label in ("target", "oracle", "unlearned") if label in metrics] + \
             [label for label in metrics if label not in ("target", "oracle", "unlearned")]
    keys = [k for k in CARD_METRICS if any(k in (metrics[label] or {}) for label in labels)]
    if keys:
        lines += ["", "## Metrics", "",
                  "`target`: before unlearning; `oracle`: trained without the forget data; "
                  "`unlearned`: this model.", "",
                  "| metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(format_number((metrics[label] or {}).get(k)) for label in labels)
                         + " |")
    lines += ["", "## Fingerprints and audit", "",
              f"- model sha256 (every file of this directory except {MODEL_CARD}): `{info.get('model_sha256')}`",
              f"- config sha256: `{info.get('config_sha256')}`"]
    audit = info.get("audit")
    if audit:
        lines += [f"- audit record head hash: `{audit['head']}` (verdict: {audit.get('verdict')})",
                  f"- check it: `obliviate verify {audit.get('record') or 'RECORD.json'} "
                  f"--expected-head {audit['head']}`"]
    else:
        lines.append("- no audit record (run `obliviate certify` to make one)")
    return "\n".join(lines) + "\n"


def write_model_card(model_dir: str | Path, info: Mapping[str, Any]) -> Path:
    """Write README.md into a checkpoint directory (atomically); returns its path."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: not a checkpoint directory")
    return atomic_write_text(model_dir / MODEL_CARD, render_model_card(info))

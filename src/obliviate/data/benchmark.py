"""Benchmarks: named roles (train, forget, retain, ...) mapped to QA splits.

The rest of the code asks a :class:`Benchmark` for a role and never hard-codes file names. Three
kinds of source are understood by :func:`load_benchmark`:

* a directory holding ``benchmark.json`` (written by :func:`write_benchmark_dir`, e.g. the built-in
  synthetic benchmark), which maps roles to split files and records their SHA-256 checksums;
* a TOFU-layout directory without a manifest (``full.jsonl``, ``forget10.jsonl``, ...), read with the
  standard TOFU roles for the chosen forget split (Maini et al., 2024, arXiv 2401.06121);
* the hub id ``locuslab/TOFU`` (same roles), fetched through :func:`obliviate.data.qa.load_qa`.

Splits are loaded lazily, on first use, and cached.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from obliviate.data.layout import inside, prepare_benchmark_directory, sha256_bytes
from obliviate.data.qa import (
    QA_SUFFIXES,
    DataError,
    QADataset,
    QAExample,
    load_qa,
    load_qa_file,
    read_json_file,
    write_qa_jsonl,
)
from obliviate.data.specs import looks_like_path, missing_path_reason
from obliviate.runs import atomic_write_json

MANIFEST = "benchmark.json"
MANIFEST_FORMAT = "obliviate-benchmark/1"

ROLES: tuple[str, ...] = (
    "train",  # what the target model is finetuned on
    "forget",  # what is unlearned
    "retain",  # kept; also the oracle (retrained) model's training data
    "holdout",  # never trained on: membership-inference negatives
    "eval_forget",  # forget rows with paraphrased / perturbed answers
    "eval_retain",
    "eval_real_authors",
    "eval_world_facts",
    "id_forget",  # in-distribution forget examples with exposure candidates
    "ood_forget",  # out-of-distribution canaries with exposure candidates
)
REQUIRED_ROLES: tuple[str, ...] = ("train", "forget", "retain")
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def tofu_roles(forget_split: str = "forget10") -> dict[str, str]:
    """TOFU's split names for each role, for ``forget01`` / ``forget05`` / ``forget10``."""
    match = re.fullmatch(r"forget(\d{2})", forget_split)
    if not match or not 0 < int(match[1]) < 100:
        raise ValueError(f"forget_split must look like forget01, forget05 or forget10, got '{forget_split}'")
    pct = match[1]
    return {
        "train": "full",
        "forget": forget_split,
        "retain": f"retain{100 - int(pct):02d}",
        "holdout": f"holdout{pct}",
        "eval_forget": f"{forget_split}_perturbed",
        "eval_retain": "retain_perturbed",
        "eval_real_authors": "real_authors_perturbed",
        "eval_world_facts": "world_facts_perturbed",
    }



@dataclass
class Benchmark:
    """Roles -> splits of one benchmark. ``files`` is empty for a hub benchmark."""

    name: str
    source: str  # a directory or a hub id
    roles: dict[str, str]  # role -> split name
    files: dict[str, Path] = field(default_factory=dict)  # split name -> file
    checksums: dict[str, str] = field(default_factory=dict)  # split name -> expected sha256
    info: dict[str, Any] = field(default_factory=dict)  # seed, config ... from the manifest
    _splits: dict[str, QADataset] = field(default_factory=dict, repr=False)
    _fingerprints: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def from_hub(self) -> bool:
        return not self.files

    def has(self, role: str) -> bool:
        _check_role_name(role, self.source)
        return role in self.roles

    def split_name(self, role: str) -> str:
        if not self.has(role):
            raise DataError(self.source, None, f"benchmark '{self.name}' has no '{role}' split "
                            f"(it has: {', '.join(self.roles)})")
        return self.roles[role]

    def split(self, role: str) -> QADataset:
        """The rows for ``role``, loaded on first use."""
        name = self.split_name(role)
        if name not in self._splits:
            self._splits[name] = self._load(role, name)
        return self._splits[name]

    def fingerprint(self, role: str) -> str:
        """SHA-256 of the split's file bytes (for a hub split: of its rows as canonical JSON)."""
        name = self.split_name(role)
        if name not in self._fingerprints:
            if self.from_hub:
                rows = [e.to_json() for e in self.split(role)]
                self._fingerprints[name] = sha256_bytes(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode())
            else:
                self._fingerprints[name] = sha256_bytes(self.files[name].read_bytes())
        return self._fingerprints[name]

    def describe(self) -> dict[str, Any]:
        """What a run records about its data: name, source and each role's split (no loading)."""
        out: dict[str, Any] = {"name": self.name, "source": self.source, "roles": dict(self.roles)}
        if self.files:
            out["files"] = {role: str(self.files[split]) for role, split in self.roles.items()}
        return out

    def _load(self, role: str, name: str) -> QADataset:
        if self.from_hub:
            try:
                return load_qa(self.source, name)
            except DataError as exc:
                raise DataError(self.source, None, f"role '{role}' (split '{name}'): {exc.problem}") from None
        path = self.files[name]
        if not path.is_file():
            raise DataError(str(path), None, f"split file for role '{role}' not found")
        digest = sha256_bytes(path.read_bytes())
        expected = self.checksums.get(name)
        if expected is not None and digest != expected:
            raise DataError(str(path), None, f"file changed since {MANIFEST} was written "
                            f"(sha256 {digest[:12]}..., expected {expected[:12]}...)")
        self._fingerprints[name] = digest
        return load_qa_file(path)


# --------------------------------------------------------------------------------------------
# Loading


def load_benchmark(spec: str | Path, forget_split: str = "forget10") -> Benchmark:
    """Open a benchmark: a directory with ``benchmark.json``, a TOFU-layout directory, or ``locuslab/TOFU``.

    ``forget_split`` picks the TOFU forget set (forget01/05/10) and is ignored for a manifest directory,
    whose roles are fixed by its manifest.
    """
    text = str(spec)
    path = Path(text)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return _from_manifest(path)
        return _from_tofu_dir(path, forget_split)
    if path.exists():
        raise DataError(text, None, f"a benchmark is a directory (with {MANIFEST} or TOFU-layout splits), "
                        "not a file")
    if text.count("/") == 1 and not looks_like_path(text):
        return Benchmark(name=text, source=text, roles=_tofu_roles(text, forget_split))
    raise DataError(text, None, f"not found ({missing_path_reason(text)}): expected a directory with {MANIFEST}, "
                    "a TOFU-layout directory or a hub dataset id such as locuslab/TOFU")


def _tofu_roles(source: str, forget_split: str) -> dict[str, str]:
    try:
        return tofu_roles(forget_split)
    except ValueError as exc:
        raise DataError(source, None, str(exc)) from None


def _find_split_file(directory: Path, split: str) -> Path | None:
    for suffix in QA_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _from_tofu_dir(directory: Path, forget_split: str) -> Benchmark:
    roles = _tofu_roles(str(directory), forget_split)
    files = {split: _find_split_file(directory, split) for split in roles.values()}
    missing = [f"{role} ({split})" for role, split in roles.items() if role in REQUIRED_ROLES and files[split] is None]
    if missing:
        available = sorted({p.stem for p in directory.iterdir() if p.suffix in QA_SUFFIXES})
        raise DataError(str(directory), None,
                        f"no {MANIFEST} and not a TOFU-layout directory for '{forget_split}': missing "
                        f"{', '.join(missing)} (splits here: {', '.join(available) or 'none'})")
    found = {split: path for split, path in files.items() if path is not None}
    present = {role: split for role, split in roles.items() if split in found}
    return Benchmark(name=f"tofu-{forget_split}", source=str(directory), roles=present,
                     files={split: found[split] for split in present.values()})


def _from_manifest(directory: Path) -> Benchmark:
    path = directory / MANIFEST
    data = read_json_file(path)
    if not isinstance(data, dict) or not isinstance(data.get("roles"), dict):
        raise DataError(str(path), None, "must be a JSON object with a 'roles' object (role -> split name)")
    roles: dict[str, str] = data["roles"]
    _check_roles(roles, str(path))
    entries = data.get("splits") or {}
    if not isinstance(entries, dict):
        raise DataError(str(path), None, "'splits' must be an object (split name -> file, rows, sha256)")
    files, checksums = {}, {}
    for role, split in roles.items():
        entry = entries.get(split) or {}
        if not isinstance(entry, dict):
            raise DataError(str(path), None, f"splits.{split} must be an object (file, rows, sha256), got "
                            f"{type(entry).__name__}")
        if entry.get("sha256") is not None and not isinstance(entry["sha256"], str):
            raise DataError(str(path), None, f"splits.{split}.sha256 must be a hex text")
        file = _split_path(directory, entry.get("file"), str(path)) if entry.get("file") else \
            _find_split_file(directory, split)
        if file is None or not file.is_file():
            raise DataError(str(path), None, f"role '{role}': split '{split}' has no file "
                            f"({file or f'{split}.jsonl'} not found)")
        files[split] = file
        if entry.get("sha256"):
            checksums[split] = entry["sha256"]
    info = {k: data[k] for k in ("seed", "config", "format") if k in data}
    return Benchmark(name=str(data.get("name") or directory.name), source=str(directory), roles=dict(roles),
                     files=files, checksums=checksums, info=info)


def _split_path(directory: Path, file: Any, source: str) -> Path:
    """A manifest's file entry, which must stay inside the benchmark directory."""
    path = inside(directory, file)
    if path is None:
        raise DataError(source, None, f"split file must be a relative path inside the directory, got {file!r}")
    return path


def _check_role_name(role: str, source: str) -> None:
    if role not in ROLES:
        raise DataError(source, None, f"unknown role '{role}' (roles: {', '.join(ROLES)})")


def _check_roles(roles: dict, source: str) -> None:
    for role, split in roles.items():
        _check_role_name(role, source)
        if not isinstance(split, str) or not _SPLIT_NAME.match(split):
            raise DataError(source, None, f"role '{role}': split name must be a plain name, got {split!r}")
    missing = [r for r in REQUIRED_ROLES if r not in roles]
    if missing:
        raise DataError(source, None, f"missing required role(s): {', '.join(missing)}")


# --------------------------------------------------------------------------------------------
# Writing


def write_benchmark_dir(splits: Mapping[str, Sequence[QAExample]], directory: str | Path, roles: dict[str, str], *,
                        name: str, seed: int | None = None, config: dict[str, Any] | None = None,
                        overwrite: bool = False) -> Path:
    """Write ``SPLIT.jsonl`` per split and then ``benchmark.json`` (last, so a crash leaves no manifest).

    A non-empty directory is refused unless ``overwrite=True``; even then only a directory that holds
    a previous benchmark is reused (its listed split files are replaced; other files are left alone).
    """
    directory = Path(directory)
    _check_roles(roles, "roles")
    for role, split in roles.items():
        if split not in splits:
            raise ValueError(f"role '{role}' names split '{split}', which is not among the splits given")
    for split, rows in splits.items():
        if not _SPLIT_NAME.match(split):
            raise ValueError(f"split name {split!r} is not a plain file name")
        if not rows:
            raise ValueError(f"split '{split}' is empty")
    prepare_benchmark_directory(directory, overwrite=overwrite, manifest=MANIFEST, what="benchmark",
                                listed_files=lambda old: [e["file"] for e in old["splits"].values()])
    entries = {}
    for split, rows in splits.items():
        file = write_qa_jsonl(rows, directory / f"{split}.jsonl")
        entries[split] = {"file": file.name, "rows": len(rows), "sha256": sha256_bytes(file.read_bytes())}
    manifest = {"format": MANIFEST_FORMAT, "name": name, "seed": seed, "config": config,
                "roles": roles, "splits": entries}
    atomic_write_json(directory / MANIFEST, manifest)
    return directory

"""Multiple-choice question sets in WMDP / MMLU format, from files or the hub.

A row has ``question``, ``choices`` (a list of texts; in CSV either a JSON list or one column per
choice named ``A``, ``B``, ``C``, ...) and ``answer``: the 0-based index of the correct choice, or its
letter (``"C"``), as WMDP (Li et al. 2024, arXiv 2403.03218, ``cais/wmdp``) and MMLU (Hendrycks et
al. 2021, arXiv 2009.03300, ``cais/mmlu``) ship them. Other fields (``subject``, ...) are kept in
``meta``. Files are ``.jsonl``, ``.json``, ``.csv`` or ``.parquet`` (read as QA files are,
``data.qa``); a bad row raises :class:`~obliviate.data.qa.DataError` naming the file, the line and
the problem, or is skipped and counted with ``skip_bad=True``.

Hub sets are ``ORG/NAME:CONFIG`` or ``ORG/NAME:CONFIG:SPLIT`` (split ``test`` by default), e.g.
``cais/wmdp:wmdp-bio`` or ``cais/mmlu:all``; out of reach of the hub they are a one-line error that
says to pass a local file.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import huggingface_hub  # module attributes, looked up per call (tests replace them)

from obliviate.data.qa import QA_SUFFIXES, DataError, log_skipped, raw_rows
from obliviate.data.specs import hub_unreachable, looks_like_path, missing_path_reason
from obliviate.runs import atomic_write_text
from obliviate.runs.rundir import plain_name, safe_name

LETTERS = string.ascii_uppercase
DEFAULT_HUB_SPLIT = "test"
_KNOWN = {"question", "choices", "answer"}


@dataclass
class MCItem:
    """One question, its choices and the index of the correct one."""

    question: str
    choices: list[str]
    answer: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"question": self.question, "choices": list(self.choices), "answer": self.answer, **self.meta}


@dataclass
class MCSet:
    """A named multiple-choice set and where it came from (for error messages and results)."""

    name: str
    items: list[MCItem]
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[MCItem]:
        return iter(self.items)

    def __getitem__(self, i: int) -> MCItem:
        return self.items[i]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds a lone surrogate, not valid Unicode text") from None
    return value


def _letter_columns(row: dict) -> list[str]:
    """The choice columns A, B, C, ... of a row, in order, stopping at the first letter missing."""
    names = []
    for letter in LETTERS:
        if letter not in row:
            break
        names.append(letter)
    return names


def _choices(row: dict) -> tuple[list[str], set[str]]:
    """The choice texts and the row keys they came from."""
    columns = _letter_columns(row)
    value = row.get("choices")
    if value is not None and columns:
        raise ValueError("give the choices either as 'choices' or as columns A, B, ..., not both")
    if value is None:
        if not columns:
            raise ValueError("missing key 'choices' (a list of texts, or columns A, B, C, ...)")
        value, keys = [row[c] for c in columns], set(columns)
    else:
        keys = {"choices"}
        if isinstance(value, str):  # CSV cells hold lists as JSON text
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"'choices' is not a JSON list: {exc}") from None
        if hasattr(value, "tolist"):  # numpy array from parquet
            value = value.tolist()
        if not isinstance(value, list):
            raise ValueError(f"'choices' must be a list of texts, got {type(value).__name__}")
    if len(value) < 2:
        raise ValueError(f"a question needs at least 2 choices, this one has {len(value)}")
    if len(value) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices, this one has {len(value)}")
    return [_text(v, f"choice {LETTERS[i]}") for i, v in enumerate(value)], keys


def _answer(value: Any, n_choices: int) -> int:
    valid = f"0-{n_choices - 1} or A-{LETTERS[n_choices - 1]}"
    if value is None:
        raise ValueError(f"missing key 'answer' (the correct choice: {valid})")
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text.upper() in LETTERS:
            index = LETTERS.index(text.upper())
        elif text.isdigit():
            index = int(text)
        else:
            raise ValueError(f"'answer' {value!r} is neither a choice index nor a letter ({valid})")
    elif isinstance(value, int) and not isinstance(value, bool):
        index = value
    else:
        raise ValueError(f"'answer' must be a choice index or a letter ({valid}), got {type(value).__name__}")
    if not 0 <= index < n_choices:
        raise ValueError(f"'answer' {value!r} is out of range: the row has {n_choices} choices ({valid})")
    return index


def parse_mc_row(row: Any) -> MCItem:
    """Validate one raw row; raises ValueError with the problem (no location)."""
    if not isinstance(row, dict):
        raise ValueError(f"row must be an object, got {type(row).__name__}")
    if row.get("question") is None:
        raise ValueError("missing key 'question'")
    question = _text(row["question"], "'question'")
    choices, choice_keys = _choices(row)
    answer = _answer(row.get("answer"), len(choices))
    used = _KNOWN | choice_keys
    return MCItem(question, choices, answer, meta={k: v for k, v in row.items() if k not in used})


def load_mc_file(path: str | Path, name: str | None = None, skip_bad: bool = False) -> MCSet:
    """A multiple-choice set from one file (.jsonl, .json, .csv or .parquet)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "file not found" if not path.exists() else "not a file")
    items, skipped = [], []
    for (line, row), raw in raw_rows(path):
        try:
            if isinstance(raw, DataError):
                raise raw
            item = parse_mc_row(raw)
            item.meta.setdefault("row", row if row is not None else line)
            items.append(item)
        except ValueError as exc:
            error = exc if isinstance(exc, DataError) else DataError(str(path), line, str(exc), row=row)
            if not skip_bad:
                raise error from None
            skipped.append(error)
    if not items:
        if skipped:
            log_skipped(str(path), skipped, "questions")
            raise DataError(str(path), None, f"no usable questions ({len(skipped)} skipped); the first: {skipped[0]}")
        raise DataError(str(path), None, "no questions (the file is empty)")
    log_skipped(str(path), skipped, "questions")
    return MCSet(_set_name(name, path.stem), items, str(path), len(skipped))


def load_mc(spec: str | Path, name: str | None = None, skip_bad: bool = False) -> MCSet:
    """A multiple-choice set from a local file or a hub dataset (``ORG/NAME:CONFIG[:SPLIT]``).

    ``name`` names the set in results (a plain name); by default the file's stem or the hub config.
    A spec that looks like a local path and is missing is an error at once, never tried on the hub.
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return load_mc_file(path, name, skip_bad)
    if path.is_dir():
        raise DataError(spec, None, "a directory, not a file: give the multiple-choice file itself "
                        f"({', '.join(QA_SUFFIXES)})")
    repo_id = spec.split(":", 1)[0]
    if looks_like_path(spec) or looks_like_path(repo_id) or repo_id.count("/") != 1:
        raise DataError(spec, None, f"not a file or a hub dataset id (ORG/NAME:CONFIG): {missing_path_reason(spec)}")
    return _load_hub(spec, name, skip_bad)


def parse_mc_option(value: str) -> tuple[str | None, str]:
    """``NAME=SPEC`` or ``SPEC`` (the ``--mc`` option) -> (name or None, spec)."""
    name, sep, spec = value.partition("=")
    if not sep or Path(value).exists():
        return None, value
    if not name or not spec:
        raise DataError(value, None, "expected NAME=FILE_OR_HUB_ID or FILE_OR_HUB_ID (e.g. wmdp_bio=wmdp-bio.jsonl)")
    return name, spec


def load_mc_sets(specs: Sequence[str | MCSet], skip_bad: bool = False) -> list[MCSet]:
    """Sets from ``--mc`` values (``NAME=SPEC`` or ``SPEC``) or given sets; names must differ."""
    sets = [s if isinstance(s, MCSet) else load_mc(*_named(s), skip_bad=skip_bad) for s in specs]
    seen: dict[str, str] = {}
    for mc in sets:
        if mc.name in seen:
            raise DataError(mc.source, None, f"a second multiple-choice set named {mc.name!r} (the first: "
                            f"{seen[mc.name]}); name them: --mc NAME=FILE")
        seen[mc.name] = mc.source
    return sets


def _named(value: str) -> tuple[str, str | None]:
    name, spec = parse_mc_option(value)
    return spec, name


def _set_name(name: str | None, default: str) -> str:
    return safe_name(name, "multiple-choice set name") if name is not None else plain_name(default) or "mc"


def _hub_parts(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(spec, None, "a hub multiple-choice set is ORG/NAME:CONFIG or ORG/NAME:CONFIG:SPLIT "
                        "(e.g. cais/wmdp:wmdp-bio)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else DEFAULT_HUB_SPLIT


def _split_files(files: list[str], config: str, split: str) -> list[str]:
    """The data files of one config and split: ``CONFIG/SPLIT-*.parquet`` (the hub's layout), else
    files named after the config alone (a repository without configs)."""
    files = [f for f in files if f.endswith(QA_SUFFIXES)]

    def named(stem: str, key: str) -> bool:
        return stem == key or stem.startswith(key + "-")

    chosen = [f for f in files if config in Path(f).parts[:-1] and named(Path(f).stem, split)]
    return chosen or [f for f in files if named(Path(f).stem, config)]


def _load_hub(spec: str, name: str | None, skip_bad: bool) -> MCSet:
    repo_id, config, split = _hub_parts(spec)
    unreachable = hub_unreachable()
    if unreachable:
        raise DataError(spec, None, f"a hub dataset, but the hub is out of reach ({unreachable}); pass a local "
                        "file (.jsonl/.json/.csv/.parquet with question, choices, answer) instead")
    try:
        files = _split_files(huggingface_hub.list_repo_files(repo_id, repo_type="dataset"), config, split)
        if not files:
            raise DataError(spec, None, f"no files for config '{config}', split '{split}' in the hub dataset")
        local = [huggingface_hub.hf_hub_download(repo_id, f, repo_type="dataset") for f in sorted(files)]
    except DataError:
        raise
    except Exception as exc:  # network and auth errors
        raise DataError(spec, None, f"could not fetch from the hub ({type(exc).__name__}: {exc}); "
                        "pass a local file instead") from None
    parts = [load_mc_file(p, None, skip_bad) for p in local]
    return MCSet(_set_name(name, config), [item for p in parts for item in p.items], spec,
                 sum(p.skipped for p in parts))


def write_mc_jsonl(items: list[MCItem], path: str | Path) -> Path:
    """Write rows as JSON Lines (atomically), in the format :func:`load_mc` reads."""
    lines = [json.dumps(item.to_json(), ensure_ascii=False) for item in items]
    return atomic_write_text(path, "\n".join(lines) + "\n")

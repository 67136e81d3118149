"""Question-answer datasets in TOFU format, from files, a TOFU-layout directory or the hub.

A row has ``question`` and ``answer`` and optionally ``paraphrased_answer``, ``perturbed_answer``
(a list of wrong answers), ``paraphrased_question`` and free ``meta`` fields. Rows that break these
rules raise :class:`DataError` naming the file, the line (1-based, as an editor shows it) and the
problem, or are skipped and counted when ``skip_bad=True``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

QA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A problem in input data, located by file and line."""

    def __init__(self, source: str, line: int | None, problem: str):
        self.source, self.line, self.problem = source, line, problem
        where = f"{source}, line {line}" if line is not None else source
        super().__init__(f"{where}: {problem}")


@dataclass
class QAExample:
    question: str
    answer: str
    paraphrased_answer: str | None = None
    perturbed_answers: list[str] = field(default_factory=list)
    paraphrased_question: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        row = {"question": self.question, "answer": self.answer}
        if self.paraphrased_answer is not None:
            row["paraphrased_answer"] = self.paraphrased_answer
        if self.perturbed_answers:
            row["perturbed_answer"] = list(self.perturbed_answers)
        if self.paraphrased_question is not None:
            row["paraphrased_question"] = self.paraphrased_question
        row.update(self.meta)
        return row


@dataclass
class QADataset:
    """A list of examples plus where they came from (for error messages and fingerprints)."""

    examples: list[QAExample]
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[QAExample]:
        return iter(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return QADataset(self.examples[i], self.source)
        return self.examples[i]

    @property
    def has_truth_ratio_fields(self) -> bool:
        return bool(self.examples) and all(
            e.perturbed_answers for e in self.examples
        )


_KNOWN = {"question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question"}


def _text(row: dict, key: str, required: bool) -> str | None:
    value = row.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing key '{key}'")
        return None
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be text, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{key}' is empty")
    return value


def _perturbed(row: dict) -> list[str]:
    value = row.get("perturbed_answer")
    if value is None:
        return []
    if isinstance(value, str):
        # CSV cells hold lists as JSON text.
        try:
            value = json.loads(value) if value.lstrip().startswith("[") else [value]
        except json.JSONDecodeError as exc:
            raise ValueError(f"'perturbed_answer' is not a JSON list: {exc}") from None
    if hasattr(value, "tolist"):  # numpy array from parquet
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("'perturbed_answer' must be a list of non-empty texts")
    return list(value)


def parse_row(row: Any) -> QAExample:
    """Validate one raw row; raises ValueError with the problem (no location)."""
    if not isinstance(row, dict):
        raise ValueError(f"row must be an object, got {type(row).__name__}")
    return QAExample(
        question=_text(row, "question", True),
        answer=_text(row, "answer", True),
        paraphrased_answer=_text(row, "paraphrased_answer", False),
        perturbed_answers=_perturbed(row),
        paraphrased_question=_text(row, "paraphrased_question", False),
        meta={k: v for k, v in row.items() if k not in _KNOWN},
    )


def _raw_rows(path: Path) -> Iterator[tuple[int | None, Any]]:
    """Yield (line number, raw row) from a file; line numbers are what an editor shows."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, DataError(str(path), lineno, f"invalid JSON: {exc.msg}")
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(str(path), exc.lineno, f"invalid JSON: {exc.msg}") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(str(path), None, "a .json file must hold a list of rows")
        # Report the row's index as its position; JSON arrays carry no line numbers.
        for i, row in enumerate(data, 1):
            yield i, row
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                # line_num is the last physical line read, which is the row's line for one-line rows.
                yield reader.line_num, {k: v for k, v in row.items() if v not in (None, "")}
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(str(path), None, "reading Parquet needs pyarrow: pip install pyarrow") from None
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield i, row
    else:
        raise DataError(str(path), None, f"unknown file type '{suffix}' (use one of {', '.join(QA_SUFFIXES)})")


def load_qa_file(path: str | Path, skip_bad: bool = False, max_answer_chars: int | None = None) -> QADataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "file not found")
    examples, skipped = [], 0
    for lineno, raw in _raw_rows(path):
        try:
            if isinstance(raw, DataError):
                raise raw
            ex = parse_row(raw)
            if max_answer_chars is not None and len(ex.answer) > max_answer_chars:
                raise ValueError(f"answer has {len(ex.answer)} characters, more than {max_answer_chars}")
            ex.meta.setdefault("row", lineno)
            examples.append(ex)
        except (ValueError, DataError) as exc:
            if not skip_bad:
                if isinstance(exc, DataError):
                    raise
                raise DataError(str(path), lineno, str(exc)) from None
            skipped += 1
    if not examples:
        raise DataError(str(path), None, "no usable rows")
    return QADataset(examples, str(path), skipped)


def _split_file(directory: Path, split: str) -> Path:
    for suffix in QA_SUFFIXES:
        candidate = directory / f"{split}{suffix}"
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for p in directory.iterdir() if p.suffix in QA_SUFFIXES})
    raise DataError(str(directory), None, f"no split '{split}' (available: {', '.join(available) or 'none'})")


def load_qa(spec: str | Path, split: str | None = None, skip_bad: bool = False) -> QADataset:
    """Load a QA set from a file, a directory plus split name, or a hub dataset id plus split.

    ``spec`` may also carry the split after a colon: ``data/tofu:forget10_perturbed`` or
    ``locuslab/TOFU:forget10_perturbed``.
    """
    spec = str(spec)
    if split is None and ":" in spec and not Path(spec).exists():
        spec, split = spec.rsplit(":", 1)
    path = Path(spec)
    if path.is_file():
        return load_qa_file(path, skip_bad)
    if path.is_dir():
        if split is None:
            raise DataError(spec, None, "a directory needs a split name, e.g. DIR:forget10_perturbed")
        return load_qa_file(_split_file(path, split), skip_bad)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _load_hub(spec, split, skip_bad)
    raise DataError(spec, None, "not a file, a directory or a hub dataset id")


def _load_hub(repo_id: str, split: str | None, skip_bad: bool) -> QADataset:
    """Hub datasets (e.g. locuslab/TOFU with a config name such as forget10_perturbed)."""
    if split is None:
        raise DataError(repo_id, None, "a hub dataset needs a split/config name, e.g. locuslab/TOFU:forget10")
    try:
        from huggingface_hub import hf_hub_download, list_repo_files
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise DataError(repo_id, None, "huggingface_hub is not installed") from None
    try:
        files = [f for f in list_repo_files(repo_id, repo_type="dataset")
                 if Path(f).stem == split or Path(f).parent.name == split]
        files = [f for f in files if f.endswith(QA_SUFFIXES)]
        if not files:
            raise DataError(repo_id, None, f"no files for split '{split}' in the hub dataset")
        local = [hf_hub_download(repo_id, f, repo_type="dataset") for f in sorted(files)]
    except DataError:
        raise
    except Exception as exc:  # network and auth errors
        raise DataError(repo_id, None, f"could not fetch from the hub ({type(exc).__name__}: {exc}); "
                        "pass a local file or directory instead") from None
    parts = [load_qa_file(p, skip_bad) for p in local]
    return QADataset([e for p in parts for e in p.examples], f"{repo_id}:{split}", sum(p.skipped for p in parts))


def write_qa_jsonl(examples: Iterable[QAExample], path: str | Path) -> Path:
    """Write rows atomically (temp file then rename)."""
    from obliviate.runs import atomic_write_text

    lines = [json.dumps(e.to_json(), ensure_ascii=False) for e in examples]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def as_dicts(ds: QADataset) -> list[dict]:
    return [asdict(e) for e in ds.examples]

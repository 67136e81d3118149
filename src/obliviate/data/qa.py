"""Question-answer datasets in TOFU format, from files, a TOFU-layout directory or the hub.

A row has ``question`` and ``answer`` and optionally ``paraphrased_answer``, ``perturbed_answer``
(a list of wrong answers), ``paraphrased_question`` and free ``meta`` fields. Rows that break these
rules raise :class:`DataError` naming the file, the line (1-based, as an editor shows it) and the
problem, or are skipped and counted when ``skip_bad=True``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, overload

import huggingface_hub  # module attributes, looked up per call (tests replace them)

from obliviate.data.specs import hub_unreachable, looks_like_path, missing_path_reason
from obliviate.errors import UserError
from obliviate.runs import atomic_write_text

QA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
log = logging.getLogger("obliviate.data")


class DataError(UserError, ValueError):
    """A problem in input data, located by file and line (``row``: the row's position where the format
    has no lines, e.g. Parquet, or beside the line for a .json array)."""

    def __init__(self, source: str, line: int | None, problem: str, row: int | None = None):
        self.source, self.line, self.problem, self.row = source, line, problem, row
        where = source
        if line is not None:
            where += f", line {line}" + (f" (row {row})" if row is not None else "")
        elif row is not None:
            where += f", row {row}"
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
        row: dict[str, Any] = {"question": self.question, "answer": self.answer}
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
    skipped_problems: list[DataError] = field(default_factory=list, repr=False)  # why each was skipped

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


@overload
def _text(row: dict, key: str, required: Literal[True]) -> str: ...


@overload
def _text(row: dict, key: str, required: Literal[False]) -> str | None: ...


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
    _check_unicode(key, value)
    return value


def _check_unicode(key: str, value: str) -> None:
    # JSON escapes can spell lone surrogates ("\ud800"), which no file or tokenizer can encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"'{key}' holds a lone surrogate (\\u{ord(value[_bad_char(value)]):04x}), "
                         "not valid Unicode text") from None


def _bad_char(value: str) -> int:
    return next(i for i, c in enumerate(value) if 0xD800 <= ord(c) <= 0xDFFF)


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
    for v in value:
        _check_unicode("perturbed_answer", v)
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


# A raw row: ((line, row), value), with the value a DataError when the row cannot be read at all.
_Where = tuple[int | None, int | None]


def read_lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, None) per line of a file, or (line number, "", problem) for a line that is
    not UTF-8 text. Lines end at \\n, \\r\\n or \\r, as an editor counts them; a leading BOM is dropped."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            yield lineno, raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            yield lineno, "", f"not UTF-8 text (byte {exc.start + 1} of the line)"


def read_text(path: Path) -> str:
    """The whole file as UTF-8 text, or a DataError at the line of the first byte that is not."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(str(path), line, "not UTF-8 text; save the file as UTF-8") from None


def parse_json(text: str) -> Any:
    """``json.loads`` whose every failure is a ValueError with a short reason (line in ``.lineno``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ValueError(f"invalid JSON: {exc}") from None


def read_json_file(path: Path) -> Any:
    """A whole JSON file (a manifest, say), or a DataError naming the file, and the line where it can."""
    try:
        return parse_json(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, f"invalid JSON: {exc.msg}") from None
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(str(path), None, str(exc)) from None


def _jsonl_rows(path: Path) -> Iterator[tuple[_Where, Any]]:
    for lineno, line, problem in read_lines(path):
        if problem is None and not line.strip():
            continue
        if problem is not None:
            yield (lineno, None), DataError(str(path), lineno, problem)
            continue
        try:
            yield (lineno, None), parse_json(line)
        except json.JSONDecodeError as exc:
            yield (lineno, None), DataError(str(path), lineno, f"invalid JSON: {exc.msg} (column {exc.colno})")
        except ValueError as exc:
            yield (lineno, None), DataError(str(path), lineno, str(exc))


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[_Where, Any]]:
    """The elements of a top-level JSON array with the line each starts on."""
    decoder = json.JSONDecoder()
    ws = " \t\n\r"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def fail(i: int, problem: str) -> DataError:
        return DataError(str(path), text.count("\n", 0, i) + 1, problem)

    i = skip(skip(0) + 1)  # past "["
    row = 0
    if i < len(text) and text[i] == "]":
        i = skip(i + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise DataError(str(path), exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            except RecursionError:
                raise fail(i, "invalid JSON: nested too deeply") from None
            except ValueError as exc:
                raise fail(i, f"invalid JSON: {exc}") from None
            row += 1
            yield (text.count("\n", 0, i) + 1, row), value
            i = skip(end)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
                continue
            if i < len(text) and text[i] == "]":
                i = skip(i + 1)
                break
            raise fail(i, "invalid JSON: expected ',' or ']' after a row")
    if i < len(text):
        raise fail(i, "invalid JSON: extra data after the list of rows")


def _json_rows(path: Path) -> Iterator[tuple[_Where, Any]]:
    text = read_text(path)
    if text.lstrip().startswith("["):
        yield from _json_array_rows(path, text)
        return
    try:
        data = parse_json(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            # JSON Lines saved as .json (TOFU's hub files are): one object per line.
            yield from _jsonl_rows(path)
            return
        raise DataError(str(path), exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except ValueError as exc:
        raise DataError(str(path), None, str(exc)) from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(str(path), None, "a .json file must hold a list of rows, {\"data\": [rows]} or one "
                        f"object per line; this one holds {type(data).__name__ if data is not None else 'null'}")
    for i, row in enumerate(data, 1):
        yield (None, i), row


def _csv_rows(path: Path) -> Iterator[tuple[_Where, Any]]:
    text = read_text(path)
    # strict: an unclosed quote is an error, not an answer that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    def records() -> Iterator[tuple[int, list[str]]]:
        """(line the record starts on, values): a quoted value may span lines."""
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                hint = " (a quote opened in this row is never closed)" if "end of data" in str(exc) else ""
                raise DataError(str(path), start, f"invalid CSV: {exc}{hint}") from None
            yield start, values

    rows = records()
    first = next(rows, None)
    if first is None:
        return
    names = [h.strip() for h in first[1]]
    if len(set(names)) != len(names):
        raise DataError(str(path), first[0], f"the header names a column twice: {', '.join(names)}")
    for line, values in rows:
        if not any(v.strip() for v in values):
            continue  # blank line
        if len(values) > len(names):
            yield (line, None), DataError(str(path), line, f"row has {len(values)} fields, the header "
                                          f"{len(names)} (quote values that hold commas)")
            continue
        # a short row leaves the last columns out: they are optional or reported as missing
        yield (line, None), {k: v for k, v in zip(names, values, strict=False) if v != ""}


def _parquet_rows(path: Path) -> Iterator[tuple[_Where, Any]]:
    try:
        import pyarrow.parquet as pq  # optional: only Parquet input needs it
    except ImportError:
        raise DataError(str(path), None, "reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises its own kinds for every corruption
        raise DataError(str(path), None, f"not a readable Parquet file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for i, row in enumerate(rows, 1):
        yield (None, i), row


def raw_rows(path: Path) -> Iterator[tuple[_Where, Any]]:
    """Yield ((line, row), raw row) from a file; line numbers are what an editor shows."""
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(str(path), None, f"unknown file type '{suffix}' (use one of {', '.join(QA_SUFFIXES)})")
    return readers[suffix](path)


def log_skipped(source: str, problems: list[DataError], what: str = "rows") -> None:
    """One warning line (stderr when nothing else is configured) naming what ``skip_bad`` skipped:
    each kind of problem with up to five of its lines."""
    if not problems:
        return
    kinds: dict[str, list[str]] = defaultdict(list)
    for p in problems:
        kinds[p.problem].append(str(p.line) if p.line is not None else f"row {p.row}")
    parts = []
    for problem, lines in kinds.items():
        shown = ", ".join(lines[:5]) + (f", ... ({len(lines)} in all)" if len(lines) > 5 else "")
        parts.append(f"{problem} (line{'s' if len(lines) > 1 else ''} {shown})")
    log.warning("%s: skipped %d bad %s: %s", source, len(problems), what, "; ".join(parts))


def load_qa_file(path: str | Path, skip_bad: bool = False, max_answer_chars: int | None = None) -> QADataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), None, "file not found" if not path.exists() else "not a file")
    examples, skipped = [], []
    for (line, row), raw in raw_rows(path):
        try:
            if isinstance(raw, DataError):
                raise raw
            ex = parse_row(raw)
            if max_answer_chars is not None and len(ex.answer) > max_answer_chars:
                raise ValueError(f"answer has {len(ex.answer)} characters, more than {max_answer_chars}")
            ex.meta.setdefault("row", row if row is not None else line)
            examples.append(ex)
        except ValueError as exc:
            error = exc if isinstance(exc, DataError) else DataError(str(path), line, str(exc), row=row)
            if not skip_bad:
                raise error from None
            skipped.append(error)
    if not examples:
        if skipped:
            log_skipped(str(path), skipped)
            raise DataError(str(path), None, f"no usable rows ({len(skipped)} skipped); the first: {skipped[0]}")
        raise DataError(str(path), None, "no rows (the file is empty)")
    log_skipped(str(path), skipped)
    return QADataset(examples, str(path), len(skipped), skipped)


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
    ``locuslab/TOFU:forget10_perturbed``. A spec that looks like a local path and is missing is an
    error at once; it is never tried on the hub.
    """
    spec = str(spec)
    if split is None and ":" in spec and not Path(spec).exists():
        spec, split = spec.rsplit(":", 1)
    path = Path(spec).expanduser()
    if path.is_file():
        return load_qa_file(path, skip_bad)
    if path.is_dir():
        if split is None:
            raise DataError(spec, None, "a directory needs a split name, e.g. DIR:forget10_perturbed")
        return load_qa_file(_split_file(path, split), skip_bad)
    if looks_like_path(spec):
        raise DataError(spec, None, f"not a file, a directory or a hub dataset id: {missing_path_reason(spec)}")
    if spec.count("/") == 1:
        return _load_hub(spec, split, skip_bad)
    raise DataError(spec, None, "not a file, a directory or a hub dataset id (org/name:split): "
                    "no such file or directory")


def _load_hub(repo_id: str, split: str | None, skip_bad: bool) -> QADataset:
    """Hub datasets (e.g. locuslab/TOFU with a config name such as forget10_perturbed)."""
    if split is None:
        raise DataError(repo_id, None, "a hub dataset needs a split/config name, e.g. locuslab/TOFU:forget10")
    unreachable = hub_unreachable()
    if unreachable:
        raise DataError(repo_id, None, f"a hub dataset, but the hub is out of reach ({unreachable}); pass a local "
                        "file or directory instead") from None
    try:
        files = [f for f in huggingface_hub.list_repo_files(repo_id, repo_type="dataset")
                 if Path(f).stem == split or Path(f).parent.name == split]
        files = [f for f in files if f.endswith(QA_SUFFIXES)]
        if not files:
            raise DataError(repo_id, None, f"no files for split '{split}' in the hub dataset")
        local = [huggingface_hub.hf_hub_download(repo_id, f, repo_type="dataset") for f in sorted(files)]
    except DataError:
        raise
    except Exception as exc:  # network and auth errors
        raise DataError(repo_id, None, f"could not fetch from the hub ({type(exc).__name__}: {exc}); "
                        "pass a local file or directory instead") from None
    parts = [load_qa_file(p, skip_bad) for p in local]
    return QADataset([e for p in parts for e in p.examples], f"{repo_id}:{split}", sum(p.skipped for p in parts))


def write_qa_jsonl(examples: Iterable[QAExample], path: str | Path) -> Path:
    """Write rows atomically (temp file then rename)."""
    lines = [json.dumps(e.to_json(), ensure_ascii=False) for e in examples]
    return atomic_write_text(path, "\n".join(lines) + "\n")


def as_dicts(ds: QADataset) -> list[dict]:
    return [asdict(e) for e in ds.examples]

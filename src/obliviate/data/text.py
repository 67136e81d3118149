"""Plain-text corpora for document-level forgetting, as in MUSE (Shi et al., 2024, "MUSE: Machine
Unlearning Six-Way Evaluation for Language Models", arXiv 2407.06460) and WMDP (Li et al., 2024,
"The WMDP Benchmark", arXiv 2403.03218), whose forget sets are raw text rather than QA pairs.

A corpus is a list of documents read from one of:

* a ``.txt`` file: one document per line (``mode="line"``, the default) or the whole file (``"file"``);
* a ``.jsonl`` file: one document per row, in its ``"text"`` field;
* a directory of ``.txt`` files (searched recursively, sorted by path): one document per file
  (``mode="file"``, the default) or per line.

Surrounding whitespace is removed from each document. A document that is empty, shorter than
``min_chars``, not UTF-8 or holds NUL bytes raises :class:`DataError` naming the file and line, or is
skipped and counted with ``skip_bad=True``.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from obliviate.data.qa import QA_SUFFIXES, DataError, QADataset, QAExample, log_skipped, parse_json

TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class TextCorpus:
    docs: list[str]
    source: str
    skipped: int = 0
    skipped_problems: list[DataError] = field(default_factory=list, repr=False)  # why each was skipped

    def __len__(self) -> int:
        return len(self.docs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.docs)

    def __getitem__(self, i):
        return self.docs[i]


# A raw document: (file, line, text, None), or (file, line, "", problem) when it is not readable text.
_Raw = tuple[Path, int, str, str | None]


def _decode(raw: bytes) -> tuple[str, str | None]:
    if b"\x00" in raw:
        return "", "holds NUL bytes: not a text file"
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return "", f"not UTF-8 text (byte {exc.start + 1} of the line)"


def _line_docs(path: Path) -> Iterator[_Raw]:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the file's final newline ends the last line; it starts no document
    for lineno, raw in enumerate(lines, 1):
        text, problem = _decode(raw)
        yield path, lineno, text, problem


def _file_doc(path: Path) -> Iterator[_Raw]:
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    bad = data.find(b"\x00")
    if bad >= 0:
        yield path, data.count(b"\n", 0, bad) + 1, "", "holds NUL bytes: not a text file"
        return
    try:
        yield path, 1, data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        yield path, data.count(b"\n", 0, exc.start) + 1, "", "not UTF-8 text"


def _jsonl_docs(path: Path) -> Iterator[_Raw]:
    for _, lineno, line, problem in _line_docs(path):
        if problem is None and not line.strip():
            continue  # blank lines between rows are not rows
        if problem is None:
            try:
                row = parse_json(line)
            except json.JSONDecodeError as exc:
                problem = f"invalid JSON: {exc.msg}"
            except ValueError as exc:
                problem = str(exc)
            else:
                if not isinstance(row, dict):
                    problem = f"row must be an object with a 'text' field, got {type(row).__name__}"
                elif "text" not in row:
                    problem = "missing key 'text'"
                elif not isinstance(row["text"], str):
                    problem = f"'text' must be text, got {type(row['text']).__name__}"
                elif not _encodable(row["text"]):
                    problem = "'text' holds a lone surrogate, not valid Unicode text"
        yield path, lineno, (row["text"] if problem is None else ""), problem


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape
        return False
    return True


def _raw_docs(path: Path, mode: str) -> Iterator[_Raw]:
    if path.suffix.lower() == ".jsonl":
        if mode == "file":
            raise ValueError(f"{path}: mode='file' does not apply to .jsonl (one document per row)")
        return _jsonl_docs(path)
    return _file_doc(path) if mode == "file" else _line_docs(path)


def load_text_corpus(spec: str | Path, mode: str | None = None, min_chars: int = 1,
                     skip_bad: bool = False) -> TextCorpus:
    """Read documents from a .txt / .jsonl file or a directory of .txt files (see the module doc).

    ``mode`` is "line" or "file"; None means "line" for a file and "file" for a directory.
    """
    if mode not in (None, "line", "file"):
        raise ValueError(f"mode must be 'line' or 'file', got {mode!r}")
    if min_chars < 1:
        raise ValueError(f"min_chars must be at least 1, got {min_chars}")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(str(path), None, "no .txt files in the directory")
        mode = mode or "file"
    elif path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise DataError(str(path), None, f"unknown file type '{path.suffix}' "
                            f"(use .txt, .jsonl or a directory of .txt files)")
        files, mode = [path], mode or "line"
    else:
        raise DataError(str(path), None, "file or directory not found")

    docs, skipped = [], []
    for file in files:
        for source, lineno, text, problem in _raw_docs(file, mode):
            if problem is None:
                text = text.strip()
                if not text:
                    problem = "empty document" + (" (blank line)" if mode == "line" else "")
                elif len(text) < min_chars:
                    problem = f"document has {len(text)} characters, fewer than min_chars={min_chars}"
            if problem is not None:
                if not skip_bad:
                    raise DataError(str(source), lineno, problem + " (--skip-bad / skip_bad=True skips such "
                                    "documents)")
                skipped.append(DataError(str(source), lineno, problem))
                continue
            docs.append(text)
    log_skipped(str(path), skipped, "documents")
    if not docs:
        if not skipped:
            raise DataError(str(path), None, "no documents (the file is empty)" if path.is_file() else
                            "no documents (the .txt files are empty)")
        raise DataError(str(path), None, f"no usable documents ({len(skipped)} skipped); the first: {skipped[0]}")
    return TextCorpus(docs, str(path), len(skipped), skipped)


def _token_ids(tokenizer, docs: Sequence[str]) -> list[list[int]]:
    if not docs:
        return []
    return tokenizer(list(docs), add_special_tokens=False)["input_ids"]


def chunk_documents(tokenizer, docs: Sequence[str], max_tokens: int, min_tokens: int = 1) -> list[list[int]]:
    """Split each document's tokens into consecutive chunks of at most ``max_tokens``.

    Chunks never span two documents; a document's last chunk may be shorter and is dropped when it
    has fewer than ``min_tokens`` tokens. No special tokens are added (the caller adds BOS/EOS if its
    objective needs them).
    """
    if max_tokens < 1 or not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}")
    chunks = []
    for ids in _token_ids(tokenizer, docs):
        for start in range(0, len(ids), max_tokens):
            chunk = ids[start:start + max_tokens]
            if len(chunk) >= min_tokens:
                chunks.append(chunk)
    return chunks


def prefix_continuations(tokenizer, docs: Sequence[str], prefix_tokens: int,
                         continuation_tokens: int) -> list[tuple[str, str]]:
    """(prefix, true continuation) text pairs for verbatim-memorisation tests (MUSE's VerbMem,
    arXiv 2407.06460): the model is prompted with a document's first ``prefix_tokens`` tokens and its
    output is compared with the next ``continuation_tokens`` tokens.

    Documents with no token after the prefix are left out; a continuation is shorter when its
    document ends first. Texts are decoded from token slices, so a cut may fall inside a word.
    """
    if prefix_tokens < 1 or continuation_tokens < 1:
        raise ValueError("prefix_tokens and continuation_tokens must be at least 1")
    pairs = []
    for ids in _token_ids(tokenizer, docs):
        if len(ids) <= prefix_tokens:
            continue
        prefix = tokenizer.decode(ids[:prefix_tokens], clean_up_tokenization_spaces=False)
        continuation = tokenizer.decode(ids[prefix_tokens:prefix_tokens + continuation_tokens],
                                        clean_up_tokenization_spaces=False)
        pairs.append((prefix, continuation))
    return pairs


def documents_as_qa(corpus: TextCorpus) -> QADataset:
    """A corpus as rows the training loop takes: an empty question and the document as the answer,
    which ``ChatFormat.encode`` lays out as plain text with every token in the loss. So every method
    whose forget objective reads only the true answer (GA, GradDiff, NPO, SimNPO, RMU, ...) unlearns
    documents, as in MUSE; refusal-target methods need questions and say so."""
    return QADataset([QAExample("", doc, meta={"row": i + 1, "document": True}) for i, doc in enumerate(corpus.docs)],
                     corpus.source, corpus.skipped, list(corpus.skipped_problems))


def is_text_corpus(spec: str | Path) -> bool:
    """Whether a data spec names plain text rather than QA rows: a ``.txt`` file, a directory with
    ``.txt`` files and no QA files, or a ``.jsonl`` file whose first row has ``text`` and no ``question``."""
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() == ".txt":
            return True
        if path.suffix.lower() == ".jsonl":
            with path.open("rb") as fh:
                for line in fh:
                    if line.strip():
                        try:
                            row = parse_json(line.decode("utf-8"))
                        except ValueError:  # invalid JSON or UTF-8: the QA loader reports it with its line
                            return False
                        return isinstance(row, dict) and "text" in row and "question" not in row
        return False
    if path.is_dir():
        has_qa = any(p.suffix.lower() in QA_SUFFIXES for p in path.iterdir() if p.is_file())
        return not has_qa and any(path.rglob("*.txt"))
    return False

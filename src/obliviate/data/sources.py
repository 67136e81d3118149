"""One entry point from a data spec to rows: QA files and splits, or plain-text corpora."""

from __future__ import annotations

from pathlib import Path

from obliviate.data.qa import QADataset, load_qa
from obliviate.data.text import documents_as_qa, is_text_corpus, load_text_corpus

DataSpec = str | Path | QADataset


def as_dataset(data: DataSpec, skip_bad: bool = False) -> QADataset:
    """QA rows from a spec (file, DIR:split, HUB_ID:split); a plain-text corpus (.txt file, directory
    of .txt files, .jsonl with a ``text`` field) becomes document rows (``data.text.documents_as_qa``)."""
    if isinstance(data, QADataset):
        return data
    if is_text_corpus(data):
        return documents_as_qa(load_text_corpus(data, skip_bad=skip_bad))
    return load_qa(data, skip_bad=skip_bad)

"""Property-based tests: whatever bytes, rows or YAML values come in, the loaders and option parsers
give a valid object or a located error (DataError naming the file; ValueError naming the option),
never another exception."""

from __future__ import annotations

import csv
import io
import json
import math
import string
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obliviate.attribution import GuardConfig, WagleConfig
from obliviate.data.qa import DataError, QADataset, load_qa_file
from obliviate.data.synthetic import SyntheticConfig
from obliviate.data.text import TextCorpus, load_text_corpus
from obliviate.methods.unierase import UniEraseOptions
from obliviate.training.config import TrainConfig

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ["question", "answer", "paraphrased_answer", "perturbed_answer", "paraphrased_question", "meta"]

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=3)), max_leaves=8)
# Rows that are mostly QA-shaped, with every field sometimes missing or of another type.
rows = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), st.one_of(st.text(max_size=30), json_values), max_size=6),
    json_values,
)


def _loaded(path: Path, skip_bad: bool) -> QADataset | DataError:
    try:
        ds = load_qa_file(path, skip_bad=skip_bad)
    except DataError as exc:
        assert str(exc).startswith(str(path)), exc  # located: the file first, then line and problem
        return exc
    assert isinstance(ds, QADataset) and len(ds) >= 1
    for ex in ds:  # what a loader accepts can be written out again
        assert isinstance(ex.question, str) and isinstance(ex.answer, str) and ex.answer.strip()
        json.dumps(ex.to_json(), ensure_ascii=False).encode("utf-8")
    return ds


@FAST
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".csv"]), skip_bad=st.booleans())
def test_arbitrary_bytes_give_rows_or_a_located_error(data, suffix, skip_bad):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        path.write_bytes(data)
        _loaded(path, skip_bad)


@FAST
@given(items=st.lists(rows, max_size=6), skip_bad=st.booleans())
def test_arbitrary_jsonl_rows(items, skip_bad):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
        result = _loaded(path, skip_bad)
        if isinstance(result, DataError) and result.line is not None:
            assert 1 <= result.line <= len(items)
        good = [r for r in items if isinstance(r, dict) and all(isinstance(r.get(k), str) and r[k].strip()
                                                                for k in ("question", "answer"))]
        if not good:
            assert isinstance(result, DataError)


@FAST
@given(items=st.lists(rows, max_size=6), wrap=st.booleans(), indent=st.sampled_from([None, 1]))
def test_arbitrary_json_documents(items, wrap, indent):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.json"
        path.write_text(json.dumps({"data": items} if wrap else items, indent=indent), encoding="utf-8")
        result = _loaded(path, skip_bad=False)
        if isinstance(result, DataError) and result.row is not None:
            assert 1 <= result.row <= len(items)


@FAST
@given(table=st.lists(st.lists(st.text(max_size=12), min_size=1, max_size=4), max_size=6),
       header=st.lists(st.sampled_from(FIELDS[:5] + ["x", "question"]), min_size=1, max_size=4))
def test_arbitrary_csv_tables(table, header):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "rows.csv"
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(table)
        path.write_text(buffer.getvalue(), encoding="utf-8", newline="")
        _loaded(path, skip_bad=False)
        _loaded(path, skip_bad=True)


@FAST
@given(docs=st.lists(st.text(max_size=40), max_size=6), mode=st.sampled_from([None, "line", "file"]),
       skip_bad=st.booleans(), min_chars=st.integers(1, 5))
def test_arbitrary_text_corpora(docs, mode, skip_bad, min_chars):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "docs.txt"
        path.write_text("\n".join(docs), encoding="utf-8")
        try:
            corpus = load_text_corpus(path, mode=mode, min_chars=min_chars, skip_bad=skip_bad)
        except DataError as exc:
            assert str(exc).startswith(str(path))
            return
        assert isinstance(corpus, TextCorpus) and all(len(doc) >= min_chars and doc == doc.strip() for doc in corpus)


@FAST
@given(data=st.binary(max_size=200), values=st.lists(json_values, max_size=4),
       suffix=st.sampled_from([".txt", ".jsonl"]))
def test_arbitrary_text_files(data, values, suffix):
    with tempfile.TemporaryDirectory() as d:
        rows_text = "".join(json.dumps({"text": v}) + "\n" for v in values)
        for name, content in (("raw", data), ("rows", rows_text.encode())):
            path = Path(d) / f"{name}{suffix}"
            path.write_bytes(content)
            for skip_bad in (False, True):
                try:
                    corpus = load_text_corpus(path, skip_bad=skip_bad)
                except DataError as exc:
                    assert str(exc).startswith(str(path))
                    continue
                assert all(isinstance(doc, str) and doc.strip() for doc in corpus)


# ---------------------------------------------------------------------------------------------
# Option values as YAML gives them


yaml_scalar_text = st.one_of(
    st.sampled_from(["1e-3", "'1e-3'", ".inf", "-.inf", ".nan", "inf", "nan", "NaN", "true", "no", "null", "~", "0",
                     "-1", "2.5", "8", "'8'", "1_000", "0x10", "[1, 2]", "{a: 1}", "''", "linear", "adamw", "bf16",
                     "tensorboard", "1e400", "99999999999999999999999", "-0.0", "'  3 '", "[4, '5']"]),
    st.integers().map(str),
    st.floats().map(repr),
    st.text(alphabet=string.ascii_letters + string.digits + " .-+_e", max_size=12),
)


def _check_options(cls, text: str) -> None:
    """``text`` as the YAML value of each field of ``cls``: a typed object or a ValueError naming the field."""
    for f in fields(cls):
        try:
            value = yaml.safe_load(f"{f.name}: {text}")[f.name]
        except (yaml.YAMLError, TypeError):
            return  # not YAML at all: the config loader reports it with its line
        try:
            obj = cls.from_dict({f.name: value})
        except ValueError as exc:
            assert f.name in str(exc), (f.name, value, str(exc))  # the option is named
            continue
        typed = getattr(obj, f.name)
        if f.type in ("float", "int"):
            assert isinstance(typed, (int, float)) and not isinstance(typed, bool), (f.name, typed)
            assert math.isfinite(typed) or (cls is GuardConfig and f.name == "tau"), (f.name, typed)
        elif f.type == "bool":
            assert isinstance(typed, bool), (f.name, typed)
        elif f.type == "str":
            assert isinstance(typed, str), (f.name, typed)


@FAST
@given(text=yaml_scalar_text)
def test_train_config_from_any_yaml_value(text):
    _check_options(TrainConfig, text)


@pytest.mark.parametrize("cls", [WagleConfig, GuardConfig, UniEraseOptions, SyntheticConfig])
def test_component_options_from_any_yaml_value(cls):
    @FAST
    @given(text=yaml_scalar_text)
    def check(text):
        _check_options(cls, text)

    check()

"""QA parsing with located errors, templating with answer-only labels, batching."""

from __future__ import annotations

import json

import pytest

from obliviate.data.chat import IGNORE, ChatFormat, length_grouped_batches, pad_batch
from obliviate.data.qa import DataError, load_qa, load_qa_file
from obliviate.models.loading import load_tokenizer


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("row,problem", [
    ({"answer": "x"}, "missing key 'question'"),
    ({"question": "q", "answer": "  "}, "'answer' is empty"),
    ({"question": "q", "answer": 3}, "'answer' must be text, got int"),
    ({"question": "q", "answer": "a", "perturbed_answer": [1]}, "'perturbed_answer' must be a list"),
    ("{not json", "invalid JSON"),
    ([1, 2], "row must be an object"),
])
def test_bad_rows_name_file_line_and_problem(tmp_path, row, problem):
    path = write(tmp_path / "d.jsonl", [{"question": "q1", "answer": "a1"}, "", row])
    with pytest.raises(DataError) as err:
        load_qa_file(path)
    assert err.value.line == 3 and str(path) in str(err.value) and problem in str(err.value)


def test_skip_bad_counts(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"question": "q1", "answer": "a1"}, {"question": "q2"}, {"answer": "x"}])
    ds = load_qa_file(path, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == 2


def test_formats_agree(tmp_path):
    rows = [{"question": "q1", "answer": "a1", "perturbed_answer": ["b", "c"]}, {"question": "q2", "answer": "a2"}]
    write(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text('question,answer,perturbed_answer\nq1,a1,"[""b"", ""c""]"\nq2,a2,\n')
    loaded = [load_qa(tmp_path / f"d.{ext}") for ext in ("jsonl", "json", "csv")]
    for ds in loaded:
        assert [(e.question, e.answer, e.perturbed_answers) for e in ds] == [("q1", "a1", ["b", "c"]), ("q2", "a2", [])]
    with pytest.raises(DataError, match="line 2"):
        (tmp_path / "bad.csv").write_text("question,answer\nq1,\n")
        load_qa(tmp_path / "bad.csv")


def test_directory_split_spec(tmp_path):
    write(tmp_path / "forget.jsonl", [{"question": "q", "answer": "a"}])
    assert len(load_qa(f"{tmp_path}:forget")) == 1
    with pytest.raises(DataError, match="no split 'nope'"):
        load_qa(tmp_path, split="nope")


def test_template_labels_cover_answer_and_end_of_turn_only(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    fmt = ChatFormat(tok, max_length=200)
    enc = fmt.encode("Who is Ana?", "A poet.")
    prompt = fmt.prompt_ids("Who is Ana?")
    assert enc.input_ids[:len(prompt)] == prompt
    assert all(x == IGNORE for x in enc.labels[:len(prompt)])
    assert tok.decode(enc.labels[len(prompt):]) == "A poet.<|im_end|>"
    assert enc.answer_len == len(tok("A poet.", add_special_tokens=False)["input_ids"])
    batch = pad_batch([enc, fmt.encode("Q?", "Yes.")], tok.pad_token_id)
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE).all()
    with pytest.raises(ValueError, match="longer than max_length"):
        ChatFormat(tok, max_length=20).encode("Who is Ana?", "A poet.")


def test_answer_longer_than_context_is_a_located_error(tiny_model_dir, tmp_path):
    from obliviate.data.batches import encode_views
    from obliviate.data.chat import ChatFormat

    path = write(tmp_path / "d.jsonl", [{"question": "q", "answer": "short"}, {"question": "q", "answer": "x" * 500}])
    fmt = ChatFormat(load_tokenizer(str(tiny_model_dir)), max_length=100)
    with pytest.raises(DataError, match=r"d.jsonl, line 2: .*longer than max_length"):
        encode_views(fmt, load_qa(path), ("answer",))


def test_length_grouped_batches_partition_and_group():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = length_grouped_batches(lengths, 2, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert all(abs(lengths[b[0]] - lengths[b[-1]]) <= 3 for b in batches)
    assert batches == length_grouped_batches(lengths, 2, seed=1)

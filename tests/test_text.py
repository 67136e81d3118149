"""Plain-text corpora: the three source kinds, located errors, token chunks and VerbMem prefixes."""

import json
import math

import pytest

from obliviate.data.qa import DataError
from obliviate.data.text import chunk_documents, load_text_corpus, prefix_continuations
from obliviate.models.tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()  # one token per byte: token counts are character counts for ASCII


def test_txt_lines_are_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst document.\r\n  Second one  \nThird\n")
    corpus = load_text_corpus(path)
    assert corpus.docs == ["First document.", "Second one", "Third"]
    assert len(corpus) == 3 and corpus.source == str(path) and corpus.skipped == 0
    assert load_text_corpus(path, mode="file").docs == ["First document.\r\n  Second one  \nThird"]


def test_blank_line_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo\n\nfour\n")
    with pytest.raises(DataError) as err:
        load_text_corpus(path)
    assert err.value.source == str(path) and err.value.line == 3 and "empty document" in err.value.problem
    corpus = load_text_corpus(path, skip_bad=True)
    assert corpus.docs == ["one", "two", "four"] and corpus.skipped == 1


def test_min_chars(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("a long enough line\nshort\n")
    with pytest.raises(DataError, match=r"c.txt, line 2: document has 5 characters, fewer than min_chars=6"):
        load_text_corpus(path, min_chars=6)
    assert load_text_corpus(path, min_chars=5).docs == ["a long enough line", "short"]


def test_non_text_lines_are_located(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"fine\nbad \xff byte\nalso fine\n")
    with pytest.raises(DataError, match=r"c.txt, line 2: not UTF-8"):
        load_text_corpus(path)
    assert load_text_corpus(path, skip_bad=True).docs == ["fine", "also fine"]
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"ok\nok\n\x00\x01\x02")
    with pytest.raises(DataError, match=r"b.txt, line 3: holds NUL bytes"):
        load_text_corpus(binary, mode="file")


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "Doc one.", "id": 1}, {"text": " Doc two. "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_text_corpus(path).docs == ["Doc one.", "Doc two."]
    with pytest.raises(ValueError, match="mode='file'"):
        load_text_corpus(path, mode="file")


@pytest.mark.parametrize("line, problem", [
    ('{"txt": "x"}', "missing key 'text'"),
    ('{"text": 5}', "'text' must be text, got int"),
    ('["x"]', "row must be an object"),
    ('{"text": ', "invalid JSON"),
    ('{"text": "   "}', "empty document"),
])
def test_bad_jsonl_rows_are_located(tmp_path, line, problem):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "good"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_text_corpus(path)
    assert err.value.source == str(path) and err.value.line == 2 and problem in err.value.problem
    corpus = load_text_corpus(path, skip_bad=True)
    assert corpus.docs == ["good"] and corpus.skipped == 1


def test_directory_of_txt_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Bee file.\nSecond line.\n")
    (tmp_path / "a.txt").write_text("Aye file.\n")
    (tmp_path / "sub" / "c.txt").write_text("Sea file.")
    (tmp_path / "ignored.md").write_text("not a corpus file")
    assert load_text_corpus(tmp_path).docs == ["Aye file.", "Bee file.\nSecond line.", "Sea file."]
    assert load_text_corpus(tmp_path, mode="line").docs == ["Aye file.", "Bee file.", "Second line.", "Sea file."]
    (tmp_path / "sub" / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match=r"empty.txt, line 1: empty document"):
        load_text_corpus(tmp_path)


def test_bad_specs(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_text_corpus(tmp_path / "missing.txt")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        load_text_corpus(tmp_path / "x.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_text_corpus(tmp_path / "empty_dir")
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"no usable documents \(2 skipped\)"):
        load_text_corpus(tmp_path / "blank.txt", skip_bad=True)
    with pytest.raises(ValueError, match="mode"):
        load_text_corpus(tmp_path / "blank.txt", mode="paragraph")


def test_chunk_documents(tok):
    docs = ["x" * 23, "short", "y" * 10]
    chunks = chunk_documents(tok, docs, max_tokens=10)
    # Reference: each document's ids cut every 10 tokens, documents never mixed.
    expected = []
    for doc in docs:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        expected += [ids[i * 10:(i + 1) * 10] for i in range(math.ceil(len(ids) / 10))]
    assert chunks == expected
    assert [len(c) for c in chunks] == [10, 10, 3, 5, 10]
    assert [len(c) for c in chunk_documents(tok, docs, max_tokens=10, min_tokens=4)] == [10, 10, 5, 10]
    assert tok.decode([t for c in chunks[:3] for t in c]) == docs[0]
    with pytest.raises(ValueError):
        chunk_documents(tok, docs, max_tokens=0)


def test_prefix_continuations(tok):
    docs = ["The quick brown fox jumps over the lazy dog.", "Tiny", "Exactly8"]
    pairs = prefix_continuations(tok, docs, prefix_tokens=8, continuation_tokens=12)
    # Byte-level tokenizer on ASCII text: token i is character i.
    assert pairs == [(docs[0][:8], docs[0][8:20])]
    tail = prefix_continuations(tok, ["0123456789"], prefix_tokens=6, continuation_tokens=50)
    assert tail == [("012345", "6789")]


# ---------------------------------------------------------------------------------------------
# unlearning plain-text documents (MUSE-style forget corpora)

def test_document_rows_are_plain_text_with_every_token_in_the_loss(tok):
    from obliviate.data.chat import IGNORE, ChatFormat

    fmt = ChatFormat(tok, max_length=16)
    enc = fmt.encode("", "Hello world")
    ids = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == [tok.bos_token_id] + ids  # no chat template, no end-of-turn
    assert enc.labels == [IGNORE] + ids and enc.answer_start == 1 and enc.answer_len == len(ids)
    with pytest.raises(ValueError, match="document is 21 tokens, longer than max_length 16"):
        fmt.encode("", "x" * 20)


def test_text_specs_are_told_from_qa_specs(tmp_path):
    from obliviate.data.text import is_text_corpus

    (tmp_path / "c.txt").write_text("a doc\n")
    (tmp_path / "t.jsonl").write_text('\n{"text": "a doc"}\n')
    (tmp_path / "q.jsonl").write_text('{"question": "q?", "answer": "a", "text": "x"}\n')
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "one.txt").write_text("a doc")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "forget.jsonl").write_text('{"question": "q?", "answer": "a"}\n')
    (tmp_path / "bench" / "notes.txt").write_text("not a corpus: the folder holds QA splits")
    assert [is_text_corpus(tmp_path / n) for n in ("c.txt", "t.jsonl", "docs")] == [True, True, True]
    assert [is_text_corpus(tmp_path / n) for n in ("q.jsonl", "bench", "missing.txt")] == [False, False, False]


def test_unlearning_a_text_corpus_raises_its_loss_and_refusal_methods_refuse(tmp_path, tiny_model_dir):
    from obliviate import api
    from obliviate.data.chat import ChatFormat
    from obliviate.data.qa import DataError
    from obliviate.evaluation.logprobs import score_pairs
    from obliviate.models.loading import load_model, load_tokenizer

    docs = ["The lighthouse keeper Orla Finch logs every storm in green ink.",
            "Orla Finch was born on the island of Vessa in a year of no winter.",
            "Her ledger of storms is kept in a tin box under the lamp room stairs.",
            "Every spring Orla Finch repaints the lighthouse door a darker green."]
    (tmp_path / "forget.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps({"text": f"Plain retained sentence number {i}."}) + "\n"
                                                   for i in range(4)))
    tok = load_tokenizer(str(tiny_model_dir))
    fmt = ChatFormat(tok)

    def nll(path):
        return sum(s.nll for s in score_pairs(load_model(str(path)), fmt, [("", d) for d in docs])) / len(docs)

    out = api.unlearn(str(tiny_model_dir), tmp_path / "forget.txt", tmp_path / "retain.jsonl", tmp_path / "run",
                      method="graddiff", train={"max_steps": 4, "lr": 3e-3, "batch_size": 2}, progress=False)
    assert nll(out) > nll(tiny_model_dir) + 0.1
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["forget"]["n"] == len(docs) and data["retain"]["n"] == 4
    with pytest.raises(DataError, match=r"forget.txt, line 1: this method's 'idk' view needs questions"):
        api.unlearn(str(tiny_model_dir), tmp_path / "forget.txt", tmp_path / "retain.jsonl", tmp_path / "run2",
                    method="idk_nll", train={"max_steps": 1}, progress=False)

"""The synthetic benchmark: determinism, split sizes and disjointness, perturbed answers, exposure candidates."""

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from obliviate.data.qa import load_qa_file
from obliviate.data.synthetic import (
    ATTRIBUTE_BY_NAME,
    CANARY_BY_NAME,
    PATTERN_CHARS,
    SyntheticConfig,
    generate_benchmark,
    write_benchmark,
)
from obliviate.data.world_facts import real_authors, world_facts

ENTITY_SPLITS = ("full", "forget", "retain", "holdout", "forget_perturbed", "retain_perturbed",
                 "id_forget", "ood_forget")


@pytest.fixture(scope="module")
def demo():
    return generate_benchmark(SyntheticConfig())


@pytest.fixture(scope="module")
def mid_config():
    return SyntheticConfig(n_entities=30, facts_per_entity=6, forget_fraction=0.2, seed=7,
                           retain_perturbed_entities=5, id_facts_per_entity=3, ood_facts_per_entity=2,
                           n_candidates=40)


@pytest.fixture(scope="module")
def mid(mid_config):
    return generate_benchmark(mid_config)


def fill(template: str, name: str, text: str) -> str | None:
    """The value that makes ``template`` (with ``{name}`` and ``{value}``) produce ``text``, or None."""
    head, tail = template.split("{value}")
    head, tail = head.format(name=name), tail.format(name=name)
    if text.startswith(head) and text.endswith(tail) and len(text) > len(head) + len(tail):
        return text[len(head):len(text) - len(tail)]
    return None


def entities_of(rows) -> set[str]:
    return {r.meta["entity"] for r in rows}


def files_digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = write_benchmark(generate_benchmark(SyntheticConfig(seed=3)), tmp_path / "a", SyntheticConfig(seed=3))
    b = write_benchmark(generate_benchmark(SyntheticConfig(seed=3)), tmp_path / "b", SyntheticConfig(seed=3))
    c = write_benchmark(generate_benchmark(SyntheticConfig(seed=4)), tmp_path / "c", SyntheticConfig(seed=4))
    assert files_digest(a) == files_digest(b)
    digest_c = files_digest(c)
    for split in ENTITY_SPLITS:
        assert files_digest(a)[f"{split}.jsonl"] != digest_c[f"{split}.jsonl"]


def test_generation_does_not_depend_on_the_process_hash_seed(tmp_path):
    code = ("import hashlib,json;from obliviate.data.synthetic import *;"
            "s=generate_benchmark(SyntheticConfig(seed=5));"
            "print(hashlib.sha256(json.dumps({k:[e.to_json() for e in v] for k,v in s.items()}).encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    here = generate_benchmark(SyntheticConfig(seed=5))
    expected = hashlib.sha256(json.dumps({k: [e.to_json() for e in v] for k, v in here.items()}).encode()).hexdigest()
    assert out == expected


@pytest.mark.parametrize("name", ["demo", "mid"])
def test_split_sizes_and_disjointness(name, demo, mid, mid_config):
    splits, config = (demo, SyntheticConfig()) if name == "demo" else (mid, mid_config)
    n_forget = max(1, int(config.forget_fraction * config.n_entities + 0.5))
    k = config.facts_per_entity
    assert len(splits["full"]) == config.n_entities * k
    assert len(splits["forget"]) == n_forget * k
    assert len(splits["retain"]) == (config.n_entities - n_forget) * k
    assert len(splits["holdout"]) == len(splits["forget"])
    assert len(entities_of(splits["full"])) == config.n_entities
    assert len(entities_of(splits["forget"])) == n_forget
    assert len(entities_of(splits["holdout"])) == n_forget

    full_q = Counter(r.question for r in splits["full"])
    assert max(full_q.values()) == 1  # every question names its entity: no duplicates
    forget_q, retain_q = {r.question for r in splits["forget"]}, {r.question for r in splits["retain"]}
    assert not forget_q & retain_q and forget_q | retain_q == set(full_q)
    assert not entities_of(splits["forget"]) & entities_of(splits["retain"])
    assert not entities_of(splits["holdout"]) & entities_of(splits["full"])
    assert not {r.question for r in splits["holdout"]} & set(full_q)
    # Plain (trained) splits carry question and answer only (plus meta), as TOFU's do; the holdout is
    # only ever evaluated, so it carries the forget rows' paraphrased and perturbed answers.
    for split in ("full", "forget", "retain"):
        for r in splits[split]:
            assert r.paraphrased_answer is None and not r.perturbed_answers and r.paraphrased_question is None
    # Each entity contributes facts on distinct attributes.
    for split in ("full", "holdout"):
        per_entity = Counter((r.meta["entity"], r.meta["attribute"]) for r in splits[split])
        assert set(per_entity.values()) == {1}


@pytest.mark.parametrize("n_entities, fraction, expected", [(5, 0.1, 1), (20, 0.1, 2), (25, 0.1, 3),
                                                            (10, 0.01, 1), (200, 0.05, 10)])
def test_forget_count_is_rounded_and_at_least_one(n_entities, fraction, expected):
    config = SyntheticConfig(n_entities=n_entities, forget_fraction=fraction, facts_per_entity=1)
    splits = generate_benchmark(config)
    assert config.n_forget == expected
    assert len(entities_of(splits["forget"])) == expected


def test_entities_do_not_change_with_the_forget_fraction():
    a = generate_benchmark(SyntheticConfig(forget_fraction=0.1))
    b = generate_benchmark(SyntheticConfig(forget_fraction=0.3))
    assert [r.to_json() for r in a["full"]] == [r.to_json() for r in b["full"]]
    assert set(entities_of(a["forget"])) != set(entities_of(b["forget"]))


def check_fact_row(r, n_perturbed):
    attr = ATTRIBUTE_BY_NAME[r.meta["attribute"]]
    t = attr.templates[r.meta["template"]]
    name, value = r.meta["entity_name"], r.meta["value"]
    assert r.question == t.question.format(name=name)
    assert r.paraphrased_question == t.paraphrased_question.format(name=name)
    assert fill(t.answer, name, r.answer) == value
    assert fill(t.paraphrased_answer, name, r.paraphrased_answer) == value
    assert value in attr.values
    assert len(r.perturbed_answers) == n_perturbed
    assert len(set(r.perturbed_answers)) == n_perturbed
    for wrong in r.perturbed_answers:
        assert wrong not in (r.answer, r.paraphrased_answer)
        wrong_value = fill(t.paraphrased_answer, name, wrong)  # same template, another value of the pool
        assert wrong_value is not None and wrong_value != value and wrong_value in attr.values


@pytest.mark.parametrize("name", ["demo", "mid"])
def test_perturbed_splits_keep_the_template_and_change_the_value(name, demo, mid, mid_config):
    splits, config = (demo, SyntheticConfig()) if name == "demo" else (mid, mid_config)
    assert [r.question for r in splits["forget_perturbed"]] == [r.question for r in splits["forget"]]
    assert [r.answer for r in splits["forget_perturbed"]] == [r.answer for r in splits["forget"]]
    for split in ("forget_perturbed", "retain_perturbed", "id_forget", "holdout"):
        for r in splits[split]:
            check_fact_row(r, config.n_perturbed)
    for r in splits["full"] + splits["holdout"]:
        attr = ATTRIBUTE_BY_NAME[r.meta["attribute"]]
        assert fill(attr.templates[r.meta["template"]].answer, r.meta["entity_name"], r.answer) == r.meta["value"]


def test_retain_perturbed_is_the_chosen_subset_of_retain(demo, mid, mid_config):
    assert [r.question for r in demo["retain_perturbed"]] == [r.question for r in demo["retain"]]
    chosen = entities_of(mid["retain_perturbed"])
    assert len(chosen) == mid_config.retain_perturbed_entities and chosen <= entities_of(mid["retain"])
    expected = [r.question for r in mid["retain"] if r.meta["entity"] in chosen]
    assert [r.question for r in mid["retain_perturbed"]] == expected


def check_candidates(r, n_candidates):
    candidates = r.meta["candidates"]
    assert len(candidates) == n_candidates
    assert len(set(candidates)) == n_candidates
    assert candidates.count(r.answer) == 1


def test_id_forget_rows_are_new_facts_about_forget_entities(mid, mid_config):
    rows = mid["id_forget"]
    forget_entities = entities_of(mid["forget"])
    assert len(rows) == len(forget_entities) * mid_config.id_facts_per_entity
    assert entities_of(rows) == forget_entities
    trained = {(r.meta["entity"], r.meta["attribute"]) for r in mid["full"]}
    assert not {(r.meta["entity"], r.meta["attribute"]) for r in rows} & trained
    assert not {r.question for r in rows} & {r.question for r in mid["full"]}
    positions = set()
    for r in rows:
        assert r.meta["kind"] == "id"
        check_candidates(r, mid_config.n_candidates)
        attr = ATTRIBUTE_BY_NAME[r.meta["attribute"]]
        t = attr.templates[r.meta["template"]]
        # Same format: the answer template with values of the attribute's pool.
        values = [fill(t.answer, r.meta["entity_name"], c) for c in r.meta["candidates"]]
        assert all(v in attr.values for v in values)
        positions.add(r.meta["candidates"].index(r.answer))
    assert len(positions) > 1  # shuffled: the true answer's position carries no signal


def test_ood_forget_rows_are_random_string_canaries(mid, mid_config):
    rows = mid["ood_forget"]
    assert len(rows) == len(entities_of(mid["forget"])) * mid_config.ood_facts_per_entity
    assert entities_of(rows) == entities_of(mid["forget"])
    for r in rows:
        assert r.meta["kind"] == "ood"
        canary = CANARY_BY_NAME[r.meta["attribute"]]
        name, value = r.meta["entity_name"], r.meta["value"]
        assert fill(canary.template.answer, name, r.answer) == value
        check_candidates(r, mid_config.n_candidates)
        assert len({len(c) for c in r.meta["candidates"]}) == 1
        for c in r.meta["candidates"]:
            code = fill(canary.template.answer, name, c)
            assert len(code) == len(canary.pattern)
            for ch, p in zip(code, canary.pattern):
                assert ch in PATTERN_CHARS[p] if p in PATTERN_CHARS else ch == p
        assert len(set(r.perturbed_answers)) == mid_config.n_perturbed
        for wrong in r.perturbed_answers:
            wrong_code = fill(canary.template.paraphrased_answer, name, wrong)
            assert wrong_code != value and len(wrong_code) == len(value)


def test_every_entity_row_has_meta(demo):
    for split in ENTITY_SPLITS:
        for r in demo[split]:
            assert {"entity", "attribute", "template", "kind", "value", "entity_name"} <= set(r.meta)
            assert r.meta["kind"] == {"id_forget": "id", "ood_forget": "ood"}.get(split, "regular")


def test_no_id_or_ood_split_when_disabled():
    splits = generate_benchmark(SyntheticConfig(id_facts_per_entity=0, ood_facts_per_entity=0))
    assert "id_forget" not in splits and "ood_forget" not in splits


def test_tofu_size_preset_and_short_answers():
    config = SyntheticConfig.preset("tofu-size")
    splits = generate_benchmark(config)
    sizes = {k: len(splits[k]) for k in ("full", "forget", "retain", "holdout", "forget_perturbed",
                                         "retain_perturbed")}
    assert sizes == {"full": 4000, "forget": 400, "retain": 3600, "holdout": 400, "forget_perturbed": 400,
                     "retain_perturbed": 400}
    words = [len(t.split()) for r in splits["full"] + splits["forget_perturbed"]
             for t in [r.answer, r.paraphrased_answer or r.answer, *r.perturbed_answers]]
    assert max(words) <= 15
    assert SyntheticConfig.preset("tofu-size", seed=2).seed == 2
    with pytest.raises(ValueError, match="unknown preset"):
        SyntheticConfig.preset("huge")


@pytest.mark.parametrize("kwargs, message", [
    ({"facts_per_entity": 24}, "exceeds the 24 attributes"),
    ({"forget_fraction": 0.0}, "forget_fraction"),
    ({"n_entities": 2, "forget_fraction": 0.9}, "leaves no retain entity"),
    ({"n_candidates": 100000}, "lower n_candidates"),
    ({"retain_perturbed_entities": 19}, "retain_perturbed_entities"),
    ({"n_perturbed": 0}, "n_perturbed"),
    ({"ood_facts_per_entity": 9}, "ood_facts_per_entity"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**kwargs)


@pytest.mark.parametrize("rows, n", [(world_facts(), 30), (real_authors(), 25)])
def test_utility_sets_are_well_formed(rows, n, demo):
    assert len(rows) >= n
    assert len({r.question for r in rows}) == len(rows)
    for r in rows:
        assert len(r.perturbed_answers) == 3 and len(set(r.perturbed_answers)) == 3
        assert r.answer not in r.perturbed_answers
        assert len(r.answer.split()) <= 6
    assert [r.question for r in demo["world_facts_perturbed"]] == [r.question for r in world_facts()]
    assert [r.question for r in demo["real_authors_perturbed"]] == [r.question for r in real_authors()]


def test_written_files_round_trip_through_the_qa_loader(tmp_path, mid, mid_config):
    directory = write_benchmark(mid, tmp_path / "bench", mid_config)
    manifest = json.loads((directory / "benchmark.json").read_text())
    assert manifest["config"]["seed"] == 7 and manifest["roles"]["train"] == "full"
    for split, rows in mid.items():
        loaded = load_qa_file(directory / f"{split}.jsonl")
        assert manifest["splits"][split]["rows"] == len(rows)
        assert [e.question for e in loaded] == [e.question for e in rows]
        assert [e.perturbed_answers for e in loaded] == [e.perturbed_answers for e in rows]
        assert [e.meta.get("candidates") for e in loaded] == [e.meta.get("candidates") for e in rows]


def test_write_refuses_a_non_empty_directory(tmp_path, demo):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_benchmark(demo, other)
    with pytest.raises(FileExistsError, match="not a benchmark"):
        write_benchmark(demo, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"

    directory = write_benchmark(demo, tmp_path / "bench")
    before = files_digest(directory)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_benchmark(generate_benchmark(SyntheticConfig(seed=9)), directory, SyntheticConfig(seed=9))
    assert files_digest(directory) == before
    smaller = SyntheticConfig(seed=9, id_facts_per_entity=0)
    write_benchmark(generate_benchmark(smaller), directory, smaller, overwrite=True)
    assert not (directory / "id_forget.jsonl").exists()  # the old benchmark's files are replaced
    assert json.loads((directory / "benchmark.json").read_text())["seed"] == 9

"""Benchmarks: manifest round trip, TOFU-layout roles, hub errors, located errors for bad manifests."""

import hashlib
import json
from pathlib import Path

import pytest

from obliviate.data.benchmark import ROLES, load_benchmark, tofu_roles, write_benchmark_dir
from obliviate.data.qa import DataError, QAExample, write_qa_jsonl
from obliviate.data.synthetic import SPLIT_ROLES, SyntheticConfig, generate_benchmark, write_benchmark

TOFU = Path("/work/shared/benchmarks/tofu")


@pytest.fixture(scope="module")
def config():
    return SyntheticConfig(n_entities=10, facts_per_entity=3, forget_fraction=0.2, seed=11, n_candidates=20)


@pytest.fixture(scope="module")
def splits(config):
    return generate_benchmark(config)


@pytest.fixture()
def bench_dir(tmp_path, splits, config):
    return write_benchmark(splits, tmp_path / "bench", config)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_round_trip(bench_dir, splits, config):
    bench = load_benchmark(bench_dir)
    assert bench.name == config.name and bench.info["seed"] == config.seed
    assert bench.info["config"]["n_entities"] == config.n_entities
    assert set(bench.roles) == set(ROLES)
    for role, split in SPLIT_ROLES.items():
        assert bench.has(role)
        rows = bench.split(role)
        assert [e.question for e in rows] == [e.question for e in splits[split]]
        assert [e.answer for e in rows] == [e.answer for e in splits[split]]
        assert bench.fingerprint(role) == sha256(bench_dir / f"{split}.jsonl")
    assert bench.split("forget") is bench.split("forget")  # cached
    assert bench.split("eval_forget").has_truth_ratio_fields
    assert load_benchmark(bench_dir / "benchmark.json").roles == bench.roles
    assert bench.describe()["files"]["train"].endswith("full.jsonl")


def test_fingerprint_without_loading_and_split_is_lazy(bench_dir):
    bench = load_benchmark(bench_dir)
    assert bench.fingerprint("retain") == sha256(bench_dir / "retain.jsonl")
    assert not bench._splits  # nothing parsed yet


def test_missing_and_unknown_roles(tmp_path):
    config = SyntheticConfig(n_entities=6, facts_per_entity=2, id_facts_per_entity=0, ood_facts_per_entity=0)
    bench = load_benchmark(write_benchmark(generate_benchmark(config), tmp_path / "b", config))
    assert not bench.has("id_forget") and not bench.has("ood_forget")
    with pytest.raises(DataError, match="no 'id_forget' split"):
        bench.split("id_forget")
    with pytest.raises(DataError, match="unknown role 'forget_set'"):
        bench.split("forget_set")


def test_a_changed_split_file_is_detected(bench_dir):
    path = bench_dir / "forget.jsonl"
    path.write_text(path.read_text() + '{"question": "Who?", "answer": "Someone."}\n')
    bench = load_benchmark(bench_dir)
    with pytest.raises(DataError, match="changed since benchmark.json") as err:
        bench.split("forget")
    assert "forget.jsonl" in str(err.value)
    assert bench.fingerprint("forget") == sha256(path)  # the fingerprint is of the bytes as they are


def test_a_missing_split_file_is_reported_at_load(bench_dir):
    (bench_dir / "holdout.jsonl").unlink()
    with pytest.raises(DataError, match="role 'holdout'.*holdout.jsonl not found"):
        load_benchmark(bench_dir)


@pytest.mark.parametrize("manifest, message", [
    ('{"roles": {"train": "full",\n "forget": }', "line 2"),
    ('{"name": "x"}', "'roles'"),
    ('{"roles": {"train": "full", "forget": "forget"}}', "missing required role.*retain"),
    ('{"roles": {"train": "full", "forget": "forget", "retain": "retain", "oracle": "retain"}}',
     "unknown role 'oracle'"),
    ('{"roles": {"train": "full", "forget": "forget", "retain": "../retain"}}', "plain name"),
    ('{"roles": {"train": "full", "forget": "forget", "retain": "retain"},'
     ' "splits": {"retain": {"file": "../elsewhere.jsonl"}}}', "inside the directory"),
])
def test_bad_manifests_are_located(bench_dir, manifest, message):
    (bench_dir / "benchmark.json").write_text(manifest)
    with pytest.raises(DataError, match=message) as err:
        load_benchmark(bench_dir)
    assert "benchmark.json" in str(err.value)


def test_a_manifest_without_splits_section_finds_files_by_name(bench_dir):
    (bench_dir / "benchmark.json").write_text(json.dumps({"roles": {"train": "full", "forget": "forget",
                                                                    "retain": "retain"}}))
    bench = load_benchmark(bench_dir)
    assert bench.name == "bench" and len(bench.split("train")) == 30 and not bench.has("holdout")


def write_tofu_like(directory: Path, splits: dict[str, list[QAExample]]) -> None:
    for name, rows in splits.items():
        write_qa_jsonl(rows, directory / f"{name}.jsonl")


def test_tofu_layout_directory_roles(tmp_path, splits):
    d = tmp_path / "tofu"
    write_tofu_like(d, {"full": splits["full"], "forget10": splits["forget"], "retain90": splits["retain"],
                        "forget10_perturbed": splits["forget_perturbed"],
                        "retain_perturbed": splits["retain_perturbed"]})
    bench = load_benchmark(d)
    assert bench.roles == {"train": "full", "forget": "forget10", "retain": "retain90",
                           "eval_forget": "forget10_perturbed", "eval_retain": "retain_perturbed"}
    assert not bench.has("holdout") and not bench.has("eval_world_facts")
    assert len(bench.split("forget")) == len(splits["forget"])
    with pytest.raises(DataError, match=r"missing forget \(forget05\), retain \(retain95\).*splits here: .*forget10"):
        load_benchmark(d, forget_split="forget05")
    with pytest.raises(DataError, match="forget01, forget05 or forget10"):
        load_benchmark(d, forget_split="forget7")


def test_tofu_role_names():
    assert tofu_roles("forget01")["retain"] == "retain99" and tofu_roles("forget01")["holdout"] == "holdout01"
    assert tofu_roles("forget05")["eval_forget"] == "forget05_perturbed"
    assert tofu_roles()["retain"] == "retain90"


@pytest.mark.skipif(not TOFU.is_dir(), reason="no local TOFU copy")
def test_real_tofu_directory():
    bench = load_benchmark(TOFU, forget_split="forget10")
    assert set(bench.roles) == set(ROLES) - {"id_forget", "ood_forget"}
    full = [e.question for e in bench.split("train")]
    forget = [e.question for e in bench.split("forget")]
    retain = [e.question for e in bench.split("retain")]
    assert (len(full), len(forget), len(retain)) == (4000, 400, 3600)
    assert sorted(forget + retain) == sorted(full)
    assert bench.split("eval_forget").has_truth_ratio_fields
    assert [e.question for e in bench.split("eval_forget")] == forget
    sums = dict(reversed(line.split()) for line in (TOFU / "SHA256SUMS").read_text().splitlines() if line.strip())
    for role in ("train", "forget", "retain", "eval_world_facts"):
        assert bench.fingerprint(role) == sums[f"{bench.roles[role]}.jsonl"]
    small = load_benchmark(TOFU, forget_split="forget01")
    assert small.roles["retain"] == "retain99" and small.roles["holdout"] == "holdout01"


def test_hub_benchmark_is_lazy_and_its_errors_are_clear(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    bench = load_benchmark("locuslab/TOFU", forget_split="forget05")  # no network needed yet
    assert bench.has("eval_world_facts") and bench.roles["retain"] == "retain95"
    with pytest.raises(DataError) as err:
        bench.split("forget")
    text = str(err.value)
    assert "locuslab/TOFU" in text and "forget05" in text and "hub" in text and "local" in text


def test_unknown_specs_are_refused(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_benchmark(tmp_path / "nowhere")
    file = tmp_path / "rows.jsonl"
    file.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match="not a file"):
        load_benchmark(file)


def test_write_benchmark_dir_checks_its_input(tmp_path):
    rows = [QAExample("q?", "a.")]
    with pytest.raises(ValueError, match="not among the splits"):
        write_benchmark_dir({"full": rows}, tmp_path / "a", {"train": "full", "forget": "f", "retain": "full"},
                            name="x")
    with pytest.raises(ValueError, match="split 'f' is empty"):
        write_benchmark_dir({"full": rows, "f": []}, tmp_path / "b", {"train": "full", "forget": "f",
                                                                       "retain": "full"}, name="x")
    with pytest.raises(DataError, match="missing required role"):
        write_benchmark_dir({"full": rows}, tmp_path / "c", {"train": "full"}, name="x")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

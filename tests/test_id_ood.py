"""The in- vs out-of-distribution study: end to end on a tiny model and benchmark, with steps to forget
re-derived from the logged curves; the analysis helpers by hand."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from obliviate.data.qa import DataError
from obliviate.data.synthetic import SyntheticConfig, generate_benchmark, write_benchmark
from obliviate.studies.id_ood import (
    GROUPS,
    IdOodConfig,
    _median_split,
    censored_median,
    finding,
    run_id_ood,
    steps_to_reach,
    summary_table,
)


@pytest.fixture(scope="module")
def study(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("idood")
    bcfg = SyntheticConfig(n_entities=4, facts_per_entity=2, forget_fraction=0.5, id_facts_per_entity=1,
                           ood_facts_per_entity=1, n_candidates=8)
    bench = write_benchmark(generate_benchmark(bcfg), root / "bench", bcfg)
    cfg = IdOodConfig(model=str(tiny_model_dir), finetune={"epochs": 10, "lr": 3e-3, "batch_size": 4},
                      unlearn_lr=1e-3, unlearn_steps=4, eval_every=2, retain_eval=4, max_new_tokens=8)
    result = run_id_ood(bench, root / "study", cfg, progress=False, echo=lambda *a: None)
    return root / "study", result, cfg


def test_outputs_and_structure(study):
    out, result, cfg = study
    for name in ("id_ood.json", "id_ood.csv", "id_ood_examples.csv", "steps_to_forget.png", "utility_at_forget.png",
                 "curves.png", "curves/id_forget-ga.json", "curves/ood_forget-graddiff.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "status.json").read_text())["status"] == "done"
    assert (out / "steps_to_forget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Target trained on full + both sets; each oracle on the target's data without its set.
    n_full = json.loads((out / "target" / "data.json").read_text())["train"]["n"]
    n_id, n_ood = (sum(r["set"] == s for r in result["examples"]) for s in ("id_forget", "ood_forget"))
    assert n_id == 2 and n_ood == 2
    assert json.loads((out / "oracle-id_forget" / "data.json").read_text())["train"]["n"] == n_full - n_id
    assert json.loads((out / "oracle-ood_forget" / "data.json").read_text())["train"]["n"] == n_full - n_ood

    table = list(csv.DictReader((out / "id_ood.csv").open()))
    assert len(table) == len(result["table"]) == 2 * 2 * len(GROUPS)
    assert {(r["set"], r["method"], r["group"]) for r in table} == {
        (s, m, g) for s in ("id_forget", "ood_forget") for m in ("ga", "graddiff") for g in GROUPS}
    assert len(list(csv.DictReader((out / "id_ood_examples.csv").open()))) == (n_id + n_ood) * 2
    assert set(result["finding"]) == {"ga", "graddiff"}
    for s in ("id_forget", "ood_forget"):
        for m in ("ga", "graddiff"):
            c = result["curves"][s][m]
            assert c["steps"] == [0, 2, 4]
            assert json.loads((out / f"curves/{s}-{m}.json").read_text()) == c
            assert c["exposure"][0] == result["target"][s]["exposure"]  # step 0 is the target


def test_steps_to_forget_follow_the_logged_curves(study):
    _, result, _ = study
    for rec in result["examples"]:
        s, i = rec["set"], rec["index"]
        oracle = result["oracle_points"][s]
        assert rec["oracle_exposure"] == oracle["exposure"][i]
        assert rec["memorised"] == (rec["target_exposure"] > rec["oracle_exposure"])
        for m, entry in rec["methods"].items():
            c = result["curves"][s][m]
            for key in ("exposure", "rouge"):
                expected = None
                for j, step in enumerate(c["steps"]):
                    if c[key][j][i] <= oracle[key][i]:
                        expected = step
                        break
                assert entry[f"steps_{key}"] == expected, (s, i, m, key)
                if expected is None:
                    assert entry[f"retain_probability_at_{key}"] is None
                else:
                    j = c["steps"].index(expected)
                    assert entry[f"retain_probability_at_{key}"] == c["retain_probability"][j]
                    assert entry[f"retain_rouge_at_{key}"] == c["retain_rouge"][j]
                    assert all(c[key][jj][i] > oracle[key][i] for jj in range(j))
    # The table's "all" rows aggregate the memorised examples' steps.
    for row in result["table"]:
        if row["group"] != "all":
            continue
        steps = [r["methods"][row["method"]]["steps_exposure"] for r in result["examples"]
                 if r["set"] == row["set"] and r["memorised"]]
        done = [x for x in steps if x is not None]
        assert row["n_memorised_exposure"] == len(steps)
        assert row["median_steps_forgotten_exposure"] == (float(np.median(done)) if done else None)
        slow = sorted(x if x is not None else float("inf") for x in steps)
        median = float(np.median(slow)) if slow else None
        assert row["median_steps_exposure"] == (median if median is not None and median != float("inf") else None)


def test_censored_median_by_hand():
    assert censored_median([10, None, 30]) == 30.0  # None sorts last: [10, 30, inf]
    assert censored_median([10, None]) == np.inf
    assert censored_median([None, 20, 10, 40]) == 30.0
    assert censored_median([]) is None


def test_steps_to_reach_and_groups_by_hand():
    assert steps_to_reach([0, 5, 10, 15], [3.0, 2.5, 1.0, 0.5], 1.0) == 10
    assert steps_to_reach([0, 5, 10], [3.0, 2.5, 2.0], 1.0) is None
    assert steps_to_reach([0, 5], [0.5, 2.0], 1.0) == 0
    assert _median_split([0.1, 0.9, 0.5, 0.2], "strong", "weak") == ["weak", "strong", "strong", "weak"]


def _rec(set_name, memorised, steps, utility, strength="strong", difficulty="easy"):
    entry = {"steps_exposure": steps, "retain_probability_at_exposure": utility, "retain_rouge_at_exposure": utility,
             "steps_rouge": None, "retain_probability_at_rouge": None, "retain_rouge_at_rouge": None}
    return {"set": set_name, "memorised": memorised, "memorised_rouge": False, "memorisation": strength,
            "difficulty": difficulty, "methods": {"ga": entry}}


def test_table_and_finding_by_hand():
    examples = [_rec("id_forget", True, 5, 0.2), _rec("id_forget", True, 15, 0.1, "weak", "hard"),
                _rec("id_forget", False, 0, 0.9), _rec("ood_forget", True, 20, 0.6),
                _rec("ood_forget", True, None, None, "weak")]
    curves = {"id_forget": {"ga": {"steps": [0, 10, 20], "retain_probability": [0.9, 0.5, 0.1]}},
              "ood_forget": {"ga": {"steps": [0, 10, 20], "retain_probability": [0.9, 0.8, 0.7]}}}
    table = summary_table(examples, curves)
    row = {(r["set"], r["group"]): r for r in table}
    id_all, ood_all = row[("id_forget", "all")], row[("ood_forget", "all")]
    assert (id_all["n"], id_all["n_memorised_exposure"], id_all["forgotten_share_exposure"]) == (3, 2, 1.0)
    assert id_all["median_steps_exposure"] == 10.0 and id_all["retain_probability_at_exposure"] == pytest.approx(0.15)
    # OOD: one forgotten at 20 steps, one never: the median is not reached within the budget.
    assert ood_all["forgotten_share_exposure"] == 0.5 and ood_all["median_steps_exposure"] is None
    assert ood_all["median_not_reached_exposure"] and ood_all["median_steps_forgotten_exposure"] == 20.0
    assert row[("id_forget", "hard")]["median_steps_exposure"] == 15.0
    assert row[("ood_forget", "weak")]["median_steps_exposure"] is None
    assert row[("ood_forget", "strong")]["median_steps_exposure"] == 20.0
    f = finding(table, curves)["ga"]
    assert f["median_steps_to_forget"] == {"ID": 10.0, "OOD": "not reached"}
    assert f["ood_takes_more_steps"] is True and f["ood_costs_less_utility"] is True
    assert f["retain_probability_drop_per_step"] == {"ID": pytest.approx(0.04), "OOD": pytest.approx(0.01)}
    assert f["id_utility_decays_faster"] is True


def test_config_and_benchmark_errors(tiny_model_dir, small_bench, tmp_path):
    with pytest.raises(ValueError, match="multiple of eval_every"):
        IdOodConfig(unlearn_steps=10, eval_every=3)
    with pytest.raises(ValueError, match="sets must be"):
        IdOodConfig(sets=("forget",))
    with pytest.raises(ValueError, match="unknown method"):
        IdOodConfig(methods=("nope",))
    bcfg = SyntheticConfig(n_entities=4, facts_per_entity=2, forget_fraction=0.5, id_facts_per_entity=0)
    bench = write_benchmark(generate_benchmark(bcfg), tmp_path / "bench", bcfg)
    with pytest.raises(DataError, match="id_forget"):
        run_id_ood(bench, tmp_path / "study", IdOodConfig(model=str(tiny_model_dir)), progress=False)
    assert not (tmp_path / "study").exists()  # fails before any run directory is made


def test_cli_generates_a_benchmark_and_runs_with_a_shared_oracle(tiny_model_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from obliviate.cli.attacks import register

    app = typer.Typer()
    app.command()(lambda: None)  # a second command keeps the sub-apps addressable by name
    register(app)
    out = tmp_path / "study"
    res = CliRunner().invoke(app, [
        "study", "id-ood", "--out", str(out), "--model", str(tiny_model_dir), "--n-entities", "4",
        "--facts-per-entity", "2", "--id-facts", "1", "--ood-facts", "1", "--candidates", "8", "--method", "ga",
        "--finetune-epochs", "1", "--finetune-lr", "3e-3", "--unlearn-lr", "1e-3", "--unlearn-steps", "2",
        "--eval-every", "2", "--retain-eval", "2", "--max-new-tokens", "4", "--shared-oracle", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "study-benchmark" / "benchmark.json").is_file()
    assert (out / "oracle" / "model").is_dir() and not (out / "oracle-id_forget").exists()
    result = json.loads((out / "id_ood.json").read_text())
    assert result["oracle"].startswith("shared") and set(result["finding"]) == {"ga"}
    assert "OOD takes more steps" in res.output
    res = CliRunner().invoke(app, ["study", "id-ood", "--out", str(out), "--model", str(tiny_model_dir)])
    assert res.exit_code == 2 and "already exists" in " ".join(res.output.split())  # rich wraps lines

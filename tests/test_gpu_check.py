"""The GPU check (benchmarks/gpu_check.sh) in its CPU smoke mode, and bench_speed's floor mode, end to end.

Both run as the user runs them (a subprocess through the script), on a tiny random model and a few
synthetic rows, so that the GPU path is known to work when a GPU appears.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_gpu_check_smoke_writes_every_stage_and_probe(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = _run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["errors"] == {} and report["smoke"] is True
    assert set(report["part_seconds"]) == {"stages", "mfu", "lora"}
    assert report["device"]["type"] == "cpu" and report["environment"]
    assert report["model"]["parameters"] > 0 and report["data"]["train"] > 0

    assert set(report["stages"]) == {"finetune", "unlearn", "evaluate"}
    for name, stage in report["stages"].items():
        for key in ("wall_seconds", "tokens", "tokens_per_second", "peak_memory_mib"):
            assert _finite(stage[key]) and stage[key] > 0, (name, key, stage[key])
    for name in ("finetune", "unlearn"):
        stage = report["stages"][name]
        assert stage["steps"] > 0 and _finite(stage["loop_seconds"]) and _finite(stage["last_loss"])
    assert report["stages"]["unlearn"]["method"] == "npo" and report["stages"]["unlearn"]["retain_rows"] > 0
    metrics = report["stages"]["evaluate"]["metrics"]
    assert {"forget_rouge", "forget_probability", "forget_truth_ratio", "model_utility"} <= set(metrics)
    assert all(_finite(v) for k, v in metrics.items() if k != "forget_quality")  # no oracle: quality is null

    mfu = report["probes"]["mfu_1b"]
    for key in ("tokens_per_second", "achieved_flops", "achieved_flops_with_attention", "forward_tokens_per_second",
                "loss", "peak_memory_mib", "seconds_per_step"):
        assert _finite(mfu[key]) and mfu[key] > 0, (key, mfu[key])
    assert mfu["mfu"] is None  # no peak FLOP/s on a CPU
    assert mfu["parameters"] > 0 and mfu["shape"]["num_hidden_layers"] == 2

    lora = report["probes"]["lora_8b"]
    for key in ("peak_gib", "step_seconds", "loss", "materialise_seconds"):
        assert _finite(lora[key]) and lora[key] > 0, (key, lora[key])
    assert lora["lora_rank"] == 16 and 0 < lora["trainable_parameters"] < lora["parameters"]
    assert lora["shape"]["tie_word_embeddings"] is False and lora["dtype"] == "bfloat16"


def test_gpu_check_needs_tofu_outside_smoke(tmp_path):
    proc = _run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "x.json")], timeout=120)
    assert proc.returncode == 2 and "--tofu" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_bench_speed_floor_mode_reports_fractions(tmp_path):
    proc = _run([sys.executable, "benchmarks/bench_speed.py", "--model", "tiny", "--entities", "4", "--facts", "2",
                 "--rows", "4", "--epochs", "1", "--unlearn-epochs", "1", "--stages", "sft,npo,evaluate",
                 "--modes", "fast,floor", "--max-new-tokens", "2", "--batch-size", "2", "--out-dir", str(tmp_path),
                 "--name", "floor"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "floor.json").read_text())
    floors = {r["stage"]: r for r in report["stages"] if r["mode"] == "floor"}
    assert set(floors) == {"sft", "npo", "evaluate"}
    for r in floors.values():
        assert r["tokens"] > 0 and r["steps"] > 0 and _finite(r["tokens_per_second"]) and r["fraction_of_floor"] == 1.0
    fast = {r["stage"]: r for r in report["stages"] if r["mode"] == "fast"}
    assert floors["sft"]["tokens"] == fast["sft"]["tokens"]  # the same rows: one epoch each, same tokens
    for stage in ("sft", "npo", "evaluate"):
        fraction = report["fraction_of_floor"][stage]["fast"]
        assert _finite(fraction) and fraction > 0

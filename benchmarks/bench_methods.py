"""Evidence that WAGLE, GUARD and UniErase do what their papers claim, on one benchmark.

Plain GradDiff and NPO against the same with WAGLE weight masks, plain against GUARD-weighted, and
UniErase, all unlearning the same target with the same oracle (``obliviate bench``), then a table of
forget quality, model utility, forget ROUGE-L and sacrifice rate written to
``benchmarks/results/methods-<name>.json`` (and ``.md``).

    python benchmarks/bench_methods.py                       # synthetic benchmark, embedded default, CPU sizes
    python benchmarks/bench_methods.py --tofu ../shared/benchmarks/tofu --name tofu10 \\
        --finetune-epochs 5 --finetune-lr 5e-4 --batch-size 32 --mixed-precision bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from obliviate.bench import BenchConfig, run_bench
from obliviate.reporting.tables import SUMMARY, format_number
from obliviate.runs import atomic_write_json, atomic_write_text, environment

METHODS = [
    {"name": "graddiff"},
    {"name": "graddiff", "wagle": {"rho": 0.2}},
    {"name": "graddiff", "guard": {"tau": 1.0}},
    {"name": "npo"},
    {"name": "npo", "wagle": {"rho": 0.2}},
    {"name": "npo", "guard": {"tau": 1.0}},
    {"name": "unierase"},
]
COLUMNS = ["forget_quality", "model_utility", "forget_rouge", "retain_rouge", "sacrifice_truth_ratio",
           "sacrifice_rouge", "sacrifice_probability"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tofu", help="TOFU directory (forget10 / retain90); default: the synthetic benchmark")
    p.add_argument("--name", default="synthetic-cpu")
    p.add_argument("--out", default=None, help="bench directory (default benchmarks/results/<name>-runs)")
    p.add_argument("--n-entities", type=int, default=8)
    p.add_argument("--facts-per-entity", type=int, default=4)
    p.add_argument("--forget-fraction", type=float, default=0.25)
    p.add_argument("--finetune-epochs", type=float, default=8)
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--unlearn-epochs", type=float, default=8)
    p.add_argument("--unlearn-lr", type=float, default=6e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--methods", nargs="*", help="subset of labels to run (default: all)")
    args = p.parse_args()

    train = {"batch_size": args.batch_size, "mixed_precision": args.mixed_precision}
    data = ({"benchmark": args.tofu, "forget_splits": ["forget10"]} if args.tofu else
            {"synthetic": {"n_entities": args.n_entities, "facts_per_entity": args.facts_per_entity,
                           "forget_fraction": args.forget_fraction}, "forget_splits": ["forget"]})
    cfg = BenchConfig.from_dict({
        **data, "model": args.model, "methods": METHODS, "seeds": [0], "max_new_tokens": args.max_new_tokens,
        "finetune": {**train, "epochs": args.finetune_epochs, "lr": args.finetune_lr, "warmup_ratio": 0.1},
        "unlearn": {**train, "epochs": args.unlearn_epochs, "lr": args.unlearn_lr, "batch_size": max(1, args.batch_size // 2),
                    "scheduler": "constant", "warmup_ratio": 0.0},
    })
    if args.methods:
        cfg.methods = [m for m in cfg.methods if m.label in args.methods]
    out = Path(args.out or f"benchmarks/results/{args.name}-runs")
    start = time.time()
    run_bench(cfg, out)
    cells = json.loads((out / "leaderboard.json").read_text())["cells"]
    rows = [{"method": c["method"], **{k: c.get(k) for k in COLUMNS}} for c in cells]
    result = {"name": args.name, "benchmark": args.tofu or "synthetic", "model": args.model, "rows": rows,
              "seconds": round(time.time() - start, 1), "bench_dir": str(out), "environment": environment(0)}
    atomic_write_json(f"benchmarks/results/methods-{args.name}.json", result)
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r['method']} | " + " | ".join(format_number(r[k], SUMMARY) for k in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    atomic_write_text(f"benchmarks/results/methods-{args.name}.md", table)
    print(table)


if __name__ == "__main__":
    main()

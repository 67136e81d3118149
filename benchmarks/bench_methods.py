"""Methods side by side on one benchmark: a table per set of methods.

``--set attribution`` (the default): evidence that WAGLE, GUARD and UniErase do what their papers claim:
plain GradDiff and NPO against the same with WAGLE weight masks, plain against GUARD-weighted, and
UniErase. ``--set new``: UNDIAL, WGA, SatImp, CE-U and PDU (docs/methods.md) beside NPO and GradDiff,
each at its preset's defaults. ``--set all``: both. Every method unlearns the same target with the same
oracle (``obliviate bench``), then a table of forget quality, model utility, forget ROUGE-L and sacrifice
rate is written to ``benchmarks/results/methods-<name>.json`` (and ``.md``).

    python benchmarks/bench_methods.py                       # synthetic benchmark, embedded default, CPU sizes
    python benchmarks/bench_methods.py --set new             # the new methods, same sizes (name synthetic-cpu-new)
    python benchmarks/bench_methods.py --set new --smoke     # random tiny model, tiny sizes: it runs (~3 min, CPU)
    python benchmarks/bench_methods.py --tofu ../shared/benchmarks/tofu --name tofu10 \\
        --finetune-epochs 5 --finetune-lr 5e-4 --batch-size 32 --mixed-precision bf16   # GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from obliviate.bench import BenchConfig, run_bench
from obliviate.reporting.tables import SUMMARY, format_number
from obliviate.runs import atomic_write_json, atomic_write_text, environment

ATTRIBUTION = [
    {"name": "graddiff"},
    {"name": "graddiff", "wagle": {"rho": 0.2}},
    {"name": "graddiff", "guard": {"tau": 1.0}},
    {"name": "npo"},
    {"name": "npo", "wagle": {"rho": 0.2}},
    {"name": "npo", "guard": {"tau": 1.0}},
    {"name": "unierase"},
]
NEW = [{"name": n} for n in ("graddiff", "npo", "undial", "wga", "satimp", "ceu", "pdu")]
METHOD_SETS = {"attribution": ATTRIBUTION, "new": NEW,
               "all": ATTRIBUTION + [m for m in NEW if m not in ATTRIBUTION]}
COLUMNS = ["forget_quality", "model_utility", "forget_rouge", "retain_rouge", "sacrifice_truth_ratio",
           "sacrifice_rouge", "sacrifice_probability"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tofu", help="TOFU directory (forget10 / retain90); default: the synthetic benchmark")
    p.add_argument("--set", dest="method_set", choices=list(METHOD_SETS), default="attribution",
                   help="which methods (see above)")
    p.add_argument("--smoke", action="store_true",
                   help="a random tiny model and tiny sizes, one epoch each: checks that every method runs")
    p.add_argument("--name", default=None, help="default: synthetic-cpu (or smoke), plus -<set> unless attribution")
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
    results = Path("benchmarks/results")
    if args.smoke:  # everything under a temporary folder: a smoke run's numbers are not results
        from obliviate.models.tiny import build_tiny_model

        results = Path(tempfile.mkdtemp(prefix="bench-methods-"))
        args.model = str(build_tiny_model(results / "tiny"))
        args.n_entities, args.facts_per_entity, args.forget_fraction = 4, 2, 0.25
        args.finetune_epochs, args.unlearn_epochs, args.batch_size, args.max_new_tokens = 1, 1, 4, 4
    if args.name is None:
        args.name = ("smoke" if args.smoke else "synthetic-cpu") + \
            ("" if args.method_set == "attribution" else f"-{args.method_set}")

    train = {"batch_size": args.batch_size, "mixed_precision": args.mixed_precision}
    data = ({"benchmark": args.tofu, "forget_splits": ["forget10"]} if args.tofu else
            {"synthetic": {"n_entities": args.n_entities, "facts_per_entity": args.facts_per_entity,
                           "forget_fraction": args.forget_fraction}, "forget_splits": ["forget"]})
    cfg = BenchConfig.from_dict({
        **data, "model": args.model, "methods": METHOD_SETS[args.method_set], "seeds": [0],
        "max_new_tokens": args.max_new_tokens,
        "finetune": {**train, "epochs": args.finetune_epochs, "lr": args.finetune_lr, "warmup_ratio": 0.1},
        "unlearn": {**train, "epochs": args.unlearn_epochs, "lr": args.unlearn_lr,
                    "batch_size": max(1, args.batch_size // 2), "scheduler": "constant", "warmup_ratio": 0.0},
    })
    if args.methods:
        cfg.methods = [m for m in cfg.methods if m.label in args.methods]
    out = Path(args.out or results / f"{args.name}-runs")
    start = time.time()
    run_bench(cfg, out)
    cells = json.loads((out / "leaderboard.json").read_text())["cells"]
    rows = [{"method": c["method"], **{k: c.get(k) for k in COLUMNS}} for c in cells]
    result = {"name": args.name, "benchmark": args.tofu or "synthetic", "model": args.model,
              "method_set": args.method_set, "rows": rows,
              "seconds": round(time.time() - start, 1), "bench_dir": str(out), "environment": environment(0)}
    atomic_write_json(results / f"methods-{args.name}.json", result)
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r['method']} | " + " | ".join(format_number(r[k], SUMMARY) for k in COLUMNS) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    atomic_write_text(results / f"methods-{args.name}.md", table)
    print(table + f"written to {results}/methods-{args.name}.json and .md")


if __name__ == "__main__":
    main()

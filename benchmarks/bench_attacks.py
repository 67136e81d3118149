"""Benchmark: relearning, quantisation and privacy attacks on a finished pipeline run.

    python benchmarks/bench_attacks.py runs/demo
    python benchmarks/bench_attacks.py runs/demo --steps 0,5,10,25,50,100 --lr 1e-5 --bits 8,4

The run directory is one written by ``obliviate demo`` / ``run_pipeline`` (``target/model``,
``oracle/model``, ``unlearn/model``, ``config.yaml`` naming the benchmark). Each attack writes its
own ``attacks/*.json`` into the run; this script also writes one JSON under ``benchmarks/results/``
with the numbers (relearning curves and summary, quantisation rows, privacy rows), the wall-clock
seconds of each attack and the environment.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from obliviate.attacks.relearn import RelearnConfig
from obliviate.attacks.run import open_run, run_privacy, run_quantise, run_relearn
from obliviate.runs import atomic_write_json, environment

RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="finished pipeline run directory")
    parser.add_argument("--steps", type=_ints, default=(0, 5, 10, 25, 50, 100), help="relearning step counts")
    parser.add_argument("--lr", type=float, default=1e-5, help="relearning learning rate (constant)")
    parser.add_argument("--fraction", type=float, default=0.15, help="share of the forget set to relearn on")
    parser.add_argument("--lora", action="store_true", help="relearn with LoRA adapters")
    parser.add_argument("--bits", type=_ints, default=(8, 4), help="quantisation bit widths")
    parser.add_argument("--backend", default="auto", choices=("auto", "rtn", "bnb"), help="quantisation backend")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-model MIA")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/...)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run = open_run(args.run_dir)
    seconds, record = {}, {"run_dir": str(args.run_dir.resolve()), "benchmark": run.benchmark.source,
                           "models": {k: str(v) for k, v in run.models.items()}}

    start = time.perf_counter()
    relearn = run_relearn(run, RelearnConfig(steps=args.steps, lr=args.lr, lora=args.lora), "forget_subset",
                          fraction=args.fraction)
    seconds["relearn"] = time.perf_counter() - start
    record["relearn"] = {k: v for k, v in relearn.items() if k != "per_sample"}
    print(f"relearn: recovery {relearn['summary']['recovery']} in {seconds['relearn']:.1f} s")

    start = time.perf_counter()
    record["quantise"] = run_quantise(run, args.bits, args.backend)
    seconds["quantise"] = time.perf_counter() - start
    print(f"quantise: done in {seconds['quantise']:.1f} s")

    start = time.perf_counter()
    record["privacy"] = run_privacy(run, reference=not args.no_reference)["rows"]
    seconds["privacy"] = time.perf_counter() - start
    print(f"privacy: done in {seconds['privacy']:.1f} s")

    record["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    record["environment"] = environment()
    out = args.out or RESULTS / f"attacks-{args.run_dir.resolve().name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(out, record)
    print(f"written: {out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU check: TOFU forget10 stages (finetune 5 epochs, NPO 10 epochs, full evaluation), a 1B-class
# MFU probe and an 8B LoRA memory probe, in one JSON. The work is in benchmarks/gpu_check.py (--help).
#
#   benchmarks/gpu_check.sh --tofu DIR --out benchmarks/results/gpu-check-h100.json   # one H100/H200, < 8 min
#   benchmarks/gpu_check.sh --smoke --out /tmp/gpu-check-smoke.json                   # CPU, < 2 min (CI)
#
# Python: $PYTHON if set; else .venv (made by `make env`) if present; else a python3 that already has
# torch (a GPU machine's CUDA build; obliviate then comes from src/ when it is not installed); else
# `make env` creates .venv as the Makefile does (CPU torch).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
elif command -v python3 >/dev/null 2>&1 && python3 -c 'import torch, transformers' >/dev/null 2>&1; then
  py=python3
else
  make env
  py=.venv/bin/python
fi
if ! "$py" -c 'import obliviate' >/dev/null 2>&1; then
  export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export TOKENIZERS_PARALLELISM=false
exec "$py" benchmarks/gpu_check.py "$@"

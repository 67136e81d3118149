"""Resumable training state in a run directory: ``RUN/checkpoints/step-N`` (Accelerate's state of
the model, optimizer, scheduler and RNGs of every process, plus ``trainer_state.json``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from obliviate.runs import RunDir, atomic_write_json

STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete


def latest_checkpoint(run: RunDir) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    done = [p for p in (run.path / "checkpoints").glob("step-*") if (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def load_state(accelerator, checkpoint: Path) -> dict:
    """Restore the state saved in ``checkpoint``; returns its trainer state (``step`` and what the
    loop added: the calibrated-stopping state)."""
    accelerator.load_state(str(checkpoint))
    return json.loads((checkpoint / STATE_FILE).read_text())


def save_state(accelerator, run: RunDir, step: int, extra: dict | None = None,
               write: Callable[[Path], None] | None = None) -> None:
    """Resumable state, written beside and renamed, so a crash never leaves a half checkpoint;
    older checkpoints are removed once the new one is complete. ``extra`` joins the trainer state;
    ``write(folder)`` (main process) adds files of the loop's own state to the checkpoint before it
    is complete."""
    accelerator.wait_for_everyone()
    root = run.path / "checkpoints"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()  # no process writes into tmp before it is cleared
    accelerator.save_state(str(tmp))  # every process writes its own RNG state file
    accelerator.wait_for_everyone()  # all of them are in tmp before it is renamed
    if accelerator.is_main_process:
        if write is not None:
            write(tmp)
        atomic_write_json(tmp / STATE_FILE, {"step": step, **(extra or {})})
        final = root / f"step-{step}"
        tmp.rename(final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()

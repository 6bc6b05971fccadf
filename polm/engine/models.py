"""Resolving what a user names as a model: a registered name, a path, a hub id or an object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polm.engine.errors import PolmError, did_you_mean
from polm.engine.quiet import no_transformers_progress

STAGE_FILE = "polm_stage.json"
#: The folder of a finished stage's model inside the stage's folder of a run (``00-sft/final``).
FINAL_DIR = "final"


def stage_model_folder(path: Path) -> Path:
    """Where the model of ``path`` is: its ``final/`` when ``path`` is a run's stage folder, else ``path``."""
    return path / FINAL_DIR if (path / FINAL_DIR).is_dir() else path


def load_model(spec: Any, tokenizer: Any = None) -> tuple[torch.nn.Module, Any]:
    """Return ``(model, tokenizer)`` for ``spec``.

    Args:
        spec: a name registered through ``polm_register_models`` (``"polm-tiny"``),
            a local folder (one a plugin claims through ``polm_load_model``, such
            as a saved multimodal model, or else ``from_pretrained``; peft adapter
            folders load with their base), a Hugging Face hub id, or a model object.
        tokenizer: required with a model object, optional otherwise.

    Raises:
        PolmError: unknown name, unreadable folder, or a model object without tokenizer.
    """
    if isinstance(spec, torch.nn.Module):
        if tokenizer is None:
            raise PolmError("a model object needs its tokenizer: Pipeline(model, tokenizer=...)")
        return spec, _ready(tokenizer)
    if not isinstance(spec, (str, Path)):
        raise PolmError(f"model must be a name, a path or a model object, got {type(spec).__name__}")
    from polm.engine.plugins import plugin_manager, registry

    models = registry("models")
    spec = str(spec)
    if spec in models:
        with no_transformers_progress():
            model, loaded_tokenizer = models.get(spec)()
        return model, _ready(tokenizer or loaded_tokenizer)
    path = Path(spec)
    path = stage_model_folder(path)
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise PolmError(
            f"model '{spec}' is neither a folder nor a registered model.{did_you_mean(spec, models)} "
            f"Registered: {', '.join(models) or 'none'}"
        )
    try:
        with no_transformers_progress():
            # A plugin may claim a local folder it knows how to read (polm_load_model), before from_pretrained.
            claimed = plugin_manager().hook.polm_load_model(path=path, tokenizer=tokenizer) if path.is_dir() else None
            if claimed is None:
                if path.is_dir() and not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
                    raise PolmError(
                        f"{path} is not a model folder: it has no config.json (nor adapter_config.json); give a "
                        "Hugging Face model folder, a run's stage folder (00-sft) or a registered model "
                        f"({', '.join(models)})")
                claimed = _from_pretrained(str(path) if path.exists() else spec, tokenizer)
            model, loaded_tokenizer = claimed
    except (OSError, ValueError) as error:  # transformers: a missing file, or a config it cannot read
        raise PolmError(
            f"could not load model '{spec}': {str(error).splitlines()[0]}. Registered models: {', '.join(models)}"
        ) from None
    return model, _ready(loaded_tokenizer)


def _from_pretrained(source: str, tokenizer: Any) -> tuple[torch.nn.Module, Any]:
    """A transformers model, or a peft adapter with its base, and the folder's tokenizer unless one is given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (Path(source) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(source)
    else:
        model = AutoModelForCausalLM.from_pretrained(source)
    return model, tokenizer or AutoTokenizer.from_pretrained(source)


def _ready(tokenizer: Any) -> Any:
    """Tokenizers without a pad token pad with end-of-sequence, as most causal LMs do."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())

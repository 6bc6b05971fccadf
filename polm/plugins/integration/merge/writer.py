"""Writing a merged model: a transformers folder, ``merge.json`` and a model card.

The folder is what ``save_pretrained`` would write: ``config.json`` and ``generation_config.json`` of the model
the output takes them from (the base, else the first model), its ``dtype`` set to the saved dtype,
``model.safetensors`` (or ``model-00001-of-0000N.safetensors`` shards and ``model.safetensors.index.json`` past
``max_shard_bytes``) and the tokenizer. Tensors are produced one at a time and each shard is written as soon as
it is full, so the output is never all in memory either. Another kind of input writes its own layout through
:data:`FOLDER_WRITERS` (a polm multimodal model's: :func:`~.multimodal.write_multimodal_folder`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from polm.engine.log import get_logger, progress_bar
from polm.plugins.integration.merge.inputs import CONFIG_FILE, GENERATION_CONFIG_FILE, MergeInput

#: The shard size past which the weights are split over several files (transformers' convention of names).
DEFAULT_SHARD_BYTES = 5 * 1024**3
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
RECORD_FILE = "merge.json"
CARD_FILE = "README.md"


def shard_names(sizes: Sequence[int], max_shard_bytes: int) -> list[str]:
    """The file each tensor goes to, given the tensors' byte sizes in order: a new shard starts where the next
    tensor would take the current one past ``max_shard_bytes`` (a larger tensor is a shard of its own)."""
    shards: list[int] = []
    filled = 0
    for size in sizes:
        if not shards or (filled and filled + size > max_shard_bytes):
            shards.append(0)
            filled = 0
        shards[-1] += 1
        filled += size
    if len(shards) <= 1:
        return [WEIGHTS_FILE] * len(sizes)
    return [f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            for number, count in enumerate(shards, start=1) for _ in range(count)]


def write_weights(folder: Path, names: Sequence[str], sizes: Sequence[int], produce: Callable[[str], torch.Tensor],
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, show_progress: bool = False) -> list[str]:
    """Write ``produce(name)`` for each name into safetensors shards in ``folder``, one shard in memory at a time.

    Args:
        sizes: each tensor's byte size as it will be saved, to plan the shards before anything is produced.

    Returns:
        The weight files written.
    """
    from safetensors.torch import save_file

    files = shard_names(sizes, max_shard_bytes)
    pending: dict[str, torch.Tensor] = {}
    progress = progress_bar("merge", show_progress)
    with progress:
        task = progress.add_task("merge", total=len(names))
        for index, (name, file) in enumerate(zip(names, files)):
            pending[name] = produce(name).contiguous()
            progress.advance(task)
            if index + 1 == len(names) or files[index + 1] != file:
                save_file(pending, folder / file, metadata={"format": "pt"})
                pending = {}
    if len(set(files)) > 1:
        index = {"metadata": {"total_size": int(sum(sizes))}, "weight_map": dict(zip(names, files))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return sorted(set(files))


def write_model_files(folder: Path, source: MergeInput, tokenizer_source: MergeInput | None,
                      dtype: str | None) -> None:
    """``config.json`` and ``generation_config.json`` of ``source`` (``dtype`` recorded when it is set) and the
    tokenizer of ``tokenizer_source`` (none, with a warning, when it has none)."""
    config = source.config()
    if dtype is not None:
        config["dtype"] = dtype
        if "torch_dtype" in config:  # configs written by transformers 4
            config["torch_dtype"] = dtype
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = source.generation_config()
    if generation is not None:
        (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    tokenizer = tokenizer_source.tokenizer() if tokenizer_source is not None else None
    if tokenizer is None:
        get_logger().warning("polm merge: the tokenizer source '%s' has no tokenizer; the output has none",
                             tokenizer_source.reference if tokenizer_source is not None else "?")
        return
    tokenizer.save_pretrained(folder)


def write_transformers_folder(folder: Path, source: MergeInput, tokenizer_source: MergeInput | None,
                              dtype: str | None, names: Sequence[str], sizes: Sequence[int],
                              produce: Callable[[str], torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                              show_progress: bool = False) -> None:
    """The weights (:func:`write_weights`) and the model files (:func:`write_model_files`) of a transformers
    folder."""
    write_weights(folder, names, sizes, produce, max_shard_bytes, show_progress)
    write_model_files(folder, source, tokenizer_source, dtype)


FolderWriter = Callable[[Path, MergeInput, "MergeInput | None", "str | None", Sequence[str], Sequence[int],
                         Callable[[str], torch.Tensor], int, bool], None]
#: How a merge of each kind of input (:attr:`~.inputs.MergeInput.kind`) is written, with the arguments of
#: :func:`write_transformers_folder`; another kind of input adds its writer.
FOLDER_WRITERS: dict[str, FolderWriter] = {"transformers": write_transformers_folder}


def merge_record(config: dict[str, Any], method: str, base: MergeInput | None, models: Sequence[MergeInput],
                 seed: int, dtype: str | None, tensors: int) -> dict[str, Any]:
    """What ``merge.json`` holds: the config as given, each input with its sha256, the polm version, the method,
    the seed, the saved dtype, the tensor count and the time."""
    import polm

    return {
        "polm_version": polm.__version__,
        "merge_method": method,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "base_model": base.describe() if base is not None else None,
        "models": [model.describe() for model in models],
        "seed": seed,
        "dtype": dtype or "as stored in the base",
        "tensors": tensors,
    }


def model_card(title: str, record: dict[str, Any]) -> str:
    """A short Hugging Face model card: front matter, then one line on the method, the inputs and polm."""
    models = ", ".join(f"`{model['model']}`" for model in record["models"])
    base = record["base_model"]
    onto = f" onto `{base['model']}`" if base is not None else ""
    parts = record.get("parts")
    methods = ", ".join(f"{part} by `{name}`" for part, name in (parts or {}).items())
    by_part = "" if not parts else (" A polm multimodal model (load it with `polm.load_model`), each part merged "
                                    f"by its method: {methods}.")
    lora = record.get("lora") or {}
    adapter = lora.get("output") == "adapter"
    of_lora = "" if not lora else (
        f" LoRA adapters merged into a new adapter (rank {lora['rank']}, by {lora['combine']}); load it with "
        "`peft.PeftModel.from_pretrained` or `polm.load_model`." if adapter
        else " LoRA adapters merged into their base's weights.")
    return (f"---\nlibrary_name: {'peft' if adapter else 'transformers'}\ntags:\n- merge\n- polm\n---\n\n# {title}\n\n"
            f"A `{record['merge_method']}` merge of {models}{onto}, made with polm {record['polm_version']} "
            f"(`polm merge`). `{RECORD_FILE}` records the config, the inputs' sha256 and the polm version.{by_part}"
            f"{of_lora}\n")


def write_record(folder: Path, record: dict[str, Any], title: str) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    (folder / CARD_FILE).write_text(model_card(title, record))

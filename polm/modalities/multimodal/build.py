"""Building a multimodal model from specs, and loading a saved one."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from polm.engine.errors import PolmError
from polm.modalities.multimodal.encoder import build_encoder
from polm.modalities.multimodal.model import (
    CONFIG_FILE,
    LM_DIR,
    MultimodalModel,
)

DEFAULT_CONNECTOR = "mlp2x_gelu"


def _spec(value: Any, key: str, where: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``{key: "name", **options}`` -> ``(name, options)``."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get(key), str):
        return value[key], {k: v for k, v in value.items() if k != key}
    raise PolmError(f"{where} must be a string or an object with '{key}', got {value!r}")


def build_multimodal(lm: torch.nn.Module, encoders: dict[str, Any],
                     connectors: dict[str, Any] | None = None) -> MultimodalModel:
    """Join ``lm`` to encoders through new connectors.

    Args:
        lm: a causal language model.
        encoders: modality (``image``, ``audio``) -> ``"open_clip:ViT-B-32"`` or
            ``{"spec": "...", **encoder options}``.
        connectors: modality -> a registered connector name or ``{"name": ..., **options}``;
            ``mlp2x_gelu`` for a modality not named.

    Raises:
        PolmError: an unknown encoder, connector or option, or an encoder of another modality.
    """
    from polm.engine.plugins import registry

    connectors = connectors or {}
    if not encoders:
        raise PolmError("a multimodal model needs at least one encoder, e.g. {image: 'open_clip:polm-tiny-vit'}")
    unused = sorted(set(connectors) - set(encoders))
    if unused:
        raise PolmError(f"connectors for {', '.join(unused)} have no encoder; encoders: {', '.join(encoders)}")
    lm_width = lm.get_input_embeddings().embedding_dim
    lm_layers = lm.config.num_hidden_layers
    built_encoders, built_connectors, names = {}, {}, {}
    for modality, value in encoders.items():
        spec, options = _spec(value, "spec", f"encoders.{modality}")
        encoder = build_encoder(spec, options)
        if encoder.modality != modality:
            raise PolmError(f"encoders.{modality}: '{spec}' encodes {encoder.modality}; list it under "
                            f"'{encoder.modality}'")
        name, options = _spec(connectors.get(modality, DEFAULT_CONNECTOR), "name", f"connectors.{modality}")
        factory = registry("connectors").get(name)
        if "lm_layers" in inspect.signature(factory).parameters:  # connectors inside the LM need its depth
            options = {**options, "lm_layers": lm_layers}
        try:
            built_connectors[modality] = factory(encoder.width, lm_width, **options)
        except TypeError as error:
            raise PolmError(f"connector '{name}': {error}") from None
        built_encoders[modality], names[modality] = encoder, name
    return MultimodalModel(lm, built_encoders, built_connectors, names)


def is_multimodal_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a saved :class:`MultimodalModel`."""
    return (Path(path) / CONFIG_FILE).is_file()


def load_multimodal(folder: str | Path, tokenizer: Any = None) -> tuple[MultimodalModel, Any]:
    """``(model, tokenizer)`` saved by :meth:`MultimodalModel.save_pretrained`.

    Encoders with a pretrained source are rebuilt from it; the others, and all
    connectors, get their saved weights.
    """
    from transformers import AutoTokenizer

    from polm.engine.models import load_model

    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(folder)
    lm, tokenizer = load_model(str(folder / LM_DIR), tokenizer)
    encoders = {m: {"spec": e["spec"], **e["options"]} for m, e in config["encoders"].items()}
    connectors = {m: {"name": c["name"], **c["options"]} for m, c in config["connectors"].items()}
    model = build_multimodal(lm, encoders, connectors)
    model.load_media_weights(folder)
    return model.eval(), tokenizer

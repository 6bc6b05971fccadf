"""A causal language model joined to modality encoders through connectors (LLaVA, Flamingo, Q-Former style).

The model takes the token stream of :mod:`polm.engine.encoding` (one negative
placeholder id per image or audio part) and the batch's ``media``: it encodes
each file, maps its features through the modality's connector and splices the
result in place of the placeholder (:mod:`polm.modalities.multimodal.splice`).
Logits come back aligned with ``input_ids``, so every loss and log-prob of the
engine works unchanged. A saved model is one folder::

    multimodal.json          encoders and connectors by modality, with their options
    language_model/          the language model (transformers, or a peft adapter over its base)
    connectors.safetensors   connector weights
    encoders.safetensors     weights of encoders that were trained or have no pretrained source
    tokenizer files
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polm.engine.data import Row
from polm.engine.errors import PolmError
from polm.engine.media import Connector, Encoder, MediaModel
from polm.engine.quiet import no_transformers_progress
from polm.modalities.multimodal.splice import splice

CONFIG_FILE = "multimodal.json"
LM_DIR = "language_model"
CONNECTORS_FILE = "connectors.safetensors"
ENCODERS_FILE = "encoders.safetensors"


class MultimodalModel(MediaModel):
    """A language model, encoders by modality (``image``, ``audio``) and one connector per encoder.

    Args:
        lm: a causal language model (transformers, possibly peft-wrapped).
        encoders: modality -> encoder.
        connectors: modality -> connector.
        connector_names: modality -> the registered name of its connector (saved to rebuild it).
    """

    def __init__(self, lm: torch.nn.Module, encoders: dict[str, Encoder], connectors: dict[str, Connector],
                 connector_names: dict[str, str]) -> None:
        super().__init__()
        self.lm = lm
        self.encoders = torch.nn.ModuleDict(encoders)
        self.connectors = torch.nn.ModuleDict(connectors)
        self.connector_names = dict(connector_names)

    @property
    def config(self) -> Any:
        """The language model's config."""
        return self.lm.config

    @property
    def generation_config(self) -> Any:
        return self.lm.generation_config

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lm.get_input_embeddings()

    def describe(self) -> dict[str, Any]:
        """What :data:`CONFIG_FILE` holds: each modality's encoder spec and options, connector name and options."""
        return {
            "encoders": {m: {"spec": e.spec, "options": e.options} for m, e in self.encoders.items()},
            "connectors": {m: {"name": self.connector_names[m], "options": c.options}
                           for m, c in self.connectors.items()},
        }

    def check_file(self, kind: str, path: str) -> None:
        if kind not in self.encoders:
            raise PolmError(f"the row holds {kind} content and the model reads {', '.join(self.encoders)} only")
        self.encoders[kind].check_file(path)

    # -- what trains ---------------------------------------------------------------------------------

    def freeze_language_model(self) -> MultimodalModel:
        """Train the connectors (and encoders with ``freeze: false``) only: LLaVA's alignment stage."""
        self.lm.requires_grad_(False)
        self._connectors_and_encoders_trainable()
        return self

    def tune_language_model(self, prepare: Callable[[torch.nn.Module], torch.nn.Module]) -> MultimodalModel:
        """Apply a tuning method to the language model (``prepare(lm) -> model to train``); connectors train too."""
        self.lm = prepare(self.lm)
        self._connectors_and_encoders_trainable()
        return self

    def _connectors_and_encoders_trainable(self) -> None:
        self.connectors.requires_grad_(True)
        for encoder in self.encoders.values():
            encoder.requires_grad_(not encoder.freeze)

    # -- forward and generation ----------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, media: list[list[Row]] | None = None,
                **kwargs: Any) -> Any:
        """The language model's output on the tokens and media; ``logits`` (B, T, V) align with ``input_ids``.

        Args:
            input_ids: (B, T) token ids, one placeholder id per media part.
            attention_mask: (B, T); packed rows (None, restarting ``position_ids``) cannot hold media.
            position_ids: (B, T) or None.
            media: per row, the media parts (``{"type", "path"}``) of its placeholders, in order.
            kwargs: passed to the language model (``use_cache``, ...).
        """
        if not media or not any(media):
            self._check_no_placeholders(input_ids)
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        if attention_mask is None and position_ids is not None:
            raise PolmError("packed rows (position ids without an attention mask) cannot hold media; "
                            "turn packing off for image and audio rows")
        spliced, features = self._splice(input_ids, attention_mask, position_ids, media)
        with self._attached(features):
            output = self.lm(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask,
                             position_ids=spliced.position_ids, **kwargs)
        output.logits = spliced.fold(output.logits)  # (B, L, V) -> (B, T, V)
        return output

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 media: list[list[Row]] | None = None, **kwargs: Any) -> torch.Tensor:
        """``generate`` of the language model on left-padded prompts with media.

        Returns:
            (B, T + new) the prompt ids followed by the new tokens, as transformers returns them.
        """
        if not media or not any(media):
            self._check_no_placeholders(input_ids)
            return self.lm.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        spliced, features = self._splice(input_ids, attention_mask, None, media)
        with self._attached(features):
            # With inputs_embeds alone, transformers returns only the new tokens.
            new = self.lm.generate(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)

    def _check_no_placeholders(self, input_ids: torch.Tensor) -> None:
        if bool((input_ids < 0).any()):
            raise PolmError("input_ids hold media placeholders but no media were passed; pass the batch's "
                            "'media' (see polm.engine.encoding.media_inputs)")

    def _splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, media: list[list[Row]]) -> tuple[Any, dict[str, Any]]:
        """The spliced batch, and for connectors acting inside the model their per-row features."""
        tokens: list[list[torch.Tensor | None]] = [[None] * len(parts) for parts in media]
        features: dict[str, list[list[torch.Tensor]]] = {}
        for modality in sorted({part["type"] for parts in media for part in parts}):
            if modality not in self.encoders:
                raise PolmError(f"the rows hold {modality} inputs but the model has encoders for "
                                f"{', '.join(self.encoders) or 'nothing'}; add a {modality} encoder in 'align'")
            where = [(b, j) for b, parts in enumerate(media) for j, part in enumerate(parts)
                     if part["type"] == modality]
            encoded = self.encoders[modality].encode_files([media[b][j]["path"] for b, j in where])  # (N, S, E)
            connector = self.connectors[modality]
            embedded = connector(encoded)  # (N, K, D)
            for (b, j), item in zip(where, embedded):
                tokens[b][j] = item
            if hasattr(connector, "attach"):
                features[modality] = [[encoded[i] for i, (row, _) in enumerate(where) if row == b]
                                      for b in range(len(media))]
        embeds = self.lm.get_input_embeddings()(input_ids.clamp(min=0))  # (B, T, D)
        return splice(embeds, input_ids, attention_mask, position_ids, tokens), features

    def _attached(self, features: dict[str, list[list[torch.Tensor]]]) -> ExitStack:
        """Install the in-model connectors (cross-attention) with each row's features, padded: (B, M, E)."""
        stack = ExitStack()
        for modality, rows in features.items():
            width = self.encoders[modality].width
            longest = max(1, max(sum(f.shape[0] for f in row) for row in rows))
            reference = next(f for row in rows for f in row)
            padded = reference.new_zeros(len(rows), longest, width)
            missing = torch.ones(len(rows), longest, dtype=torch.bool, device=reference.device)
            for b, row in enumerate(rows):
                if row:
                    joined = torch.cat(row)  # (M_b, E)
                    padded[b, : len(joined)] = joined
                    missing[b, : len(joined)] = False
            stack.enter_context(self.connectors[modality].attach(self.lm, padded, missing))
        return stack

    # -- saving --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write the folder described in the module docstring (``polm.load_model(folder)`` restores it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with no_transformers_progress():
            self.lm.save_pretrained(directory / LM_DIR, safe_serialization=True)
        save_file({k: v.detach().contiguous() for k, v in self.connectors.state_dict().items()},
                  directory / CONNECTORS_FILE)
        kept = {f"{m}.{k}": v.detach().contiguous() for m, e in self.encoders.items()
                if not (e.freeze and e.rebuilds_weights) for k, v in e.state_dict().items()}
        if kept:
            save_file(kept, directory / ENCODERS_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(self.describe(), indent=2))

    def load_saved_weights(self, directory: Path) -> None:
        """Load what :meth:`save_pretrained` wrote to ``directory`` into this model, in place: the language
        model (or its adapter), the connectors and the encoders whose weights were saved."""
        from polm.engine.tuning import load_weights

        load_weights(self.lm, directory / LM_DIR)
        self.load_media_weights(directory)

    def load_media_weights(self, directory: Path) -> None:
        """The connectors' and the saved encoders' weights from ``directory``, in place."""
        self.connectors.load_state_dict(load_file(directory / CONNECTORS_FILE))
        if (directory / ENCODERS_FILE).is_file():
            saved = load_file(directory / ENCODERS_FILE)
            for modality, encoder in self.encoders.items():
                state = {k[len(modality) + 1:]: v for k, v in saved.items() if k.startswith(f"{modality}.")}
                if state:
                    encoder.load_state_dict(state)

"""The interfaces of modality encoders and connectors: what the ``encoders`` and ``connectors`` registries hold.

They live in the engine so that the packages on either side of a multimodal model, the encoders
(:mod:`polm.modalities`) and the connectors (:mod:`polm.adapters`), depend on the engine and not on
each other, and a plugin can contribute either without importing polm's own. :class:`MediaModel` is what
the engine knows of the model they make.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch


class Encoder(torch.nn.Module):
    """Base class of the encoders registered through ``polm_register_encoders``.

    Subclasses set ``modality`` and implement :meth:`load` (one file to one
    preprocessed input) and :meth:`forward`. They report ``width`` (features
    per token) and ``num_tokens`` (tokens per input) so connectors can be
    built before anything is encoded.

    Attributes:
        spec: what rebuilds the encoder, e.g. ``"open_clip:polm-tiny-vit"``.
        options: the encoder's options, saved beside ``spec``.
        freeze: keep the weights as they are (the default); frozen outputs are cached per file.
        rebuilds_weights: whether ``spec`` and ``options`` restore the weights (pretrained);
            if not, a saved multimodal model stores them.
    """

    modality: ClassVar[str] = ""

    def __init__(self, spec: str, options: Any, width: int, num_tokens: int, freeze: bool,
                 rebuilds_weights: bool, cache_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.options = dataclasses.asdict(options)
        self.width = width
        self.num_tokens = num_tokens
        self.freeze = freeze
        self.rebuilds_weights = rebuilds_weights
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def load(self, path: str) -> torch.Tensor:
        """One file as the encoder's preprocessed input.

        Raises:
            PolmError: the file is missing or unreadable, naming it.
        """
        raise NotImplementedError

    def check_file(self, path: str) -> None:
        """Fail now if :meth:`load` would fail on ``path``: what a stage asks of every file its rows name
        before it writes anything. By default the file is loaded; an encoder whose files can be checked more
        cheaply (a header) overrides this.

        Raises:
            PolmError: the file is missing or unreadable, naming it.
        """
        self.load(path)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """(N, *input shape) -> (N, num_tokens, width)."""
        raise NotImplementedError

    def encode_files(self, paths: list[str]) -> torch.Tensor:
        """(N, num_tokens, width) features of ``paths``; a frozen encoder reuses the features it computed before."""
        device = next(self.parameters()).device
        if not (self.freeze and self.cache_size):
            return self(torch.stack([self.load(path) for path in paths]).to(device))
        missing = list(dict.fromkeys(path for path in paths if path not in self._cache))
        if missing:
            with torch.no_grad():
                features = self(torch.stack([self.load(path) for path in missing]).to(device))
            for path, feature in zip(missing, features):
                self._cache[path] = feature
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        for path in paths:
            self._cache.move_to_end(path)
        return torch.stack([self._cache[path] for path in paths]).to(device)

    def train(self, mode: bool = True) -> Encoder:
        """A frozen encoder stays in eval mode, so its outputs do not depend on the model's mode."""
        return super().train(mode and not self.freeze)


class Connector(torch.nn.Module):
    """Base class of the connectors registered through ``polm_register_connectors``.

    A connector turns the features of one input, (S, encoder width), into
    :meth:`num_tokens` embeddings of the language model's width that replace
    the input's placeholder token. Connectors that act inside the language
    model (``cross_attention``) also implement ``attach``.

    Attributes:
        options: the connector's options, saved with a multimodal model to rebuild it.
    """

    def __init__(self, options: Any = None) -> None:
        super().__init__()
        self.options = dataclasses.asdict(options) if options is not None else {}

    def num_tokens(self, encoder_tokens: int) -> int:
        """Embeddings per input, for an encoder that gives ``encoder_tokens`` tokens per input."""
        return encoder_tokens

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, S, encoder width) -> (N, num_tokens(S), lm width)."""
        raise NotImplementedError


class MediaModel(torch.nn.Module):
    """Base class of models that read media: a language model joined to encoders through connectors.

    The engine calls such a model with ``media=`` (:func:`polm.engine.encoding.media_inputs`) and applies a
    stage's tuning method to its language model only (:meth:`tune_language_model`), whatever the stage.
    """

    def tune_language_model(self, prepare: Callable[[torch.nn.Module], torch.nn.Module]) -> MediaModel:
        """Apply a tuning method to the language model (``prepare(lm) -> model to train``); connectors train too."""
        raise NotImplementedError

    def check_file(self, kind: str, path: str) -> None:
        """Fail now if the model could not read the ``kind`` (``image``, ``audio``) file at ``path``.

        Raises:
            PolmError: the model has no encoder for ``kind``, or its encoder cannot read the file.
        """
        raise NotImplementedError

    def load_saved_weights(self, directory: Path) -> None:
        """Load into this model, in place, the weights its ``save_pretrained(directory)`` wrote: what a resumed
        run restores from a checkpoint or a finished stage (:func:`polm.engine.tuning.load_weights`)."""
        raise NotImplementedError


def reads_media(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model inside a DistributedDataParallel wrapper) takes ``media=``."""
    return isinstance(getattr(model, "module", model), MediaModel)

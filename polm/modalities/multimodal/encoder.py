"""What every modality encoder is: a frozen-by-default module that reads files and returns token features."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, ClassVar

import torch

from polm.engine.errors import PolmError, did_you_mean


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


def parse_options(what: str, options_class: type, options: dict[str, Any]) -> Any:
    """The options dataclass of an encoder or connector, with one-line errors naming it and the option.

    Args:
        what: how errors name the component, e.g. ``"encoder 'open_clip'"``.

    Raises:
        PolmError: an unknown option or an invalid value.
    """
    names = [f.name for f in dataclasses.fields(options_class)]
    for name in options:
        if name not in names:
            raise PolmError(f"{what} has no option '{name}'.{did_you_mean(name, names)} "
                            f"Options: {', '.join(names) or 'none'}")
    try:
        return options_class(**options)
    except (TypeError, ValueError) as error:
        raise PolmError(f"{what}: {error}") from None


def build_encoder(spec: str, options: dict[str, Any] | None = None) -> Encoder:
    """An encoder from its spec, ``"<family>:<model>"`` (e.g. ``open_clip:ViT-B-32``, ``whisper:base``).

    Raises:
        PolmError: a malformed spec or an unknown family, naming the registered ones.
    """
    from polm.engine.plugins import registry

    encoders = registry("encoders")
    family, _, model = str(spec).partition(":")
    if not model:
        raise PolmError(f"encoder '{spec}' must be written '<family>:<model>', e.g. 'open_clip:polm-tiny-vit'; "
                        f"families: {', '.join(encoders)}")
    return encoders.get(family)(model, **(options or {}))

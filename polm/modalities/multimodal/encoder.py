"""Building a registered modality encoder from its spec (the interface is :class:`polm.engine.media.Encoder`)."""

from __future__ import annotations

from typing import Any

from polm.engine.errors import PolmError
from polm.engine.media import Encoder


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

"""What connectors share beyond their interface (:class:`polm.engine.media.Connector`)."""

from __future__ import annotations

from polm.engine.errors import PolmError


def check_heads(lm_width: int, heads: int) -> None:
    """Raise PolmError unless ``heads`` divides the language model's width."""
    if lm_width % heads:
        choices = ", ".join(str(h) for h in range(1, 17) if lm_width % h == 0)
        raise PolmError(f"connector option 'heads' ({heads}) must divide the language model's width {lm_width}; "
                        f"choose one of {choices}")

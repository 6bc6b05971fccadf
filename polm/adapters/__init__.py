"""Connectors and domain adapters (a built-in plugin).

Registers the connectors that join encoders to a language model:
``linear``, ``mlp2x_gelu``, ``resampler`` and ``cross_attention``.
"""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl


@hookimpl
def polm_register_connectors(register: Register) -> None:
    from polm.adapters.connectors.cross_attention import CrossAttentionConnector
    from polm.adapters.connectors.projection import LinearConnector, MLPConnector
    from polm.adapters.connectors.resampler import Resampler

    register("linear", LinearConnector, description="one linear map per encoder token (LLaVA)")
    register("mlp2x_gelu", MLPConnector, description="two linear layers with GELU per encoder token (LLaVA-1.5)")
    register("resampler", Resampler, description="learned queries cross-attend to the encoder tokens (Perceiver)")
    register("cross_attention", CrossAttentionConnector,
             description="tanh-gated cross-attention blocks inside the language model's layers (Flamingo)")

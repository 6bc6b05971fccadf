"""Connectors and domain adapters (a built-in plugin).

Registers the connectors that join encoders to a language model:
``linear``, ``mlp2x_gelu``, ``resampler`` and ``cross_attention``; the domains ``code`` and ``math``
(:mod:`.domains`) with the datasets ``polm:stdlib-code`` and ``polm:stdlib-firstline``, and ``polm domain``;
the stage ``extend_vocabulary`` (:mod:`.tokenizer_extension`).
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


@hookimpl
def polm_register_stages(register: Register) -> None:
    from polm.adapters.tokenizer_extension import ExtendVocabularyStage

    register("extend_vocabulary", ExtendVocabularyStage,
             description="add a corpus's frequent strings as tokens, new embedding rows the mean of their old pieces'")


@hookimpl
def polm_register_datasets(register: Register) -> None:
    from polm.adapters.domains import register_datasets

    register_datasets(register)


@hookimpl
def polm_register_domains(register: Register) -> None:
    from polm.adapters.domains import register_domains

    register_domains(register)


@hookimpl
def polm_register_commands(register: Register) -> None:
    from polm.adapters.domains.command import DOMAIN_COMMAND

    register("domain", DOMAIN_COMMAND, description="a domain's recipe (for polm run) and its evaluator's metrics")

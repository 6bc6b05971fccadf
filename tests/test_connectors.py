"""Connectors: output shapes, registration, options, and cross-attention's zero-initialised gate."""

from __future__ import annotations

import pytest
import torch

from polm.adapters.connectors.cross_attention import CrossAttentionConnector
from polm.engine.errors import PolmError
from polm.engine.plugins import registry

N, S, E, D = 3, 10, 24, 32  # inputs, encoder tokens, encoder width, language-model width

CASES = [
    ("linear", {}, S),
    ("mlp2x_gelu", {}, S),
    ("resampler", {"num_queries": 4, "depth": 1}, 4),
    ("cross_attention", {"lm_layers": 2}, 1),
]


@pytest.mark.parametrize("name, options, tokens", CASES)
def test_connector_shapes(name, options, tokens):
    """(N, S, E) encoder features -> (N, tokens, D) embeddings, and num_tokens says how many."""
    connector = registry("connectors").get(name)(E, D, **options)
    assert connector.num_tokens(S) == tokens
    assert connector(torch.randn(N, S, E)).shape == (N, tokens, D)


def test_connectors_are_registered():
    assert {"linear", "mlp2x_gelu", "resampler", "cross_attention"} <= set(registry("connectors"))


def test_connector_options_are_checked():
    factory = registry("connectors").get("resampler")
    with pytest.raises(PolmError, match="connector 'resampler': unknown option 'queries'.* Valid options: .*num_queries"):
        factory(E, D, queries=4)
    with pytest.raises(PolmError, match="'heads' \\(5\\) must divide the language model's width 32"):
        factory(E, D, heads=5)


def test_cross_attention_starts_as_the_identity(random_model):
    """tanh(0) = 0: with fresh gates the attached blocks leave the language model's logits unchanged;
    once a gate opens, rows with media change and a row without media does not."""
    connector = CrossAttentionConnector(E, random_model.config.hidden_size, lm_layers=2)
    ids = torch.randint(0, 50, (2, 6))
    media = torch.randn(2, S, E)
    missing = torch.zeros(2, S, dtype=torch.bool)
    missing[1] = True  # row 1 has no media
    plain = random_model(input_ids=ids).logits
    with connector.attach(random_model, media, missing):
        torch.testing.assert_close(random_model(input_ids=ids).logits, plain)
        torch.nn.init.constant_(connector.blocks[0].attention_gate, 1.0)
        gated = random_model(input_ids=ids).logits
    assert not torch.allclose(gated[0], plain[0])
    torch.testing.assert_close(gated[1], plain[1])
    torch.testing.assert_close(random_model(input_ids=ids).logits, plain)  # hooks removed

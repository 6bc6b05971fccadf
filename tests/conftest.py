"""Shared fixtures: tiny models built offline, and isolation of the plugin state."""

from __future__ import annotations

import os

import pytest
import torch

# Tests see only the plugins they install or register themselves.
os.environ.setdefault("POLM_DISABLE_PLUGIN_AUTOLOAD", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer():
    """The polm-tiny tokenizer design, trained on a few lines (fast, deterministic)."""
    from polm.modalities.text.tiny.tokenizer import build_tokenizer

    return build_tokenizer(["What is 12 + 7? The sum of 12 and 7 is 19. 3 * 4 = 12; 9 - 5 = 4."] * 4)


@pytest.fixture
def random_model(tokenizer):
    """A random-init two-layer Llama (~70k parameters) for plumbing tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture
def arithmetic():
    """Small train/test slices of the bundled arithmetic task."""
    from polm.modalities.text.tasks.arithmetic import arithmetic_rows

    return arithmetic_rows("train", 64), arithmetic_rows("test", 16)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The quickstart recipe (SFT of polm-tiny on polm:arithmetic, ~2 min), run once per test session.

    Returns:
        ``(recipe, RunResult)``; the result's first stage holds the before/after metrics.
    """
    from importlib.resources import files

    from polm.engine.recipe import load_recipe

    recipe = load_recipe(str(files("polm.recipes") / "quickstart.yaml"))
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    return recipe, recipe.pipeline().run(run_dir, evaluate_before=True)


@pytest.fixture(scope="session")
def sft_checkpoint(quickstart_run):
    """The folder of the quickstart's SFT model (about 77% held-out exact_match): the start of alignment
    and reasoning learning tests. Treat it as read-only."""
    _, result = quickstart_run
    return result.stages[0].checkpoint


@pytest.fixture(scope="module")
def app():
    """The polm app served in this process on 127.0.0.1, on the first free port from 7860; closed afterwards.
    Module-scoped: each app test file gets its own server. Needs the 'app' extra."""
    from polm.apps.server import launch

    served = launch([], port=None, block=False)
    yield served
    served.close()

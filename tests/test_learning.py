"""Learning tests on the shipped polm-tiny: post-training moves the metric it should move.

This runs the quickstart recipe itself (about two minutes on two CPU cores).
"""

from __future__ import annotations

from importlib.resources import files

from polm.engine.recipe import load_recipe


def test_quickstart_sft_teaches_polm_tiny_to_answer_arithmetic(tmp_path):
    """Held-out exact_match on polm:arithmetic rises from under 10% (the base) to over 50% after SFT."""
    recipe = load_recipe(str(files("polm.recipes") / "quickstart.yaml"))
    result = recipe.pipeline().run(tmp_path / "quickstart", evaluate_before=True)
    before = result.stages[0].before["exact_match"]
    after = result.stages[0].metrics["eval/exact_match"]
    assert before < 0.10 and after > 0.50, f"exact_match before {before:.1%}, after {after:.1%}"

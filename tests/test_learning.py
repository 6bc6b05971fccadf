"""Learning tests on the shipped polm-tiny: post-training moves the metric it should move.

The quickstart recipe runs once per session (the ``quickstart_run`` fixture of
conftest, about two minutes on two CPU cores); the LoRA comparison adds about two minutes.
"""

from __future__ import annotations

import polm
from polm.engine.models import count_parameters
from polm.engine.plugins import registry

LORA = {"r": 8, "alpha": 16}


def test_quickstart_sft_teaches_polm_tiny_to_answer_arithmetic(quickstart_run):
    """Held-out exact_match on polm:arithmetic rises from under 10% (the base) to over 50% after SFT."""
    _, result = quickstart_run
    before = result.stages[0].before["exact_match"]
    after = result.stages[0].metrics["eval/exact_match"]
    assert before < 0.10 and after > 0.50, f"exact_match before {before:.1%}, after {after:.1%}"


def test_lora_sft_comes_within_10_points_of_full_sft_training_under_5_percent(quickstart_run, tmp_path):
    """LoRA at the quickstart's step budget reaches full SFT's exact_match minus at most 10 points."""
    recipe, full = quickstart_run
    options = {key: value for key, value in recipe.stages[0].items() if key != "name"}
    options.update(lr=3e-3, tuning="lora", tuning_options=LORA)
    lora = polm.Pipeline("polm-tiny").add("sft", **options).run(tmp_path / "lora")

    method = registry("tuning_methods").get("lora")
    trainable, total = count_parameters(method.prepare(polm.load_model("polm-tiny")[0], method.Options(**LORA)))
    full_score = full.stages[0].metrics["eval/exact_match"]
    lora_score = lora.stages[0].metrics["eval/exact_match"]
    assert trainable / total < 0.05, f"lora trains {trainable / total:.2%} of the parameters"
    assert lora_score >= full_score - 0.10, f"lora {lora_score:.1%} vs full {full_score:.1%}"


def test_rft_raises_exact_match_over_its_sft_starting_point(quickstart_run, sft_checkpoint, tmp_path):
    """Three rounds of rejection sampling (8 samples of 2048 training prompts, the stage's defaults) and
    fine-tuning on the accepted answers raise held-out exact_match above the SFT checkpoint's."""
    _, sft = quickstart_run
    start = sft.stages[0].metrics["eval/exact_match"]
    result = polm.Pipeline(sft_checkpoint).add(
        "rft", data="polm:arithmetic", reward="accuracy", max_new_tokens=8, batch_size=32, eval_size=300,
    ).run(tmp_path / "rft")
    after = result.stages[0].metrics["eval/exact_match"]
    assert after > start, f"exact_match {start:.1%} after SFT, {after:.1%} after RFT"

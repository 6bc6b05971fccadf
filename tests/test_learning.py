"""Learning tests on the shipped polm-tiny: post-training moves the metric it should move.

The quickstart recipe runs once per session (the ``quickstart_run`` fixture of conftest, about five minutes
on two CPU cores); the LoRA comparison (slow) adds about as much. Figures by seed and thread count come from
``python -m tests.seed_sweep`` (README, "Run the tests").
"""

from __future__ import annotations

import pytest

import polm
from polm.engine.models import count_parameters
from polm.engine.plugins import registry

LORA = {"r": 8, "alpha": 16}


def test_quickstart_sft_teaches_polm_tiny_to_answer_arithmetic(quickstart_run, record_property):
    """Held-out exact_match on polm:arithmetic rises from under 10% (the base) to at least 75% after SFT.

    Measured (``python -m tests.seed_sweep``), held-out exact_match at seeds 0 / 1 / 2:

    | CPU, threads | seed 0 | seed 1 | seed 2 |
    |---|---|---|---|
    | AMD EPYC (Zen 4, the CI machine's), 1 | 87.7% | 79.0% | 87.7% |
    | AMD EPYC, 2 | 87.7% | not measured | not measured |
    | Intel Xeon (Sapphire Rapids), 1 and 2 | 88.0% | 84.3% | 87.0% |

    The worst cell, 79.0% (AMD, seed 1: level 3 83.1%, level 4 10.2%), passes by 4 points: its loss fell
    through the carry of two-digit sums (level 3) only near step 2000, where seed 0 did near step 1300, so
    this recipe still ends close to that drop on some trajectories. At the former 1200 steps: 77.0% / 60.7% /
    42.7%, and 63.7% on another CPU.
    """
    _, result = quickstart_run
    before = result.stages[0].before["exact_match"]
    after = result.stages[0].metrics["eval/exact_match"]
    record_property("before", before)
    record_property("after", after)
    for level in range(1, 5):
        record_property(f"level_{level}", result.stages[0].metrics[f"eval/exact_match/level_{level}"])
    assert before < 0.10 and after >= 0.75, f"exact_match before {before:.1%}, after {after:.1%}"


@pytest.mark.slow  # a second 3000-step run, about 5 minutes on two cores: the default suite stays under 20
def test_lora_sft_comes_within_10_points_of_full_sft_training_under_5_percent(quickstart_run, seed, tmp_path,
                                                                              record_property):
    """LoRA at the quickstart's step budget reaches full SFT's exact_match minus at most 10 points.

    Measured at one thread, lora against full at seeds 0 / 1 / 2: 92.3 / 90.3 / 90.3% against 87.7 / 79.0 /
    87.7% on an AMD EPYC; 90.7 / 91.0 / 90.7% against 88.0 / 84.3 / 87.0% on an Intel Xeon. LoRA (lr 3e-3)
    beat full SFT in every cell, by 2.6 to 11.3 points; the threshold allows it to lose 10.
    """
    recipe, full = quickstart_run
    options = {key: value for key, value in recipe.stages[0].items() if key != "name"}
    options.update(lr=3e-3, tuning="lora", tuning_options=LORA)
    lora = polm.Pipeline("polm-tiny", seed=seed).add("sft", **options).run(tmp_path / "lora")

    method = registry("tuning_methods").get("lora")
    trainable, total = count_parameters(method.prepare(polm.load_model("polm-tiny")[0], method.Options(**LORA)))
    full_score = full.stages[0].metrics["eval/exact_match"]
    lora_score = lora.stages[0].metrics["eval/exact_match"]
    record_property("full", full_score)
    record_property("lora", lora_score)
    assert trainable / total < 0.05, f"lora trains {trainable / total:.2%} of the parameters"
    assert lora_score >= full_score - 0.10, f"lora {lora_score:.1%} vs full {full_score:.1%}"


def test_rft_raises_exact_match_over_its_sft_starting_point(short_sft_run, seed, tmp_path, record_property):
    """384 steps of rejection sampling (8 samples of each of 32 training prompts per step, the stage's
    defaults otherwise: 12288 prompts in all) and fine-tuning on the accepted answers raise held-out
    exact_match by at least 2 points over the short SFT it starts from (``short_sft_run``: the format
    learned, the carries not), STaR's setting.

    Measured on an AMD EPYC (the CI machine's CPU) by script with this test's calls, short SFT -> rft:

    | seed | 1 thread | 2 threads |
    |---|---|---|
    | 0 | 27.3 -> 35.3% (+8.0) | 27.3 -> 35.3% (+8.0) |
    | 1 | 30.0 -> 38.0% (+8.0) | 30.0 -> 38.0% (+8.0) |
    | 2 | 31.3 -> 41.7% (+10.3) | 31.3 -> 41.7% (+10.3) |

    Under pytest (``python -m tests.seed_sweep``, one thread) the same three cells again: +8.0 / +8.0 / +10.3.
    The worst gain, +8.0, is four times the threshold; on an Intel Xeon these 384 steps are not yet measured.
    At the former 192 steps the gain was smaller than its spread across machines and seeds: +7.0 / +3.3 /
    +1.3 points on AMD at one thread (seed 2 failed), +3.7 / +4.0 / +4.7 on an Intel Xeon. Doubling the
    steps keeps rft's small constant lr (3e-5; at 1e-4, seed 0 on Intel gave +2.4 at 192 steps) and raised
    the worst gain on AMD from +1.3 to +8.0 points. From the converged quickstart model there is nothing
    to bootstrap: 88.0% -> 87.3% and 84.3% -> 82.3% (the former rounds), and skipping prompts solved every
    time (max_pass_rate 0.875 or 0.5) did not help.
    """
    start = short_sft_run.stages[0].metrics["eval/exact_match"]
    result = polm.Pipeline(short_sft_run.checkpoint, seed=seed).add(
        "rft", data="polm:arithmetic", rewards={"accuracy": 1.0}, max_new_tokens=8, batch_size=32, max_steps=384,
        eval_size=300,
    ).run(tmp_path / "rft")
    after = result.stages[0].metrics["eval/exact_match"]
    record_property("sft", start)
    record_property("rft", after)
    assert after >= start + 0.02, f"exact_match {start:.1%} after SFT, {after:.1%} after RFT"

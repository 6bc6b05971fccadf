"""Learning tests of the efficiency paradigm from the quickstart's SFT model (``sft_checkpoint``), marked ``slow``.

Measured by script with these tests' calls on an AMD EPYC at one thread, from the quickstart models of seeds
0 / 1 / 2 (held-out exact_match 87.7 / 79.0 / 87.7%), each step with pipeline seed 0; ``polm compress`` then
measured the saved variants (the closing note of session 15 has its table):

| variant | seed 0 | seed 1 | seed 2 |
|---|---|---|---|
| int8 weight-only (``quantize``) | 87.7% | 79.3% | 87.7% |
| dynamic int8 | 88.0% | 79.3% | 88.3% |
| 50% unstructured, magnitude (per layer) | 85.3% | 73.7% | 86.3% |
| 50% unstructured, Wanda (per output row) | 80.0% | 58.3% | 83.3% |
| 25% of the MLP neurons removed | 87.7% | 79.3% | 88.0% |
| the same, then 300 recovery steps | 88.3% | 80.3% | 89.0% |

Wanda lost more than magnitude on every model (issue 20 expects the opposite): on polm-tiny the inputs of
the attention and gate/up projections, after RMSNorm, have no outlier features (largest over median input
norm 2-5), and weighting by them, compared within rows, removed weights that mattered; on down_proj, whose
inputs have large outliers (167 times the median), Wanda and magnitude scored alike. No test asserts
either order.
"""

from __future__ import annotations

import pytest

import polm

pytestmark = pytest.mark.slow

HELD_OUT = {"eval_size": 300, "max_new_tokens": 8}  # the whole polm:arithmetic test pool


def test_removing_a_quarter_of_the_mlp_neurons_shrinks_the_files_and_recovery_keeps_exact_match(
        sft_checkpoint, seed, tmp_path, record_property):
    """Structured pruning of 25% of each layer's MLP neurons (172 of 688) and 300 recovery steps: the
    safetensors at most 85% of the model's and held-out exact_match at most 5 points under it.

    Measured (table of the module docstring): 16.0% fewer parameters and 84.0% of the bytes; exact_match
    87.7 -> 88.3%, 79.0 -> 80.3%, 87.7 -> 89.0% (seeds 0 / 1 / 2, pruned at pipeline seed 0); seed 1 run as
    this test runs it (pipeline seed 1: other calibration rows and data order), 79.0 -> 79.3%. The worst cell
    is 5.3 points clear of the threshold.
    Without recovery the removal alone cost nothing (87.7 / 79.3 / 88.0%): the SFT'd polm-tiny leaves many
    MLP neurons nearly silent on this task.
    """
    before = polm.evaluate(sft_checkpoint, "polm:arithmetic", size=300, max_new_tokens=8)["exact_match"]
    result = polm.Pipeline(str(sft_checkpoint), seed=seed).add(
        "prune", data="polm:arithmetic", mlp_fraction=0.25, max_steps=300, batch_size=32, lr=1e-4,
        warmup_ratio=0.05, **HELD_OUT).run(tmp_path / "run")
    after = result.stages[0].metrics["eval/exact_match"]
    size = sum(path.stat().st_size for path in result.checkpoint.glob("*.safetensors"))
    original = sum(path.stat().st_size for path in sft_checkpoint.glob("*.safetensors"))
    record_property("before", before)
    record_property("after", after)
    record_property("size_ratio", size / original)
    assert size <= 0.85 * original, f"safetensors {size:,} bytes against {original:,}"
    assert after >= before - 0.05, f"held-out exact_match {before:.1%} unpruned, {after:.1%} after recovery"

"""Learning tests of the alignment paradigm, from the quickstart's SFT model (``sft_checkpoint``).

Each test shows a method moving the metric it should move on the bundled arithmetic tasks, with the
before and after figures in its assertion message. The step budgets are chosen to fit a two-core CI run.
"""

from __future__ import annotations

import polm

HELD_OUT = 300  # the whole polm:arithmetic test pool
MAX_NEW_TOKENS = 8


def test_dpo_ranks_held_out_pairs_without_losing_exact_match(sft_checkpoint, tmp_path):
    """DPO on polm:arithmetic-prefs: held-out reward accuracy reaches 0.8 and exact_match on the same 300
    questions drops by at most 2 points."""
    result = polm.Pipeline(str(sft_checkpoint), seed=0).add("dpo", **DPO_RECIPE).run(
        tmp_path / "run", evaluate_before=True)
    stage = result.stages[0]
    before, after = stage.before, stage.metrics
    figures = (f"reward_accuracy {before['reward_accuracy']:.3f} -> {after['eval/reward_accuracy']:.3f}, "
               f"exact_match {before['exact_match']:.3f} -> {after['eval/exact_match']:.3f}")
    assert after["eval/reward_accuracy"] >= 0.8, figures
    assert after["eval/exact_match"] >= before["exact_match"] - 0.02, figures


#: 200 steps of 32 pairs; beta 2 keeps the policy near the SFT model (exact_match does not drop).
DPO_RECIPE = {"data": "polm:arithmetic-prefs", "objective_options": {"beta": 2.0}, "max_steps": 200,
              "batch_size": 32, "lr": 1e-4, "eval_size": HELD_OUT, "max_new_tokens": MAX_NEW_TOKENS}

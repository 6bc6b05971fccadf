"""Learning tests of the alignment paradigm, from a short SFT of polm-tiny (``short_sft_run``).

Each test shows a method moving the metric it should move on the bundled arithmetic tasks, with the
before and after figures in its assertion message. The step budgets are chosen to fit a two-core CI run.
"""

from __future__ import annotations

import polm

HELD_OUT = 300  # the whole polm:arithmetic test pool
MAX_NEW_TOKENS = 8


def test_dpo_ranks_held_out_pairs_without_losing_exact_match(short_sft_run, seed, tmp_path, record_property):
    """DPO on polm:arithmetic-prefs from the short SFT (``short_sft_run``): held-out reward accuracy reaches 0.7
    (chance is 0.5; it starts at 0.0 because the policy's and the reference's rewards tie) and exact_match on the
    same 300 questions drops by at most 2 points.

    Measured on two CPUs with this recipe (400 steps, cosine schedule). Intel Xeon (Sapphire Rapids), one
    thread: reward_accuracy 0.837 / 0.827 / 0.840 and exact_match 27.3% -> 30.7%, 36.3% -> 39.0%, 38.0% ->
    42.3% at seeds 0 / 1 / 2. AMD EPYC, one thread, under pytest (``python -m tests.seed_sweep``): 0.773 /
    0.797 / 0.813 and exact_match 27.3% -> 32.7%, 30.0% -> 33.7%, 31.3% -> 34.3% at seeds 0 / 1 / 2; two
    threads, seed 0 (CI and a fresh clone, identical): 0.773, exact_match 27.3% -> 32.7%. A 600-step run on the AMD machine (another schedule, so not this recipe's
    figures) ranked 0.787 / 0.830 / 0.813 at seeds 0 / 1 / 2: more steps do not lift seed 0 clear of 0.8.
    The ranking levels off near 0.8 because the rejected answers are near misses, which only a model that can
    add tells apart, and the short SFT answers about a third of the questions right. A threshold of 0.8, set
    from the Intel runs alone, failed CI on the AMD machine; 0.7 sits 0.07 under the worst run, and the effect
    (0.27 or more above chance) is four times the spread. Not yet measured with this recipe: AMD seeds 1 / 2
    at two threads, and two threads on Intel.

    From the converged quickstart model (84-88%) the same recipe lost 3.0-3.3 points of
    exact_match and ranked 0.75-0.84 of the pairs; lr 3e-5 to 5e-5, beta 5 or an NLL term on the chosen
    answers (nll_weight 1) still lost 0.7-2.3 points or ranked under 0.75.
    """
    result = polm.Pipeline(str(short_sft_run.checkpoint), seed=seed).add("dpo", **DPO_RECIPE).run(
        tmp_path / "run", evaluate_before=True)
    stage = result.stages[0]
    before, after = stage.before, stage.metrics
    figures = (f"reward_accuracy {before['reward_accuracy']:.3f} -> {after['eval/reward_accuracy']:.3f}, "
               f"exact_match {before['exact_match']:.3f} -> {after['eval/exact_match']:.3f}")
    for metric in ("reward_accuracy", "exact_match"):
        record_property(f"{metric}_before", before[metric])
        record_property(f"{metric}_after", after[f"eval/{metric}"])
    assert after["eval/reward_accuracy"] >= 0.7, figures
    assert after["eval/exact_match"] >= before["exact_match"] - 0.02, figures


#: 400 steps of 32 pairs (12 800 of the 20 000 training pairs); beta 2 keeps the policy near its start.
DPO_RECIPE = {"data": "polm:arithmetic-prefs", "objective_options": {"beta": 2.0}, "max_steps": 400,
              "batch_size": 32, "lr": 1e-4, "eval_size": HELD_OUT, "max_new_tokens": MAX_NEW_TOKENS}

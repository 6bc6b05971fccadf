"""Learning tests of the reasoning paradigm, from the session's SFT checkpoint of polm-tiny (``sft_checkpoint``).

GRPO raises the reward of the prompts it trains on (on-policy, fresh samples every step). Held-out
gains of GRPO, PRM best-of-n and self-consistency are not asserted here: at the budgets measured so
far they did not reach their targets (see the reasoning paradigm's issue for the figures).
"""

from __future__ import annotations

import json

import polm
from polm.modalities.text.tasks.arithmetic import arithmetic_rows


def test_grpo_raises_the_reward_of_its_training_prompts(sft_checkpoint, tmp_path):
    """16 hard questions (levels 3-4), 8 samples each per step; the rollouts' accuracy rises."""
    rows = [row for row in arithmetic_rows("train", 400) if row["level"] >= 3][:16]
    (polm.Pipeline(sft_checkpoint)
     .add("grpo", data=rows, batch_size=16, num_generations=8, max_steps=40, lr=3e-5, lr_scheduler="constant",
          rewards={"accuracy": 1.0, "format": 0.2}, reward_options={"format": {"pattern": r"-?\d+"}},
          max_new_tokens=8, log_every=10, eval_size=0)
     .run(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run/00-grpo/metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["reward/accuracy"], records[-1]["reward/accuracy"]
    assert records[-1]["reward/format"] >= 0.99, "the answers stay bare numbers"
    assert last >= first + 0.10, f"rollout accuracy over steps 1-10 {first:.1%}, over steps 31-40 {last:.1%}"

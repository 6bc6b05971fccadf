"""The kto stage: unpaired rows from preference pairs, mismatched rows for the KL estimate, the loss at the start.

Runs use the random two-layer Llama of ``random_model``.
"""

from __future__ import annotations

import json
import math

import pytest
from torch.testing import assert_close

import polm
from polm.engine.encoding import IGNORE_INDEX, Encoded
from polm.modalities.text.tasks import arithmetic_preference_rows
from polm.plugins.alignment.kto import KTOStage, unpaired_rows
from polm.plugins.alignment.kto.rows import EncodedCompletion, mismatched


def test_preference_rows_become_a_desirable_and_an_undesirable_row():
    rows = unpaired_rows([{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"},
                          {"prompt": "What is 2 + 2?", "completion": "5", "label": False}])
    assert rows == [{"prompt": "What is 1 + 1?", "completion": "2", "label": True},
                    {"prompt": "What is 1 + 1?", "completion": "3", "label": False},
                    {"prompt": "What is 2 + 2?", "completion": "5", "label": False}]
    with pytest.raises(polm.PolmError, match=r"row 0 has fields \['completion', 'label', 'prompt'\]"):
        unpaired_rows([{"prompt": "p", "completion": "c", "label": "yes"}])


def test_mismatched_rows_splice_each_prompt_with_the_next_completion():
    """Rows (prompt | completion): A = (1 2 | 3), B = (4 | 5 6). Mismatched: (1 2 | 5 6) and (4 | 3);
    the prompt keeps no label. With max_length 3 the first is cut to (1 2 | 5)."""
    a = EncodedCompletion(Encoded([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3]), 2, True)
    b = EncodedCompletion(Encoded([4, 5, 6], [IGNORE_INDEX, 5, 6]), 1, False)
    assert mismatched([a, b], 8) == [Encoded([1, 2, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 5, 6]),
                                     Encoded([4, 3], [IGNORE_INDEX, 3])]
    assert mismatched([a, b], 3)[0] == Encoded([1, 2, 5], [IGNORE_INDEX, IGNORE_INDEX, 5])


def test_kto_starts_at_one_half_and_learns_fixed_rows(random_model, tokenizer, tmp_path):
    """At step 1 the policy is its reference: every reward and z0 are 0, each row costs 1 - sigmoid(0) = 1/2.

    On eight preference pairs (sixteen unpaired rows) the loss then falls, the step metrics reach
    metrics.jsonl, and held-out pairs give reward_accuracy as in dpo.
    """
    rows, test_rows = arithmetic_preference_rows("train", 8), arithmetic_preference_rows("test", 4)
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "kto", data=rows, eval_data=test_rows, eval_size=4, max_new_tokens=2, max_steps=8, batch_size=16, lr=1e-2,
        log_every=1, objective_options={"beta": 1.0}).run(tmp_path / "run")
    logged = [r for r in map(json.loads, (tmp_path / "run/00-kto/metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert_close(logged[0]["loss"], 0.5, rtol=0, atol=1e-6)
    assert {"reward_accuracy", "kl", "chosen_reward", "rejected_reward", "reward_margin"} <= logged[0].keys()
    assert logged[-1]["loss"] < 0.6 * logged[0]["loss"], (logged[0]["loss"], logged[-1]["loss"])
    assert math.isfinite(logged[-1]["kl"])
    assert {"eval/reward_accuracy", "eval/exact_match"} <= result.stages[0].metrics.keys()
    assert KTOStage.headline_metric == "reward_accuracy"


@pytest.mark.parametrize("options, message", [
    ({"objective_options": {"betta": 1.0}},
     r"objective 'kto': unknown option 'betta'\. Did you mean 'beta'\? Valid options: beta, desirable_weight"),
    ({"objective_options": {"desirable_weight": 0.0}}, r"objective 'kto': 'desirable_weight' must be positive"),
])
def test_bad_kto_options_fail_when_the_stage_is_added(options, message):
    with pytest.raises(polm.PolmError, match=message):
        polm.Pipeline("polm-tiny").add("kto", data="polm:arithmetic-prefs", **options)

"""The preference stages: pair encoding, completion log-probs, the reference model, objectives chosen by name.

All runs use the random two-layer Llama of ``random_model`` on a few pairs of ``polm:arithmetic-prefs``
(``{prompt, chosen, rejected, answer}``: the right answer over a plausible wrong one).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.engine.encoding import IGNORE_INDEX
from polm.engine.rl import ReferenceModel, completion_logps, sequence_logps
from polm.modalities.text.tasks import arithmetic_preference_rows
from polm.plugins.alignment.logps import collate_pairs, encode_pair
from polm.plugins.alignment.objectives import dpo_loss
from polm.plugins.alignment.preference import PreferenceStage


@pytest.fixture
def prefs():
    """Eight training pairs and four held-out ones."""
    return arithmetic_preference_rows("train", 8), arithmetic_preference_rows("test", 4)


@pytest.fixture
def captured_references(monkeypatch):
    """Every ``(policy, reference)`` a preference stage sets up in a run; reference None when reference-free."""
    captured: list[tuple[torch.nn.Module, ReferenceModel | None]] = []
    original = PreferenceStage.reference

    def reference(self, policy, objective):
        captured.append((policy, original(self, policy, objective)))
        return captured[-1][1]

    monkeypatch.setattr(PreferenceStage, "reference", reference)
    return captured


def records(run_dir, stage="00-dpo"):
    """Training records (with a loss) of a stage's metrics.jsonl."""
    lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "loss" in record]


def held_bytes(*tensor_lists):
    """Bytes of the distinct storages behind the tensors: a tensor shared by two holders counts once."""
    storages = {}
    for tensors in tensor_lists:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def model_tensors(model):
    return list(model.parameters()) + list(model.buffers())


def test_completion_logps_match_hand_computation():
    """Sum and mean of log-probs of labelled next tokens; padding and prompt count for nothing.

    Vocabulary 2. Row 0: labels (-100, 0, 1); position 0 predicts 0 from logits (0, 0): ln 1/2;
    position 1 predicts 1 from (ln 3, 0): p = 1/4, ln 1/4. Sum -3 ln 2, average -1.5 ln 2.
    Row 1: labels (-100, 1, -100): only position 0 predicts 1 from (0, 0): ln 1/2, sum = average = -ln 2.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]],
                           [[0.0, 0.0], [9.0, -9.0], [1.0, 2.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 0, 1], [IGNORE_INDEX, 1, IGNORE_INDEX]])
    ln2 = math.log(2.0)
    assert_close(completion_logps(logits, labels), torch.tensor([-3 * ln2, -ln2]))
    assert_close(completion_logps(logits, labels, average=True), torch.tensor([-1.5 * ln2, -ln2]))
    with pytest.raises(ValueError, match="no labelled"):
        completion_logps(logits, torch.full((2, 3), IGNORE_INDEX))


def test_pairs_mask_the_prompt_and_stack_chosen_then_rejected(tokenizer, prefs):
    """Both sides share the prompt tokens, unlabelled; a batch holds B chosen rows, then B rejected rows."""
    rows, _ = prefs
    pairs = [encode_pair(tokenizer, row, 64) for row in rows[:3]]
    for pair in pairs:
        prompt_length = pair.chosen.labels.count(IGNORE_INDEX)
        assert pair.chosen.labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
        assert pair.chosen.input_ids[:prompt_length] == pair.rejected.input_ids[:prompt_length]
        assert pair.chosen.labels[prompt_length:] == pair.chosen.input_ids[prompt_length:]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and "ref_logps" not in batch
    for i, pair in enumerate(pairs):
        assert batch["input_ids"][i, : len(pair.chosen.input_ids)].tolist() == pair.chosen.input_ids
        assert batch["input_ids"][3 + i, : len(pair.rejected.input_ids)].tolist() == pair.rejected.input_ids
    scored = [type(pair)(pair.chosen, pair.rejected, (-1.0 - i, -10.0 - i)) for i, pair in enumerate(pairs)]
    assert collate_pairs(scored, tokenizer.pad_token_id)["ref_logps"].tolist() == [-1, -2, -3, -10, -11, -12]
    with pytest.raises(polm.PolmError, match="prompt, chosen and rejected"):
        encode_pair(tokenizer, {"prompt": "What is 1 + 1?", "answer": "2"}, 64)
    assert encode_pair(tokenizer, rows[0], 4) is None  # the prompt alone fills max_length


def test_sequence_logps_do_not_depend_on_the_batch(random_model, tokenizer, prefs):
    """A pair scored alone or in a padded batch has the same log-probs (what precomputing relies on)."""
    rows, _ = prefs
    random_model.eval()
    pairs = [encode_pair(tokenizer, row, 64) for row in rows[:4]]
    together = sequence_logps(random_model, collate_pairs(pairs, tokenizer.pad_token_id))  # (8,)
    alone = [sequence_logps(random_model, collate_pairs([pair], tokenizer.pad_token_id)) for pair in pairs]
    assert_close(together, torch.cat([torch.stack([a[0] for a in alone]), torch.stack([a[1] for a in alone])]))


def test_dpo_stage_lowers_the_loss_on_fixed_pairs_and_logs_metrics(random_model, tokenizer, prefs, tmp_path):
    """Full DPO on eight fixed pairs: step 1 is ln 2 (the policy is its own reference), then the loss falls.

    Each step's loss, reward accuracy, margin and rewards reach metrics.jsonl; the held-out evaluation
    reports reward_accuracy on pairs and exact_match on their answers.
    """
    rows, test_rows = prefs
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "dpo", data=rows, eval_data=test_rows, eval_size=4, max_new_tokens=2, max_steps=8, batch_size=8,
        lr=1e-2, log_every=1, objective_options={"beta": 1.0},
    ).run(tmp_path / "run")
    logged = records(tmp_path / "run")
    assert {"loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"} <= logged[0].keys()
    assert_close(logged[0]["loss"], math.log(2.0), rtol=0, atol=1e-5)
    assert logged[-1]["loss"] < 0.25 * logged[0]["loss"], (logged[0]["loss"], logged[-1]["loss"])
    assert logged[-1]["reward_accuracy"] == 1.0
    metrics = result.stages[0].metrics
    assert {"eval/reward_accuracy", "eval/exact_match"} <= metrics.keys()
    assert PreferenceStage.headline_metric == "reward_accuracy"


def test_nll_weight_adds_the_chosen_answers_per_token_nll(random_model, tokenizer, prefs, tmp_path):
    """Step 1 with ``nll_weight: 0.5`` on all eight pairs at once: ln 2 (the policy is its own reference) plus
    0.5 x the mean over pairs of -(log-prob of the chosen answer / its token count) under the starting model."""
    rows, _ = prefs
    start = copy.deepcopy(random_model).eval()
    batch = collate_pairs([encode_pair(tokenizer, row, 512) for row in rows], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen_logps = sequence_logps(start, batch, average=True).chunk(2)[0]  # (8,) per-token means
    nll = float(-chosen_logps.mean())
    polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "dpo", data=rows, eval_size=0, max_steps=1, batch_size=8, lr=1e-2, log_every=1, nll_weight=0.5,
        objective_options={"beta": 1.0},
    ).run(tmp_path / "run")
    logged = records(tmp_path / "run")[0]
    assert_close(logged["chosen_nll"], nll, rtol=1e-5, atol=1e-5)
    assert_close(logged["loss"], math.log(2.0) + 0.5 * nll, rtol=1e-5, atol=1e-5)


def test_held_out_reward_accuracy_compares_implicit_rewards(random_model, tokenizer, prefs, tmp_path):
    """eval/reward_accuracy is the fraction of held-out pairs with (policy - start) of chosen above rejected.

    Checked against log-probs computed pair by pair with the trained and the starting model. Before its
    stage the starting model is its own reference: every implicit reward is 0, no pair is won.
    """
    rows, test_rows = prefs
    start = copy.deepcopy(random_model).eval()
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "dpo", data=rows, eval_data=test_rows, eval_size=4, max_new_tokens=2, max_steps=6, batch_size=8, lr=1e-2,
    ).run(tmp_path / "run", evaluate_before=True)
    assert result.stages[0].before["reward_accuracy"] == 0.0
    trained = polm.load_model(result.checkpoint)[0].eval()
    wins = []
    for row in test_rows:
        batch = collate_pairs([encode_pair(tokenizer, row, 512)], tokenizer.pad_token_id)
        with torch.no_grad():
            chosen, rejected = sequence_logps(trained, batch) - sequence_logps(start, batch)
        wins.append(float(chosen > rejected))
    assert result.stages[0].metrics["eval/reward_accuracy"] == sum(wins) / len(wins)


class _RecordingObjective:
    """A runtime plugin contributing the pairwise objective ``scaled_dpo`` (no other metadata: the defaults)."""

    def __init__(self):
        self.calls: list[tuple[int, float]] = []

    @polm.hookimpl
    def polm_register_objectives(self, register):
        def scaled_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, scale=1.0):
            self.calls.append((policy_chosen.shape[0], scale))
            return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=scale)

        register("scaled_dpo", scaled_dpo, family="pairwise")


def test_third_party_objective_is_selected_by_name_and_runs(random_model, tokenizer, prefs, tmp_path):
    """objective: scaled_dpo runs the plugin's function with its options.

    Calls: one on (1,) zeros when the stage is added (its options are checked), then one per step on B = 4 pairs.
    """
    rows, _ = prefs
    plugin = _RecordingObjective()
    polm.plugin_manager().register(plugin, name="test-scaled-dpo")
    try:
        pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add(
            "dpo", data=rows, objective="scaled_dpo", objective_options={"scale": 0.5}, max_steps=2, batch_size=4,
            eval_size=0)
        assert plugin.calls == [(1, 0.5)]
        pipeline.run(tmp_path / "run")
        assert plugin.calls == [(1, 0.5), (4, 0.5), (4, 0.5)]
        with pytest.raises(polm.PolmError, match=r"unknown option 'beta'.*Valid options: scale"):
            polm.Pipeline(random_model, tokenizer=tokenizer).add(
                "dpo", data=rows, objective="scaled_dpo", objective_options={"beta": 0.5})
    finally:
        polm.plugin_manager().unregister(name="test-scaled-dpo")
    with pytest.raises(polm.PolmError, match="unknown objective 'scaled_dpo'"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add("dpo", data=rows, objective="scaled_dpo")


@pytest.mark.parametrize("options, message", [
    ({"objective": "dpoo"},
     r"stage 0 'dpo': unknown objective 'dpoo'\. Did you mean 'dpo'\? Available: dpo, hinge, ipo, orpo, robust, simpo"),
    ({"objective": "kto"}, r"objective 'kto' belongs to the unpaired family.*choose one of: dpo, hinge"),
    ({"objective_options": {"betta": 0.1}},
     r"objective 'dpo': unknown option 'betta'\. Did you mean 'beta'\? Valid options: beta, label_smoothing"),
    ({"objective_options": {"label_smoothing": 0.7}}, r"objective 'dpo': 'label_smoothing' must be in \[0, 0\.5\)"),
    ({"objective": "orpo", "objective_options": {"beta": 0.1}}, r"Valid options: lambda_"),
    ({"nll_weight": -1.0}, r"'nll_weight' must not be negative, got -1\.0"),
])
def test_bad_objective_or_options_fail_when_the_stage_is_added(tokenizer, prefs, options, message):
    rows, _ = prefs
    with pytest.raises(polm.PolmError, match=message):
        polm.Pipeline("polm-tiny").add("dpo", data=rows, **options)


def test_lora_dpo_holds_one_copy_of_the_base_weights(random_model, tokenizer, prefs, tmp_path, captured_references):
    """With LoRA the reference is the policy with adapters disabled; full DPO keeps a frozen copy.

    LoRA: policy and reference together hold exactly the policy's bytes (base + adapters). Full: twice the
    policy's bytes. After LoRA training the reference still scores like the starting model, and the policy does not.
    """
    rows, _ = prefs
    start = copy.deepcopy(random_model).eval()
    for tuning, run in (("lora", "lora"), ("full", "full")):
        polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer).add(
            "dpo", data=rows, tuning=tuning, max_steps=3, batch_size=4, lr=1e-2, eval_size=0,
        ).run(tmp_path / run)
    (lora_policy, lora_reference), (full_policy, full_reference) = captured_references
    policy_bytes = held_bytes(model_tensors(lora_policy))
    assert lora_reference.held_tensors() == []
    assert held_bytes(model_tensors(lora_policy), lora_reference.held_tensors()) == policy_bytes
    full_bytes = held_bytes(model_tensors(full_policy))
    assert held_bytes(model_tensors(full_policy), full_reference.held_tensors()) == 2 * full_bytes

    batch = collate_pairs([encode_pair(tokenizer, row, 64) for row in rows[:2]], tokenizer.pad_token_id)
    with torch.no_grad():
        starting = sequence_logps(start, batch)
        assert_close(lora_reference.logps(lora_policy, batch), starting)
        assert not torch.allclose(sequence_logps(lora_policy.eval(), batch), starting)


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_precomputed_reference_gives_the_same_losses(random_model, tokenizer, prefs, tmp_path, tuning,
                                                     captured_references):
    """precompute_ref: true scores the pairs once before training; the losses equal per-batch scoring.

    Step 1 is ln 2 either way; steps 2-3 depend on the reference log-probs (the policy has moved). With full
    tuning the frozen copy is dropped once the pairs are scored.
    """
    rows, test_rows = prefs
    losses = {}
    for precompute in (False, True):
        run = tmp_path / f"precompute-{precompute}"
        polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer).add(
            "dpo", data=rows, eval_data=test_rows, eval_size=4, max_new_tokens=1, tuning=tuning, max_steps=3,
            batch_size=4, lr=1e-2, log_every=1, precompute_ref=precompute, objective_options={"beta": 1.0},
        ).run(run)
        losses[precompute] = [record["loss"] for record in records(run)]
    assert_close(losses[True][0], math.log(2.0), rtol=0, atol=1e-5)
    assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
    assert losses[True][2] != pytest.approx(math.log(2.0), abs=1e-3)
    assert captured_references[1][1].held_tensors() == []


@pytest.mark.parametrize("stage", ["simpo", "orpo"])
def test_reference_free_stages_hold_no_reference(random_model, tokenizer, prefs, tmp_path, stage,
                                                 captured_references):
    """simpo and orpo default to their reference-free objectives: no reference, and held-out accuracy compares
    the policy's average log-probs of chosen and rejected."""
    rows, test_rows = prefs
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        stage, data=rows, eval_data=test_rows, eval_size=4, max_new_tokens=1, max_steps=3, batch_size=4, lr=1e-2,
        log_every=1,
    ).run(tmp_path / "run")
    assert captured_references[0][1] is None
    assert {"loss", "reward_accuracy", "reward_margin"} <= records(tmp_path / "run", f"00-{stage}")[0].keys()
    trained = polm.load_model(result.checkpoint)[0].eval()
    batch = collate_pairs([encode_pair(tokenizer, row, 512) for row in test_rows], tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = sequence_logps(trained, batch, average=True).chunk(2)
    assert result.stages[0].metrics["eval/reward_accuracy"] == float((chosen > rejected).float().mean())

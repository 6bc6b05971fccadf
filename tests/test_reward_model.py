"""Reward models: the Bradley–Terry loss by hand, the reward_model stage, its folder, the rewards that use it.

Runs use the random two-layer Llama of ``random_model`` on a few pairs of ``polm:arithmetic-prefs``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.engine.encoding import encode_completion
from polm.modalities.text.tasks import arithmetic_preference_rows
from polm.plugins.alignment.judge import judge_reward
from polm.plugins.alignment.reward_model import RewardModelStage, bradley_terry_loss, reward_model_reward

LN3 = math.log(3.0)


@pytest.fixture
def prefs():
    """Eight training pairs and four held-out ones."""
    return arithmetic_preference_rows("train", 8), arithmetic_preference_rows("test", 4)


def test_bradley_terry_loss_matches_hand_computation():
    """Scores chosen (ln 3, 0), rejected (0, ln 3): differences (ln 3, -ln 3), sigmoid 3/4 and 1/4.

    Loss (ln(4/3) + ln 4) / 2; pair 0 won, pair 1 lost: accuracy 1/2, margin 0.
    Gradient w.r.t. the chosen scores: -(1 - sigmoid(d_i)) / 2 = (-1/8, -3/8); the rejected get the opposite.
    With margin ln 3 the differences become (0, -2 ln 3): sigmoid 1/2 and 1/10, loss (ln 2 + ln 10) / 2.
    """
    chosen = torch.tensor([LN3, 0.0], requires_grad=True)
    rejected = torch.tensor([0.0, LN3], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    assert_close(loss, torch.tensor((math.log(4 / 3) + math.log(4)) / 2))
    assert metrics["reward_accuracy"] == 0.5
    assert_close(metrics["reward_margin"], 0.0, rtol=0, atol=1e-6)
    loss.backward()
    assert_close(chosen.grad, torch.tensor([-1 / 8, -3 / 8]))
    assert_close(rejected.grad, torch.tensor([1 / 8, 3 / 8]))
    with_margin, _ = bradley_terry_loss(chosen.detach(), rejected.detach(), margin=LN3)
    assert_close(with_margin, torch.tensor((math.log(2) + math.log(10)) / 2))


def test_reward_model_round_trips_through_plain_transformers(random_model, tokenizer, prefs, tmp_path):
    """The stage's final/ loads with AutoModelForSequenceClassification (num_labels 1); the reward_model
    reward scores prompt + completion with it exactly as a plain forward pass reads the last token; held-out
    accuracy is the fraction of pairs scored chosen above rejected; the loss falls on fixed pairs."""
    from transformers import AutoModelForSequenceClassification

    rows, test_rows = prefs
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "reward_model", data=rows, eval_data=test_rows, eval_size=4, max_steps=8, batch_size=8, lr=1e-2,
        log_every=1).run(tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run/00-reward_model/metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in logged if "loss" in record]
    assert losses[-1] < 0.75 * losses[0], losses
    assert RewardModelStage.headline_metric == "accuracy"

    loaded = AutoModelForSequenceClassification.from_pretrained(result.checkpoint).eval()
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tokenizer.pad_token_id
    prompts = [row["prompt"] for row in test_rows] * 2
    completions = [row["chosen"] for row in test_rows] + [row["rejected"] for row in test_rows]
    scores = reward_model_reward(prompts, completions, path=str(tmp_path / "run/00-reward_model"))
    with torch.no_grad():
        alone = [float(loaded(input_ids=torch.tensor([encode_completion(tokenizer, p, c).input_ids])).logits[0, 0])
                 for p, c in zip(prompts, completions)]
    assert_close(scores, alone, rtol=1e-5, atol=1e-5)
    chosen, rejected = torch.tensor(scores).chunk(2)
    assert result.stages[0].metrics["eval/accuracy"] == float((chosen > rejected).float().mean())
    with pytest.raises(polm.PolmError, match="reward model '.*' not found"):
        reward_model_reward(prompts[:1], completions[:1], path=str(tmp_path / "nowhere"))


def test_reward_model_stage_passes_the_policy_on_and_ppo_points_at_it(random_model, tokenizer, prefs, tmp_path):
    """reward_model -> ppo in one pipeline: ppo trains the starting causal LM (not the reward model) with
    rewards from the reward model's folder; a resumed finished run reloads neither model into the other."""
    from transformers import AutoModelForCausalLM

    rows, _ = prefs
    run = tmp_path / "run"

    def pipeline():
        return polm.Pipeline(random_model, tokenizer=tokenizer).add(
            "reward_model", data=rows, max_steps=2, batch_size=4, eval_size=0,
        ).add("ppo", data=[{"prompt": row["prompt"], "answer": row["answer"]} for row in rows],
              rewards={"reward_model": 1.0}, reward_options={"reward_model": {"path": str(run / "00-reward_model")}},
              max_steps=2, batch_size=2, max_new_tokens=4, eval_size=0, log_every=1)

    result = pipeline().run(run)
    logged = [json.loads(line) for line in (run / "01-ppo/metrics.jsonl").read_text().splitlines()]
    assert "score" in logged[0]
    assert type(AutoModelForCausalLM.from_pretrained(result.checkpoint)).__name__ == "LlamaForCausalLM"
    resumed = pipeline().run(run, resume=True)
    assert [stage.checkpoint for stage in resumed.stages] == [stage.checkpoint for stage in result.stages]


def test_reward_model_stage_refuses_adapters(prefs):
    with pytest.raises(polm.PolmError, match="tuning 'lora' is not supported here"):
        polm.Pipeline("polm-tiny").add("reward_model", data=prefs[0], tuning="lora")


def test_judge_reward_is_the_probability_of_yes_against_no(random_model, tokenizer, tmp_path):
    """p(Yes) / (p(Yes) + p(No)) at the judge's next token after the rendered template, row fields included."""
    from polm.engine.encoding import encode_prompt

    random_model.save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    template = "Q: {prompt} A: {completion} Expected: {answer}. Correct?"
    prompts, completions, answers = ["What is 1 + 2?", "What is 3 + 4?"], ["3", "8"], ["3", "7"]
    scores = judge_reward(prompts, completions, model=str(tmp_path / "judge"), template=template, answer=answers)
    yes, no = (tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("Yes", "No"))
    for prompt, completion, answer, value in zip(prompts, completions, answers, scores):
        ids = encode_prompt(tokenizer, template.format(prompt=prompt, completion=completion, answer=answer))
        with torch.no_grad():
            logits = random_model.eval()(input_ids=torch.tensor([ids])).logits[0, -1]
        assert value == pytest.approx(float(torch.sigmoid(logits[yes] - logits[no])), abs=1e-5)
    with pytest.raises(polm.PolmError, match=r"names field 'level'.*available fields: prompt, completion, answer"):
        judge_reward(prompts, completions, model=str(tmp_path / "judge"), template="{level}", answer=answers)

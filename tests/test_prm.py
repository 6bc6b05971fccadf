"""Process reward models: step encoding, the ``prm`` stage on a tiny model, the ``prm`` reward, the bundled steps data."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForTokenClassification

import polm
from polm.engine.data import load_rows
from polm.engine.encoding import IGNORE_INDEX, encode_prompt
from polm.plugins.reasoning.prm import encode_steps, prm_reward, split_steps, step_scores


def test_split_steps_reads_the_think_block_or_the_whole_completion():
    assert split_steps("<think>23 + 15 = 38\n38 * 4 = 152\n</think><answer>152</answer>") == [
        "23 + 15 = 38", "38 * 4 = 152"]
    assert split_steps("<answer>85</answer>") == ["85"]
    assert split_steps("a; b;", separator=";") == ["a", "b"]
    assert split_steps("  \n") == []


def test_step_labels_sit_on_each_step_end(tokenizer):
    prompt_ids = encode_prompt(tokenizer, "What is (1 + 2) * 3?")
    example = encode_steps(tokenizer, "What is (1 + 2) * 3?", ["1 + 2 = 3", "3 * 3 = 8"], [1, 0])
    first = tokenizer("1 + 2 = 3\n", add_special_tokens=False)["input_ids"]
    second = tokenizer("3 * 3 = 8\n", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + first + second
    labelled = [(position, label) for position, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert labelled == [(len(prompt_ids) + len(first) - 1, 1), (len(example.input_ids) - 1, 0)]


def test_bundled_step_rows_label_every_step_from_the_first_mistake_on():
    rows = load_rows("polm:arithmetic-steps", "test")
    assert len(rows) == 200 and {len(row["steps"]) for row in rows} == {2, 3}
    for row in rows:
        labels = row["labels"]
        assert len(labels) == len(row["steps"]) and labels == sorted(labels, reverse=True)
        final = row["steps"][-1].split(" = ")[-1]
        assert (final == row["answer"]) == all(labels), row
    assert 0.3 < sum(not all(row["labels"]) for row in rows) / len(rows) < 0.7
    think = load_rows("polm:arithmetic-think", "test")
    assert [row["prompt"] for row in think] == [row["prompt"] for row in rows]
    assert think[0]["completion"].startswith("<think>") and think[0]["completion"].endswith(
        f"<answer>{think[0]['answer']}</answer>")
    train_prompts = {row["prompt"] for row in load_rows("polm:arithmetic-think", "train")}
    assert not train_prompts & {row["prompt"] for row in think}, "the splits share no question"


def test_prm_stage_saves_a_token_classifier_that_the_prm_reward_uses(random_model, tokenizer, tmp_path):
    rows = load_rows("polm:arithmetic-steps", "train")[:64]
    result = (polm.Pipeline(random_model, tokenizer=tokenizer)
              .add("prm", data=rows, eval_data=rows[:16], max_steps=3, batch_size=8, log_every=1)
              .add("sft", data=[{"prompt": "What is 1 + 1?", "completion": "2"}], max_steps=1, eval_size=0)
              .run(tmp_path / "run"))
    prm_dir = result.stages[0].checkpoint
    assert 0.0 <= result.stages[0].metrics["eval/step_accuracy"] <= 1.0
    assert "eval/solution_accuracy" in result.stages[0].metrics
    prm = AutoModelForTokenClassification.from_pretrained(prm_dir)
    assert prm.config.id2label == {0: "wrong", 1: "right"}
    sft_config = json.loads((result.stages[1].checkpoint / "config.json").read_text())
    assert sft_config["architectures"] == ["LlamaForCausalLM"], "the stage after prm trains the policy, not the PRM"

    completions = ["<think>1 + 2 = 3\n3 * 3 = 9</think><answer>9</answer>", "<answer>8</answer>", ""]
    prompts = ["What is (1 + 2) * 3?"] * 3
    scores = step_scores(prm, tokenizer, prompts, [split_steps(c) for c in completions])
    assert [len(values) for values in scores] == [2, 1, 0]
    by_min = prm_reward(prompts, completions, checkpoint=str(prm_dir.parent))
    by_prod = prm_reward(prompts, completions, checkpoint=str(prm_dir), aggregation="prod")
    assert by_min == pytest.approx([min(scores[0]), scores[1][0], 0.0], abs=1e-6)
    assert by_prod == pytest.approx([scores[0][0] * scores[0][1], scores[1][0], 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="checkpoint"):
        prm_reward(prompts, completions)


def test_prm_stage_rejects_malformed_rows_and_adapters(random_model, tokenizer, tmp_path):
    with pytest.raises(polm.PolmError, match="'tuning' must be 'full' for prm"):
        polm.Pipeline().add("prm", data="polm:arithmetic-steps", tuning="lora")
    bad = [{"prompt": "What is 1 + 1?", "answer": "2", "steps": ["1 + 1 = 2"], "labels": [1, 1]}]
    with pytest.raises(polm.PolmError, match=r"data row 0: field 'labels' must hold one 0 or 1 per step; got \[1, 1\] for 1 step"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add("prm", data=bad, max_steps=1).run(tmp_path / "run")

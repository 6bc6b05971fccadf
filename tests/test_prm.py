"""Process reward models: step encoding, the ``prm`` stage on a tiny model, the ``prm`` reward, the bundled steps data."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

import polm
from polm.engine.data import load_rows
from polm.engine.encoding import IGNORE_INDEX, encode_prompt
from polm.plugins.reasoning.prm import (
    encode_solution,
    locate_steps,
    prm_reward,
    split_steps,
    step_scores,
    step_spans,
)
from polm.plugins.reasoning.prm.likelihood import likelihood_step_loss, step_labels, step_token_logps


def test_steps_are_the_think_lines_then_the_answer_block():
    completion = "<think>23 + 15 = 38\n38 * 4 = 152\n</think><answer>152</answer>"
    assert split_steps(completion) == ["23 + 15 = 38", "38 * 4 = 152", "<answer>152</answer>"]
    assert step_spans(completion)[0] == (7, 19) and step_spans(completion)[2] == (41, 61)
    assert split_steps("<answer>85</answer>") == ["<answer>85</answer>"]
    assert split_steps("a; b;", separator=";") == ["a", "b"]
    assert split_steps("  \n") == []
    assert locate_steps("x = 1\nx = 1", ["x = 1", "x = 1"]) == [(0, 5), (6, 11)]
    with pytest.raises(ValueError, match="step 1 'y' is not in the completion after step 0"):
        locate_steps("x\nz", ["x", "y"])


def test_step_labels_sit_on_the_character_that_closes_each_step(tokenizer):
    """'<think>1 + 2 = 3\n3 * 3 = 8</think><answer>8</answer>' in three pieces cut after each step's
    closing character: the '\n' after the first line, the '<' of '</think>' after the second, and
    the answer block's own last character; each piece's last token carries its step's label."""
    prompt = "What is (1 + 2) * 3?"
    completion = "<think>1 + 2 = 3\n3 * 3 = 8</think><answer>8</answer>"
    example = encode_solution(tokenizer, prompt, completion, step_spans(completion), [1, 0, 0])
    pieces = ["<think>1 + 2 = 3\n", "3 * 3 = 8<", "/think><answer>8</answer>"]
    ids = [tokenizer(piece, add_special_tokens=False)["input_ids"] for piece in pieces]
    prompt_ids = encode_prompt(tokenizer, prompt)
    assert example.input_ids == prompt_ids + ids[0] + ids[1] + ids[2]
    labelled = [(position, label) for position, label in enumerate(example.labels) if label != IGNORE_INDEX]
    ends = [len(prompt_ids) + len(ids[0]) - 1, len(prompt_ids) + len(ids[0]) + len(ids[1]) - 1,
            len(example.input_ids) - 1]
    assert labelled == [(ends[0], 1), (ends[1], 0), (ends[2], 0)]


def test_bundled_step_rows_label_every_step_from_the_first_mistake_on():
    rows = load_rows("polm:arithmetic-steps", "test")
    assert len(rows) == 200 and {len(row["steps"]) for row in rows} == {3, 4}, "2-3 lines and the answer block"
    for row in rows:
        labels = row["labels"]
        assert len(labels) == len(row["steps"]) and labels == sorted(labels, reverse=True)
        assert split_steps(row["completion"]) == row["steps"], "the policy's completions split the same way"
        written = row["steps"][-1].removeprefix("<answer>").removesuffix("</answer>")
        assert (written == row["answer"]) == all(labels), row
    assert 0.3 < sum(not all(row["labels"]) for row in rows) / len(rows) < 0.7
    copied_wrongly = [row for row in rows if row["labels"][-2:] == [1, 0]]
    assert copied_wrongly and all(row["steps"][-2].split(" = ")[-1] == row["answer"] for row in copied_wrongly)
    think = load_rows("polm:arithmetic-think", "test")
    assert [row["prompt"] for row in think] == [row["prompt"] for row in rows]
    assert think[0]["completion"].startswith("<think>") and think[0]["completion"].endswith(
        f"<answer>{think[0]['answer']}</answer>")
    train_prompts = {row["prompt"] for row in load_rows("polm:arithmetic-think", "train")}
    assert not train_prompts & {row["prompt"] for row in think}, "the splits share no question"


def test_prm_stage_saves_a_token_classifier_that_the_prm_reward_uses(random_model, tokenizer, tmp_path):
    rows = load_rows("polm:arithmetic-steps", "train")[:64]
    result = (polm.Pipeline(random_model, tokenizer=tokenizer)
              .add("prm", data=rows, eval_data=rows[:16], head="classifier", max_steps=3, batch_size=8, log_every=1)
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
    scores = step_scores(prm, tokenizer, prompts, completions)
    assert [len(values) for values in scores] == [3, 1, 0]
    by_min = prm_reward(prompts, completions, checkpoint=str(prm_dir.parent))
    by_prod = prm_reward(prompts, completions, checkpoint=str(prm_dir), aggregation="prod")
    assert by_min == pytest.approx([min(scores[0]), scores[1][0], 0.0], abs=1e-6)
    assert by_prod == pytest.approx([scores[0][0] * scores[0][1] * scores[0][2], scores[1][0], 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="checkpoint"):
        prm_reward(prompts, completions)


def test_prm_stage_rejects_malformed_rows_and_adapters(random_model, tokenizer, tmp_path):
    with pytest.raises(polm.PolmError, match="'tuning' must be 'full' for prm"):
        polm.Pipeline().add("prm", data="polm:arithmetic-steps", tuning="lora")
    bad = [{"prompt": "What is 1 + 1?", "answer": "2", "steps": ["1 + 1 = 2"], "labels": [1, 1]}]
    with pytest.raises(polm.PolmError, match=r"^row 0: field 'labels' must hold one 0 or 1 per step; got \[1, 1\] for 1 step"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add("prm", data=bad, max_steps=1).run(tmp_path / "run")
    missing = [{"prompt": "What is 1 + 1?", "completion": "<think>1 + 1 = 2</think>", "steps": ["1 + 1 = 3"],
                "labels": [0]}]
    with pytest.raises(polm.PolmError, match=r"^row 0: step 0 '1 \+ 1 = 3' is not in the completion; each step must "
                                             r"appear in field 'completion', in order"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add("prm", data=missing, max_steps=1).run(tmp_path / "run2")


def test_likelihood_head_scores_a_step_by_its_least_likely_token():
    """Vocabulary {0, 1}; the logits at positions 0-3 predict tokens 1-4 of input_ids [0, 1, 0, 1, 1].
    Step 0 is tokens 1-2, step 1 tokens 3-4 (step_index [-1, 0, 0, 1, 1]).
    logits [0, ln 3] give p(1) = 3/4 and p(0) = 1/4; [0, ln 2] give p(1) = 2/3.
    Step 0: p(token 1 = 1) = 3/4, p(token 2 = 0) = 1/4 -> min log p = ln 1/4.
    Step 1: p(token 3 = 1) = 3/4, p(token 4 = 1) = 2/3 -> min log p = ln 2/3.
    Labels (0, 1): loss = -(ln(1 - 1/4) + ln(2/3)) / 2 = (0.287682 + 0.405465) / 2 = 0.346574;
    P(right) 1/4 and 2/3 both agree with their labels."""
    ln3, ln2 = math.log(3), math.log(2)
    logits = torch.tensor([[[0.0, ln3], [0.0, ln3], [0.0, ln3], [0.0, ln2], [0.0, 0.0]]])
    input_ids = torch.tensor([[0, 1, 0, 1, 1]])
    step_index = torch.tensor([[-1, 0, 0, 1, 1]])
    step_logps = step_token_logps(logits, input_ids, step_index, num_steps=2)
    torch.testing.assert_close(step_logps, torch.tensor([[math.log(1 / 4), math.log(2 / 3)]]))
    labels = step_labels(torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX, 1]]), num_steps=2)
    assert labels.tolist() == [[0, 1]]
    loss, metrics = likelihood_step_loss(step_logps, labels)
    torch.testing.assert_close(loss, torch.tensor(0.346574), atol=1e-6, rtol=0)
    assert metrics == {"step_accuracy": 1.0}


def test_likelihood_prm_is_a_causal_lm_that_the_prm_reward_loads(random_model, tokenizer, tmp_path):
    rows = load_rows("polm:arithmetic-steps", "test")[:32]
    result = (polm.Pipeline(random_model, tokenizer=tokenizer)
              .add("prm", data=rows, eval_data=rows[:16], max_steps=2, batch_size=8)  # the default head
              .run(tmp_path / "run"))
    assert 0.0 <= result.stages[0].metrics["eval/step_accuracy"] <= 1.0
    prm = AutoModelForCausalLM.from_pretrained(result.stages[0].checkpoint)
    assert prm.config.polm_prm_head == "likelihood"
    completions = ["<think>1 + 2 = 3\n3 * 3 = 9</think><answer>9</answer>", "<answer>8</answer>", ""]
    prompts = ["What is (1 + 2) * 3?"] * 3
    scores = step_scores(prm, tokenizer, prompts, completions)
    assert [len(values) for values in scores] == [3, 1, 0] and all(0 < value <= 1 for value in scores[0])
    by_min = prm_reward(prompts, completions, checkpoint=str(result.stages[0].checkpoint))
    assert by_min == pytest.approx([min(scores[0]), scores[1][0], 0.0], abs=1e-5)
    with pytest.raises(polm.PolmError, match="the starting model is a PRM with the 'likelihood' head; set head: "
                                             "likelihood to go on training it"):
        polm.Pipeline(str(result.stages[0].checkpoint)).add("prm", data=rows, head="classifier",
                                                            max_steps=1).run(tmp_path / "again")
    with pytest.raises(polm.PolmError, match="'head' must be one of classifier, likelihood, got 'value'"):
        polm.Pipeline().add("prm", data=rows, head="value")


def test_prm_trains_on_the_readmes_step_rows_and_names_the_file_line_of_a_bad_one(random_model, tokenizer, tmp_path):
    """A JSONL file of ``{prompt, steps, labels}`` rows (the README's format, no ``completion``: the steps are
    joined by the separator) trains the prm; a row whose labels do not match its steps is refused naming its
    ``file:line`` and the field."""
    rows = [{"prompt": "What is 12 + 7?", "steps": ["12 + 7 = 19", "<answer>19</answer>"], "labels": [1, 1]},
            {"prompt": "What is 12 + 7?", "steps": ["12 + 7 = 18", "<answer>18</answer>"], "labels": [0, 0]}] * 4
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "prm", data=str(data), eval_data=str(data), max_steps=2, batch_size=4, eval_size=8).run(tmp_path / "run")
    assert 0.0 <= result.stages[0].metrics["eval/step_accuracy"] <= 1.0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "labels": [0]}) + "\n")
    with pytest.raises(polm.PolmError, match=rf"^{re.escape(str(bad))}:2: field 'labels' must hold one 0 or 1 per "
                                             r"step; got \[0\] for 2 steps$"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add("prm", data=str(bad), max_steps=1).run(tmp_path / "run2")
    assert not (tmp_path / "run2").exists()

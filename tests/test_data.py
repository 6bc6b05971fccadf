"""Rows in, token ids and loss masks out.

Reading data: row formats, JSONL validation with ``file:line`` and the field
at fault, media paths, bundled datasets. Encoding with the polm-tiny
tokenizer design, whose chat template renders each message as
``<|role|>\\n{content}<|end|>\\n``.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import polm
from polm.engine.data import load_rows, read_jsonl, row_format, validate_row
from polm.engine.encoding import IGNORE_INDEX, Encoded, encode_prompt, encode_row, pad_batch, truncate
from tests.helpers import labelled_spans

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 1 + 2?"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "And 3 * 4?"},
    {"role": "assistant", "content": "12"},
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# Reading rows


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"text": "3 * 4 = 12"}, "text"),
        ({"prompt": "What is 3 * 4?", "completion": "12"}, "completion"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "chat"),
        ({"prompt": "What is 3 * 4?", "chosen": "12", "rejected": "7"}, "preference"),
        ({"prompt": "What is 3 * 4?", "answer": "12"}, "task"),
        ({"question": "What is 3 * 4?"}, ""),
    ],
)
def test_row_format_is_detected(row, expected):
    """Each row format is told apart by its keys; unknown keys give no format."""
    assert row_format(row) == expected


def test_row_of_unknown_format_lists_the_formats():
    """A row with none of the known key sets names its keys and the accepted formats."""
    with pytest.raises(polm.PolmError, match=r"row 0: cannot tell the row format from its fields \['question'\]"):
        validate_row({"question": "q"}, "row 0")


def test_numeric_task_answers_become_strings():
    """``{"answer": 12}`` is read as the string "12", since answers are compared as text."""
    assert validate_row({"prompt": "What is 3 * 4?", "answer": 12}, "row 0")["answer"] == "12"


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"prompt": "What is 1 + 2?", "completion": }', "invalid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}',
         "field 'messages[1].role' is 'robot'; expected one of system, user, assistant"),
        ('{"prompt": 42, "completion": "42"}', "field 'prompt' must be a string, got int"),
    ],
    ids=["bad-json", "robot-role", "numeric-prompt"],
)
def test_malformed_jsonl_line_is_reported_with_file_line_and_field(tmp_path, bad_line, expected):
    """The error names the file, the line in the file (blank lines count) and what is wrong."""
    path = write_jsonl(tmp_path / "train.jsonl", ['{"prompt": "What is 1 + 1?", "completion": "2"}', "", bad_line])
    with pytest.raises(polm.PolmError) as caught:
        read_jsonl(path)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert expected in str(caught.value)


def test_missing_data_file(tmp_path):
    """A missing JSONL file is named."""
    with pytest.raises(polm.PolmError, match="data file not found: .*nowhere.jsonl"):
        load_rows(tmp_path / "nowhere.jsonl")


def test_empty_data_file(tmp_path):
    """A file with only blank lines is an error rather than an empty dataset."""
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(polm.PolmError, match="has no rows"):
        read_jsonl(path)


def test_relative_media_paths_resolve_against_the_jsonl_folder(tmp_path):
    """Image and audio parts with relative paths point into the JSONL file's folder; absolute paths stay."""
    absolute = str(tmp_path / "elsewhere" / "hello.wav")
    chat = {"messages": [
        {"role": "user", "content": [{"type": "image", "path": "images/cat.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A cat."},
    ]}
    task = {"prompt": [{"role": "user", "content": [{"type": "audio", "path": absolute}]}], "answer": "hello"}
    path = write_jsonl(tmp_path / "data" / "rows.jsonl", [json.dumps(chat), json.dumps(task)])

    chat_row, task_row = read_jsonl(path)

    image, text = chat_row["messages"][0]["content"]
    assert Path(image["path"]) == tmp_path / "data" / "images" / "cat.png"
    assert text == {"type": "text", "text": "What?"}
    assert task_row["prompt"][0]["content"][0]["path"] == absolute


def test_unknown_bundled_dataset_lists_the_bundled_ones():
    """``polm:<unknown>`` suggests the closest bundled dataset and lists them all."""
    with pytest.raises(polm.PolmError) as caught:
        load_rows("polm:arithmatic")
    message = str(caught.value)
    assert "unknown dataset 'arithmatic'" in message and "Did you mean 'arithmetic'?" in message
    assert all(name in message for name in polm.components("datasets"))


def test_unknown_split_names_the_valid_ones():
    """A split a bundled dataset does not have is an error listing the ones it has."""
    with pytest.raises(polm.PolmError, match="'polm:arithmetic' has no split 'validation'; it has: train, test"):
        load_rows("polm:arithmetic", "validation")


def _assert_solved_line_by_line(rows: list[dict]) -> None:
    """Every line of every ``<think>`` holds, the last line's result is the answer, and the rewards give 1.0."""
    from polm.plugins.reasoning.rewards import accuracy_reward, format_reward

    for row in rows:
        lines = row["completion"].removeprefix("<think>").split("</think>")[0].split("\n")
        for line in lines:
            left, op, right, _, result = line.split()
            assert int(result) == {"+": int(left) + int(right), "-": int(left) - int(right),
                                   "*": int(left) * int(right)}[op], (row["prompt"], line)
        assert lines[-1].split()[-1] == row["answer"]
    completions, prompts = [row["completion"] for row in rows], [row["prompt"] for row in rows]
    assert accuracy_reward(prompts, completions, answer=[row["answer"] for row in rows]) == [1.0] * len(rows)
    assert format_reward(prompts, completions) == [1.0] * len(rows)


def test_worked_arithmetic_solves_the_questions_of_polm_arithmetic_line_by_line():
    """``polm:arithmetic-worked`` asks polm:arithmetic's questions; each line is right and the answer is the last one's."""
    worked, plain = load_rows("polm:arithmetic-worked", "test"), load_rows("polm:arithmetic", "test")
    assert [(row["prompt"], row["answer"]) for row in worked] == [(row["prompt"], row["answer"]) for row in plain]
    assert worked[1]["completion"] == "<think>10 * 5 = 50\n6 * 5 = 30\n50 + 30 = 80</think><answer>80</answer>"
    _assert_solved_line_by_line(worked + load_rows("polm:arithmetic-worked", "train")[:2000])


def test_arithmetic_paths_solve_each_question_along_one_of_several_ways():
    """``polm:arithmetic-paths`` asks polm:arithmetic-worked's questions along varied paths: a sum of two
    two-digit numbers has three (place value first, units first, tens and units apart), each drawn
    about a third of the time; the rows are the same on every call."""
    paths, paths_test = load_rows("polm:arithmetic-paths", "train")[:3000], load_rows("polm:arithmetic-paths", "test")
    worked = load_rows("polm:arithmetic-worked", "train")[:3000] + load_rows("polm:arithmetic-worked", "test")
    assert [row["prompt"] for row in paths + paths_test] == [row["prompt"] for row in worked]
    assert load_rows("polm:arithmetic-paths", "train")[:3000] == paths
    _assert_solved_line_by_line(paths + paths_test)
    ways = Counter()
    for row in paths:
        a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
        if row["level"] == 3 and op == "+" and not b.endswith("0"):  # a round right operand leaves one way
            first_step = row["completion"].removeprefix("<think>").split(" = ")[0]
            ways[{f"{a} + {b[0]}0": "place value", f"{a} + {b[1]}": "units first",
                  f"{a[0]}0 + {b[0]}0": "apart"}[first_step]] += 1
    assert set(ways) == {"place value", "units first", "apart"}
    assert min(ways.values()) > sum(ways.values()) / 5, ways


# Encoding


def test_completion_row_labels_only_the_completion(tokenizer):
    """Labels are -100 exactly on the prompt tokens and the input ids on the rest: the completion and ``<|end|>``."""
    prompt, completion = "What is 12 + 7?", "19"
    example = encode_row(tokenizer, {"prompt": prompt, "completion": completion})
    prompt_ids = encode_prompt(tokenizer, prompt)

    assert len(example.input_ids) == len(example.labels)
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert example.labels[len(prompt_ids):] == example.input_ids[len(prompt_ids):]
    assert tokenizer.decode(prompt_ids) == "<|user|>\nWhat is 12 + 7?<|end|>\n<|assistant|>\n"
    # The template closes every message with <|end|> and a newline.
    assert labelled_spans(tokenizer, example) == ["19<|end|>\n"]


def test_task_row_is_trained_like_a_completion(tokenizer):
    """A ``{prompt, answer}`` row trains on the answer."""
    example = encode_row(tokenizer, {"prompt": "What is 3 * 4?", "answer": "12"})
    assert labelled_spans(tokenizer, example) == ["12<|end|>\n"]


def test_chat_row_labels_only_assistant_turns(tokenizer):
    """In a multi-turn chat, the assistant turns are labelled and the system and user turns are not."""
    example = encode_row(tokenizer, {"messages": CHAT})

    assert tokenizer.decode(example.input_ids) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is 1 + 2?<|end|>\n<|assistant|>\n3<|end|>\n"
        "<|user|>\nAnd 3 * 4?<|end|>\n<|assistant|>\n12<|end|>\n"
    )
    assert labelled_spans(tokenizer, example) == ["3<|end|>\n", "12<|end|>\n"]


def test_chat_row_without_assistant_turn_fails(tokenizer):
    """A chat with nothing to learn from is an error, not a silently empty example."""
    with pytest.raises(polm.PolmError, match="no assistant message"):
        encode_row(tokenizer, {"messages": CHAT[:2]})


def test_text_row_is_fully_labelled(tokenizer):
    """A ``{text}`` row is language modelling: every token, and the closing end token, is labelled."""
    example = encode_row(tokenizer, {"text": "3 * 4 = 12"})
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example.input_ids) == "3 * 4 = 12<|end|>"


def test_pad_batch_right_pads_with_masked_labels():
    """Rows are right-padded to the longest one: pad id in inputs, 0 in the mask, -100 in labels."""
    batch = pad_batch([Encoded([7, 8, 9], [IGNORE_INDEX, 8, 9]), Encoded([4, 5], [4, 5])], pad_token_id=0)

    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.shape == (2, 3) and tensor.dtype == torch.long for tensor in batch.values())
    assert batch["input_ids"].tolist() == [[7, 8, 9], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 8, 9], [4, 5, IGNORE_INDEX]]


def test_truncate_cuts_and_drops_examples_with_no_label_left():
    """``truncate`` keeps the first ``max_length`` tokens, or returns None if none of them is labelled."""
    example = Encoded([1, 2, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 3, 4])
    assert truncate(example, 3) == Encoded([1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 3])
    assert truncate(example, 2) is None


def test_chat_row_without_chat_template_gives_a_clear_error(tokenizer):
    """A tokenizer without a chat template cannot render a chat row; the error says so and how to fix it."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(polm.PolmError, match="has no chat template") as caught:
        encode_row(plain, {"messages": CHAT})
    assert "{prompt, completion}" in str(caught.value)


def test_completion_row_without_chat_template_is_plain_text(tokenizer):
    """Without a chat template the prompt is used as is, and the completion plus the end token is labelled."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    example = encode_row(plain, {"prompt": "What is 12 + 7? ", "completion": "19"})
    assert tokenizer.decode(example.input_ids) == "What is 12 + 7? 19<|end|>"
    assert labelled_spans(tokenizer, example) == ["19<|end|>"]


LONG_PROMPT = "What is " + " + ".join(["1"] * 40) + "?"  # about 90 tokens: no room for the answer in 32


@pytest.mark.parametrize("stage, row_of", [
    ("sft", lambda prompt, ok: {"prompt": prompt, "completion": "2" if ok else "3"}),
    ("dpo", lambda prompt, ok: {"prompt": prompt, "chosen": "2", "rejected": "3"}),
    ("reward_model", lambda prompt, ok: {"prompt": prompt, "chosen": "2", "rejected": "3"}),
    ("kto", lambda prompt, ok: {"prompt": prompt, "completion": "2" if ok else "3", "label": ok}),
])
def test_rows_longer_than_max_length_follow_one_policy(stage, row_of, random_model, tokenizer, tmp_path, caplog):
    """Every stage skips the rows that keep no completion token within max_length, with one warning that
    counts them, and stops with an error naming max_length when no row is left."""
    rows = [row_of("What is 1 + 1?", ok) for ok in (True, False, True, False)] + [row_of(LONG_PROMPT, True)]
    options = {"max_length": 32, "max_steps": 1, "batch_size": 2, "eval_size": 0}
    with caplog.at_level("WARNING", logger="polm"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add(stage, data=rows, **options).run(tmp_path / "run")
    assert [record.getMessage() for record in caplog.records if record.name == "polm"] == [
        f"{stage}: 1 of 5 rows of data keep no completion token within max_length=32 and were skipped"]
    with pytest.raises(polm.PolmError, match=f"{stage}: no row of data keeps a completion token within max_length=32"):
        polm.Pipeline(random_model, tokenizer=tokenizer).add(stage, data=rows[-1:], **options).run(tmp_path / "none")

"""Public chat templates as they are (``tests/fixtures/chat_templates``, sources in its SOURCES.md).

Each template is put on polm's test tokenizer with its family's special tokens, so that exactly the
assistant turns' tokens can be checked by decoding the labelled runs; then sft, dpo and grpo run with it
on a tiny random Llama whose vocabulary holds those tokens.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import polm
from polm.engine.encoding import encode_completion, encode_prompt, encode_row
from tests.helpers import labelled_spans

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
             {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]

#: family: bos, eos, the tokens its template writes, the labelled runs of the system + two-turn chat, and
#: those of the prompt/completion row "What is 2 + 3?" -> "5". The runs are worked out from each template:
#: Qwen3 writes an empty think block only in the turn after the last user message; Phi-3 closes the
#: conversation with its end-of-sequence token; Mistral v0.3 puts a space before the answer.
FAMILIES = {
    "llama-3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"],
                ["5<|eot_id|>", "8<|eot_id|>"], "5<|eot_id|>"),
    "llama-3.1": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"],
                  ["5<|eot_id|>", "8<|eot_id|>"], "5<|eot_id|>"),
    "qwen2.5": (None, "<|im_end|>", ["<|im_start|>"], ["5<|im_end|>\n", "8<|im_end|>\n"], "5<|im_end|>\n"),
    "qwen3": (None, "<|im_end|>", ["<|im_start|>", "<think>", "</think>"],
              ["5<|im_end|>\n", "<think>\n\n</think>\n\n8<|im_end|>\n"], "<think>\n\n</think>\n\n5<|im_end|>\n"),
    "gemma-2": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"],
                ["5<end_of_turn>\n", "8<end_of_turn>\n"], "5<end_of_turn>\n"),
    "gemma-3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"],
                ["5<end_of_turn>\n", "8<end_of_turn>\n"], "5<end_of_turn>\n"),
    "mistral-v0.3": ("<s>", "</s>", ["[INST]", "[/INST]"], [" 5</s>", " 8</s>"], " 5</s>"),
    "phi-3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
              ["5<|end|>\n", "8<|end|>\n<|endoftext|>"], "5<|end|>\n<|endoftext|>"),
    "deepseek-r1-distill": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ["<｜User｜>", "<｜Assistant｜>", "<think>"],
                            ["5<｜end▁of▁sentence｜>", "8<｜end▁of▁sentence｜>"], "5<｜end▁of▁sentence｜>"),
}
#: The templates that refuse a system message, with their own words.
REFUSES_SYSTEM = {"gemma-2": "System role not supported"}


def family_tokenizer(tokenizer, family: str):
    """polm's test tokenizer with ``family``'s special tokens and chat template."""
    bos, eos, literal, _, _ = FAMILIES[family]
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"eos_token": eos, **({"bos_token": bos} if bos else {})})
    tokenizer.add_tokens(literal, special_tokens=True)
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    return tokenizer


def chat(family: str) -> list[dict]:
    """The system + two-turn chat, without the system message where the template refuses one."""
    return TWO_TURNS if family in REFUSES_SYSTEM else [SYSTEM, *TWO_TURNS]


@pytest.mark.parametrize("family", FAMILIES)
def test_exactly_the_assistant_turns_are_labelled(tokenizer, family):
    """The labelled runs of a chat row are the assistant turns as the template renders them, and
    nothing of the system or user turns; a prompt/completion row labels its completion's turn."""
    tokenizer = family_tokenizer(tokenizer, family)
    assert labelled_spans(tokenizer, encode_row(tokenizer, {"messages": chat(family)})) == FAMILIES[family][3]
    completion = encode_completion(tokenizer, "What is 2 + 3?", "5")
    assert labelled_spans(tokenizer, completion) == [FAMILIES[family][4]]
    prompt_ids = encode_prompt(tokenizer, "What is 2 + 3?")
    assert completion.input_ids[: len(prompt_ids)] == prompt_ids, "the prompt is what the model is asked"


@pytest.mark.parametrize("family", ["qwen3", "phi-3"])
def test_a_tokenizer_without_offsets_labels_the_same_tokens(tokenizer, family):
    """A tokenizer that cannot report character offsets is cut at the assistant turns' edges instead;
    where no token crosses those edges (as here) the example is the same."""
    fast = family_tokenizer(tokenizer, family)
    slow = copy.deepcopy(fast)
    slow.__class__ = type("WithoutOffsets", (type(fast),), {"is_fast": False})
    row = {"messages": chat(family)}
    assert encode_row(slow, row) == encode_row(fast, row)


def test_deepseek_r1_prompt_ends_in_its_think_opening_written_once(tokenizer):
    """DeepSeek-R1-Distill's generation prompt ends in ``<think>\\n``: a completion is learned after it, and
    a completion that starts with it (as R1 traces do) does not get it twice."""
    tokenizer = family_tokenizer(tokenizer, "deepseek-r1-distill")
    prompt = tokenizer.decode(encode_prompt(tokenizer, "What is 2 + 3?"))
    assert prompt.endswith("<｜Assistant｜><think>\n")
    trace = encode_completion(tokenizer, "What is 2 + 3?", "<think>\n2 + 3 = 5\n</think>\n\n5")
    assert tokenizer.decode(trace.input_ids) == prompt + "2 + 3 = 5\n</think>\n\n5<｜end▁of▁sentence｜>"


def test_a_template_that_refuses_a_role_names_the_row_and_quotes_the_template(tokenizer, tmp_path):
    """Gemma 2 refuses a system message: sft stops with one line naming the file and line of the row and
    the template's own words, before training."""
    tokenizer = family_tokenizer(tokenizer, "gemma-2")
    data = tmp_path / "chats.jsonl"
    rows = [{"messages": TWO_TURNS}, {"messages": [SYSTEM, *TWO_TURNS]}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    stage = polm.Pipeline("polm-tiny").add("sft", data=str(data)).stages[0]
    with pytest.raises(polm.PolmError) as raised:
        stage.encode(tokenizer)
    message = str(raised.value)
    assert message.startswith(f"{data}:2: the chat template of ")
    assert "System role not supported" in message and "\n" not in message


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """A folder per family: a tiny random Llama whose vocabulary holds the family's tokens, with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from polm.modalities.text.tiny.tokenizer import build_tokenizer

    base = build_tokenizer(["What is 12 + 7? The sum of 12 and 7 is 19. 3 * 4 = 12; 9 - 5 = 4."] * 4)
    folders = {}
    for family in FAMILIES:
        tokenizer = family_tokenizer(base, family)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(family)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_dpo_and_grpo_run_with_the_template(family_models, family, tmp_path):
    """Two steps each of sft on chat rows, dpo on pairs and grpo on prompts, from the family's folder."""
    chats = [{"messages": chat(family)}] * 4
    pairs = [{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}] * 4
    prompts = [{"prompt": "What is 2 + 3?", "answer": "5"}] * 4
    result = (polm.Pipeline(str(family_models[family]), seed=0)
              .add("sft", data=chats, max_steps=2, batch_size=2, eval_size=0)
              .add("dpo", data=pairs, max_steps=2, batch_size=2, eval_size=0)
              .add("grpo", data=prompts, max_steps=2, batch_size=2, num_generations=2, max_new_tokens=4,
                   rewards={"accuracy": 1.0}, eval_size=0)
              .run(tmp_path / "run"))
    assert [stage.name for stage in result.stages] == ["sft", "dpo", "grpo"]
    assert all(torch.isfinite(torch.tensor(stage.metrics["loss"])) for stage in result.stages)

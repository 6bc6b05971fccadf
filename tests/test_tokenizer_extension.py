"""Tokenizer extension (issue 22, item 2): learned tokens, mean-initialised rows, the ``extend_vocabulary`` stage.

The corpus is made-up code over a few long identifiers; conftest's tokenizer (trained on one arithmetic line)
spells them nearly byte by byte, so the learned tokens save a measured share of the held-out text's tokens.
"""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

import polm
from polm.adapters.tokenizer_extension import (
    NEW_TOKENS_FILE,
    extend_tokenizer,
    learn_new_tokens,
    round_trip_failures,
    tokens_per_byte,
)
from polm.engine.cli import main
from tests.helpers import save, tiny_llama

NAMES = ["request_handler", "parse_config", "connection_pool", "max_retries", "timeout_seconds", "buffer_size"]
#: The share of the held-out text's tokens that the learned tokens must save (measured: 78.7% with 20 tokens, 70.8%
#: with the stage's 15).
HELD_OUT_SAVING = 0.5


def code(seed: int, functions: int) -> list[str]:
    """``functions`` small made-up Python functions over :data:`NAMES`, one text each."""
    rng = random.Random(seed)
    texts = []
    for _ in range(functions):
        a, b, c = rng.sample(NAMES, 3)
        texts.append(f"def {a}(self, {b}):\n    if self.{c} is None:\n        return {b} + {rng.randint(0, 99)}\n"
                     f"    return self.{c}({b})\n")
    return texts


TRAIN, HELD_OUT = code(0, 60), code(1, 20)


@pytest.fixture(scope="module")
def new_tokens(tokenizer) -> list[str]:
    return learn_new_tokens(tokenizer, TRAIN, 20, min_frequency=3)


def test_learned_tokens_cut_the_held_out_token_count(tokenizer, new_tokens, record_property):
    """20 tokens learned on 60 functions take at least half of the tokens off 20 other functions; the list is
    deterministic (whatever the order of the texts), holds no number and no string seen fewer than 3 times, and none already one token."""
    _, extended = extend_tokenizer(tiny_llama(tokenizer, 0), tokenizer, new_tokens)
    before, after = tokens_per_byte(tokenizer, HELD_OUT), tokens_per_byte(extended, HELD_OUT)
    saving = 1 - after / before
    record_property("held_out_token_saving", round(saving, 4))
    assert saving >= HELD_OUT_SAVING, f"held-out tokens per byte {before:.3f} -> {after:.3f} ({saving:.1%} fewer)"
    assert len(new_tokens) == 20 and len(extended) == len(tokenizer) + 20
    assert learn_new_tokens(tokenizer, TRAIN[::-1], 20, min_frequency=3) == new_tokens  # order-free too
    assert " request_handler" in new_tokens and "\n       " in new_tokens  # an identifier and an indentation
    joined = "".join(TRAIN)
    for token in new_tokens:
        assert not any(char.isdigit() for char in token)
        assert joined.count(token) >= 3
        assert len(tokenizer.encode(token, add_special_tokens=False)) > 1


def test_the_rule_is_frequency_times_pieces_saved(tokenizer):
    """Three strings, each five times: the one of most pieces saves most and comes first; one seen twice is left
    out at ``min_frequency`` 3, and ``count`` caps the list."""
    texts = ["xq yyyyyyyy zzzz"] * 5 + ["wwwwwwwwwwwwwwww"] * 2
    pieces = {s: len(tokenizer.encode(s, add_special_tokens=False)) for s in (" yyyyyyyy", " zzzz", "xq")}
    assert pieces[" yyyyyyyy"] > pieces[" zzzz"] > pieces["xq"] > 1, pieces
    assert learn_new_tokens(tokenizer, texts, 10, min_frequency=3) == [" yyyyyyyy", " zzzz", "xq"]
    assert learn_new_tokens(tokenizer, texts, 1, min_frequency=3) == [" yyyyyyyy"]
    assert "wwwwwwwwwwwwwwww" in learn_new_tokens(tokenizer, texts, 10, min_frequency=2)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_each_new_row_is_the_mean_of_its_old_pieces_rows(tokenizer, new_tokens, tied):
    """``E'[new] = mean_i E[piece_i]`` for the input embeddings and, untied, the output layer's rows; the old
    rows are unchanged, and tied embeddings stay one tensor. The model's embedding rows padded past the
    tokenizer's (8 spare rows) go to the first new tokens before the matrix grows."""
    model = tiny_llama(tokenizer, 0, tie_word_embeddings=tied, vocab_size=len(tokenizer) + 8)
    old_input = model.get_input_embeddings().weight.detach().clone()
    old_output = model.get_output_embeddings().weight.detach().clone()
    model, extended = extend_tokenizer(model, tokenizer, new_tokens)
    rows = len(tokenizer) + len(new_tokens)
    new_input, new_output = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_input.shape[0] == new_output.shape[0] == model.config.vocab_size == rows
    assert (new_output is new_input) == tied
    assert_close(new_input[:old_input.shape[0] - 8], old_input[:-8])
    assert_close(new_output[:old_output.shape[0] - 8], old_output[:-8])
    for token in new_tokens:
        token_id = extended.convert_tokens_to_ids(token)
        pieces = tokenizer.encode(token, add_special_tokens=False)
        assert token_id >= len(tokenizer) and len(pieces) > 1
        assert_close(new_input[token_id], old_input[pieces].mean(0))
        assert_close(new_output[token_id], old_output[pieces].mean(0))


def test_logits_on_text_without_new_strings_are_unchanged(tokenizer, new_tokens):
    """Text holding none of the new strings encodes to the same ids, and the old tokens' logits are the same."""
    model = tiny_llama(tokenizer, 0, tie_word_embeddings=False).eval()
    text = "What is 12 + 7? The sum is 19."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits  # (1, T, V)
    model, extended = extend_tokenizer(model, tokenizer, new_tokens)
    assert torch.equal(extended(text, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        after = model(input_ids=ids).logits  # (1, T, V + 20)
    assert after.shape[-1] == before.shape[-1] + len(new_tokens)
    assert_close(after[..., :before.shape[-1]], before)


def test_text_round_trips_and_the_new_tokens_are_ordinary(tokenizer, new_tokens):
    """``decode(encode(text)) == text`` on every train and held-out text (and on text with accents, tabs and
    special tokens), also with ``skip_special_tokens``, and the corpus is encoded with the new tokens."""
    _, extended = extend_tokenizer(tiny_llama(tokenizer, 0), tokenizer, new_tokens)
    texts = [*TRAIN, *HELD_OUT, "\tcafé   def  request_handlerx(self):\n<|end|>"]
    assert round_trip_failures(extended, texts) == 0
    for text in HELD_OUT:
        ids = extended.encode(text, add_special_tokens=False)
        assert extended.decode(ids, skip_special_tokens=True) == text
        assert sum(i >= len(tokenizer) for i in ids) > len(ids) / 2
    assert not set(new_tokens) & set(extended.all_special_tokens)


def test_the_extended_model_saves_and_loads_with_plain_transformers(tokenizer, new_tokens, tmp_path):
    """``from_pretrained`` of the saved folder gives the larger vocabulary, the same ids and the same logits, and
    ``polm.load_model`` reads it too."""
    model, extended = extend_tokenizer(tiny_llama(tokenizer, 0, tie_word_embeddings=False), tokenizer, new_tokens)
    folder = save(model, extended, tmp_path / "extended")
    loaded, loaded_tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert len(loaded_tokenizer) == len(extended) == loaded.config.vocab_size
    ids = extended(HELD_OUT[0], return_tensors="pt")["input_ids"]
    assert torch.equal(loaded_tokenizer(HELD_OUT[0], return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        assert_close(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    polm_model, polm_tokenizer = polm.load_model(str(folder))
    assert polm_model.get_input_embeddings().weight.shape[0] == len(polm_tokenizer) == len(extended)


def test_the_stage_then_sft_in_a_pipeline(tokenizer, tmp_path):
    """``extend_vocabulary`` hands sft the larger tokenizer: both stages' ``final/`` load with plain transformers
    at the new vocabulary size, sft's tokenizer encodes the corpus with the new tokens, and a resumed run of the
    finished pipeline reads both stages back."""
    rows = [{"text": text} for text in TRAIN]
    pipeline = (polm.Pipeline(tiny_llama(tokenizer, 0), tokenizer=tokenizer, seed=0)
                .add("extend_vocabulary", data=rows, eval_data=[{"text": text} for text in HELD_OUT],
                     new_tokens=15, min_frequency=3)
                .add("sft", data=rows, max_steps=2, batch_size=4, eval_size=0, max_length=64))
    result = pipeline.run(tmp_path / "run")
    extended, trained = result.stages
    assert extended.metrics["new_tokens"] == 15 and extended.metrics["vocab_size"] == len(tokenizer) + 15
    assert extended.metrics["eval/token_reduction"] >= HELD_OUT_SAVING, extended.metrics
    added = json.loads((tmp_path / "run" / "00-extend_vocabulary" / NEW_TOKENS_FILE).read_text())
    assert sorted(added.values()) == list(range(len(tokenizer), len(tokenizer) + 15))
    for stage in (extended, trained):
        model = AutoModelForCausalLM.from_pretrained(stage.checkpoint)
        assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(stage.checkpoint)) == len(tokenizer) + 15
    records = [json.loads(line) for line in (tmp_path / "run" / "01-sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in record for record in records)
    ids = AutoTokenizer.from_pretrained(trained.checkpoint).encode(TRAIN[0], add_special_tokens=False)
    assert any(i >= len(tokenizer) for i in ids)
    assert len(ids) < len(tokenizer.encode(TRAIN[0], add_special_tokens=False)) / 2
    resumed = pipeline.run(tmp_path / "run", resume=True)
    assert [stage.metrics for stage in resumed.stages] == [stage.metrics for stage in result.stages]


def test_a_resumed_run_gives_the_next_stage_the_saved_tokenizer(tokenizer, tmp_path):
    """sft stopped at its start, after ``extend_vocabulary`` finished: the resume reads the extended model and
    tokenizer back from ``final/``, and sft trains and saves with them."""
    rows = [{"text": text} for text in TRAIN]
    pipeline = polm.Pipeline(tiny_llama(tokenizer, 0), tokenizer=tokenizer, seed=0).add(
        "extend_vocabulary", data=rows, new_tokens=10).add("sft", data=rows, max_steps=2, batch_size=4, eval_size=0,
                                                             max_length=64)
    stop = threading.Event()
    stop.set()
    assert pipeline.run(tmp_path / "run", stop=stop).stages[-1].interrupted
    result = pipeline.run(tmp_path / "run", resume=True)
    assert not result.stages[-1].interrupted
    assert len(AutoTokenizer.from_pretrained(result.stages[1].checkpoint)) == len(tokenizer) + 10
    assert AutoModelForCausalLM.from_pretrained(result.stages[1].checkpoint).config.vocab_size == len(tokenizer) + 10


BAD_OPTIONS = {
    "no-tokens": ("corpus.jsonl", "new_tokens: 0", "'new_tokens' must be at least 1, got 0"),
    "corpus": ("corpus.jsonl", "corpus: x.jsonl", "unknown option 'corpus'. Did you mean 'data'?"),
    "frequency": ("corpus.jsonl", "min_frequency: two", "'min_frequency'"),
    "missing-file": ("missing.jsonl", "new_tokens: 5", "option 'data': data file not found"),
}


@pytest.mark.parametrize("data, extra, expected", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_fail_in_one_line_with_exit_2(data, extra, expected, model_dir, tmp_path, capsys):
    """A bad count, the brief's name ``corpus`` for ``data``, a word for a number and a missing file: one line
    naming the recipe line and the option, exit 2 through ``polm run``, nothing written."""
    recipe = tmp_path / "recipe.yaml"
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TRAIN))
    recipe.write_text(f"model: {model_dir}\nstages:\n  - name: extend_vocabulary\n    data: {tmp_path / data}\n"
                      f"    {extra}\n")
    status = main(["run", str(recipe), "--output", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_a_corpus_with_nothing_frequent_enough_is_named(tokenizer, tmp_path):
    pipeline = polm.Pipeline(tiny_llama(tokenizer, 0), tokenizer=tokenizer).add(
        "extend_vocabulary", data=[{"text": "one two three"}], min_frequency=2)
    with pytest.raises(polm.PolmError, match="lower 'min_frequency'"):
        pipeline.run(tmp_path / "run")


def test_the_stage_is_registered():
    assert polm.components("stages")["extend_vocabulary"].__name__ == "ExtendVocabularyStage"


def test_no_learned_token_can_split_a_special_token(tokenizer):
    """Rows that hold `` <|end|>`` as text: `` <|`` is frequent but would match before ``<|end|>`` and split it,
    so it is not learned, and the special token still encodes as one."""
    texts = ["done <|end|> next <|end|> again <|end|> more <|end|>"] * 3
    chosen = learn_new_tokens(tokenizer, texts, 10, min_frequency=3)
    assert " <|" not in chosen and " next" in chosen
    _, extended = extend_tokenizer(tiny_llama(tokenizer, 0), tokenizer, chosen)
    assert extended.encode(texts[0], add_special_tokens=False).count(extended.convert_tokens_to_ids("<|end|>")) == 4

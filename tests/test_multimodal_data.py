"""Media in rows and batches: placeholders, labels, truncation, padding; the bundled shapes and tones tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

import polm
from polm.engine.encoding import IGNORE_INDEX, MEDIA_TOKEN_IDS, MediaBatch, encode_row, pad_batch, truncate
from polm.engine.errors import PolmError

IMAGE = {"type": "image", "path": "/data/cat.png"}
AUDIO = {"type": "audio", "path": "/data/meow.wav"}


def _chat(*parts, answer="a cat"):
    return {"messages": [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": answer}]}


def test_media_parts_become_placeholders_without_labels(tokenizer):
    """One placeholder id per part, in order; the parts travel with the example; no loss on them."""
    example = encode_row(tokenizer, _chat(IMAGE, {"type": "text", "text": "and"}, AUDIO))
    placeholders = [i for i in example.input_ids if i < 0]
    assert placeholders == [MEDIA_TOKEN_IDS["image"], MEDIA_TOKEN_IDS["audio"]]
    assert example.media == [IMAGE, AUDIO]
    assert all(label == IGNORE_INDEX for token, label in zip(example.input_ids, example.labels) if token < 0)
    text = encode_row(tokenizer, _chat({"type": "text", "text": "and"}))
    assert [i for i in example.input_ids if i >= 0] == text.input_ids  # the rest renders as for text


def test_task_rows_carry_prompt_media(tokenizer):
    row = {"prompt": [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What?"}]}], "answer": "cat"}
    assert encode_row(tokenizer, row).media == [IMAGE]


def test_truncation_keeps_the_media_of_the_kept_placeholders(tokenizer):
    example = encode_row(tokenizer, _chat(IMAGE, {"type": "text", "text": "x"}, AUDIO))
    cut = example.input_ids.index(MEDIA_TOKEN_IDS["audio"])
    example.labels[cut - 1] = 7  # give the kept part a label so truncation keeps the example
    assert truncate(example, cut).media == [IMAGE]


def test_pad_batch_carries_media_only_when_there_are_any(tokenizer):
    with_media = pad_batch([encode_row(tokenizer, _chat(IMAGE)), encode_row(tokenizer, _chat())], 0)
    assert with_media["media"] == [[IMAGE], []] and isinstance(with_media["media"], MediaBatch)
    assert with_media["media"].to("cpu") is with_media["media"]  # batches move to a device like tensors
    assert "media" not in pad_batch([encode_row(tokenizer, _chat())], 0)


def test_marker_text_is_refused(tokenizer):
    with pytest.raises(PolmError, match="must not contain the markers"):
        encode_row(tokenizer, _chat({"type": "text", "text": "see <|image|>"}))


def test_sampling_media_prompts_with_a_text_model_fails_clearly(random_model, tokenizer):
    prompt = [{"role": "user", "content": [IMAGE, {"type": "text", "text": "What?"}]}]
    with pytest.raises(PolmError, match="cannot read; start from a multimodal model"):
        polm.generate(random_model, tokenizer, [prompt])


@pytest.mark.parametrize("name, skills", [("shapes", {"colour", "shape", "count", "position"}),
                                          ("tones", {"count", "pitch"})])
def test_bundled_media_tasks_are_deterministic_and_valid(tmp_path, monkeypatch, name, skills):
    """Generated into the cache folder on first use; the same seed gives the same files and rows."""
    from polm.engine.data import load_rows
    from polm.modalities.audio.tones import tones_rows
    from polm.modalities.vision.shapes import shapes_rows

    make = {"shapes": shapes_rows, "tones": tones_rows}[name]
    monkeypatch.setenv("POLM_CACHE_DIR", str(tmp_path / "a"))
    first = make("test", size=12)
    monkeypatch.setenv("POLM_CACHE_DIR", str(tmp_path / "b"))
    second = make("test", size=12)
    assert [r["answer"] for r in first] == [r["answer"] for r in second]
    files = [part["path"] for row in first for part in row["prompt"][0]["content"] if part["type"] != "text"]
    again = [part["path"].replace(str(tmp_path / "b"), str(tmp_path / "a"))
             for row in second for part in row["prompt"][0]["content"] if part["type"] != "text"]
    assert files == again
    assert all(Path(f).read_bytes() == Path(f.replace("/a/", "/b/")).read_bytes() for f in files)
    assert {r["skill"] for r in first} == skills
    assert len(load_rows(f"polm:{name}", "test")) == 400  # registered, valid rows


def test_align_options_and_starting_model_are_checked():
    with pytest.raises(PolmError, match="'tuning' belongs to a later sft stage"):
        polm.Pipeline().add("align", data="polm:shapes-captions", encoders={"image": "open_clip:polm-tiny-vit"},
                            tuning="lora")
    stage = polm.Pipeline().add("align", data="polm:shapes-captions").stages[0]
    model, _ = polm.load_model("polm-tiny")
    with pytest.raises(PolmError, match="reads text only; set 'encoders'"):
        stage.prepare(model)


@pytest.mark.parametrize("name", ["multimodal.yaml", "multimodal-audio.yaml"])
def test_multimodal_recipes_build(name):
    from polm.engine.recipe import load_recipe

    recipe = load_recipe(str(Path(__file__).parents[1] / "examples" / "recipes" / name))
    assert [stage.name for stage in recipe.pipeline().stages] == ["align", "sft", "grpo"]

"""The multimodal model: mixed batches, save/load, generation and the engine's media paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import polm
from polm.engine.encoding import encode_row, media_inputs, pad_batch
from polm.engine.errors import PolmError
from polm.engine.rl.rollout import completion_token_logps, sample
from polm.modalities.audio.tones import write_wav
from polm.modalities.multimodal.build import build_multimodal

ENCODERS = {"image": "open_clip:polm-tiny-vit", "audio": "whisper:polm-tiny"}


@pytest.fixture
def media(tmp_path):
    """A red image and a two-second clip, as paths."""
    Image.new("RGB", (32, 32), (230, 40, 40)).save(tmp_path / "red.png")
    write_wav(tmp_path / "beep.wav", 0.5 * np.sin(np.arange(16000) * 0.4))
    return str(tmp_path / "red.png"), str(tmp_path / "beep.wav")


def _rows(media):
    image, audio = media
    return [
        {"prompt": [{"role": "user", "content": [{"type": "image", "path": image},
                                                 {"type": "text", "text": "What colour is it?"}]}], "answer": "red"},
        {"prompt": [{"role": "user", "content": [{"type": "text", "text": "How many beeps?"},
                                                 {"type": "audio", "path": audio}]}], "answer": "1"},
        {"prompt": "What is 3 + 4?", "answer": "7"},
    ]


def _logits(model, examples, pad_id):
    batch = pad_batch(examples, pad_id)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 **media_inputs(model, batch.get("media"))).logits


def _model(random_model, connector, seed=0):
    torch.manual_seed(seed)
    model = build_multimodal(random_model, ENCODERS, {"image": connector, "audio": connector})
    for name, parameter in model.connectors.named_parameters():
        if name.endswith("_gate"):
            torch.nn.init.constant_(parameter, 0.5)  # open the cross-attention gates so media matter
    return model.eval()


@pytest.mark.parametrize("connector", ["mlp2x_gelu", "resampler", "cross_attention"])
def test_mixed_batch_gives_each_row_its_own_logits(random_model, tokenizer, media, connector):
    """An image row, an audio row and a text row batched together get the logits each gets alone."""
    model = _model(random_model, connector)
    examples = [encode_row(tokenizer, row) for row in _rows(media)]
    with torch.no_grad():
        batched = _logits(model, examples, tokenizer.pad_token_id)  # (3, T, V)
        for i, example in enumerate(examples):
            alone = _logits(model, [example], tokenizer.pad_token_id)[0]
            torch.testing.assert_close(batched[i, : len(example.input_ids)], alone)
        text_only = random_model(input_ids=torch.tensor([examples[2].input_ids])).logits[0]
    torch.testing.assert_close(batched[2, : len(examples[2].input_ids)], text_only)
    assert batched.shape[1] == max(len(e.input_ids) for e in examples)  # aligned with input_ids, not the splice


@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_save_and_load_round_trip(random_model, tokenizer, media, tmp_path, tuning):
    """``polm.load_model(folder)`` restores the model, peft-tuned language model included, logit for logit.

    A peft adapter names its base by path, so the base here is loaded from a folder as a user's would be.
    """
    from transformers import AutoModelForCausalLM

    random_model.save_pretrained(tmp_path / "base")
    model = _model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), "resampler")
    if tuning == "lora":
        method = polm.components("tuning_methods")["lora"]
        model.tune_language_model(lambda lm: method.prepare(lm, method.Options(r=4)))
        torch.nn.init.normal_(model.lm.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    examples = [encode_row(tokenizer, row) for row in _rows(media)]
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    loaded, loaded_tokenizer = polm.load_model(str(tmp_path / "saved"))
    assert {"connectors.safetensors", "encoders.safetensors", "language_model", "multimodal.json"} <= \
        {path.name for path in (tmp_path / "saved").iterdir()}
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded, examples, loaded_tokenizer.pad_token_id),
                                   _logits(model.eval(), examples, tokenizer.pad_token_id))


def test_sampled_tokens_are_scored_where_they_were_sampled(random_model, tokenizer, media):
    """Greedy samples of mixed prompts are each the argmax of the log-probs the rollout scorer gives them."""
    model = _model(random_model, "mlp2x_gelu")
    rollout = sample(model, tokenizer, [row["prompt"] for row in _rows(media)], max_new_tokens=4)
    assert rollout.media is not None and [len(m) for m in rollout.select([1, 2]).media] == [1, 0]
    logps, _ = completion_token_logps(model, rollout)  # (3, C)
    full = torch.log_softmax(model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                   position_ids=(rollout.attention_mask.cumsum(-1) - 1).clamp(min=0),
                                   media=rollout.media).logits, -1)
    width = rollout.completion_ids.shape[1]
    best = full[:, -width - 1: -1].max(-1).values * rollout.completion_mask
    torch.testing.assert_close(logps, best, atol=1e-4, rtol=1e-4)


def test_text_model_refuses_media_rows_clearly(random_model, tokenizer, media):
    batch = pad_batch([encode_row(tokenizer, _rows(media)[0])], tokenizer.pad_token_id)
    with pytest.raises(PolmError, match="image content, which the text-only model LlamaForCausalLM cannot read"):
        media_inputs(random_model, batch["media"])


def test_placeholders_without_media_are_refused(random_model, tokenizer, media):
    model = _model(random_model, "linear")
    example = encode_row(tokenizer, _rows(media)[0])
    with pytest.raises(PolmError, match="input_ids hold media placeholders but no media were passed"):
        model(input_ids=torch.tensor([example.input_ids]))


def test_preference_pairs_with_images_are_scored_with_their_images(random_model, tokenizer, tmp_path):
    """dpo's log-probs of an image pair depend on the image: the same pair with another picture scores differently,
    and the pair scored in a batch equals the pair scored alone."""
    from polm.engine.rl import sequence_logps
    from polm.plugins.alignment.logps import collate_pairs, encode_pair

    model = _model(random_model, "mlp2x_gelu")
    pairs = []
    for name, colour in (("red", (230, 40, 40)), ("blue", (30, 40, 230))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{name}.png")
        prompt = [{"role": "user", "content": [{"type": "image", "path": str(tmp_path / f"{name}.png")},
                                               {"type": "text", "text": "What colour is it?"}]}]
        pairs.append(encode_pair(tokenizer, {"prompt": prompt, "chosen": "red", "rejected": "blue"}, 64))
    with torch.no_grad():
        both = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))  # red c, blue c, red r, blue r
        alone = sequence_logps(model, collate_pairs(pairs[:1], tokenizer.pad_token_id))
    torch.testing.assert_close(both[[0, 2]], alone)
    assert not torch.allclose(both[0], both[1]), "the image must change the completion's log-prob"

"""SFT layouts: packed and padding-free rows keep samples apart; NEFTune noise."""

from __future__ import annotations

import json

import torch

import polm
from polm.engine.encoding import IGNORE_INDEX, Encoded, encode_row
from polm.plugins.finetuning.sft.packing import collate_packed, concatenate, pack


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits


def test_packed_samples_do_not_attend_to_each_other(random_model, tokenizer):
    """Changing the first sample leaves the second sample's logits unchanged, and equal to running it alone."""
    first = encode_row(tokenizer, {"prompt": "What is 12 + 7?", "completion": "19"})
    second = encode_row(tokenizer, {"prompt": "What is 3 * 4?", "completion": "12"})
    changed = encode_row(tokenizer, {"prompt": "What is 99 - 45 + 1?", "completion": "55"})
    row = pack([first, second], max_length=256)
    assert len(row) == 1
    offset = len(first.input_ids)

    together = _logits(random_model, collate_packed(row, tokenizer.pad_token_id))
    other = _logits(random_model, collate_packed(pack([changed, second], 256), tokenizer.pad_token_id))
    alone = _logits(random_model, collate_packed(pack([second], 256), tokenizer.pad_token_id))

    second_in_together = together[0, offset: offset + len(second.input_ids)]
    second_in_other = other[0, len(changed.input_ids): len(changed.input_ids) + len(second.input_ids)]
    torch.testing.assert_close(second_in_together, second_in_other)
    torch.testing.assert_close(second_in_together, alone[0, : len(second.input_ids)])
    # Without the position ids the samples would see each other: the check above can fail.
    leaky = random_model(input_ids=collate_packed(row, tokenizer.pad_token_id)["input_ids"]).logits
    assert not torch.allclose(leaky[0, offset: offset + len(second.input_ids)], second_in_together, atol=1e-5)


def test_pack_fills_rows_and_masks_each_first_token():
    """Rows hold at most max_length tokens; each sample's first token is unlabelled and positions restart."""
    examples = [Encoded([1, 2, 3], [1, 2, 3]), Encoded([4, 5], [4, 5]), Encoded([6, 7, 8, 9], [6, 7, 8, 9])]
    rows = pack(examples, max_length=5)
    assert [row.input_ids for row in rows] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert rows[0].labels == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    assert rows[0].position_ids == [0, 1, 2, 0, 1]
    batch = collate_packed(rows, pad_token_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["num_tokens"] == 9
    assert batch["labels"][1, 4] == IGNORE_INDEX and batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0]
    assert concatenate(examples[:2]).position_ids == [0, 1, 2, 0, 1]


def _first_and_last_loss(run_dir):
    records = [json.loads(line) for line in (run_dir / "00-sft/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    return losses[0], losses[-1]


def test_packed_padding_free_and_neftune_sft_train(random_model, tokenizer, arithmetic, tmp_path):
    """Each layout trains: the loss falls by 30% over 40 steps."""
    rows, _ = arithmetic
    for name, extra in [("packed", {"packing": True, "max_length": 64}), ("padding_free", {"padding_free": True}),
                        ("neftune", {"neftune_alpha": 5.0})]:
        model = type(random_model)(random_model.config)
        model.load_state_dict(random_model.state_dict())
        polm.Pipeline(model, tokenizer=tokenizer).add(
            "sft", data=rows[:32], max_steps=40, batch_size=8, lr=3e-3, log_every=5, eval_size=0, **extra
        ).run(tmp_path / name)
        first, last = _first_and_last_loss(tmp_path / name)
        assert last < 0.7 * first, (name, first, last)
        assert not model.get_input_embeddings()._forward_hooks, "the NEFTune hook must not outlive its stage"


def test_neftune_noise_is_on_in_training_only(random_model, tokenizer):
    """The hook perturbs embeddings in train mode and leaves eval mode exact."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    embeddings = random_model.get_input_embeddings()
    ids = torch.tensor([[5, 6, 7]])
    clean = embeddings(ids)
    embeddings.neftune_noise_alpha = 5.0
    handle = embeddings.register_forward_hook(neftune_post_forward_hook)
    try:
        embeddings.train()
        noisy = embeddings(ids)
        embeddings.eval()
        torch.testing.assert_close(embeddings(ids), clean)
    finally:
        handle.remove()
    bound = 5.0 / (3 * clean.shape[-1]) ** 0.5
    assert 0 < (noisy - clean).abs().max() <= bound

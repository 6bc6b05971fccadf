"""Sampling for on-policy stages: token bookkeeping, and log-probs that match an unpadded forward pass."""

from __future__ import annotations

import torch

from polm.engine.encoding import encode_prompt
from polm.engine.rl.rollout import completion_token_logps, sample


def test_samples_of_a_prompt_are_consecutive_and_masks_end_at_eos(random_model, tokenizer):
    torch.manual_seed(0)
    prompts = ["What is 1 + 2?", "What is 12 * 7? Answer quickly."]
    rollout = sample(random_model, tokenizer, prompts, num_samples=3, max_new_tokens=6, temperature=1.0)
    assert rollout.prompt_ids.shape[0] == rollout.completion_ids.shape[0] == len(rollout.texts) == 6
    for row in range(6):
        expected = encode_prompt(tokenizer, prompts[row // 3])
        assert rollout.prompt_ids[row][rollout.prompt_mask[row].bool()].tolist() == expected
        tokens = rollout.completion_ids[row][rollout.completion_mask[row].bool()].tolist()
        assert 1 <= len(tokens) <= 6
        assert tokenizer.eos_token_id not in tokens[:-1], "no token is kept after the end token"
        assert rollout.texts[row] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert rollout.tokens_per_second > 0


def test_token_logps_equal_those_of_each_row_scored_alone(random_model, tokenizer):
    """Left padding must not shift positions: each row's log-probs equal an unpadded forward pass's."""
    torch.manual_seed(1)
    rollout = sample(random_model, tokenizer, ["What is 1 + 2?", "What is 45 - 12? Think."], max_new_tokens=5,
                     temperature=1.0)
    logps, entropy = completion_token_logps(random_model, rollout, with_entropy=True)
    for row in range(2):
        prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        completion = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
        ids = torch.cat([prompt, completion]).unsqueeze(0)
        with torch.no_grad():
            alone = torch.log_softmax(random_model(input_ids=ids).logits[0, len(prompt) - 1: -1], -1)
        expected = alone.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(logps[row, : len(completion)], expected, atol=1e-5, rtol=1e-5)
        assert torch.all(logps[row, len(completion):] == 0) and torch.all(entropy[row, len(completion):] == 0)
        assert torch.all(entropy[row, : len(completion)] > 0)

"""Sampled tokens per second of GRPO's rollouts vs a plain ``generate`` loop over the same prompts.

Run: ``python bench/grpo_rollout.py [--model polm-tiny] [--prompts 16] [--generations 8] [--threads 1]``.
Side by side in one process, on the same model and prompts, at temperature 1:

* ``grpo rollout``: what the ``grpo`` stage does each step, :func:`polm.engine.rl.rollout.sample` with
  all ``prompts * generations`` rows in one left-padded batch, KV cache on, stopping at EOS;
* ``plain generate loop``: ``model.generate`` once per prompt and sample (batch 1, KV cache on);
* ``plain loop, no KV cache``: the same with ``use_cache=False``.

Tokens are sampled completion tokens (through the end token).
"""

from __future__ import annotations

import argparse
import time

import torch

from polm.engine.data import load_rows
from polm.engine.encoding import encode_prompt
from polm.engine.models import load_model
from polm.engine.rl.rollout import sample, stop_token_ids


def plain_loop(model, tokenizer, prompts: list[str], generations: int, max_new_tokens: int, use_cache: bool) -> float:
    """Sampled tokens per second of one ``generate`` call per prompt and sample."""
    stops = stop_token_ids(model, tokenizer)
    tokens, started = 0, time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            input_ids = torch.tensor([encode_prompt(tokenizer, prompt)])
            for _ in range(generations):
                output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                        eos_token_id=stops, pad_token_id=tokenizer.pad_token_id, use_cache=use_cache)
                tokens += output.shape[1] - input_ids.shape[1]
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="polm-tiny", help="a registered model or a checkpoint folder")
    parser.add_argument("--data", default="polm:arithmetic-think")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    model, tokenizer = load_model(arguments.model)
    model.eval()
    prompts = [row["prompt"] for row in load_rows(arguments.data, "test")[: arguments.prompts]]
    settings = (arguments.generations, arguments.max_new_tokens)
    torch.manual_seed(0)
    sample(model, tokenizer, prompts[:2], max_new_tokens=4, temperature=1.0)  # warm-up
    rollout = sample(model, tokenizer, prompts, num_samples=arguments.generations, temperature=1.0,
                     max_new_tokens=arguments.max_new_tokens, batch_size=len(prompts) * arguments.generations)
    results = {
        "grpo rollout (batched)": rollout.tokens_per_second,
        "plain generate loop": plain_loop(model, tokenizer, prompts, *settings, use_cache=True),
        "plain loop, no KV cache": plain_loop(model, tokenizer, prompts, *settings, use_cache=False),
    }
    print(f"{arguments.model}: {len(prompts)} prompts x {arguments.generations} samples, "
          f"max_new_tokens {arguments.max_new_tokens}, {arguments.threads} thread(s); "
          f"rollout mean completion {float(rollout.completion_lengths.float().mean()):.1f} tokens")
    grpo = results["grpo rollout (batched)"]
    print(f"{'run':26s} {'sampled tok/s':>13s} {'grpo is':>9s}")
    for name, speed in results.items():
        print(f"{name:26s} {speed:13,.0f} {grpo / speed:8.1f}x")


if __name__ == "__main__":
    main()

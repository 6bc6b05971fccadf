"""Useful (non-padding) tokens per second of SFT: padded vs packed vs padding-free, a bare PyTorch loop, and TRL.

Run: ``python bench/sft_packing.py [--steps 40] [--threads 2]`` (TRL rows need
``pip install 'polm[bench]'``; without it they are skipped). All runs train the
same randomly initialised polm-tiny-shaped model on the same mixed-length rows
(long-tailed lengths, as in real instruction data), side by side in one
process, and print a table with each run's ratio to padded polm SFT. Every run
skips its first quarter of steps as warm-up.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import polm
from polm.engine.encoding import encode_row, pad_batch
from polm.engine.lm import completion_loss
from polm.modalities.text.tiny import TINY_MODEL_DIR


def mixed_length_rows(count: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows whose lengths follow a long tail (most short, a few long)."""
    rng = random.Random(seed)
    words = ["the", "sum", "of", "seven", "and", "five", "is", "twelve", "while", "nine", "minus", "four",
             "leaves", "five"]
    rows = []
    for _ in range(count):
        length = min(180, int(rng.paretovariate(1.2) * 6))
        rows.append({"prompt": " ".join(rng.choices(words, k=4)), "completion": " ".join(rng.choices(words, k=length))})
    return rows


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL_DIR))


def polm_run(rows, tokenizer, steps: int, batch_size: int, **layout) -> float:
    with tempfile.TemporaryDirectory() as folder:
        polm.Pipeline(fresh_model(), tokenizer=tokenizer).add(
            "sft", data=rows, max_steps=steps, batch_size=batch_size, max_length=256, log_every=steps // 4,
            eval_size=0, **layout,
        ).run(Path(folder) / "run")
        records = [json.loads(line) for line in (Path(folder) / "run/00-sft/metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # first window includes warm-up
    return sum(speeds) / len(speeds)


def bare_loop(rows, tokenizer, steps: int, batch_size: int) -> float:
    """The same padded SFT written as a plain PyTorch loop, for the engine's overhead."""
    model = fresh_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    examples = [encode_row(tokenizer, row) for row in rows]
    tokens, elapsed = 0, 0.0
    for step in range(steps):
        batch = pad_batch(examples[step * batch_size:(step + 1) * batch_size], tokenizer.pad_token_id)
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = completion_loss(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step >= steps // 4:  # skip warm-up like the polm runs
            elapsed += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    return tokens / elapsed


def trl_run(rows, tokenizer, steps: int, batch_size: int, packing: bool = False) -> float:
    """TRL's ``SFTTrainer`` on the same rows and model, completion-only loss; non-padding tokens per second."""
    from datasets import Dataset, disable_progress_bars
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Throughput(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= steps // 4:
                self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

    throughput = Throughput()
    disable_progress_bars()
    with tempfile.TemporaryDirectory() as folder:
        config = SFTConfig(
            output_dir=folder, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-4,
            max_length=256, packing=packing, completion_only_loss=True, save_strategy="no", report_to=[],
            logging_steps=steps, disable_tqdm=True, use_cpu=True, include_num_input_tokens_seen="non_padding",
        )
        SFTTrainer(model=fresh_model(), args=config, train_dataset=Dataset.from_list(rows),
                   processing_class=tokenizer, callbacks=[throughput]).train()
    (start, seen_start), (end, seen_end) = throughput.marks[0], throughput.marks[-1]
    return (seen_end - seen_start) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    rows = mixed_length_rows(arguments.steps * arguments.batch_size * 8)
    padded = polm_run(rows, tokenizer, arguments.steps, arguments.batch_size)
    results = {
        "bare PyTorch loop, padded": bare_loop(rows, tokenizer, arguments.steps, arguments.batch_size),
        "polm sft, padded": padded,
        "polm sft, packing": polm_run(rows, tokenizer, arguments.steps, arguments.batch_size, packing=True),
        "polm sft, padding_free": polm_run(rows, tokenizer, arguments.steps, arguments.batch_size,
                                           padding_free=True),
    }
    try:
        import trl  # noqa: F401
    except ImportError:
        print("TRL is not installed: pip install 'polm[bench]' to add its rows")
    else:
        results["TRL SFTTrainer, padded"] = trl_run(rows, tokenizer, arguments.steps, arguments.batch_size)
        results["TRL SFTTrainer, packing"] = trl_run(rows, tokenizer, arguments.steps, arguments.batch_size,
                                                     packing=True)
    print(f"{'run':28s} {'useful tok/s':>12s} {'vs padded polm':>15s}")
    for name, speed in results.items():
        print(f"{name:28s} {speed:12,.0f} {speed / padded:14.2f}x")


if __name__ == "__main__":
    main()

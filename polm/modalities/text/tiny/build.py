"""Build polm-tiny from nothing: corpus, tokenizer, model and pretraining.

    python -m polm.modalities.text.tiny.build --seed 0 --out polm/modalities/text/tiny/weights

The same seed and step count give the same weights on the same machine. The
default build takes about a quarter of an hour on two CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from polm.modalities.text.tasks import arithmetic_rows
from polm.modalities.text.tiny.corpus import pretraining_documents
from polm.modalities.text.tiny.tokenizer import END, END_OF_TEXT, build_tokenizer

SEQUENCE_LENGTH = 64
TOKENIZER_DOCUMENTS = 20_000


def tiny_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The polm-tiny architecture: a 4-layer Llama of about 3.3M parameters."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(END),
        pad_token_id=tokenizer.pad_token_id,
    )


def _held_out_expressions(seed: int) -> set[str]:
    # "What is 37 + 48?" -> "37 + 48"
    prompts = [row["prompt"] for row in arithmetic_rows("test", seed=seed)]
    return {prompt.removeprefix("What is ").removesuffix("?") for prompt in prompts}


def _token_stream(tokenizer: PreTrainedTokenizerFast, documents: Iterator[str], tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the documents, each followed by <|endoftext|>."""
    separator = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    ids: list[int] = []
    while len(ids) < tokens:
        batch = list(itertools.islice(documents, 5_000))
        for encoded in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids += encoded + [separator]
    return torch.tensor(ids[:tokens])


def _learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    model: LlamaForCausalLM,
    stream: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int,
) -> None:
    """Next-token training on random windows of ``stream`` with AdamW and a cosine schedule."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    windows = stream[: len(stream) // SEQUENCE_LENGTH * SEQUENCE_LENGTH].view(-1, SEQUENCE_LENGTH)
    model.train()
    start = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps, lr, warmup=min(100, steps // 10 + 1))
        batch = windows[torch.randint(len(windows), (batch_size,), generator=generator)]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - start:6.0f}s", flush=True)


def build(out: Path, seed: int, steps: int, batch_size: int, lr: float, log_every: int) -> None:
    """Generate the corpus, train tokenizer and model, and save both to ``out``."""
    torch.manual_seed(seed)
    documents = pretraining_documents(seed, held_out=_held_out_expressions(seed))
    first = list(itertools.islice(documents, TOKENIZER_DOCUMENTS))
    tokenizer = build_tokenizer(first)
    stream = _token_stream(tokenizer, itertools.chain(first, documents), steps * batch_size * SEQUENCE_LENGTH)
    print(f"corpus: {len(stream):,} tokens, vocabulary {len(tokenizer)}", flush=True)

    model = LlamaForCausalLM(tiny_config(tokenizer))
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    pretrain(model, stream, steps, batch_size, lr, seed, log_every)

    end_ids = [tokenizer.convert_tokens_to_ids(END), tokenizer.convert_tokens_to_ids(END_OF_TEXT)]
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    parser.add_argument("--seed", type=int, default=0)
    # Measured: with these defaults the model learns to add; with lr 3e-3 and
    # 16 windows of 128 tokens it was still guessing sums after 2000 steps.
    parser.add_argument("--steps", type=int, default=2600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    build(args.out, args.seed, args.steps, args.batch_size, args.lr, args.log_every)
    print(f"saved to {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

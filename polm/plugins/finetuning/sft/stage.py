"""The ``sft`` stage: supervised fine-tuning with the loss on completions only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from polm.engine.data import check_data_spec, load_rows
from polm.engine.encoding import Encoded, encode_row, pad_batch, truncate
from polm.engine.errors import PolmError
from polm.engine.options import StageOptions
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.finetuning.sft.loss import completion_loss


@dataclass
class SFTOptions(StageOptions):
    """Options of ``sft``; rows may be ``{text}``, ``{prompt, completion}``, ``{messages}`` or ``{prompt, answer}``."""

    data: Any = field(default=None, metadata={"help": "training rows: 'polm:<name>', a JSONL path, or a list"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("option 'data' is required (a JSONL path or 'polm:<name>')")


class SFTStage(Stage):
    """Supervised fine-tuning: cross-entropy on completion / assistant tokens, prompts masked."""

    Options = SFTOptions

    def check(self) -> None:
        check_data_spec(self.options.data, "data")
        if self.options.eval_data is not None:
            check_data_spec(self.options.eval_data, "eval_data")

    def encode(self, tokenizer: Any) -> list[Encoded]:
        rows = load_rows(self.options.data, "train")
        examples = []
        for row in rows:
            example = truncate(encode_row(tokenizer, row), self.options.max_length)
            if example is not None:
                examples.append(example)
        dropped = len(rows) - len(examples)
        if dropped:
            Console(stderr=True).print(
                f"[yellow]sft: {dropped} of {len(rows)} rows have no completion token within "
                f"max_length={self.options.max_length} and were skipped"
            )
        if not examples:
            raise PolmError(f"sft: no row of {self.options.data} fits max_length={self.options.max_length}")
        return examples

    def run(self, context: StageContext) -> StageOutput:
        tokenizer = context.tokenizer
        examples = self.encode(tokenizer)

        def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return completion_loss(logits, batch["labels"])

        task = TrainingTask(
            rows=examples,
            collate=lambda items: pad_batch(items, tokenizer.pad_token_id),
            compute_loss=compute_loss,
            evaluate=lambda model: self.evaluate(model, tokenizer),
        )
        return train(self.name, context, self.options, task)

"""The ``sft`` stage: supervised fine-tuning with the loss on completions only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.integrations.neftune import neftune_post_forward_hook

from polm.engine.data import check_data_spec, load_rows
from polm.engine.encoding import Encoded, encode_row, keep_rows_that_fit, media_inputs, pad_batch, truncate
from polm.engine.errors import PolmError
from polm.engine.options import StageOptions
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.finetuning.sft.loss import completion_loss
from polm.plugins.finetuning.sft.packing import collate_packed, concatenate, pack

VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")


@dataclass
class SFTOptions(StageOptions):
    """Options of ``sft``; rows may be ``{text}``, ``{prompt, completion}``, ``{messages}`` or ``{prompt, answer}``."""

    data: Any = field(default=None, metadata={"help": "training rows: 'polm:<name>', a JSONL path, or a list"})
    packing: bool = field(default=False, metadata={
        "help": "pack several examples into rows of max_length tokens; samples do not attend to each other"})
    padding_free: bool = field(default=False, metadata={
        "help": "put each micro-batch in one unpadded row (batch_size examples), samples kept apart"})
    neftune_alpha: float = field(default=0.0, metadata={
        "help": "NEFTune: uniform noise of scale alpha/sqrt(T*d) on input embeddings in training (0: off)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("option 'data' is required (a JSONL path or 'polm:<name>')")
        if self.packing and self.padding_free:
            raise ValueError("choose one of 'packing' and 'padding_free'")
        if (self.packing or self.padding_free) and self.tuning in VIRTUAL_TOKEN_METHODS:
            raise ValueError(f"'packing'/'padding_free' cannot be combined with tuning '{self.tuning}', whose "
                             "virtual tokens would be shared across packed samples; turn packing off")
        if self.neftune_alpha < 0:
            raise ValueError(f"'neftune_alpha' must not be negative, got {self.neftune_alpha}")


def sft_loss(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """The completion loss of a padded or a packed batch."""
    if "position_ids" in batch:  # packed: no attention mask, positions delimit the samples
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       **media_inputs(model, batch.get("media"))).logits
    return completion_loss(logits, batch["labels"])


class SFTStage(Stage):
    """Supervised fine-tuning: cross-entropy on completion / assistant tokens, prompts masked."""

    Options = SFTOptions

    def check(self) -> None:
        check_data_spec(self.options.data, "data")
        if self.options.eval_data is not None:
            check_data_spec(self.options.eval_data, "eval_data")

    def encode(self, tokenizer: Any) -> list[Encoded]:
        rows = load_rows(self.options.data, "train")
        max_length = self.options.max_length
        return keep_rows_that_fit(self.name, [truncate(encode_row(tokenizer, row), max_length) for row in rows],
                                  max_length)

    def training_task(self, tokenizer: Any) -> TrainingTask:
        """Rows, collation and loss for the chosen layout (padded, packed or padding-free)."""
        examples = self.encode(tokenizer)
        pad_id = tokenizer.pad_token_id
        if (self.options.packing or self.options.padding_free) and any(example.media for example in examples):
            raise PolmError(f"sft: rows of {self.options.data} hold images or audio, which packed rows do not "
                            "carry; set packing and padding_free to false")
        if self.options.packing:
            rows: list[Any] = pack(examples, self.options.max_length)
            collate = lambda items: collate_packed(items, pad_id)
        elif self.options.padding_free:
            rows = examples
            collate = lambda items: collate_packed([concatenate(items)], pad_id)
        else:
            rows = examples
            collate = lambda items: pad_batch(items, pad_id)

        return TrainingTask(
            rows=rows,
            collate=collate,
            compute_loss=sft_loss,
            evaluate=lambda model: self.evaluate(model, tokenizer),
            count_tokens=lambda batch: int(batch["num_tokens"]) if "num_tokens" in batch
            else int(batch["attention_mask"].sum()),
        )

    def run(self, context: StageContext) -> StageOutput:
        task = self.training_task(context.tokenizer)
        hook = None
        if self.options.neftune_alpha > 0:
            embeddings = context.model.get_input_embeddings()
            embeddings.neftune_noise_alpha = self.options.neftune_alpha
            hook = embeddings.register_forward_hook(neftune_post_forward_hook)
        try:
            return train(self.name, context, self.options, task)
        finally:
            if hook is not None:
                hook.remove()

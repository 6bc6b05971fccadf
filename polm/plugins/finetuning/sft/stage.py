"""The ``sft`` stage: supervised fine-tuning with the loss on completions only, padded, packed or padding-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers.integrations.neftune import neftune_post_forward_hook

from polm.engine.errors import PolmError
from polm.engine.lm import LanguageModellingOptions, LanguageModellingStage, label_tokens
from polm.engine.stage import StageContext, StageOutput
from polm.engine.trainer import TrainingTask, train
from polm.plugins.finetuning.sft.packing import collate_packed, concatenate, pack

VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")


@dataclass
class SFTOptions(LanguageModellingOptions):
    """Options of ``sft``; ``data`` rows may be ``{text}``, ``{prompt, completion}``, ``{messages}`` or
    ``{prompt, answer}``, and ``objective`` any of the language_modelling family."""

    packing: bool = field(default=False, metadata={
        "help": "pack several examples into rows of max_length tokens; samples do not attend to each other"})
    padding_free: bool = field(default=False, metadata={
        "help": "put each micro-batch in one unpadded row (batch_size examples), samples kept apart"})
    neftune_alpha: float = field(default=0.0, metadata={
        "help": "NEFTune: uniform noise of scale alpha/sqrt(T*d) on input embeddings in training (0: off)", "min": 0})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.packing and self.padding_free:
            raise ValueError("choose one of 'packing' and 'padding_free'")
        if (self.packing or self.padding_free) and self.tuning in VIRTUAL_TOKEN_METHODS:
            raise ValueError(f"'packing'/'padding_free' cannot be combined with tuning '{self.tuning}', whose "
                             "virtual tokens would be shared across packed samples; turn packing off")


class SFTStage(LanguageModellingStage):
    """Supervised fine-tuning: cross-entropy on completion / assistant tokens, prompts masked."""

    Options = SFTOptions

    def training_task(self, tokenizer: Any) -> TrainingTask:
        """Rows, collation and loss for the chosen layout (padded, packed or padding-free)."""
        if not (self.options.packing or self.options.padding_free):
            return super().training_task(tokenizer)
        examples = self.encode(tokenizer)
        pad_id = tokenizer.pad_token_id
        if any(example.media for example in examples):
            raise PolmError(f"sft: rows of {self.options.data} hold images or audio, which packed rows do not "
                            "carry; set packing and padding_free to false")
        if self.options.packing:
            rows: list[Any] = pack(examples, self.options.max_length)
            collate = lambda items: collate_packed(items, pad_id)
        else:
            rows = examples
            collate = lambda items: collate_packed([concatenate(items)], pad_id)
        return TrainingTask(
            rows=rows,
            collate=collate,
            compute_loss=self.loss(),
            weigh=label_tokens,
            evaluate=lambda model: self.evaluate(model, tokenizer),
            count_tokens=lambda batch: int(batch["num_tokens"]),
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

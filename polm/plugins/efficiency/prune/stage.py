"""The ``prune`` stage: a smaller or sparser model, optionally fine-tuned to recover.

In :meth:`PruneStage.run` (validation writes nothing), on the model the stage starts from:

1. Structured (``mlp_fraction``, ``heads_fraction``): each decoder layer loses its least important MLP neurons
   and attention heads, ranked by what they add to the residual stream on ``calibration_rows`` rows of
   ``data``; the model and its config shrink (:mod:`polm.plugins.efficiency.prune.structured`).
2. Unstructured (``sparsity``): the decoder layers' Linear weights (never the embeddings or ``lm_head``) are
   zeroed by ``method``, magnitude or Wanda (whose input norms come from the calibration rows, over the model
   as step 1 left it), to the target in each layer or over all of them (``scope``).
3. Recovery (``max_steps`` or ``epochs`` above 0; by default none): the language-modelling stage's training on
   ``data``, cross-entropy on completions, with the pruned weights set back to exactly zero after every
   optimizer step, so that the sparsity holds throughout.

Then held-out metrics, the ``sparsity`` reached (exact zeros among the decoder layers' Linear weights) and the
parameter counts. ``final/`` is a plain transformers folder of the smaller model.

Resume: pruning is deterministic (the calibration rows are a seeded choice of ``data``), so an interrupted
recovery prunes its starting model again, to the same shapes and the same zeros, and the training loop loads
the checkpoint over it; the checkpoint's pruned weights are exactly zero because the masks were applied after
each step. A finished stage is read back from ``final/`` (:meth:`PruneStage.load_finished`), whose shapes may
not be those of the starting model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polm.engine.distributed import process_state
from polm.engine.encoding import pad_batch
from polm.engine.errors import PolmError
from polm.engine.lm import LanguageModellingOptions, LanguageModellingStage
from polm.engine.log import get_logger
from polm.engine.media import reads_media
from polm.engine.models import count_parameters, load_model
from polm.engine.stage import StageContext, StageOutput
from polm.engine.trainer import TrainingTask
from polm.engine.tuning import unwrap_peft
from polm.plugins.efficiency.prune.calibration import collect_input_statistics
from polm.plugins.efficiency.prune.methods import (
    global_masks,
    layer_mask,
    magnitude_scores,
    wanda_scores,
)
from polm.plugins.efficiency.prune.structured import (
    StructuredPlan,
    decoder_linears,
    prune_structured,
    structured_inputs,
    structured_plan,
)

METHODS = ("magnitude", "wanda")
SCOPES = ("layer", "global")


@dataclass
class PruneOptions(LanguageModellingOptions):
    """Options of ``prune``: what to remove, the calibration rows, and a language-modelling stage's options for
    the optional recovery fine-tuning on ``data``."""

    method: str = field(default="wanda", metadata={
        "help": "unstructured scores: magnitude (|W|) or wanda (|W| x input norm on the calibration rows)",
        "choices": METHODS})
    sparsity: float = field(default=0.0, metadata={
        "help": "fraction of the decoder layers' Linear weights set to zero (unstructured; 0: none)",
        "min": 0, "below": 1})
    scope: str = field(default="layer", metadata={
        "help": "layer: each Linear layer at the sparsity (wanda compares within each output row, as in its "
                "paper); global: all of them ranked together", "choices": SCOPES})
    mlp_fraction: float = field(default=0.0, metadata={
        "help": "fraction of the MLP neurons removed from each layer (structured: the model shrinks)",
        "min": 0, "below": 1})
    heads_fraction: float = field(default=0.0, metadata={
        "help": "fraction of the query heads removed from each layer, the same number from each key/value group "
                "(structured; multi-head attention loses whole heads)", "min": 0, "below": 1})
    calibration_rows: int = field(default=128, metadata={
        "help": "rows of data (a seeded choice) whose activations wanda and structured pruning score with",
        "min": 1})
    max_steps: int = field(default=0, metadata={
        "help": "recovery fine-tuning steps after pruning; 0 means run for 'epochs'"})
    epochs: float = field(default=0.0, metadata={
        "help": "passes of recovery fine-tuning over data when max_steps is 0 (both 0: prune only)"})

    def __post_init__(self) -> None:
        pass  # no recovery is a valid choice here: max_steps and epochs may both be 0

    @property
    def recovers(self) -> bool:
        return bool(self.max_steps or self.epochs)


class PruneMasks:
    """Which weights unstructured pruning zeroed, by the name of their Linear layer: set back to zero after each
    optimizer step of recovery (the training loop's ``after_step``)."""

    def __init__(self, pruned: dict[str, torch.Tensor]) -> None:
        self.pruned = pruned  # name -> (out, in) bool, True where zeroed

    def apply(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            for name, pruned in self.pruned.items():
                weight = model.get_submodule(name).weight
                if pruned.device != weight.device:
                    pruned = self.pruned[name] = pruned.to(weight.device)
                weight.masked_fill_(pruned, 0)


class PruneStage(LanguageModellingStage):
    """Prune the starting model (structured, unstructured or both), then optionally fine-tune it to recover."""

    Options = PruneOptions

    def __init__(self, name: str, options: Any) -> None:
        super().__init__(name, options)
        self.masks: PruneMasks | None = None

    def check(self) -> None:
        """What needs no model: something to prune, and full tuning for the recovery.

        Raises:
            PolmError: naming the option.
        """
        super().check()
        options = self.options
        if not (options.sparsity or options.mlp_fraction or options.heads_fraction):
            raise PolmError("nothing to prune: set 'sparsity' (unstructured), 'mlp_fraction' or 'heads_fraction' "
                            "above 0")
        if options.tuning != "full":
            raise PolmError(f"option 'tuning': prune's recovery trains the pruned weights themselves (full); "
                            f"{options.tuning}'s update would fill the zeros of 'sparsity' when merged, and its "
                            "folder would not hold the pruned model")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The starting model with an earlier stage's adapters merged in; pruned later, in :meth:`run`.

        Raises:
            PolmError: a model that reads media.
        """
        if reads_media(model):
            raise PolmError(f"{self.name}: {type(model).__name__} reads media; prune prunes text language models")
        return super().prepare(unwrap_peft(model))

    def check_inputs(self, model: torch.nn.Module) -> None:
        """The base checks, and that ``model`` has the decoder layers and projections to prune as asked.

        Raises:
            PolmError: naming the option (and the module looked for).
        """
        super().check_inputs(model)
        self.plan(model)
        if self.options.sparsity:
            try:
                decoder_linears(model)
            except PolmError as error:
                raise PolmError(f"option 'sparsity': {error}") from None

    def plan(self, model: torch.nn.Module) -> StructuredPlan | None:
        """What structured pruning removes from ``model``; None when ``mlp_fraction`` and ``heads_fraction`` are 0."""
        options = self.options
        if not (options.mlp_fraction or options.heads_fraction):
            return None
        return structured_plan(model, options.mlp_fraction, options.heads_fraction)

    def calibration_batches(self, tokenizer: Any, seed: int) -> list[dict[str, Any]]:
        """``calibration_rows`` rows of ``data`` (encoded as for training, a permutation by ``seed``), in padded
        batches of ``batch_size``."""
        rows = self.encode(tokenizer)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        chosen = [rows[i] for i in order[:self.options.calibration_rows].tolist()]
        size = self.options.batch_size
        return [pad_batch(chosen[i:i + size], tokenizer.pad_token_id) for i in range(0, len(chosen), size)]

    def prune(self, model: torch.nn.Module, tokenizer: Any, seed: int) -> PruneMasks | None:
        """Prune ``model`` in place as the options say (steps 1 and 2 of the module docstring), on the run's
        device; the same model, rows and ``seed`` give the same result. Returns the unstructured masks."""
        options = self.options
        model.to(process_state().device)
        batches = None
        plan = self.plan(model)
        if plan is not None:
            batches = self.calibration_batches(tokenizer, seed)
            watched, blocks = structured_inputs(model, plan)
            prune_structured(model, plan, collect_input_statistics(model, watched, batches, blocks))
        if not options.sparsity:
            return None
        linears = decoder_linears(model)
        if options.method == "wanda":
            batches = batches or self.calibration_batches(tokenizer, seed)
            statistics = collect_input_statistics(model, linears, batches)
            scores = [wanda_scores(linear.weight, statistics.norms(name)) for name, linear in linears.items()]
        else:
            scores = [magnitude_scores(linear.weight) for linear in linears.values()]
        if options.scope == "global":
            keeps = global_masks(scores, options.sparsity)
        else:
            keeps = [layer_mask(score, options.sparsity, per_row=options.method == "wanda") for score in scores]
        masks = PruneMasks({name: ~keep for name, keep in zip(linears, keeps)})
        masks.apply(model)
        return masks

    def training_task(self, tokenizer: Any) -> TrainingTask:
        """The language-modelling task, with the unstructured masks re-applied after each optimizer step."""
        task = super().training_task(tokenizer)
        if self.masks is not None:
            task.after_step = self.masks.apply
        return task

    def run(self, context: StageContext) -> StageOutput:
        model, tokenizer = context.model, context.tokenizer
        before = count_parameters(model)[1]
        self.masks = self.prune(model, tokenizer, context.seed)
        try:
            if self.options.recovers:
                output = super().run(context)
            else:
                model.eval()
                with torch.no_grad():
                    evaluated = self.evaluate(model, tokenizer)
                output = StageOutput(model, {f"eval/{key}": value for key, value in evaluated.items()})
        finally:
            self.masks = None
        pruned = {**pruning_metrics(output.model), "parameters_before": float(before)}
        get_logger().info("%s: %s of %s parameters left, sparsity %.3f of the decoder layers' Linear weights",
                          self.name, f"{int(pruned['parameters']):,}", f"{before:,}", pruned["sparsity"])
        output.metrics = {**output.metrics, **pruned}
        return output

    def load_finished(self, model: torch.nn.Module, final_dir: Path) -> torch.nn.Module:
        """The pruned model saved in ``final_dir``, read as it is (its shapes may differ from ``model``'s), on
        ``model``'s device."""
        loaded, _ = load_model(final_dir)
        return loaded.to(next(model.parameters()).device)


def pruning_metrics(model: torch.nn.Module) -> dict[str, float]:
    """``sparsity`` (the fraction of exact zeros among the decoder layers' Linear weights), ``parameters`` (all
    of the model's), and the config's ``intermediate_size`` and ``num_attention_heads``."""
    weights = [linear.weight for linear in decoder_linears(model).values()]
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    config = model.config
    return {"sparsity": zeros / sum(weight.numel() for weight in weights),
            "parameters": float(count_parameters(model)[1]),
            "intermediate_size": float(getattr(config, "intermediate_size", 0)),
            "num_attention_heads": float(config.num_attention_heads)}

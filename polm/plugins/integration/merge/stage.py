"""The ``merge`` stage: the model the pipeline hands it merged with other saved models; no training.

Its options are the keys of a merge config (:class:`~.config.MergeConfig`)::

    stages:
      - {name: sft, data: polm:arithmetic, max_steps: 300}
      - name: merge
        merge_method: ties
        models: [{model: runs/other/00-sft, parameters: {weight: 0.5, density: 0.5}}]

The base is the pipeline's model (the previous stage's result, its adapters merged in) unless ``base_model``
names another; a method that uses no base (``linear``) merges the pipeline's model as its first model instead,
with the top-level ``parameters`` (``parameters: {weight: 0.7}``). The merge is written to a temporary folder
by :func:`~.merge.merge_models`, exactly as ``polm merge`` writes it, and loaded back: that model goes on to the
next stage and the pipeline saves it as the stage's ``final/``; ``merge.json`` lands in the stage's folder. A
polm multimodal model merges part by part with saved multimodal models of its make (``parts``, see
:mod:`.multimodal`); its language model's adapters, if an earlier stage trained some, are merged in first.
Saved LoRA adapters among the models are merged into the pipeline's model (``lora: {output: base}``, :mod:`.lora`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from polm.engine.distributed import process_state
from polm.engine.errors import PolmError
from polm.engine.media import reads_media
from polm.engine.models import load_model
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.tuning import unwrap_peft
from polm.plugins.integration.merge.config import MergeConfig, check_merge_config
from polm.plugins.integration.merge.merge import merge_models
from polm.plugins.integration.merge.writer import RECORD_FILE


class MergeStage(Stage):
    """Merge the starting model with other saved models by a registered merge method."""

    Options = MergeConfig

    def check(self) -> None:
        """The method exists and takes the parameters given, the models exist, and their count suits the method."""
        super().check()
        check_merge_config(self.options, pipeline_base=True)
        if self.options.lora_merge().output == "adapter":
            raise PolmError("lora.output: a merge stage hands a model on, not an adapter; merge LoRA adapters into "
                            "the pipeline's model with output: base (the default), or write an adapter with polm merge")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The starting model with an earlier stage's adapters merged in (a multimodal model's into its language
        model)."""
        if reads_media(model):
            return model.tune_language_model(unwrap_peft)
        return unwrap_peft(model)

    def run(self, context: StageContext) -> StageOutput:
        main = process_state().is_main_process
        with tempfile.TemporaryDirectory(prefix="polm-merge-") as folder:
            output = Path(folder) / "merged"
            report = merge_models(self.options, output, seed=context.seed,
                                  pipeline_model=(context.model, context.tokenizer), show_progress=main)
            merged, _ = load_model(output)
            if main:
                shutil.copyfile(output / RECORD_FILE, context.stage_dir / RECORD_FILE)
        device = next(context.model.parameters()).device
        metrics = {"tensors": float(report.tensors), "merged_tensors": float(report.merged_tensors)}
        return StageOutput(model=merged.to(device), metrics=metrics)

    def load_finished(self, model: torch.nn.Module, final_dir: Path) -> torch.nn.Module:
        """The merged model saved in ``final_dir``."""
        return load_model(final_dir)[0]

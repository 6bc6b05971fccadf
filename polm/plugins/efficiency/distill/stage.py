"""The ``distill`` stage: a smaller student trained towards a teacher's next-token distributions.

Word-level knowledge distillation (Hinton et al. 2015; Kim & Rush 2016's word-level KD) on the completion
tokens of ``data``: at each labelled position the student's distribution is pulled towards the teacher's by
an objective of the ``distillation`` family (``forward_kl``, ``reverse_kl``, ``jsd``), mixed with the hard
labels by the objective's ``alpha``. The teacher is the model the stage starts from (the pipeline's model or
an earlier stage's result), or the model ``teacher`` names; the student is the teacher's architecture with
``student`` overrides, started from the teacher's layers (:mod:`polm.plugins.efficiency.distill.student`).
The stage's result, the student, is what later stages continue from and what ``final/`` holds: a plain
transformers folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from polm.engine.errors import PolmError
from polm.engine.lm import LanguageModellingOptions, LanguageModellingStage
from polm.engine.log import get_logger
from polm.engine.media import reads_media
from polm.engine.models import count_parameters, load_model
from polm.engine.objectives import DISTILLATION, DistillationObjective
from polm.engine.stage import StageContext, StageOutput
from polm.engine.tuning import is_peft, unwrap_peft
from polm.plugins.efficiency.distill.student import build_student

STUDENT_INITS = ("teacher", "random")


@dataclass
class DistillOptions(LanguageModellingOptions):
    """Options of ``distill``: a language-modelling stage's (rows with completions) with an objective of the
    distillation family, the teacher and the student."""

    objective: str = field(default="forward_kl", metadata={
        "help": "a registered distillation objective: forward_kl (Hinton), reverse_kl, jsd (GKD), or a plugin's"})
    teacher: str | None = field(default=None, metadata={
        "help": "the teacher: a model folder, registered name or hub id; default the model the stage starts from"})
    student: dict = field(default_factory=dict, metadata={
        "help": "the student as overrides of the teacher's config, e.g. {num_hidden_layers: 2, "
                "intermediate_size: 512}; empty: the teacher's own architecture"})
    student_init: str = field(default="teacher", metadata={
        "help": "teacher (a subset of its layers spread over its depth, as DistilBERT) or random",
        "choices": STUDENT_INITS})


class DistillStage(LanguageModellingStage):
    """Distil the starting model (or ``teacher``) into a smaller student on the completions of ``data``."""

    Options = DistillOptions
    objective_family = DISTILLATION

    def __init__(self, name: str, options: Any) -> None:
        super().__init__(name, options)
        self.teacher: torch.nn.Module | None = None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The student to train, built from the teacher, which the stage keeps for :meth:`run`.

        Raises:
            PolmError: a multimodal teacher, a ``teacher`` of another vocabulary than the model the stage starts
                from (whose tokenizer the pipeline uses), or a ``student`` that is not the teacher's config fields.
        """
        teacher = model if self.options.teacher is None else load_model(self.options.teacher)[0]
        if reads_media(teacher):
            raise PolmError(f"{self.name}: the teacher {type(teacher).__name__} reads media; distill distils "
                            "text language models")
        theirs, ours = (m.get_input_embeddings().num_embeddings for m in (teacher, model))
        if theirs != ours:
            raise PolmError(f"{self.name}: the teacher {self.options.teacher} has a vocabulary of {theirs} tokens and "
                            f"the pipeline's model {ours}; distillation compares both models' distributions over "
                            "one vocabulary, read through the pipeline's tokenizer, so use a teacher of that tokenizer")
        teacher = unwrap_peft(teacher) if is_peft(teacher) else teacher
        self.teacher = teacher.eval().requires_grad_(False)
        student, started = build_student(teacher, self.options.student, self.options.student_init)
        get_logger().info(
            "%s: student of %s parameters (teacher %s); %d tensors copied from the teacher, %d sliced, %d random",
            self.name, f"{count_parameters(student)[1]:,}", f"{count_parameters(teacher)[1]:,}", started.copied,
            started.sliced, started.random)
        return super().prepare(student)

    def loss(self) -> Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, float]]]:
        return partial(distill_loss, teacher=self.teacher, objective=self.objective().fn,
                       options=self.options.objective_options)

    def run(self, context: StageContext) -> StageOutput:
        self.teacher.to(next(context.model.parameters()).device)
        try:
            return super().run(context)
        finally:
            self.teacher = None  # the later stages continue from the student; the teacher's memory is freed


def distill_loss(student: torch.nn.Module, batch: dict[str, Any], teacher: torch.nn.Module,
                 objective: DistillationObjective, options: Mapping[str, Any] | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """``objective(student logits, teacher logits, labels, **options)`` of a padded batch of text (rows with
    media are refused before the stage starts: the student is a text model); the teacher runs without
    gradients."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = student(**inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    return objective(logits, teacher_logits, batch["labels"], **(options or {}))


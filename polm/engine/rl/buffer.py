"""The rollout buffer: one generation batch of an on-policy stage and the updates still to make from it.

An on-policy stage (:class:`polm.engine.trainer.OnPolicyTask`) collects a buffer from the prompts of one
optimizer step, without gradients: the samples, their scores and advantages, and the log-probs its updates
compare against. The training loop then makes the buffer's ``updates`` one optimizer step each (GRPO's
``num_iterations``, PPO's ``ppo_epochs x minibatches``), cutting each update into ``grad_accum`` micro-batches.
The loop saves the buffer, with how many of its updates are done, in every checkpoint, so a run resumed between
two updates of a generation batch continues with the same samples.

Shapes: ``N`` samples (completions, or preference pairs); every field has one row per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

from polm.engine.rl.rollout import Rollout


def select(value: Any, indices: Sequence[int]) -> Any:
    """The rows ``indices`` of one buffer field: a :class:`Rollout`, a tensor (N, ...) or a list of N items."""
    if isinstance(value, Rollout):
        return value.select(indices)
    if isinstance(value, torch.Tensor):
        return value[torch.as_tensor(indices, dtype=torch.long, device=value.device)]
    return [value[i] for i in indices]


@dataclass
class MicroBatch:
    """The samples of one micro-batch of an update, as a stage's ``loss`` receives them.

    Attributes:
        fields: every buffer field restricted to the micro-batch's samples; ``micro_batch["advantages"]`` reads one.
        size: samples in the micro-batch; 0 when a filter (DAPO's dynamic sampling, tied pairs) left it none.
        weight: the sum of its samples' weights: its part of the loss normalisation of the update.
    """

    fields: dict[str, Any]
    size: int
    weight: float

    def __getitem__(self, name: str) -> Any:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


@dataclass
class RolloutBuffer:
    """One generation batch, kept for the updates made from it.

    Attributes:
        fields: the collected data, one row per sample: a :class:`Rollout`, tensors (N, ...) such as
            ``advantages`` (N,) or ``old_logps`` (N, C), lists of N items (encoded preference pairs).
        weights: (N,) what each sample weighs when the loop normalises the loss of an update: a stage whose
            loss is a mean over completion tokens weighs each sample by its completion tokens, a stage whose loss
            is a mean over samples gives each 1, so that an update's gradient is the same whether its samples
            sit in one micro-batch or in several (and on one process or several).
        updates: the sample indices of each update, one optimizer step each, in order.
        metrics: statistics of the generation batch (rewards, sampling speed), logged once, when it is collected.
        done: updates made so far.
    """

    fields: dict[str, Any]
    weights: torch.Tensor
    updates: list[list[int]]
    metrics: dict[str, float] = field(default_factory=dict)
    done: int = 0

    @property
    def exhausted(self) -> bool:
        return self.done >= len(self.updates)

    def next_update(self, micro_batches: int) -> list[MicroBatch]:
        """The next update cut into ``micro_batches`` consecutive parts (sizes differ by one at most), and
        counted as done."""
        indices = self.updates[self.done]
        self.done += 1
        bounds = [len(indices) * part // micro_batches for part in range(micro_batches + 1)]
        parts = [indices[start:end] for start, end in pairwise(bounds)]
        return [MicroBatch({name: select(value, part) for name, value in self.fields.items()}, len(part),
                           float(self.weights[part].sum()) if part else 0.0) for part in parts]

    def state(self) -> dict[str, Any]:
        """What :meth:`from_state` rebuilds the buffer from, its tensors moved to the CPU (for checkpoints)."""
        fields = {name: value.cpu() if isinstance(value, torch.Tensor) else value
                  for name, value in self.fields.items()}
        return {"fields": fields, "weights": self.weights.cpu(), "updates": self.updates, "metrics": self.metrics,
                "done": self.done}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RolloutBuffer:
        return cls(**state)

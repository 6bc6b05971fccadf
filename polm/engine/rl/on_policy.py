"""How the training loop drives an on-policy stage: collect a generation batch, then make its updates.

At each optimizer step the loop hands :meth:`OnPolicySteps.prepare` the prompts of the step's ``grad_accum``
micro-batches. When the buffer's updates are used up, the stage's ``collect`` samples, scores and computes what
its updates compare against from those prompts (without gradients); otherwise the prompts stay unused, so
``max_steps`` and ``epochs`` count optimizer steps. Then the buffer's next update is cut into ``grad_accum``
micro-batches, and :meth:`OnPolicySteps.loss` gives each one's loss, scaled for the backward pass.

Normalisation over the accumulation window: a stage's loss reduces each micro-batch over its own samples the way
their weights say (a mean over completion tokens when each sample weighs its token count, a mean over samples
when each weighs 1). Scaling micro-batch ``m`` by ``w_m * P / W``, where ``w_m`` is its weight, ``W`` the sum of
the weights of the update's micro-batches on all ``P`` processes (an all-reduce) and ``P`` undoes DDP's average
over processes, makes the update's gradient that of one reduction over all its samples: the same at batch 8 as
at batch 4 x grad_accum 2, as DAPO's token-level loss defines it (Yu et al. 2025, "DAPO: An Open-Source LLM
Reinforcement Learning System at Scale", arXiv:2503.14476, eq. 8: one sum over every token of the batch, over the
count of those tokens). With equal weights the scale is the familiar ``1 / grad_accum``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator

from polm.engine.data import Row
from polm.engine.rl.buffer import MicroBatch, RolloutBuffer

Collect = Callable[[torch.nn.Module, list[Row]], RolloutBuffer]
MicroBatchLoss = Callable[[torch.nn.Module, MicroBatch], "tuple[torch.Tensor, dict[str, float], int]"]


def normalising_shares(weights: list[float], accelerator: Accelerator) -> list[float]:
    """Each micro-batch's loss scale ``w_m * P / W`` for the weights ``w_m`` of one optimizer step's micro-batches
    on this process (0 for all when the step has no weight, e.g. no sample left).

    ``W`` sums the weights of every micro-batch of the step on all ``P`` processes (an all-reduce, so every
    process must call this at every step). With one micro-batch on one process the share is exactly 1.
    """
    processes = accelerator.num_processes
    total = sum(weights)
    if processes > 1:
        total = float(accelerator.reduce(torch.tensor(total, device=accelerator.device), "sum"))
    return [weight * processes / total if total else 0.0 for weight in weights]


class OnPolicySteps:
    """The rollout buffer of a run and where in its updates the run is.

    Args:
        collect: ``(model, prompt rows) -> RolloutBuffer``, called without gradients.
        loss: ``(model, micro-batch) -> (loss, metrics, tokens)``: the micro-batch's loss reduced over its own
            samples, its metrics, and the prompt and completion tokens it trained on (for tokens/s).
        grad_accum: micro-batches per update.
        accelerator: for the process count and the all-reduce of the weights.
    """

    def __init__(self, collect: Collect, loss: MicroBatchLoss, grad_accum: int, accelerator: Accelerator) -> None:
        self.collect = collect
        self.micro_batch_loss = loss
        self.grad_accum = grad_accum
        self.accelerator = accelerator
        self.buffer: RolloutBuffer | None = None
        self.micro_batches: list[MicroBatch] = []
        self.shares: list[float] = []

    def prepare(self, model: torch.nn.Module, micro_batch_rows: list[list[Row]]) -> dict[str, float]:
        """Collect a generation batch from ``micro_batch_rows`` if the last one is used up, and take its next update.

        Returns:
            The generation batch's metrics when it was collected by this call (to log once), else ``{}``.
        """
        collected: dict[str, float] = {}
        if self.buffer is None or self.buffer.exhausted:
            with torch.no_grad():
                self.buffer = self.collect(model, [row for rows in micro_batch_rows for row in rows])
            collected = self.buffer.metrics
        self.micro_batches = self.buffer.next_update(self.grad_accum)
        self.shares = normalising_shares([micro_batch.weight for micro_batch in self.micro_batches], self.accelerator)
        return collected

    def loss(self, model: torch.nn.Module, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        """Micro-batch ``micro`` of the current update: ``(its loss scaled by its share, metrics, tokens)``; the
        scaled losses of an update's micro-batches on all processes sum (over processes, averaged) to its loss."""
        loss, metrics, tokens = self.micro_batch_loss(model, self.micro_batches[micro])
        return loss * self.shares[micro], metrics, tokens

    def state(self) -> dict[str, Any] | None:
        """The buffer, for a checkpoint, while it has updates left (a used-up one is collected again anyway)."""
        return None if self.buffer is None or self.buffer.exhausted else self.buffer.state()

    def load_state(self, state: dict[str, Any] | None) -> None:
        self.buffer = None if state is None else RolloutBuffer.from_state(state)

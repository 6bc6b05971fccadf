"""The reference model: the stage's starting model, scored without gradients.

A fully tuned policy moves away from its starting weights, so a frozen copy
is kept. A peft policy (``tuning: lora`` and the like) leaves its base weights
untouched, so the same model with its adapters disabled *is* the starting
model, and no second copy of the base is held.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from polm.engine.rl.logps import sequence_logps
from polm.engine.rl.rollout import Rollout, completion_token_logps
from polm.engine.tuning import is_peft


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (Accelerate wraps it on several devices)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout) inside the block, in its former mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class ReferenceModel:
    """Log-probs of the starting model of a preference or RL stage.

    Args:
        policy: the prepared model the stage trains, before its first step.
        average: score completions by average rather than summed log-prob.

    The reference is scored in eval mode (no dropout), so per-batch and
    precomputed log-probs agree.
    """

    def __init__(self, policy: torch.nn.Module, average: bool = False) -> None:
        self.average = average
        self.shares_policy = is_peft(policy)
        self.frozen: torch.nn.Module | None = None
        if not self.shares_policy:
            self.frozen = copy.deepcopy(policy).requires_grad_(False).eval()

    def held_tensors(self) -> list[torch.Tensor]:
        """The parameters and buffers this reference holds beyond the policy's own (none for a peft policy)."""
        if self.frozen is None:
            return []
        return list(self.frozen.parameters()) + list(self.frozen.buffers())

    def release(self) -> None:
        """Drop the frozen copy (once every reference log-prob needed is computed)."""
        self.frozen = None

    @contextmanager
    def model(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The starting model, to score with inside the block: the frozen copy (moved to ``policy``'s device),
        or for a peft policy the policy itself in eval mode with its adapters disabled."""
        if self.shares_policy:
            model = _unwrap(policy)
            with eval_mode(model), model.disable_adapter():
                yield model
            return
        if self.frozen is None:
            raise RuntimeError("the reference copy was released; its log-probs had to be precomputed")
        device = next(policy.parameters()).device
        if next(self.frozen.parameters()).device != device:
            self.frozen.to(device)
        yield self.frozen

    @torch.no_grad()
    def logps(self, policy: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) reference log-probs of the rows of ``batch``; ``policy`` is the model being trained."""
        with self.model(policy) as model:
            return sequence_logps(model, batch, self.average)

    @torch.no_grad()
    def token_logps(self, policy: torch.nn.Module, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
        """(N, C) reference log-probs of each sampled token of ``rollout`` (0 on padding)."""
        with self.model(policy) as model:
            return completion_token_logps(model, rollout, temperature)[0]

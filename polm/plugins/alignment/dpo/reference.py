"""The reference model: the stage's starting model, scored without gradients.

A fully tuned policy moves away from its starting weights, so a frozen copy
is kept. A peft policy (``tuning: lora`` and the like) leaves its base weights
untouched, so the same model with its adapters disabled *is* the starting
model, and no second copy of the base is held.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch

from polm.engine.rollout import Rollout, completion_token_logps
from polm.engine.tuning import is_peft
from polm.plugins.alignment.logps import EncodedPair, collate_pairs, sequence_logps


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
    """Log-probs of the starting model of a preference stage.

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

    def precompute(self, policy: torch.nn.Module, pairs: Sequence[EncodedPair], pad_token_id: int,
                   batch_size: int, device: torch.device) -> list[EncodedPair]:
        """``pairs`` with ``ref_logps`` filled in, scored ``batch_size`` pairs at a time on ``device``."""
        if self.shares_policy:
            policy.to(device)
        done: list[EncodedPair] = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_token_id).items() if k != "ref_logps"}
            chosen, rejected = self.logps(policy, batch).cpu().chunk(2)
            done += [replace(pair, ref_logps=(float(c), float(r))) for pair, c, r in zip(chunk, chosen, rejected)]
        return done

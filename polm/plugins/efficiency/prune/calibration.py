"""Calibration statistics: what the inputs of Linear layers look like on a few rows of data.

Forward pre-hooks on the named Linear layers sum, over every real token of the calibration batches (padding
left out), the square of each input feature (``||X_j||_2^2``: Wanda's norms, and the neurons' energies), and
for layers given a block size the Gram matrix of each block of features (``X_h^T X_h`` of each attention
head's part of ``o_proj``'s input). One forward pass over the model as it is, without gradients, sums in
float32. (Wanda's reference code instead runs the layers one at a time, each on the outputs of the layers
before it as already pruned; one pass over the unpruned model is simpler and close to it at moderate
sparsity.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class InputStatistics:
    """Sums over the calibration tokens of the inputs of some Linear layers, by module name.

    Attributes:
        squares: (in,) ``sum_t x_tj^2`` of each input feature.
        grams: (in / block, block, block) ``sum_t x_tb x_tb^T`` of each block of features, for the layers given a
            block size.
        tokens: the tokens summed over.
    """

    squares: dict[str, torch.Tensor] = field(default_factory=dict)
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def norms(self, name: str) -> torch.Tensor:
        """(in,) ``||X_j||_2`` of layer ``name``'s input features."""
        return self.squares[name].sqrt()


@torch.no_grad()
def collect_input_statistics(model: torch.nn.Module, layers: Mapping[str, torch.nn.Linear],
                             batches: Iterable[dict[str, Any]], blocks: Mapping[str, int] | None = None
                             ) -> InputStatistics:
    """Run ``model`` over ``batches`` and sum the statistics of :class:`InputStatistics` for ``layers``.

    Args:
        model: a causal LM; put in eval mode for the pass and given back in the mode it was in.
        layers: the Linear layers to watch, by name.
        batches: padded batches with ``input_ids`` and ``attention_mask`` (B, T).
        blocks: block sizes of the layers whose feature-block Gram matrices to sum as well.

    Returns:
        The sums, on the model's device.
    """
    blocks = blocks or {}
    statistics = InputStatistics()
    real: list[torch.Tensor] = []  # the current batch's (B, T) mask of real tokens

    def watch(name: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0][real[0]].float()  # (N, in): the real tokens only
            squares = x.pow(2).sum(0)
            statistics.squares[name] = statistics.squares[name] + squares if name in statistics.squares else squares
            if name in blocks:
                xb = x.reshape(x.shape[0], -1, blocks[name])  # (N, H, d)
                gram = torch.einsum("nhc,nhd->hcd", xb, xb)
                statistics.grams[name] = statistics.grams[name] + gram if name in statistics.grams else gram
        return hook

    handles = [layer.register_forward_pre_hook(watch(name)) for name, layer in layers.items()]
    training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for batch in batches:
            mask = batch["attention_mask"].to(device)
            real[:] = [mask.bool()]
            model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
            statistics.tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return statistics

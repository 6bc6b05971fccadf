"""``linear``: the weighted average of the models (Wortsman et al. 2022, Model Soups, arXiv 2203.05482)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polm.plugins.integration.merge.methods.common import check_inputs, per_model, stack


def linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    weight: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """``sum_m w_m theta_m``, divided by ``sum_m w_m`` when ``normalize``.

    Args:
        tensors: M tensors of one shape ``S``, one per model.
        base: not used (mergekit's linear merge has no base); pass None.
        weight: ``w_m``, one per model.
        normalize: divide by the sum of the weights, so the weights need not sum to 1.

    Returns:
        ``S``, in the dtype of ``tensors``.

    Raises:
        ValueError: ``normalize`` with weights that sum to 0.
    """
    check_inputs("linear", tensors, None, base_required=False, weight=weight)
    stacked = stack(tensors)  # (M, *S)
    merged = (per_model(weight, stacked) * stacked).sum(dim=0)
    if normalize:
        total = sum(float(value) for value in weight)
        if total == 0:
            raise ValueError("linear merge: the weights sum to 0, so they cannot be normalized; set normalize: false")
        merged = merged / total
    return merged.to(tensors[0].dtype)

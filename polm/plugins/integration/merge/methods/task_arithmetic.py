"""``task_arithmetic``: add weighted task vectors to the base (Ilharco et al. 2023, arXiv 2212.04089)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polm.plugins.integration.merge.methods.common import check_inputs, combine, task_vectors


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """``base + lambda * sum_m w_m tau_m`` with task vectors ``tau_m = theta_m - base``.

    Args:
        tensors: M tensors of the base's shape ``S``, one per fine-tuned model.
        base: ``S``, the model the task vectors are taken from.
        weight: ``w_m``, one per model.
        normalize: divide the weighted sum by ``sum_m w_m`` (a sum of weights below 1e-8 is taken as 1).
        lambda_: the scale of the summed task vectors (config key ``lambda``).
        int8_mask: accepted for mergekit configs, where it stores masks in int8 to save memory; no effect.

    Returns:
        ``S``, in the base's dtype.
    """
    check_inputs("task_arithmetic", tensors, base, base_required=True, weight=weight)
    deltas, work_base = task_vectors(tensors, base)
    merged = combine(deltas, weight, work_base, sign_consensus=False, normalize=normalize, lambda_=lambda_)
    return merged.to(base.dtype)

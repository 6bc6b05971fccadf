"""``ties``: TIES-Merging, trim, elect sign and disjoint merge (Yadav et al. 2023, arXiv 2306.01708)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polm.plugins.integration.merge.methods.common import check_inputs, combine, task_vectors
from polm.plugins.integration.merge.methods.sparsify import trim_to_density


def ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    int8_mask: bool = False,
) -> torch.Tensor:
    """TIES: ``base + lambda * sum_m w_m tau'_m [agree_m] / sum_m w_m [agree_m]``.

    1. Trim: each task vector ``tau_m = theta_m - base`` keeps its top ``density_m`` fraction of entries
       by magnitude, the rest set to 0 (``tau'_m``).
    2. Elect: each entry's sign is that of ``sum_m w_m tau'_m``, the sign with the larger total weighted
       magnitude; a sum of exactly 0 elects +.
    3. Disjoint merge: each entry averages, weighted by ``w_m``, only the models whose entry is nonzero and
       has the elected sign; an entry no model agrees on stays at the base.

    Args:
        tensors: M tensors of the base's shape ``S``, one per fine-tuned model.
        base: ``S``.
        weight: ``w_m``, one per model.
        density: the fraction of entries each model keeps in step 1.
        normalize: divide by the weights of the agreeing models (step 3); without it they are summed.
        rescale: scale each trimmed task vector back to its L1 norm (mergekit's option; off in TIES).
        lambda_: the scale of the merged task vector (config key ``lambda``).
        int8_mask: accepted for mergekit configs, where it stores the sign mask in int8; no effect.

    Returns:
        ``S``, in the base's dtype.
    """
    check_inputs("ties", tensors, base, base_required=True, weight=weight, density=density)
    deltas, work_base = task_vectors(tensors, base)
    trimmed = trim_to_density(deltas, density, rescale=rescale)
    merged = combine(trimmed, weight, work_base, sign_consensus=True, normalize=normalize, lambda_=lambda_)
    return merged.to(base.dtype)

"""``dare_linear`` and ``dare_ties``: DARE's random drop of task-vector entries (Yu et al. 2024, arXiv 2311.03099).

DARE (Drop And REscale) drops each entry of a task vector with probability ``p = 1 - density`` and divides
the survivors by ``1 - p``, which keeps the task vector's expected value; the dropped task vectors are then
summed (``dare_linear``) or TIES-merged with sign election and disjoint mean (``dare_ties``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polm.plugins.integration.merge.methods.sparsify import merge_after_drop, uniform_keep_probability


def dare_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``base + lambda * sum_m w_m tau_m * B_m / density_m`` with ``B_m ~ Bernoulli(density_m)`` per entry.

    Args:
        tensors: M tensors of the base's shape ``S``, one per fine-tuned model.
        base: ``S``.
        weight: ``w_m``, one per model.
        density: ``1 - p``, the probability that each entry of a model's task vector survives.
        normalize: divide the weighted sum by ``sum_m w_m``.
        rescale: divide the survivors by ``density_m`` (DARE's rescale; without it the drop shrinks the
            task vectors).
        lambda_: the scale of the merged task vector (config key ``lambda``).
        int8_mask: accepted for mergekit configs; no effect.
        generator: the seeded generator the drops are drawn from (the same seed gives the same tensor).

    Returns:
        ``S``, in the base's dtype.
    """
    return merge_after_drop(
        "dare_linear", tensors, base, lambda deltas: uniform_keep_probability(density, deltas), weight=weight,
        density=density, sign_consensus=False, normalize=normalize, rescale=rescale, lambda_=lambda_,
        generator=generator,
    )


def dare_ties(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE's drop in place of TIES's trim, then TIES's sign election and disjoint merge (see :func:`ties`).

    Args:
        tensors: M tensors of the base's shape ``S``, one per fine-tuned model.
        base: ``S``.
        weight: ``w_m``, one per model.
        density: the probability that each entry of a model's task vector survives the drop.
        normalize: divide by the weights of the models that agree with the elected sign (mergekit's default
            for ``dare_ties`` is not to).
        rescale: divide the survivors by ``density_m``.
        lambda_: the scale of the merged task vector (config key ``lambda``).
        int8_mask: accepted for mergekit configs, where it stores the sign mask in int8; no effect.
        generator: the seeded generator the drops are drawn from.

    Returns:
        ``S``, in the base's dtype.
    """
    return merge_after_drop(
        "dare_ties", tensors, base, lambda deltas: uniform_keep_probability(density, deltas), weight=weight,
        density=density, sign_consensus=True, normalize=normalize, rescale=rescale, lambda_=lambda_,
        generator=generator,
    )

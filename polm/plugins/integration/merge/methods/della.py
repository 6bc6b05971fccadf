"""``della`` and ``della_linear``: DELLA-Merging's magnitude-ranked drop (Deep et al. 2024, arXiv 2406.11617).

DELLA's MagPrune is DARE with a keep probability per entry instead of one per model: within each row the
entries are ranked by magnitude and kept with probabilities from ``density - epsilon`` (the smallest) to
``density + epsilon`` (the largest), and the survivors are divided by their own keep probability. The
dropped task vectors are then TIES-merged (``della``: sign election and disjoint mean) or summed
(``della_linear``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polm.plugins.integration.merge.methods.sparsify import magnitude_keep_probability, merge_after_drop


def della(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool = True,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MagPrune each task vector, then TIES's sign election and disjoint merge (see :func:`ties`).

    Args:
        tensors: M tensors of the base's shape ``S``, one per fine-tuned model.
        base: ``S``.
        weight: ``w_m``, one per model.
        density: each model's mean keep probability.
        epsilon: each model's half-width of the keep probabilities; ``density +- epsilon`` must lie in (0, 1).
        normalize: divide by the weights of the models that agree with the elected sign.
        rescale: divide each survivor by its keep probability.
        lambda_: the scale of the merged task vector (config key ``lambda``).
        int8_mask: accepted for mergekit configs, where it stores the sign mask in int8; no effect.
        generator: the seeded generator the drops are drawn from.

    Returns:
        ``S``, in the base's dtype.
    """
    return merge_after_drop(
        "della", tensors, base, lambda deltas: magnitude_keep_probability(deltas, density, epsilon),
        weight=weight, density=density, epsilon=epsilon, sign_consensus=True, normalize=normalize,
        rescale=rescale, lambda_=lambda_, generator=generator,
    )


def della_linear(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool = False,
    rescale: bool = True,
    lambda_: float = 1.0,
    int8_mask: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MagPrune each task vector, then ``base + lambda * sum_m w_m tau'_m`` (see :func:`dare_linear`).

    Args:
        tensors: M tensors of the base's shape ``S``, one per fine-tuned model.
        base: ``S``.
        weight: ``w_m``, one per model.
        density: each model's mean keep probability.
        epsilon: each model's half-width of the keep probabilities; ``density +- epsilon`` must lie in (0, 1).
        normalize: divide the weighted sum by ``sum_m w_m``.
        rescale: divide each survivor by its keep probability.
        lambda_: the scale of the merged task vector (config key ``lambda``).
        int8_mask: accepted for mergekit configs; no effect.
        generator: the seeded generator the drops are drawn from.

    Returns:
        ``S``, in the base's dtype.
    """
    return merge_after_drop(
        "della_linear", tensors, base, lambda deltas: magnitude_keep_probability(deltas, density, epsilon),
        weight=weight, density=density, epsilon=epsilon, sign_consensus=False, normalize=normalize,
        rescale=rescale, lambda_=lambda_, generator=generator,
    )

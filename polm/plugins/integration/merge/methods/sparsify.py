"""Sparsifying task vectors before they are combined: TIES's magnitude trim and the random drops of DARE and DELLA.

All functions take and return ``(M, *S)`` task vectors (one row per model) with one parameter value per model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from polm.plugins.integration.merge.methods.common import check_inputs, combine, per_model, task_vectors

# Below this L1 norm a task vector is taken as zero and not rescaled (mergekit's tolerance).
_NORM_EPSILON = 1e-7


def trim_to_density(deltas: torch.Tensor, density: Sequence[float], *, rescale: bool) -> torch.Tensor:
    """TIES's trim: keep the ``k = int(density * numel)`` entries of each task vector largest in magnitude.

    Of equal magnitudes the earlier entry (in flattened order) is kept first, so the result does not
    depend on the sort's implementation. A density of 1 or more keeps everything.

    Args:
        deltas: ``(M, *S)`` task vectors.
        density: the fraction of entries each model keeps.
        rescale: scale each trimmed task vector back to its L1 norm before trimming (mergekit's
            ``rescale`` for magnitude trimming; TIES itself does not rescale).

    Returns:
        ``(M, *S)``, zero where trimmed.

    Raises:
        ValueError: a density so small that a model keeps no entry of the tensor (as mergekit refuses it).
    """
    trimmed = []
    for delta, fraction in zip(deltas, density):
        if fraction >= 1:
            trimmed.append(delta)
            continue
        keep = int(fraction * delta.numel())
        if keep <= 0:
            raise ValueError(
                f"density {fraction} keeps no entry of a tensor of {delta.numel()} entries; raise the density"
            )
        order = torch.argsort(delta.abs().flatten(), descending=True, stable=True)
        mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
        mask[order[:keep]] = True
        kept = delta * mask.view_as(delta)
        if rescale:
            before, after = delta.abs().sum(), kept.abs().sum()
            if before >= _NORM_EPSILON and after >= _NORM_EPSILON:
                kept = kept * (before / after)
        trimmed.append(kept)
    return torch.stack(trimmed)


def drop_at_random(
    deltas: torch.Tensor,
    keep_probability: torch.Tensor,
    *,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DARE's drop: zero each entry independently, keeping it with its probability ``q``, then divide by ``q``.

    Dividing the survivors by ``q = 1 - p`` keeps every entry's expected value: ``E[tau * B / q] = tau``
    for ``B ~ Bernoulli(q)`` (Yu et al. 2024, arXiv 2311.03099, eq. 1). An entry with ``q = 0`` is always
    dropped, one with ``q = 1`` always kept.

    Args:
        deltas: ``(M, *S)`` task vectors.
        keep_probability: ``q`` of each entry, broadcastable to ``deltas``.
        rescale: divide the survivors by ``q``. mergekit's ``rescale`` instead scales each task vector
            back to its L1 norm, which approximates the same factor on a large tensor.
        generator: draws the uniform numbers (on its own device); None uses torch's global generator.

    Returns:
        ``(M, *S)``.
    """
    device = generator.device if generator is not None else deltas.device
    uniform = torch.rand(deltas.shape, generator=generator, device=device, dtype=torch.float32)
    kept = uniform.to(deltas.device) < keep_probability  # P(U < q) = q for U ~ Uniform[0, 1)
    dropped = deltas * kept
    if rescale:
        dropped = dropped / torch.where(keep_probability > 0, keep_probability, torch.ones_like(keep_probability))
    return dropped


def uniform_keep_probability(density: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """DARE's ``q = density`` of every entry, one per model: ``(M, 1, ..., 1)``, clipped to [0, 1]."""
    return per_model(density, like).clamp(0.0, 1.0)


def magnitude_keep_probability(
    deltas: torch.Tensor, density: Sequence[float], epsilon: Sequence[float]
) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities: ranked by magnitude within each row, spread over density +- epsilon.

    In each row (the last dimension; a 1-d tensor is one row) the entry of rank ``r`` (0 for the smallest
    magnitude, ``n - 1`` for the largest) is kept with probability ``(density - epsilon) + 2 epsilon r / (n - 1)``,
    so a larger change is more likely kept and the mean is ``density`` (Deep et al. 2024, arXiv 2406.11617,
    where the drop probability ``p_i = 1 - q_i`` spans ``[p - epsilon, p + epsilon]``). A one-entry row gets
    ``density``; equal magnitudes rank in index order. A model with density 1 or more keeps everything, one
    with density 0 or less nothing.

    Args:
        deltas: ``(M, *S)`` task vectors.
        density: the mean keep probability of each model.
        epsilon: the half-width of each model's range.

    Returns:
        ``(M, *S)`` keep probabilities.

    Raises:
        ValueError: ``density - epsilon`` or ``density + epsilon`` outside (0, 1), which mergekit refuses too.
    """
    row_length = deltas.shape[-1] if deltas.dim() > 1 else 1
    rows = deltas.reshape(deltas.shape[0], -1, row_length)  # (M, R, n)
    ranks = rows.abs().argsort(dim=-1, stable=True).argsort(dim=-1).to(deltas.dtype)  # 0 = smallest magnitude
    position = ranks / (row_length - 1) if row_length > 1 else torch.full_like(ranks, 0.5)
    probabilities = []
    for model_position, mean, half_width in zip(position, density, epsilon):
        if mean >= 1:
            probabilities.append(torch.ones_like(model_position))
        elif mean <= 0:
            probabilities.append(torch.zeros_like(model_position))
        elif not (mean - half_width > 0 and mean + half_width < 1):
            raise ValueError(f"epsilon {half_width} with density {mean} must keep density +- epsilon inside (0, 1)")
        else:
            probabilities.append((mean - half_width) + 2 * half_width * model_position)
    return torch.stack(probabilities).reshape(deltas.shape)


def merge_after_drop(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    keep_probability: Callable[[torch.Tensor], torch.Tensor],
    *,
    weight: Sequence[float],
    sign_consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    generator: torch.Generator | None,
    **per_model_values: Sequence[float],
) -> torch.Tensor:
    """What DARE and DELLA share: task vectors, :func:`drop_at_random`, then :func:`~.common.combine`.

    Args:
        method: the method's name, for the messages.
        keep_probability: maps the ``(M, *S)`` task vectors to their keep probabilities.
        per_model_values: the method's other per-model parameters, checked to have one value per model.
        The others as in :func:`~.dare.dare_ties`.

    Returns:
        ``S``, in the base's dtype.
    """
    check_inputs(method, tensors, base, base_required=True, weight=weight, **per_model_values)
    deltas, work_base = task_vectors(tensors, base)
    dropped = drop_at_random(deltas, keep_probability(deltas), rescale=rescale, generator=generator)
    merged = combine(dropped, weight, work_base, sign_consensus=sign_consensus, normalize=normalize, lambda_=lambda_)
    return merged.to(base.dtype)

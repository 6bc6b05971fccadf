"""Pruning scores and masks: pure functions over tensors.

Unstructured pruning scores every weight of a Linear layer and zeroes the lowest-scoring ones:

- magnitude: ``|W_ij|`` (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
  Networks", https://arxiv.org/abs/1506.02626).
- Wanda: ``|W_ij| * ||X_j||_2``, the weight times the norm of its input feature over calibration tokens, the
  lowest-scoring weights removed within each output row (Sun et al. 2024, "A Simple and Effective Pruning
  Approach for Large Language Models", https://arxiv.org/abs/2306.11695, eq. 1 and its per-output comparison
  group).

Structured pruning ranks whole MLP neurons and attention heads by what they add to the residual stream on
the calibration tokens: the squared Frobenius norm of their part of ``down_proj`` / ``o_proj``'s output,
``||X_S W_S^T||_F^2`` for the input features ``S`` of the structure (one intermediate neuron, or one head's
``head_dim`` features). Removing a structure removes exactly that part of the output, so these are the energies
of the errors that pruning each one alone makes there.

Masks are boolean tensors of the weight's shape, True where a weight is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``: (out, in) -> (out, in)."""
    return weight.detach().abs().float()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's ``S_ij = |W_ij| * ||X_j||_2`` (Sun et al. 2024, eq. 1).

    Args:
        weight: (out, in) a Linear layer's weight.
        input_norms: (in,) the L2 norm of each input feature over the calibration tokens.

    Returns:
        (out, in) scores.
    """
    return weight.detach().abs().float() * input_norms.float()[None, :]


def removed_per_group(group_size: int, sparsity: float) -> int:
    """How many of ``group_size`` weights a target ``sparsity`` removes: ``floor(sparsity * group_size)``, as
    Wanda's reference code does, so that a group never loses more than asked."""
    return int(sparsity * group_size + 1e-9)


def layer_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Keep-mask removing the lowest ``sparsity`` of ``scores``, compared within each output row (``per_row``,
    Wanda's group) or across the whole matrix (magnitude's). Ties go to the earlier weight being removed.

    Args:
        scores: (out, in) scores of one layer.
        sparsity: the fraction to remove, in [0, 1).
        per_row: compare within each row (each row loses ``floor(sparsity * in)``) instead of the whole layer
            (which loses ``floor(sparsity * out * in)``).

    Returns:
        (out, in) bool, True where kept.
    """
    flat = scores if per_row else scores.reshape(1, -1)  # (groups, group size)
    removed = removed_per_group(flat.shape[1], sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if removed:
        lowest = torch.argsort(flat, dim=1, stable=True)[:, :removed]
        keep.scatter_(1, lowest, False)
    return keep.reshape(scores.shape)


def global_masks(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks removing the lowest ``sparsity`` of all weights of all layers together: layers whose scores
    are lower lose more. Exactly ``floor(sparsity * total)`` are removed; of weights tied at the threshold,
    the first in layer order go first.

    Args:
        scores: each layer's (out, in) scores, on one device.
        sparsity: the fraction of all weights to remove, in [0, 1).

    Returns:
        One (out, in) bool keep-mask per layer.
    """
    flat = torch.cat([score.reshape(-1) for score in scores])
    removed = removed_per_group(flat.numel(), sparsity)
    if removed == 0:
        return [torch.ones_like(score, dtype=torch.bool) for score in scores]
    threshold = torch.kthvalue(flat, removed).values
    masks, ties_left = [], removed - int((flat < threshold).sum())  # the weights at the threshold still to go
    for score in scores:
        keep = score > threshold
        tied = (score == threshold).reshape(-1).nonzero().squeeze(1)
        taken = tied[:ties_left]
        ties_left -= len(taken)
        keep.reshape(-1)[tied[len(taken):]] = True
        masks.append(keep)
    return masks


def neuron_importance(down_weight: torch.Tensor, input_squares: torch.Tensor) -> torch.Tensor:
    """What each intermediate neuron adds to the MLP's output over the calibration tokens:
    ``||X_j||^2 * ||W_down[:, j]||^2 = ||x_j w_j^T||_F^2`` (its output is an outer product).

    Args:
        down_weight: (hidden, intermediate) ``down_proj``'s weight.
        input_squares: (intermediate,) ``sum_t x_tj^2`` of ``down_proj``'s inputs.

    Returns:
        (intermediate,) energies.
    """
    return down_weight.detach().float().pow(2).sum(0) * input_squares.float()


def head_importance(o_weight: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """What each attention head adds to ``o_proj``'s output over the calibration tokens:
    ``||X_h W_h^T||_F^2 = sum_cd (W_h^T W_h)_cd (X_h^T X_h)_cd`` for head ``h``'s input features.

    Args:
        o_weight: (hidden, heads * head_dim) ``o_proj``'s weight.
        grams: (heads, head_dim, head_dim) ``X_h^T X_h`` of each head's part of ``o_proj``'s inputs.

    Returns:
        (heads,) energies.
    """
    heads, head_dim, _ = grams.shape
    w = o_weight.detach().float().reshape(o_weight.shape[0], heads, head_dim)  # (hidden, H, d)
    return torch.einsum("ohc,ohd,hcd->h", w, w, grams.float())


def neurons_to_keep(importance: torch.Tensor, removed: int) -> torch.Tensor:
    """The indices (ascending) of all but the ``removed`` least important neurons; ties remove the earlier."""
    lowest = torch.argsort(importance, stable=True)[:removed]
    keep = torch.ones_like(importance, dtype=torch.bool)
    keep[lowest] = False
    return keep.nonzero().squeeze(1)


def heads_to_keep(importance: torch.Tensor, kv_heads: int, removed: int) -> torch.Tensor:
    """The query heads (ascending) left when a layer loses ``removed`` of its least important ones.

    Grouped-query attention (``kv_heads`` below the heads): every key/value group loses ``removed / kv_heads``
    of its own query heads, the least important of that group, and keeps its key/value head, so that the model
    stays one a config describes. Query head ``h`` reads key/value head ``h // (heads / kv_heads)``
    (transformers' ``repeat_kv``); the kept heads in ascending order keep that mapping with the new group
    size. Multi-head attention (``kv_heads`` equal to the heads, groups of one): the ``removed`` least important
    heads of the layer go, each with its own key and value.

    Args:
        importance: (heads,) each query head's energy (:func:`head_importance`).
        kv_heads: key/value heads (``num_key_value_heads``).
        removed: query heads removed from the layer; with GQA a multiple of ``kv_heads``.

    Returns:
        (heads - removed,) kept query-head indices.
    """
    heads = importance.shape[0]
    if kv_heads == heads:
        return neurons_to_keep(importance, removed)
    if removed % kv_heads:
        raise ValueError(f"{removed} query heads do not divide among {kv_heads} key/value groups")
    group = heads // kv_heads
    kept = [neurons_to_keep(scores, removed // kv_heads) + g * group
            for g, scores in enumerate(importance.reshape(kv_heads, group))]
    return torch.cat(kept)

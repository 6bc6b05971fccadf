"""``model_stock``: interpolate to the models' average by the angle of their task vectors (Jang et al. 2024,
Model Stock, arXiv 2403.19522)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polm.plugins.integration.merge.methods.common import check_inputs, task_vectors

# Floor of the product of two norms, so that a zero task vector gives cos 0 rather than 0 / 0 (mergekit's).
_NORM_PRODUCT_FLOOR = 1e-6


def model_stock(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    """``t * mean_m theta_m + (1 - t) * base`` with ``t = N cos(theta) / (1 + (N - 1) cos(theta))`` (eq. 5).

    ``cos(theta)`` is the cosine between the task vectors ``tau_m = theta_m - base``; with more than two models
    it is the mean of the pairwise cosines (the paper assumes one angle; this is mergekit's reading). Two
    models whose task vectors are orthogonal give ``t = 0`` (the base), parallel ones ``t = 1`` (their mean).

    Args:
        tensors: N >= 2 tensors of the base's shape ``S``, one per fine-tuned model.
        base: ``S``, the pre-trained model.
        filter_wise: one ratio per row (the last dimension; a 1-d tensor is one row) instead of one for the
            whole tensor.

    Returns:
        ``S``, in the base's dtype.

    Raises:
        ValueError: fewer than two models, which give no angle.
    """
    check_inputs("model_stock", tensors, base, base_required=True)
    if len(tensors) < 2:
        raise ValueError(f"merge method 'model_stock' needs at least 2 models besides the base, got {len(tensors)}")
    deltas, work_base = task_vectors(tensors, base)  # (N, *S), (*S)
    count = len(tensors)
    per_row = filter_wise and deltas.dim() > 2  # S has at least two dimensions
    rows = deltas.reshape(count, -1, deltas.shape[-1]) if per_row else deltas.reshape(count, 1, -1)  # (N, R, n)
    norms = rows.norm(dim=-1)  # (N, R)
    cosines = [
        ((rows[i] * rows[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=_NORM_PRODUCT_FLOOR)).clamp(-1.0, 1.0)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cosine = torch.stack(cosines).mean(dim=0)  # (R,)
    ratio = count * cosine / (1 + (count - 1) * cosine)  # (R,)
    ratio = ratio.reshape(*deltas.shape[1:-1], 1) if per_row else ratio.reshape(())
    merged = work_base + ratio * deltas.mean(dim=0)
    return merged.to(base.dtype)

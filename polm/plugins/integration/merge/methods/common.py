"""What the merge methods share: input checks, task vectors, and the task-arithmetic combine step.

Every method stacks its inputs into one ``(M, *S)`` tensor (M models, S the tensor's shape) in at least
float32, whatever the inputs' dtype, and casts the result back once at the end, so bf16 / fp16 models
lose no precision in between.

The combine step is mergekit's generalized task arithmetic: the (sparsified) task vectors are weighted,
optionally reduced to the entries that agree with an elected sign (TIES), summed, optionally divided by
the weights that contributed (``normalize``), scaled by ``lambda`` and added to the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or the input's own dtype where that is wider (float64)."""
    return torch.promote_types(dtype, torch.float32)


def check_inputs(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    *,
    base_required: bool,
    models: int | None = None,
    **per_model: Sequence[float],
) -> None:
    """Raise ValueError for inputs that do not fit the method.

    Args:
        method: the method's registered name, for the messages.
        tensors: one tensor per non-base model.
        base: the base model's tensor or None.
        base_required: whether the method needs ``base``.
        models: the exact number of non-base models the method takes, if it has one.
        per_model: each per-model parameter by name, one value per model.
    """
    if not tensors:
        raise ValueError(f"merge method '{method}' got no models to merge")
    if models is not None and len(tensors) != models:
        raise ValueError(
            f"merge method '{method}' takes exactly {models} model(s) besides the base, got {len(tensors)}"
        )
    if base_required and base is None:
        raise ValueError(f"merge method '{method}' needs a base model")
    shape = tensors[0].shape
    for tensor in [*tensors[1:], *([base] if base is not None else [])]:
        if tensor.shape != shape:
            raise ValueError(
                f"merge method '{method}' got tensors of different shapes: {tuple(shape)} and {tuple(tensor.shape)}"
            )
    for name, values in per_model.items():
        if len(values) != len(tensors):
            raise ValueError(
                f"merge method '{method}': '{name}' has {len(values)} value(s) for {len(tensors)} model(s)"
            )


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The models' tensors as one ``(M, *S)`` tensor in the working dtype."""
    return torch.stack([tensor.to(work_dtype(tensor.dtype)) for tensor in tensors])


def per_model(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """One value per model, shaped ``(M, 1, ..., 1)`` to broadcast against ``like`` of shape ``(M, *S)``."""
    column = torch.tensor([float(value) for value in values], dtype=like.dtype, device=like.device)
    return column.reshape(-1, *([1] * (like.dim() - 1)))


def task_vectors(tensors: Sequence[torch.Tensor], base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Task vectors ``tau_m = theta_m - theta_base`` (Ilharco et al. 2023, arXiv 2212.04089).

    Returns:
        ``(deltas, base)``: the ``(M, *S)`` task vectors and the ``(*S)`` base, both in the working dtype.
    """
    base = base.to(work_dtype(base.dtype))
    return stack(tensors).to(base.dtype) - base, base


def elect_sign(weighted_deltas: torch.Tensor) -> torch.Tensor:
    """TIES's elected sign of each entry: the sign of the summed weighted task vectors.

    The sum of the entries is the sum of the positive magnitudes minus the negative ones, so this is the
    sign with the larger total magnitude (TIES eq. 2). A tie (sum exactly 0) elects +1, as mergekit does.

    Args:
        weighted_deltas: ``(M, *S)`` weighted, trimmed task vectors.

    Returns:
        ``(*S)`` of +1 and -1.
    """
    return torch.where(weighted_deltas.sum(dim=0) >= 0, 1.0, -1.0).to(weighted_deltas.dtype)


def combine(
    deltas: torch.Tensor,
    weight: Sequence[float],
    base: torch.Tensor,
    *,
    sign_consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Merge task vectors into the base: ``base + lambda * sum_m w_m tau_m [mask_m] / divisor``.

    Args:
        deltas: ``(M, *S)`` task vectors, already trimmed or dropped where the method does so.
        weight: one weight per model.
        base: ``(*S)`` the base tensor.
        sign_consensus: keep only the entries whose weighted sign agrees with :func:`elect_sign`
            (TIES's disjoint merge); a zero entry agrees with no sign, so it never counts.
        normalize: divide by the summed weights of the models that contributed to each entry (with
            ``sign_consensus``), or by the sum of all weights (without); a zero divisor is taken as 1.
        lambda_: the scale of the merged task vector (config key ``lambda``).

    Returns:
        ``(*S)`` in the working dtype.
    """
    weights = per_model(weight, deltas)  # (M, 1, ..., 1)
    weighted = deltas * weights  # (M, *S)
    if sign_consensus:
        agrees = (torch.sign(weighted) == elect_sign(weighted)).to(weighted.dtype)  # (M, *S)
        merged = (weighted * agrees).sum(dim=0)
        divisor = (weights * agrees).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = weighted.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        merged = merged / divisor
    return base + lambda_ * merged

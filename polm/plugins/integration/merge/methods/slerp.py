"""``slerp``: spherical linear interpolation from the base to one model (Shoemake 1985, as mergekit uses it).

No arXiv paper: Ken Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985. Each tensor is
treated as one vector, so the angle is between the two whole tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from polm.plugins.integration.merge.methods.common import check_inputs, work_dtype

# Above this |cos| the two tensors are taken as parallel and interpolated linearly (mergekit's DOT_THRESHOLD).
PARALLEL_COSINE = 0.9995
# Below this norm a tensor is not normalised before the angle is taken (mergekit's eps).
_NORM_EPSILON = 1e-8


def slerp(tensors: Sequence[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """``sin((1 - t) Omega) / sin(Omega) * base + sin(t Omega) / sin(Omega) * theta``, Omega their angle.

    ``t = 0`` gives the base and ``t = 1`` the model. Two unit vectors stay unit vectors and the angle is
    split in the ratio ``t : 1 - t``. When ``|cos Omega| > 0.9995`` (parallel or opposite tensors, where
    ``sin Omega`` is about 0) it falls back to the linear ``(1 - t) base + t theta``.

    Args:
        tensors: exactly one tensor ``theta`` of the base's shape ``S``.
        base: ``S``, the start of the path.
        t: where on the path, usually in [0, 1]; mergekit's config requires it (there is no default).

    Returns:
        ``S``, in the base's dtype.
    """
    check_inputs("slerp", tensors, base, base_required=True, models=1)
    start = base.to(work_dtype(base.dtype))
    end = tensors[0].to(start.dtype)
    cosine = float((_unit(start) * _unit(end)).sum())
    if abs(cosine) > PARALLEL_COSINE:
        merged = (1 - t) * start + t * end
    else:
        omega = math.acos(max(-1.0, min(1.0, cosine)))
        merged = (math.sin((1 - t) * omega) * start + math.sin(t * omega) * end) / math.sin(omega)
    return merged.to(base.dtype)


def _unit(tensor: torch.Tensor) -> torch.Tensor:
    norm = tensor.norm()
    return tensor / norm if norm > _NORM_EPSILON else tensor

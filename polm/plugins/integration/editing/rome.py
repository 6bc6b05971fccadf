"""ROME: Rank-One Model Editing of one MLP layer (Meng, Bau, Andonian, Belinkov, "Locating and Editing Factual
Associations in GPT", NeurIPS 2022, arXiv 2202.05262, section 3 and appendix A).

The MLP output projection ``W`` is read as a linear associative memory from keys ``k`` (its inputs) to values
``W k``. ROME inserts one new pair ``(k*, v*)``, keeping ``W`` as close as possible to the old memory on the keys
the layer usually sees, whose second moment is ``C = E[k k^T]``:

    minimise |W' K - V|^2  subject to  W' k* = v*   =>   W' = W + (v* - W k*) (C^-1 k*)^T / ((C^-1 k*)^T k*)

``k*`` is the subject's last-token key (averaged over the prompt's contexts) and ``v* = W k* + delta``, with
``delta`` optimised so that the model completes the prompt with the target (:func:`~.values.optimise_delta`).
"""

from __future__ import annotations

from typing import Any

import torch

from polm.plugins.integration.editing.model import down_proj, keys_at, tokenize
from polm.plugins.integration.editing.requests import EditRequest
from polm.plugins.integration.editing.values import ValueOptions, optimise_delta


def rome_update(weight: torch.Tensor, covariance: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor) -> torch.Tensor:
    """The rank-one edit of ROME's eq. 2: the weight that maps ``key`` to ``value`` and changes least elsewhere.

    Args:
        weight: ``W`` ``(d_out, d_in)``, the MLP's output projection (a Linear's weight: ``y = W k``).
        covariance: ``C = E[k k^T]`` ``(d_in, d_in)`` of the keys, symmetric positive definite.
        key: ``k*`` ``(d_in,)``.
        value: ``v*`` ``(d_out,)``.

    Returns:
        ``W' = W + (v* - W k*) u^T / (u^T k*)`` with ``u = C^-1 k*`` ``(d_out, d_in)``, in ``weight``'s dtype:
        ``W' k* = v*`` exactly, and ``W' k = W k`` for every key with ``u^T k = 0``.
    """
    w = weight.double()
    k = key.double()
    u = torch.linalg.solve(covariance.double(), k)  # (d_in,) C^-1 k*
    residual = value.double() - w @ k  # (d_out,)
    return (w + torch.outer(residual, u) / (u @ k)).to(weight.dtype)


def rome_edit(model: torch.nn.Module, tokenizer: Any, request: EditRequest, layer: int, covariance: torch.Tensor,
              options: ValueOptions) -> dict[str, float]:
    """Write ``request`` into ``model``'s layer ``layer`` in place (its ``down_proj`` weight replaced by
    :func:`rome_update`). Returns the value optimisation's final NLL and ``|delta|``."""
    delta, metrics = optimise_delta(model, tokenizer, layer, request, options)
    contexts = [tokenize(tokenizer, request.prompt, request.subject, request.target, prefix)
                for prefix in options.prefixes]
    key = keys_at(model, tokenizer, layer, contexts).mean(0)  # (d_mlp,) k*
    module = down_proj(model, layer)
    with torch.no_grad():
        value = module.weight.float() @ key + delta  # (d_model,) v*
        module.weight.copy_(rome_update(module.weight, covariance.to(module.weight.device), key, value))
    return {**metrics, "delta_norm": float(delta.norm())}

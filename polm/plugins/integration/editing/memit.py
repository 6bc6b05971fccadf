"""MEMIT: Mass-Editing Memory in a Transformer (Meng, Sen Sharma, Andonian, Belinkov, Bau, ICLR 2023,
arXiv 2210.07229, section 4 and algorithm 1).

Many facts at once, spread over several MLP layers ``R``. For each request ``i`` a target hidden state
``z_i = h_i + delta_i`` after the last layer of ``R`` is optimised (as ROME's ``v*``); then, layer by layer from
the first, the residual still missing, ``r_i = (z_i - h_i) / (layers left)``, is written into that layer's
``down_proj`` by the batched least-squares update of eq. 14

    Delta = R K^T (lambda C + K K^T)^-1

with ``K`` ``(d_in, n)`` the requests' keys at that layer, ``R`` ``(d_out, n)`` their residuals and ``C`` the
layer's key second moment ``E[k k^T]``, weighted by ``lambda`` (MEMIT's ``mom2_update_weight``) against the new
keys. The keys and hidden states are read again after each layer's update, so a later layer writes only what the
earlier ones left.

For one request and one layer the update is ``r (C^-1 k)^T / (lambda + k^T C^-1 k)`` (Sherman-Morrison), ROME's
``r (C^-1 k)^T / (k^T C^-1 k)`` damped by ``lambda``: ROME is its limit as ``lambda`` goes to 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polm.plugins.integration.editing.model import down_proj, keys_at, outputs_at, tokenize
from polm.plugins.integration.editing.requests import EditRequest
from polm.plugins.integration.editing.values import ValueOptions, optimise_delta


def memit_update(weight: torch.Tensor, covariance: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor,
                 prior_weight: float) -> torch.Tensor:
    """MEMIT's eq. 14 for one layer: the weight that adds ``residuals`` to its outputs on ``keys``, in least
    squares against keeping its outputs on the keys ``covariance`` describes.

    Args:
        weight: ``W`` ``(d_out, d_in)``.
        covariance: ``C = E[k k^T]`` ``(d_in, d_in)``.
        keys: ``K`` ``(d_in, n)``, one column per request.
        residuals: ``R`` ``(d_out, n)``, the change wanted in the layer's output for each key.
        prior_weight: ``lambda`` > 0, how much the keys of ``C`` weigh against the new ones.

    Returns:
        ``W + R K^T (lambda C + K K^T)^-1`` ``(d_out, d_in)``, in ``weight``'s dtype.
    """
    k = keys.double()
    system = prior_weight * covariance.double() + k @ k.T  # (d_in, d_in), symmetric
    update = residuals.double() @ torch.linalg.solve(system, k).T  # R (A^-1 K)^T = R K^T A^-1
    return (weight.double() + update).to(weight.dtype)


def memit_edit(model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest], layers: Sequence[int],
               covariances: dict[int, torch.Tensor], prior_weight: float,
               options: ValueOptions) -> dict[str, float]:
    """Write all ``requests`` into ``model``'s ``layers`` in place, in one batch (algorithm 1). Returns the mean
    final NLL of the target optimisation and the mean ``|delta|``."""
    layers = sorted(layers)
    last = layers[-1]
    found = [optimise_delta(model, tokenizer, last, request, options) for request in requests]
    prompts = [tokenize(tokenizer, request.prompt, request.subject, request.target) for request in requests]
    targets = outputs_at(model, tokenizer, last, prompts) + torch.stack([delta for delta, _ in found])  # (n, d) z
    contexts = [[tokenize(tokenizer, request.prompt, request.subject, request.target, prefix)
                 for prefix in options.prefixes] for request in requests]
    for index, layer in enumerate(layers):
        keys = torch.stack([keys_at(model, tokenizer, layer, rows).mean(0) for rows in contexts])  # (n, d_mlp)
        missing = (targets - outputs_at(model, tokenizer, last, prompts)) / (len(layers) - index)  # (n, d_model)
        module = down_proj(model, layer)
        with torch.no_grad():
            module.weight.copy_(memit_update(module.weight, covariances[layer].to(module.weight.device), keys.T,
                                             missing.T, prior_weight))
    return {"nll": sum(m["nll"] for _, m in found) / len(found),
            "delta_norm": sum(float(delta.norm()) for delta, _ in found) / len(found)}

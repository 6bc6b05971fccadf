"""The value an edit writes: a vector added to one layer's MLP output at the subject's last token, optimised so
that the model completes the prompt with the target (ROME's ``v*``, Meng et al., arXiv 2202.05262, section 3.1;
MEMIT's ``z``, arXiv 2210.07229, eq. 16).

The MLP output of a Llama layer is added straight to the residual stream, so a shift of that output at one
token is the same shift of the residual stream after the layer: ROME reads it as the new value ``v* = W k* +
delta`` of the layer's ``down_proj``, MEMIT as the new hidden state ``z = h + delta`` after its last layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from polm.plugins.integration.editing.model import (
    Tokens,
    down_proj,
    frozen,
    pad_id,
    padded,
    reading_residual,
    shifting_output,
    tokenize,
)
from polm.plugins.integration.editing.requests import EditRequest


@dataclass(frozen=True)
class ValueOptions:
    """How ``delta`` is optimised. ROME's settings for GPT-2 XL are 20 steps at lr 0.5, KL factor 0.0625, weight
    decay 0.5 and norm clamp 4; these defaults keep the lr, KL factor and weight decay but allow 100 steps and a
    clamp of 10, since on polm-tiny taught ``polm:facts`` a clamp of 4 left 3 of the first 20 edits short of their
    target (efficacy of ROME one request at a time on 50 facts: 0.90 with 40 steps and clamp 4, 0.98 with these).

    Attributes:
        steps: Adam steps at most; the optimisation stops once the target's mean NLL is below ``stop_nll``.
        lr: Adam's learning rate.
        kl_factor: weight of the KL divergence of the next-token distribution after the bare subject from the
            unedited model's, which keeps what the model says about the subject in general.
        weight_decay: weight of ``|delta|^2 / |h|^2``, ``h`` the residual stream after the layer at the subject's
            token in the unedited model (MEMIT's reference norm; ROME's code takes the MLP output's, which in a
            small or young model is too small to move anything).
        clamp_norm: ``|delta|`` is kept at most this many times ``|h|``.
        stop_nll: the NLL below which the optimisation stops early.
        prefixes: texts put before the prompt; the loss is their mean (ROME uses short generated prefixes so
            that the edit holds in other contexts). ``""`` is the prompt alone.
    """

    steps: int = 100
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm: float = 10.0
    stop_nll: float = 0.05
    prefixes: tuple[str, ...] = ("",)


def optimise_delta(model: torch.nn.Module, tokenizer: Any, layer: int, request: EditRequest,
                   options: ValueOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """The shift ``delta`` ``(d_model,)`` of layer ``layer``'s MLP output at the subject's last token that makes
    the model complete ``request.prompt`` (after each prefix) with ``request.target``; the model is unchanged.

    The loss is ``mean NLL(target) + kl_factor * KL(p_0 || p_delta) + weight_decay * |delta|^2 / |h|^2``, the KL
    taken on the next-token distribution after the subject alone. Returns ``delta`` and ``{"nll": ...}`` (the
    target's NLL at the last step).
    """
    module = down_proj(model, layer)
    device = module.weight.device
    rows = [tokenize(tokenizer, request.prompt, request.subject, request.target, prefix) for prefix in options.prefixes]
    essence = tokenize(tokenizer, request.subject, request.subject, request.target)
    batch: Sequence[Tokens] = [*rows, essence]
    ids, mask = padded(batch, pad_id(tokenizer), device)
    positions = [tokens.subject for tokens in batch]
    # (B, T) labels: each row's target tokens at the positions that predict them.
    labels = torch.full(ids.shape, -100, dtype=torch.long, device=device)
    for row, tokens in enumerate(rows):
        start = tokens.answer_start
        labels[row, start:start + len(tokens.target)] = torch.tensor(tokens.target, device=device)
    with torch.no_grad(), reading_residual(model, layer) as seen:
        base = model(input_ids=ids, attention_mask=mask).logits
    value_norm = seen[0][0, rows[0].subject].float().norm()
    base_kl = F.log_softmax(base[-1, essence.subject].float(), dim=-1)
    delta = torch.zeros(module.out_features, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=options.lr)
    nll = torch.tensor(float("inf"))
    with frozen(model):
        for _ in range(options.steps):
            with shifting_output(module, positions, delta):
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            log_probs = F.log_softmax(logits[:-1], dim=-1)  # (B - 1, T, V): the prompt rows
            picked = labels[:-1].clamp(min=0)
            token_nll = -log_probs.gather(-1, picked.unsqueeze(-1)).squeeze(-1) * (labels[:-1] >= 0)
            nll = (token_nll.sum(1) / (labels[:-1] >= 0).sum(1)).mean()
            kl = F.kl_div(F.log_softmax(logits[-1, essence.subject], dim=-1), base_kl, log_target=True,
                          reduction="sum")
            loss = nll + options.kl_factor * kl + options.weight_decay * delta.pow(2).sum() / value_norm.pow(2)
            if nll.item() < options.stop_nll:
                break
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                limit = options.clamp_norm * value_norm
                if delta.norm() > limit:
                    delta.mul_(limit / delta.norm())
    return delta.detach(), {"nll": float(nll.item())}


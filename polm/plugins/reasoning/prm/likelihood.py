"""The ``likelihood`` head of a process reward model: a step is as right as its least likely token.

The PRM is a causal LM. A step's P(right) is the probability, under that LM,
of the step's least likely token (its "weakest link"): a miscopied operand or
a wrong digit is a token the model would not have written, so the step scores
low, while a right step scores near 1. Training on step labels is binary
cross-entropy on that probability: maximum likelihood of the weakest token of
a right step, unlikelihood (Welleck et al. 2019, "Neural Text Generation with
Unlikelihood Training", arXiv:1908.04319) of the weakest token of a wrong one.
Scoring solutions by a language model's likelihood is the generative
verifier of Zhang et al. 2024 ("Generative Verifiers", arXiv:2408.15240).

Unlike the ``classifier`` head it needs no new weights, so it starts from what
the policy already knows: on polm:arithmetic-think the untrained head already
ranks samples better than a random pick, where a new classifier head trained on
the bundled step labels learned to flag only 8% of the wrong lines.
"""

from __future__ import annotations

import torch

from polm.engine.encoding import IGNORE_INDEX


def step_token_logps(logits: torch.Tensor, input_ids: torch.Tensor, step_index: torch.Tensor,
                     num_steps: int) -> torch.Tensor:
    """The log-probability of each step's least likely token.

    Args:
        logits: (B, T, V) next-token logits of the PRM's LM.
        input_ids: (B, T) the prompt and solution tokens.
        step_index: (B, T) the step each token belongs to, -1 for the prompt and padding.
        num_steps: S, the most steps of any row.

    Returns:
        (B, S) the minimum over each step's tokens of log p(token | everything before it);
        0.0 (probability 1) for a step a row does not have.
    """
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]  # (B, T-1)
    member = step_index[:, 1:, None] == torch.arange(num_steps, device=step_index.device)  # (B, T-1, S)
    per_step = logps[..., None].expand_as(member).masked_fill(~member, 0.0)  # (B, T-1, S)
    return per_step.min(dim=1).values  # (B, S)


def step_labels(labels: torch.Tensor, num_steps: int) -> torch.Tensor:
    """(B, S) the labels read at each row's step ends, in order, ``-100`` past its last step."""
    rows = torch.full((labels.shape[0], num_steps), IGNORE_INDEX, dtype=torch.long)
    for row in range(labels.shape[0]):
        found = labels[row][labels[row] != IGNORE_INDEX]
        rows[row, : len(found)] = found
    return rows.to(labels.device)


def likelihood_step_loss(step_logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary cross-entropy of P(right) = exp(weakest token's log-probability) against the step labels.

    Args:
        step_logps: (B, S) from :func:`step_token_logps`.
        labels: (B, S) 1 right, 0 wrong, ``-100`` for no step.

    Returns:
        ``(loss, {"step_accuracy": ...})``, accuracy of P(right) > 0.5 against the labels.
    """
    labelled = labels != IGNORE_INDEX  # (B, S)
    logp = step_logps[labelled].clamp(max=-1e-6)  # log P(right) < 0, so that log(1 - P) is finite
    right = labels[labelled].float()
    log_wrong = torch.log(-torch.expm1(logp))  # log(1 - P(right))
    loss = -(right * logp + (1 - right) * log_wrong).mean()
    accuracy = ((logp > torch.log(torch.tensor(0.5))).float() == right).float().mean()
    return loss, {"step_accuracy": float(accuracy)}


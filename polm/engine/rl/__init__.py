"""The RL core: what every on-policy and preference stage shares, written once.

Stages of any paradigm (``grpo``, ``ppo``, ``online_dpo``, ``rft``, ``dpo``,
``kto``, ``reward_model``) build on these modules instead of importing each
other:

* :mod:`~polm.engine.rl.rollout`: sampling completions with the KV cache
  (:class:`Rollout`, :func:`sample`) and the log-prob of each sampled token.
* :mod:`~polm.engine.rl.logps`: summed or averaged completion log-probs of labelled rows.
* :mod:`~polm.engine.rl.reference`: the starting model scored without gradients
  (:class:`ReferenceModel`), and :func:`eval_mode`.
* :mod:`~polm.engine.rl.advantages`: advantage estimators (group, RLOO, GAE),
  DAPO's group filter and masked statistics.
* :mod:`~polm.engine.rl.losses`: the clipped policy objective of GRPO and PPO,
  the k3 KL and the per-token reductions.
* :mod:`~polm.engine.rl.buffer`: the rollout buffer of one generation batch
  (:class:`RolloutBuffer`) and the micro-batches its updates are cut into.
* :mod:`~polm.engine.rl.on_policy`: how the training loop drives an on-policy
  stage, and the loss normalisation over the accumulation window.
"""

from polm.engine.rl.advantages import (
    gae,
    group_advantages,
    informative_groups,
    masked_mean,
    rloo_advantages,
    whiten,
)
from polm.engine.rl.buffer import MicroBatch, RolloutBuffer
from polm.engine.rl.logps import completion_logps, sequence_logps
from polm.engine.rl.losses import LOSS_TYPES, aggregate, clipped_policy_loss, k3_kl, zero_loss
from polm.engine.rl.reference import ReferenceModel, eval_mode
from polm.engine.rl.rollout import Rollout, completion_token_logps, in_chunks, sample, stop_token_ids

__all__ = [
    "LOSS_TYPES",
    "MicroBatch",
    "ReferenceModel",
    "Rollout",
    "RolloutBuffer",
    "aggregate",
    "clipped_policy_loss",
    "completion_logps",
    "completion_token_logps",
    "eval_mode",
    "gae",
    "group_advantages",
    "in_chunks",
    "informative_groups",
    "k3_kl",
    "masked_mean",
    "rloo_advantages",
    "sample",
    "sequence_logps",
    "stop_token_ids",
    "whiten",
    "zero_loss",
]

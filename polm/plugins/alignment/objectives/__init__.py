"""Preference objectives: pure functions returning ``(loss, metrics)``, registered with their family
(see :mod:`polm.engine.objectives` for the families and their signatures).

The pairwise family, selected by the preference stages (``dpo``, ``simpo``,
``orpo``, ``online_dpo``) with ``objective: <name>``, shares one signature::

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
       **hparams) -> (loss, metrics)

Each argument is a (B,) tensor of completion log-probs (summed over the
completion's tokens, or averaged where the objective says so); ``loss`` is a
scalar tensor; ``metrics`` is a dict of floats holding at least
``reward_accuracy``, ``reward_margin``, ``chosen_reward`` and ``rejected_reward``.
``hparams`` are keyword arguments with defaults; recipes set them through the
stage's ``objective_options``. An objective rejects a bad value with ``ValueError``:
the stage calls it once on (1,) zero tensors when the pipeline is built, so a
bad option fails before any model loads. KTO (``kto``) is of the unpaired family.

An objective describes itself with the metadata it is registered with
(``register(name, fn, family=PAIRWISE, **metadata)``); ``family`` is required,
and a pairwise objective that omits the others gets their defaults:

- ``reference_free``: ``False`` (default) for objectives that compare with the
  starting model; ``True`` for those that take ``None`` for the reference
  log-probs (no reference model is held for them).
- ``average_logps``: ``False`` (default) for summed log-probs, ``True`` for
  log-probs averaged over the completion's tokens (SimPO, ORPO).
"""

from polm.plugins.alignment.objectives.common import preference_metrics
from polm.plugins.alignment.objectives.dpo import dpo_loss
from polm.plugins.alignment.objectives.hinge import hinge_loss
from polm.plugins.alignment.objectives.ipo import ipo_loss
from polm.plugins.alignment.objectives.kto import kl_estimate, kto_loss
from polm.plugins.alignment.objectives.orpo import orpo_loss
from polm.plugins.alignment.objectives.robust import robust_dpo_loss
from polm.plugins.alignment.objectives.simpo import simpo_loss

__all__ = [
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_estimate",
    "kto_loss",
    "orpo_loss",
    "preference_metrics",
    "robust_dpo_loss",
    "simpo_loss",
]

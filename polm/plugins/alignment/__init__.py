"""The alignment paradigm: preference objectives and the stages that train with them.

Stages:

==============  =====================================================================  ==================
stage           trains on                                                              headline metric
==============  =====================================================================  ==================
dpo             preference pairs, any pairwise objective (``simpo``/``orpo``: presets)  reward_accuracy
kto             unpaired rows ``{prompt, completion, label}`` (or pairs, split in two)  reward_accuracy
reward_model    preference pairs: a Bradley–Terry reward model (a side model)           accuracy
ppo             prompts; rewards from a reward model and/or registered rewards         reward
online_dpo      prompts; two samples each, the reward picks the chosen one              reward
==============  =====================================================================  ==================

A ``reward_model`` stage writes the reward model to its ``final/`` and hands
the model it started from on to the next stage; later stages score with it as
the reward ``reward_model`` and its folder, e.g. ``ppo: {rewards: {reward_model: 1.0},
reward_options: {reward_model: {path: runs/demo/01-reward_model}}}``.

Rewards: ``reward_model`` (a trained reward model's score; option ``path``)
and ``judge`` (a local language model's probability of "Yes"; options
``model``, ``template``, ``yes``, ``no``).

The method folders import the engine (the RL core :mod:`polm.engine.rl`) and
these paradigm modules, never each other: ``objectives`` (the loss functions,
looked up by family through :mod:`polm.engine.objectives`),
``preference`` (the base of ``dpo``, ``kto`` and ``online_dpo``), ``logps``
(preference pairs in tokens) and ``scoring`` (rewards for sampled completions).
"""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl
from polm.engine.objectives import PAIRWISE, UNPAIRED
from polm.plugins.alignment.dpo import DPOStage, ORPOStage, SimPOStage
from polm.plugins.alignment.judge import judge_reward
from polm.plugins.alignment.kto import KTOStage
from polm.plugins.alignment.objectives import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)
from polm.plugins.alignment.online_dpo import OnlineDPOStage
from polm.plugins.alignment.ppo import PPOStage
from polm.plugins.alignment.reward_model import RewardModelStage, reward_model_reward


@hookimpl
def polm_register_objectives(register: Register) -> None:
    register("dpo", dpo_loss, family=PAIRWISE, description="DPO sigmoid loss; label_smoothing gives cDPO")
    register("ipo", ipo_loss, family=PAIRWISE, description="IPO: squared distance of the margin to 1/(2 beta)")
    register("hinge", hinge_loss, family=PAIRWISE, description="SLiC hinge on the reference-normalised margin")
    register("robust", robust_dpo_loss, family=PAIRWISE, description="rDPO: unbiased under flipped labels")
    register("simpo", simpo_loss, family=PAIRWISE, reference_free=True, average_logps=True,
             description="SimPO: reference-free, length-normalised, with a target margin")
    register("orpo", orpo_loss, family=PAIRWISE, reference_free=True, average_logps=True,
             description="ORPO: SFT on chosen plus an odds-ratio term, reference-free")
    register("kto", kto_loss, family=UNPAIRED, description="KTO on unpaired desirable / undesirable completions")


@hookimpl
def polm_register_stages(register: Register) -> None:
    register("dpo", DPOStage, description="preference optimisation with any pairwise objective (default dpo)")
    register("simpo", SimPOStage, description="the dpo stage with the reference-free SimPO objective")
    register("orpo", ORPOStage, description="the dpo stage with the reference-free ORPO objective")
    register("kto", KTOStage, description="KTO on unpaired rows {prompt, completion, label} or on preference pairs")
    register("reward_model", RewardModelStage,
             description="Bradley–Terry reward model on preference pairs; passes its starting policy on")
    register("ppo", PPOStage, description="RLHF: PPO with a value head, KL penalty to the start and GAE")
    register("online_dpo", OnlineDPOStage,
             description="pairs sampled from the policy, labelled by a reward, trained with a pairwise objective")


@hookimpl
def polm_register_rewards(register: Register) -> None:
    register("reward_model", reward_model_reward, description="the score of a trained reward model (option: path)")
    register("judge", judge_reward,
             description="p(Yes) of a local judge LM asked a template about the completion (options: model, template)")

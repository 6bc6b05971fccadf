"""The reasoning paradigm: rewards on answers, form and steps; the ``grpo`` and ``prm`` stages; the
``policy_gradient`` objectives ``grpo``, ``dr_grpo`` and ``dapo`` (also ``ppo``'s); and the inference-time
scaling methods ``self_consistency``, ``best_of_n`` and ``self_refine``."""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl
from polm.engine.objectives import POLICY_GRADIENT
from polm.plugins.reasoning.grpo import GRPOStage
from polm.plugins.reasoning.grpo.objectives import dapo_objective, dr_grpo_objective, grpo_objective
from polm.plugins.reasoning.prm import PRMStage, prm_reward
from polm.plugins.reasoning.rewards import accuracy_reward, format_reward, length_reward, repetition_reward
from polm.plugins.reasoning.scaling import best_of_n, self_consistency, self_refine


@hookimpl
def polm_register_stages(register: Register) -> None:
    register("grpo", GRPOStage, description="group relative policy optimisation (objectives grpo, dr_grpo, dapo; rloo advantages)")
    register("prm", PRMStage, description="process reward model: a right/wrong score per solution step")


@hookimpl
def polm_register_objectives(register: Register) -> None:
    register("grpo", grpo_objective, family=POLICY_GRADIENT,
             description="clipped surrogate, mean over each completion's tokens then over completions")
    register("dapo", dapo_objective, family=POLICY_GRADIENT, token_level=True,
             description="clipped surrogate, mean over every completion token (PPO's reduction; clip-higher)")
    register("dr_grpo", dr_grpo_objective, family=POLICY_GRADIENT,
             description="clipped surrogate, token sum over N * max_new_tokens (no length normalisation)")


@hookimpl
def polm_register_rewards(register: Register) -> None:
    register("accuracy", accuracy_reward, description="1.0 when the extracted final answer equals 'answer'")
    register("format", format_reward, description="1.0 when the completion matches 'pattern' (default <think>/<answer>)")
    register("length", length_reward, description="length penalty in [-1, 0]: shorter, or closer to 'target' chars")
    register("repetition", repetition_reward, description="n-gram repetition penalty in [-1, 0]")
    register("prm", prm_reward, description="a process reward model's min (or prod) step score; option checkpoint")


@hookimpl
def polm_register_inference_methods(register: Register) -> None:
    register("self_consistency", self_consistency,
             description="majority vote of k samples per question (options k, temperature, top_p, stop_strings)")
    register("best_of_n", best_of_n,
             description="the best of n samples under a registered reward (options n, reward, reward_options, ...)")
    register("self_refine", self_refine,
             description="critique-and-revise for a number of rounds (options rounds, critique_tokens, templates)")

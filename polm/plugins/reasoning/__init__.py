"""The reasoning paradigm: rewards on verifiable answers (GRPO and inference-time scaling to come)."""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl
from polm.plugins.reasoning.rewards import accuracy_reward


@hookimpl
def polm_register_rewards(register: Register) -> None:
    register("accuracy", accuracy_reward, description="1.0 when the extracted final answer equals 'answer'")

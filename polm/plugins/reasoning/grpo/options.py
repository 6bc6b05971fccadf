"""Options of the ``grpo`` stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polm.engine.options import StageOptions
from polm.engine.rl.losses import LOSS_TYPES

ADVANTAGES = ("group", "rloo")  # polm.engine.rl.advantages: group_advantages, rloo_advantages
DAPO_EPSILON_HIGH = 0.28  # DAPO's clip-higher upper bound (arXiv:2503.14476, section 3.1)


@dataclass
class GRPOOptions(StageOptions):
    """Options of ``grpo``. ``loss_type`` picks a variant; ``epsilon_high`` and ``dynamic_sampling``
    default to what that variant prescribes and may be set explicitly."""

    data: Any = field(default=None, metadata={
        "help": "prompts with the fields the rewards need, e.g. {prompt, answer}: 'polm:<name>', JSONL or rows"})
    batch_size: int = field(default=8, metadata={
        "help": "prompts per micro-batch; each is sampled num_generations times"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    rewards: Any = field(default_factory=lambda: {"accuracy": 1.0}, metadata={
        "help": "registered rewards with weights: {accuracy: 1.0, format: 0.2}, a list (weight 1) or one name"})
    reward_options: dict = field(default_factory=dict, metadata={
        "help": "keyword options per reward, e.g. {format: {pattern: '-?\\d+'}}"})
    num_generations: int = field(default=8, metadata={"help": "completions sampled per prompt (the group size G)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling of the rollouts"})
    stop_strings: list = field(default_factory=list, metadata={
        "help": "a completion also ends at the first of these strings, e.g. ['</answer>']"})
    max_new_tokens: int = field(default=32, metadata={"help": "completion length budget, in rollouts and evaluation"})
    loss_type: str = field(default="grpo", metadata={
        "help": "grpo (per-completion mean), dr_grpo (no std or length normalisation), "
                "dapo (token-level mean, clip-higher, dynamic sampling)"})
    advantage: str = field(default="group", metadata={
        "help": "group (reward minus group mean, over the group std except for dr_grpo) or rloo (leave-one-out)"})
    epsilon: float = field(default=0.2, metadata={"help": "lower clip range of the probability ratio"})
    epsilon_high: float | None = field(default=None, metadata={
        "help": f"upper clip range; default: {DAPO_EPSILON_HIGH} for dapo, else epsilon"})
    beta: float = field(default=0.0, metadata={
        "help": "weight of the k3 KL to the starting model (0: no reference is kept; DeepSeekMath used 0.04)"})
    num_iterations: int = field(default=1, metadata={
        "help": "policy updates (optimizer steps) per generation batch, clipped against the sampling policy"})
    dynamic_sampling: bool | None = field(default=None, metadata={
        "help": "drop groups whose rewards are all equal; default: on for dapo, off otherwise"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None:
            raise ValueError("option 'data' is required (prompts with answers, e.g. 'polm:arithmetic')")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"'loss_type' must be one of {', '.join(LOSS_TYPES)}, got '{self.loss_type}'")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"'advantage' must be one of {', '.join(ADVANTAGES)}, got '{self.advantage}'")
        if self.num_generations < 2:
            raise ValueError(f"'num_generations' must be at least 2 to compare completions of a prompt, "
                             f"got {self.num_generations}")
        if self.num_iterations < 1:
            raise ValueError(f"'num_iterations' must be at least 1, got {self.num_iterations}")
        if self.temperature <= 0:
            raise ValueError("'temperature' must be positive: the group needs diverse samples")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"'top_p' must be in (0, 1], got {self.top_p}")
        if self.beta < 0:
            raise ValueError(f"'beta' must not be negative, got {self.beta}")
        if self.epsilon_high is None:
            self.epsilon_high = DAPO_EPSILON_HIGH if self.loss_type == "dapo" else self.epsilon
        if not 0 < self.epsilon < 1 or self.epsilon_high <= 0:
            raise ValueError(f"clip ranges must be positive with 'epsilon' below 1, got epsilon={self.epsilon}, "
                             f"epsilon_high={self.epsilon_high}")
        if self.dynamic_sampling is None:
            self.dynamic_sampling = self.loss_type == "dapo"
        if not isinstance(self.reward_options, dict) or not all(
                isinstance(value, dict) for value in self.reward_options.values()):
            raise ValueError("'reward_options' maps reward names to option mappings, e.g. {format: {pattern: ...}}")

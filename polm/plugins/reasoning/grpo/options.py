"""Options of the ``grpo`` stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from polm.engine.option_groups import DataOptions, RewardOptions, SamplingOptions
from polm.engine.options import StageOptions

ADVANTAGES = ("group", "rloo")  # polm.engine.rl.advantages: group_advantages, rloo_advantages
DAPO_EPSILON_HIGH = 0.28  # DAPO's clip-higher upper bound (arXiv:2503.14476, section 3.1)


@dataclass
class GRPOOptions(StageOptions, DataOptions, SamplingOptions, RewardOptions):
    """Options of ``grpo``; ``data`` holds prompts with the fields the rewards need, e.g. ``{prompt, answer}``.
    ``objective`` picks the policy loss; ``epsilon_high`` and ``dynamic_sampling`` default to what DAPO
    prescribes when it is ``dapo`` and may be set explicitly."""

    batch_size: int = field(default=8, metadata={
        "help": "prompts per micro-batch; each is sampled num_generations times"})
    lr: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    num_generations: int = field(default=8, metadata={
        "help": "completions sampled per prompt (the group size G; at least 2, to compare them)", "min": 2})
    objective: str = field(default="grpo", metadata={
        "help": "a registered policy_gradient objective: grpo (per-completion mean), dr_grpo (no std or length "
                "normalisation), dapo (token-level mean, clip-higher, dynamic sampling) or a plugin's",
        "aliases": ("loss_type",)})  # TRL's name for the same choice
    objective_options: dict = field(default_factory=dict, metadata={"help": "the objective's keyword options"})
    advantage: str = field(default="group", metadata={
        "help": "group (reward minus group mean, over the group std except for dr_grpo) or rloo (leave-one-out)",
        "choices": ADVANTAGES})
    epsilon: float = field(default=0.2, metadata={
        "help": "lower clip range of the probability ratio", "above": 0, "below": 1})
    epsilon_high: float | None = field(default=None, metadata={
        "help": f"upper clip range; default: {DAPO_EPSILON_HIGH} for dapo, else epsilon", "above": 0})
    beta: float = field(default=0.0, metadata={
        "help": "weight of the k3 KL to the starting model (0: no reference is kept; DeepSeekMath used 0.04)",
        "min": 0})
    num_iterations: int = field(default=1, metadata={
        "help": "policy updates (optimizer steps) per generation batch, clipped against the sampling policy",
        "min": 1})
    dynamic_sampling: bool | None = field(default=None, metadata={
        "help": "drop groups whose rewards are all equal; default: on for dapo, off otherwise"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon_high is None:
            self.epsilon_high = DAPO_EPSILON_HIGH if self.objective == "dapo" else self.epsilon
        if self.dynamic_sampling is None:
            self.dynamic_sampling = self.objective == "dapo"

"""Option groups that several stages share, declared once and mixed into their options dataclasses.

A stage's options subclass :class:`~polm.engine.options.StageOptions` and the groups it needs::

    @dataclass
    class GRPOOptions(StageOptions, DataOptions, SamplingOptions, RewardOptions): ...

The base :meth:`polm.engine.stage.Stage.check` validates what each group holds (the data specs, the
reward names), so a stage neither declares these options again nor checks them itself. The length of
sampled completions is ``StageOptions.max_new_tokens``, shared with evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from polm.engine.rewards import parse_reward_weights


@dataclass(kw_only=True)
class DataOptions:
    """The rows a stage trains on (required) and is evaluated on; the stage's docstring says which rows it reads."""

    data: Any = field(metadata={
        "help": "training rows: 'polm:<name>', a .jsonl / .json / .csv / .parquet file, a save_to_disk folder, a "
                "Hugging Face dataset id ('owner/name' or 'owner/name:config'), a datasets.Dataset, or a list of rows"})
    eval_data: Any = field(default=None, metadata={
        "help": "held-out rows, from the same kinds of source (its 'test' split where it has splits); defaults to "
                "the 'test' split of a bundled 'polm:<name>' data"})
    columns: dict = field(default_factory=dict, metadata={
        "help": "rename the data's columns to polm's fields before the rows are read, e.g. {question: prompt, "
                "solution: answer}; other columns are kept"})


@dataclass
class SamplingOptions:
    """How a stage samples completions from the policy (rollouts, rejection samples), ``max_new_tokens`` long."""

    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature of the completions", "above": 0})
    top_p: float = field(default=1.0, metadata={
        "help": "nucleus sampling: keep the most likely tokens holding this much probability", "above": 0, "max": 1})
    stop_strings: list = field(default_factory=list, metadata={
        "help": "a completion also ends at the first of these strings (kept in it), e.g. ['</answer>']"})


@dataclass
class RewardOptions:
    """The rewards a stage scores completions with: a weighted sum of registered rewards
    (:func:`polm.engine.rewards.score_weighted`). A trained reward model is the reward ``reward_model``
    with its folder as an option: ``rewards: {reward_model: 1.0}, reward_options: {reward_model: {path: ...}}``."""

    rewards: dict | list | str = field(default_factory=lambda: {"accuracy": 1.0}, metadata={
        "help": "registered rewards with weights, {accuracy: 1.0, format: 0.2}; a name or a list weighs each 1"})
    reward_options: dict = field(default_factory=dict, metadata={
        "help": "keyword options per reward, {name: {option: value}}, e.g. {reward_model: {path: <folder>}}"})

    def reward_weights(self) -> dict[str, float]:
        """``{reward name: weight}`` as :func:`~polm.engine.rewards.score_weighted` takes them.

        Raises:
            PolmError: no reward named, or a weight that is not a finite number.
        """
        return parse_reward_weights(self.rewards)

"""LLM-as-a-judge: the ``judge`` reward."""

from polm.plugins.alignment.judge.reward import DEFAULT_TEMPLATE, judge_reward

__all__ = ["DEFAULT_TEMPLATE", "judge_reward"]

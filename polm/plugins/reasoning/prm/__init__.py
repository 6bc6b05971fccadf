"""Process reward models: the ``prm`` stage, the ``prm`` reward, and per-step scoring."""

from polm.plugins.reasoning.prm.model import load_process_reward_model, process_reward_model, step_scores
from polm.plugins.reasoning.prm.reward import prm_reward
from polm.plugins.reasoning.prm.stage import PRMOptions, PRMStage
from polm.plugins.reasoning.prm.steps import encode_solution, locate_steps, split_steps, step_spans

__all__ = ["PRMOptions", "PRMStage", "encode_solution", "load_process_reward_model", "locate_steps", "prm_reward",
           "process_reward_model", "split_steps", "step_scores", "step_spans"]

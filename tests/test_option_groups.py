"""Shared option groups, constraints in field metadata, and objectives by family.

A test plugin adds, each in one place, a reward with an option (``length_target``) and a
language-modelling objective (``label_smoothed``); the four stages that score completions take the
reward with the same recipe syntax, and ``sft`` trains with the objective.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import polm
from polm.engine.encoding import IGNORE_INDEX, pad_batch
from polm.engine.lm import completion_loss
from polm.engine.options import check_constraints, describe_options
from polm.engine.stage import Stage
from polm.plugins.reasoning.grpo import GRPOOptions

SCORING_STAGES = ("grpo", "ppo", "online_dpo", "rft")
REWARD_RECIPE = {"rewards": {"length_target": 1.0}, "reward_options": {"length_target": {"target": 5}}}


class OptionGroupsPlugin:
    """Registered the way a user's plugin is; records the options its reward and objective are called with."""

    def __init__(self) -> None:
        self.targets: list[int] = []
        self.smoothings: list[float] = []
        self.reinforce_scales: list[float] = []

    def length_target(self, prompts: list[Any], completions: list[str], target: int = 3,
                      **fields: Any) -> list[float]:
        """1.0 for a completion of ``target`` characters, less the further its length is from it."""
        self.targets.append(target)
        return [1.0 / (1.0 + abs(len(completion) - target)) for completion in completions]

    def label_smoothed(self, logits: torch.Tensor, labels: torch.Tensor,
                       smoothing: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token cross-entropy with label smoothing on the labelled tokens (Szegedy et al. 2016)."""
        if not 0 <= smoothing < 1:
            raise ValueError(f"'smoothing' must be in [0, 1), got {smoothing}")
        self.smoothings.append(smoothing)
        shifted, targets = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
        count = (targets != IGNORE_INDEX).sum()
        loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum", label_smoothing=smoothing) / count
        return loss, {"label_tokens": float(count)}

    def reinforce(self, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  *, scale: float = 1.0, **context: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """REINFORCE without clipping, ``-scale * A * log p`` averaged over completion tokens (Williams 1992)."""
        if scale <= 0:
            raise ValueError(f"'scale' must be positive, got {scale}")
        self.reinforce_scales.append(scale)
        advantage = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # (N, 1) or (N, C)
        mask = mask.to(logps.dtype)
        return -scale * (advantage * logps * mask).sum() / mask.sum().clamp(min=1), {}

    @polm.hookimpl
    def polm_register_rewards(self, register):
        register("length_target", self.length_target, description="closeness to 'target' characters (test)")

    @polm.hookimpl
    def polm_register_objectives(self, register):
        register("label_smoothed", self.label_smoothed, family="language_modelling",
                 description="label-smoothed cross-entropy (test)")
        register("familyless", self.label_smoothed, description="registered without a family (test)")
        register("reinforce", self.reinforce, family="policy_gradient", token_level=True,
                 description="REINFORCE token mean (test)")


@pytest.fixture
def plugin():
    registered = OptionGroupsPlugin()
    polm.plugin_manager().register(registered, name="test-option-groups")
    try:
        yield registered
    finally:
        polm.plugin_manager().unregister(name="test-option-groups")


def records(stage_dir) -> list[dict]:
    return [json.loads(line) for file in sorted(stage_dir.rglob("metrics.jsonl"))
            for line in file.read_text().splitlines()]


# Rewards: one syntax in every stage that scores completions.


@pytest.mark.parametrize("stage", SCORING_STAGES)
def test_every_scoring_stage_takes_the_same_reward_syntax(plugin, stage):
    """``rewards: {length_target: 1.0}, reward_options: {length_target: {target: 5}}`` validates alike."""
    added = polm.Pipeline("polm-tiny").add(stage, data="polm:arithmetic", **REWARD_RECIPE).stages[0]
    assert added.options.reward_weights() == {"length_target": 1.0}
    assert added.options.reward_options == {"length_target": {"target": 5}}


@pytest.mark.parametrize("stage", SCORING_STAGES)
def test_options_of_a_reward_that_is_not_used_fail_in_every_scoring_stage(plugin, stage):
    """Options for a reward that ``rewards`` does not list are one line naming both options."""
    with pytest.raises(polm.PolmError) as caught:
        polm.Pipeline("polm-tiny").add(stage, data="polm:arithmetic", rewards={"accuracy": 1.0},
                                       reward_options={"length_target": {"target": 5}})
    message = str(caught.value)
    assert "\n" not in message and f"stage 0 '{stage}'" in message
    assert "option 'reward_options' sets options of length_target, which 'rewards' does not list" in message


@pytest.mark.parametrize("stage, settings", [
    ("grpo", {"num_generations": 2, "max_steps": 1}),
    ("rft", {"samples": 2, "max_steps": 1, "threshold": 0.0}),
])
def test_the_reward_option_reaches_the_reward(plugin, random_model, tokenizer, arithmetic, tmp_path, stage,
                                              settings):
    """One step of grpo and of rft: every call of the reward sees ``target`` 5, not its default 3;
    rft's threshold 0 accepts every sample, which it then trains on."""
    rows, _ = arithmetic
    polm.Pipeline(random_model, tokenizer=tokenizer).add(
        stage, data=rows[:2], batch_size=2, max_new_tokens=4, eval_size=0, log_every=1, **settings,
        **REWARD_RECIPE).run(tmp_path / "run")
    assert plugin.targets and set(plugin.targets) == {5}, plugin.targets
    logged = records(tmp_path / "run" / f"00-{stage}")
    if stage == "grpo":
        assert "reward/length_target" in logged[0]
    else:
        assert any("loss" in record for record in logged), "the accepted samples were trained on"


def test_a_reward_model_folder_is_a_reward_with_its_path_as_option():
    """ppo's reward model is the registered reward ``reward_model`` and its folder an option; the folder is
    only read when the reward is called."""
    added = polm.Pipeline("polm-tiny").add(
        "ppo", data="polm:arithmetic", rewards={"reward_model": 1.0},
        reward_options={"reward_model": {"path": "runs/demo/01-reward_model"}}).stages[0]
    assert added.options.reward_weights() == {"reward_model": 1.0}


# Objectives by family.


def test_label_smoothed_objective_by_hand(plugin):
    """Vocabulary 2, one labelled target 0 predicted from logits (ln 3, 0): p = (3/4, 1/4).

    Cross-entropy: ln(4/3). With smoothing eps the target is (1 - eps/2, eps/2), so the loss is
    (1 - eps) ln(4/3) + eps (ln(4/3) + ln 4) / 2; at eps = 0.2: 0.8 ln(4/3) + 0.1 ln(16/3). At eps = 0 it is
    the completion loss.
    """
    logits = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # (B=1, T=2, V=2)
    labels = torch.tensor([[IGNORE_INDEX, 0]])
    loss, _ = plugin.label_smoothed(logits, labels, smoothing=0.2)
    assert_close(loss, torch.tensor(0.8 * math.log(4 / 3) + 0.1 * math.log(16 / 3)))
    plain, _ = plugin.label_smoothed(logits, labels, smoothing=0.0)
    assert_close(plain, completion_loss(logits, labels)[0])


def test_sft_trains_with_a_plugin_objective(plugin, random_model, tokenizer, arithmetic, tmp_path):
    """One sft step with ``objective: label_smoothed``: the options are checked once when the stage is added,
    and the logged loss is the objective's on the one batch (all four rows), not the completion loss."""
    rows = arithmetic[0][:4]
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows, objective="label_smoothed", objective_options={"smoothing": 0.2}, max_steps=1,
        batch_size=4, eval_size=0, log_every=1)
    assert plugin.smoothings == [0.2]
    stage = pipeline.stages[0]
    batch = pad_batch(stage.encode(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = random_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected, _ = plugin.label_smoothed(logits, batch["labels"], smoothing=0.2)
        plain, _ = completion_loss(logits, batch["labels"])
    pipeline.run(tmp_path / "run")
    assert plugin.smoothings == [0.2] * 3  # added, checked before the first stage starts, trained
    logged = [record for record in records(tmp_path / "run" / "00-sft") if "loss" in record]
    assert logged[0]["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(expected) - float(plain)) > 1e-3


def test_objective_options_are_checked_against_the_objective(plugin):
    """An option the objective does not take, or a value it refuses, fails when the stage is added."""
    with pytest.raises(polm.PolmError, match=r"objective 'label_smoothed': unknown option 'smooth'\. "
                                             r"Did you mean 'smoothing'\?"):
        polm.Pipeline("polm-tiny").add("sft", data="polm:arithmetic", objective="label_smoothed",
                                       objective_options={"smooth": 0.1})
    with pytest.raises(polm.PolmError, match=r"objective 'label_smoothed': 'smoothing' must be in \[0, 1\)"):
        polm.Pipeline("polm-tiny").add("sft", data="polm:arithmetic", objective="label_smoothed",
                                       objective_options={"smoothing": 1.5})


@pytest.mark.parametrize("stage, data, objective, families, listed", [
    ("sft", "polm:arithmetic", "dpo", ("pairwise", "language_modelling"), "completion, label_smoothed"),
    ("dpo", "polm:arithmetic-prefs", "label_smoothed", ("language_modelling", "pairwise"),
     "dpo, hinge, ipo, orpo, robust, simpo"),
    ("kto", "polm:arithmetic-prefs", "dpo", ("pairwise", "unpaired"), "kto"),
    ("online_dpo", "polm:arithmetic", "kto", ("unpaired", "pairwise"), "dpo, hinge, ipo, orpo, robust, simpo"),
    ("grpo", "polm:arithmetic", "dpo", ("pairwise", "policy_gradient"), "dapo, dr_grpo, grpo, reinforce"),
    ("ppo", "polm:arithmetic", "completion", ("language_modelling", "policy_gradient"),
     "dapo, dr_grpo, grpo, reinforce"),
    ("rft", "polm:arithmetic", "kto", ("unpaired", "language_modelling"), "completion, label_smoothed"),
])
def test_an_objective_of_another_family_is_refused_naming_both_families(plugin, stage, data, objective, families,
                                                                         listed):
    """One line: the objective's family, the stage's family, and the objectives of the stage's family."""
    with pytest.raises(polm.PolmError) as caught:
        polm.Pipeline("polm-tiny").add(stage, data=data, objective=objective)
    message = str(caught.value)
    assert "\n" not in message
    assert (f"stage 0 '{stage}': objective '{objective}' belongs to the {families[0]} family, not to the "
            f"{families[1]} family this stage trains with; choose one of: {listed}") == message


def test_an_objective_without_a_family_is_refused(plugin):
    with pytest.raises(polm.PolmError, match=r"objective 'familyless' \(plugin 'test-option-groups'\) declares "
                                             r"no family.*language_modelling, pairwise, unpaired"):
        polm.Pipeline("polm-tiny").add("sft", data="polm:arithmetic", objective="familyless")


def test_built_in_objectives_declare_their_family():
    from polm.engine.plugins import registry

    objectives = registry("objectives")
    assert objectives.entry("completion").metadata["family"] == "language_modelling"
    assert objectives.get("completion") is completion_loss
    for name in ("grpo", "dr_grpo", "dapo"):
        assert objectives.entry(name).metadata["family"] == "policy_gradient"
        assert objectives.entry(name).metadata.get("token_level", False) == (name == "dapo")
    assert Stage.objective_family is None


@pytest.mark.parametrize("stage, settings", [
    ("grpo", {"num_generations": 2}),
    ("ppo", {"samples": 1, "rewards": {"length_target": 1.0}}),
])
def test_grpo_and_ppo_train_with_a_plugin_policy_gradient_objective(plugin, random_model, tokenizer, arithmetic,
                                                                    tmp_path, stage, settings):
    """``objective: reinforce`` with its option, checked once when the stage is added, then called by each
    update of the step (grpo: one; ppo: ppo_epochs 2 x minibatches 1)."""
    rows, _ = arithmetic
    settings = {"rewards": {"length_target": 1.0}, **settings}
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        stage, data=rows[:2], batch_size=2, max_new_tokens=4, eval_size=0, log_every=1, max_steps=1 if stage ==
        "grpo" else 2, objective="reinforce", objective_options={"scale": 0.5}, **settings)
    assert plugin.reinforce_scales == [0.5]
    pipeline.run(tmp_path / "run")
    assert plugin.reinforce_scales == [0.5] * (2 if stage == "grpo" else 3)  # checked when added, then each update


def test_policy_gradient_objectives_take_the_stage_context_not_options(plugin):
    """``beta`` is grpo's own option, which the stage passes every policy-gradient objective; ppo's value loss
    is a token mean, so it refuses an objective that averages over completions."""
    with pytest.raises(polm.PolmError, match=r"objective 'reinforce': 'beta' is set by the stage"):
        polm.Pipeline("polm-tiny").add("grpo", data="polm:arithmetic", objective="reinforce",
                                       objective_options={"beta": 0.1})
    with pytest.raises(polm.PolmError, match=r"objective 'reinforce': 'scale' must be positive, got 0"):
        polm.Pipeline("polm-tiny").add("grpo", data="polm:arithmetic", objective="reinforce",
                                       objective_options={"scale": 0})
    with pytest.raises(polm.PolmError, match=r"ppo's objective must be token-level .*'grpo' is not; use dapo"):
        polm.Pipeline("polm-tiny").add("ppo", data="polm:arithmetic", objective="grpo")


# Constraints in field metadata.


@pytest.mark.parametrize("rules, value, message", [
    ({"min": 1}, 0, "'x' must be at least 1, got 0"),
    ({"min": 0}, -0.5, "'x' must not be negative, got -0.5"),
    ({"above": 0}, 0.0, "'x' must be positive, got 0.0"),
    ({"above": 2}, 2, "'x' must be above 2, got 2"),
    ({"max": 1}, 1.5, "'x' must be at most 1, got 1.5"),
    ({"below": 1}, 1, "'x' must be below 1, got 1"),
    ({"min": 0, "below": 1}, 1.0, "'x' must be in [0, 1), got 1.0"),
    ({"above": 0, "max": 1}, 0.0, "'x' must be in (0, 1], got 0.0"),
    ({"choices": ("a", "b")}, "c", "'x' must be one of a, b, got 'c'"),
])
def test_each_constraint_has_one_message(rules, value, message):
    with pytest.raises(ValueError) as caught:
        check_constraints("x", value, rules)
    assert str(caught.value) == message


def test_values_inside_the_constraints_and_none_pass():
    for rules, value in [({"min": 1}, 1), ({"above": 0, "max": 1}, 1.0), ({"min": 0, "below": 1}, 0),
                         ({"choices": ("a", "b")}, "b"), ({"min": 1, "choices": (1, 2)}, None)]:
        check_constraints("x", value, rules)


@pytest.mark.parametrize("stage, data, option, value, message", [
    ("sft", "polm:arithmetic", "warmup_ratio", 1.0, "'warmup_ratio' must be in [0, 1), got 1.0"),
    ("sft", "polm:arithmetic", "neftune_alpha", -1.0, "'neftune_alpha' must not be negative, got -1.0"),
    ("grpo", "polm:arithmetic", "num_generations", 1, "'num_generations' must be at least 2, got 1"),
    ("grpo", "polm:arithmetic", "top_p", 1.5, "'top_p' must be in (0, 1], got 1.5"),
    ("grpo", "polm:arithmetic", "lr", -1.0, "'lr' must not be negative, got -1.0"),  # redeclared: keeps min 0
    ("grpo", "polm:arithmetic", "epsilon", 1.0, "'epsilon' must be in (0, 1), got 1.0"),
    ("ppo", "polm:arithmetic", "clip_range", 0, "'clip_range' must be positive, got 0.0"),
    ("ppo", "polm:arithmetic", "lam", 1.5, "'lam' must be in (0, 1], got 1.5"),
    ("online_dpo", "polm:arithmetic", "temperature", 0, "'temperature' must be positive, got 0.0"),
    ("rft", "polm:arithmetic", "samples", 0, "'samples' must be at least 1, got 0"),
    ("rft", "polm:arithmetic", "lr_scheduler", "cosin", "'lr_scheduler' must be one of cosine, linear, constant"),
    ("prm", "polm:arithmetic-steps", "head", "value", "'head' must be one of classifier, likelihood, got 'value'"),
    ("reward_model", "polm:arithmetic-prefs", "margin", -0.1, "'margin' must not be negative, got -0.1"),
])
def test_a_value_outside_its_constraints_is_one_line_naming_the_option(stage, data, option, value, message):
    with pytest.raises(polm.PolmError) as caught:
        polm.Pipeline("polm-tiny").add(stage, data=data, **{option: value})
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"stage 0 '{stage}': ") and message in text


def test_a_redeclared_option_keeps_the_constraints_it_overrides():
    """grpo declares ``lr`` and ``batch_size`` again for their defaults; their bounds come from StageOptions."""
    described = describe_options(GRPOOptions)
    assert (described["lr"]["default"], described["lr"]["min"]) == (1e-5, 0)
    assert (described["batch_size"]["default"], described["batch_size"]["min"]) == (8, 1)
    assert described["top_p"]["above"] == 0 and described["top_p"]["max"] == 1

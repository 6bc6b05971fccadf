"""The plugin system as a plugin author meets it.

Plugins here are throwaway classes registered the way users register them,
``polm.plugin_manager().register(obj, name=...)``, and unregistered in a
``finally`` so that no test leaks components into another.
"""

from __future__ import annotations

import builtins
import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import polm
from polm.engine import hookspecs
from polm.engine import plugins as plugins_module
from polm.engine.options import StageOptions
from polm.engine.plugins import DEFAULT_PLUGINS, plugin_problems, registry
from polm.engine.registry import COMPONENT_KINDS
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.plugins.reasoning.rewards import accuracy_reward
from tests.helpers import registered


def problems_of(plugin_name: str) -> list[str]:
    """The ``plugin_problems()`` lines that name ``plugin_name``."""
    return [problem for problem in plugin_problems() if f'"{plugin_name}"' in problem]


def constant_reward(value: float):
    """A reward giving every completion ``value``."""

    def reward(prompts: list[Any], completions: list[str], **fields: Any) -> list[float]:
        return [value] * len(completions)

    return reward


# A stage contributed by a plugin: it scores greedy generations with a reward it looks up by name.


@dataclass
class ScorePromptsOptions(StageOptions):
    """Options of the ``score_prompts`` test stage."""

    prompts: list = field(default_factory=lambda: ["What is 1 + 2?", "What is 3 * 4?", "What is 9 - 5?"],
                          metadata={"help": "prompts whose greedy completions are scored"})
    reward: str = field(default="completion_length", metadata={"help": "a registered reward"})


class ScorePromptsStage(Stage):
    """Scores greedy completions of ``prompts`` with ``reward``; trains nothing."""

    Options = ScorePromptsOptions
    headline_metric = "reward"

    def run(self, context: StageContext) -> StageOutput:
        reward = polm.components("rewards")[self.options.reward]
        completions = polm.generate(context.model, context.tokenizer, self.options.prompts,
                                    max_new_tokens=self.options.max_new_tokens)
        scores = reward(self.options.prompts, completions)
        metrics = {"reward": sum(scores) / len(scores), **{f"reward/{i}": s for i, s in enumerate(scores)}}
        return StageOutput(context.model, metrics)


class ScorePlugin:
    """Contributes the ``score_prompts`` stage and the ``completion_length`` reward, and records reward calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Any], list[str]]] = []

    def completion_length(self, prompts: list[Any], completions: list[str], **fields: Any) -> list[float]:
        self.calls.append((list(prompts), list(completions)))
        return [1.0 + len(completion) for completion in completions]

    @polm.hookimpl
    def polm_register_stages(self, register):
        register("score_prompts", ScorePromptsStage)

    @polm.hookimpl
    def polm_register_rewards(self, register):
        register("completion_length", self.completion_length)


def test_runtime_plugin_stage_runs_in_a_pipeline_with_its_reward(random_model, tokenizer, tmp_path):
    """A registered plugin's stage runs in a Pipeline, calls its reward by name, reports it, and goes away on unregister."""
    plugin = ScorePlugin()
    prompts = ["What is 1 + 2?", "What is 3 * 4?"]
    weights_before = {name: value.clone() for name, value in random_model.state_dict().items()}
    manager = polm.plugin_manager()
    manager.register(plugin, name="score-plugin")
    try:
        assert polm.components("stages")["score_prompts"] is ScorePromptsStage
        result = (
            polm.Pipeline(random_model, tokenizer=tokenizer)
            .add("score_prompts", prompts=prompts, max_new_tokens=4)
            .run(tmp_path / "run")
        )
    finally:
        manager.unregister(plugin)

    assert len(plugin.calls) == 1, "the stage should call the reward once"
    called_prompts, completions = plugin.calls[0]
    assert called_prompts == prompts
    assert completions == polm.generate(random_model, tokenizer, prompts, max_new_tokens=4)  # greedy: same text
    expected = [1.0 + len(completion) for completion in completions]
    metrics = result.stages[0].metrics
    assert metrics["reward"] == pytest.approx(sum(expected) / len(expected))
    assert [metrics["reward/0"], metrics["reward/1"]] == expected
    for name, value in random_model.state_dict().items():
        torch.testing.assert_close(value, weights_before[name], msg=f"the stage changed {name}")
    assert "score_prompts" not in polm.components("stages")
    assert "completion_length" not in polm.components("rewards")


def test_duplicate_name_is_reported_by_plugin_name_and_the_rest_keep_working():
    """Two plugins registering one name: one problem line names both plugins; their other components and the built-ins stay."""

    class First:
        @polm.hookimpl
        def polm_register_rewards(self, register):
            register("first_only", constant_reward(1.0))
            register("shared_name", constant_reward(1.0))

    class Second:
        @polm.hookimpl
        def polm_register_rewards(self, register):
            register("second_only", constant_reward(2.0))
            register("shared_name", constant_reward(2.0))

    with registered(First(), "first-plugin"), registered(Second(), "second-plugin"):
        rewards = polm.components("rewards")
        duplicates = [problem for problem in plugin_problems() if "'shared_name'" in problem]
        assert len(duplicates) == 1, plugin_problems()
        assert "'first-plugin'" in duplicates[0] and "'second-plugin'" in duplicates[0]
        assert duplicates[0].startswith(('Error in plugin "first-plugin"', 'Error in plugin "second-plugin"'))
        assert {"first_only", "second_only", "shared_name", "accuracy"} <= set(rewards)
        assert "sft" in polm.components("stages")
    assert problems_of("first-plugin") == problems_of("second-plugin") == []


def test_later_plugin_cannot_shadow_an_earlier_one():
    """On a duplicate, the first registration (a built-in over a third-party plugin) wins and the later one is reported."""

    class Shadow:
        @polm.hookimpl
        def polm_register_rewards(self, register):
            register("accuracy", constant_reward(1.0))

    with registered(Shadow(), "shadow"):
        assert registry("rewards").entry("accuracy").plugin == "polm.plugins.reasoning"
        assert polm.components("rewards")["accuracy"] is accuracy_reward
        assert [problem.split(" (")[0] for problem in problems_of("shadow")] == ['Error in plugin "shadow"']


def test_unknown_name_lists_available_names_and_the_closest():
    """Looking up a misspelled stage names it, suggests the closest, and lists what exists."""
    with pytest.raises(polm.PolmError) as caught:
        registry("stages").get("sfft")
    message = str(caught.value)
    assert "unknown stage 'sfft'" in message
    assert "Did you mean 'sft'?" in message
    assert all(name in message for name in polm.components("stages"))


def test_hook_that_raises_is_reported_by_plugin_name_and_builtins_still_register():
    """A hook raising names its plugin and the error; its other hooks and every built-in still register."""

    class Exploding:
        @polm.hookimpl
        def polm_register_rewards(self, register):
            raise RuntimeError("no reward today")

        @polm.hookimpl
        def polm_register_stages(self, register):
            register("exploding_stage", ScorePromptsStage)

    with registered(Exploding(), "exploding"):
        problems = problems_of("exploding")
        assert len(problems) == 1
        assert problems[0].startswith('Error in plugin "exploding"')
        assert "RuntimeError: no reward today" in problems[0]
        assert {"sft", "exploding_stage"} <= set(polm.components("stages"))
        assert polm.components("rewards")["accuracy"] is accuracy_reward
        assert "full" in polm.components("tuning_methods")
    assert problems_of("exploding") == []


def test_every_hookspec_is_documented_and_prefixed():
    """Every hook in polm.engine.hookspecs has a docstring and the ``polm_`` prefix; the ``polm_register_*``
    hooks match the registries one to one, and the others choose one plugin (``firstresult``)."""
    specs = {name: function for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(function, f"{hookspecs.PROJECT_NAME}_spec")}
    assert specs, "no hookspecs found"
    for name, function in specs.items():
        assert name.startswith("polm_"), name
        assert (function.__doc__ or "").strip(), f"{name} has no docstring"
    register_hooks = {name for name in specs if name.startswith("polm_register_")}
    assert register_hooks == {f"polm_register_{kind}" for kind in COMPONENT_KINDS}, "a hook without a registry, or back"
    for name in set(specs) - register_hooks:
        assert getattr(specs[name], f"{hookspecs.PROJECT_NAME}_spec")["firstresult"], f"{name} is not firstresult"


@pytest.mark.parametrize("kind", COMPONENT_KINDS)
def test_components_of_each_kind(kind):
    """``polm.components(kind)`` holds a runtime plugin's contribution of that kind, next to the built-ins."""
    builtins = {"stages": {"sft"}, "rewards": {"accuracy"}, "tuning_methods": {"full"},
                "datasets": {"arithmetic", "arithmetic-prefs"}}.get(kind, set())
    contribution = object()
    plugin_class = type("OneKindPlugin", (), {
        f"polm_register_{kind}": polm.hookimpl(lambda self, register: register("from_test", contribution)),
    })
    assert "from_test" not in polm.components(kind)
    with registered(plugin_class(), "one-kind"):
        components = polm.components(kind)
        assert components["from_test"] is contribution
        assert builtins <= set(components)
        assert problems_of("one-kind") == []
    assert "from_test" not in polm.components(kind)


def test_unknown_kind_fails_with_the_list_of_kinds():
    """An unknown component kind is a PolmError that lists every kind."""
    with pytest.raises(polm.PolmError, match="unknown component kind 'reward'") as caught:
        polm.components("reward")
    assert all(kind in str(caught.value) for kind in COMPONENT_KINDS)


def test_builtin_plugins_are_registered_by_module_name():
    """Every built-in paradigm module is a plugin named after its module."""
    names = {name for name, _ in polm.plugin_manager().list_name_plugin()}
    assert set(DEFAULT_PLUGINS) <= names


def test_a_new_plugin_at_a_reused_address_is_collected(monkeypatch):
    """A plugin registered after another was unregistered shows its own components, even at the same address."""

    class Named:
        def __init__(self, reward_name: str) -> None:
            self.reward_name = reward_name

        def __hash__(self) -> int:  # objects at one address hash alike
            return -1

        @polm.hookimpl
        def polm_register_rewards(self, register):
            register(self.reward_name, constant_reward(0.0))

    # CPython often gives a new object the address of one just freed; make it happen every time.
    monkeypatch.setattr(plugins_module, "id", lambda obj: -1 if isinstance(obj, Named) else builtins.id(obj),
                        raising=False)
    manager = polm.plugin_manager()
    try:
        manager.register(Named("old_reward"), name="old")
        assert "old_reward" in polm.components("rewards")
        manager.unregister(name="old")
        manager.register(Named("new_reward"), name="new")
        rewards = polm.components("rewards")
        assert "new_reward" in rewards and "old_reward" not in rewards
    finally:
        for name in ("old", "new"):
            if manager.get_plugin(name) is not None:
                manager.unregister(name=name)
        monkeypatch.undo()
        polm.components("rewards")  # refresh, so later tests do not inherit a stale registry

"""The hooks through which the engine reaches what lives above it: inference methods, model loaders, commands.

Each test plugin is a throwaway class with ``@polm.hookimpl`` methods, registered the way users
register one (``polm.plugin_manager().register(obj, name=...)``) and unregistered in a ``finally``.
The last test checks that the README documents every hook.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import polm
from polm.engine import hookspecs
from polm.engine.cli import _parser, main
from polm.engine.commands import Command
from polm.engine.models import load_model
from polm.engine.plugins import registry
from tests.helpers import registered

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER_FILE = "made-by-test.txt"

# Four questions on two levels: answering the first three right gives 3/4 overall, 2/2 on level 1, 1/2 on level 2.
ROWS = [
    {"prompt": "What is 1 + 1?", "answer": "2", "level": 1},
    {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
    {"prompt": "What is 12 + 7?", "answer": "19", "level": 2},
    {"prompt": "What is 30 + 12?", "answer": "42", "level": 2},
]


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


class AnswerKey:
    """An inference method that copies the reference answer of the first ``right`` rows and gets the rest wrong."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def answer_key(self, model: torch.nn.Module, tokenizer: Any, rows: list[dict], max_new_tokens: int = 32,
                   right: int | None = None, style: dict | None = None) -> list[str]:
        self.calls.append({"rows": len(rows), "max_new_tokens": max_new_tokens, "right": right, "style": style})
        right = len(rows) if right is None else right
        return [row["answer"] if index < right else "no idea" for index, row in enumerate(rows)]

    @polm.hookimpl
    def polm_register_inference_methods(self, register):
        register("answer_key", self.answer_key)


def test_polm_eval_grades_a_plugin_inference_method_with_its_options(data_file, capsys):
    """``--method answer_key --option right=3``: 3 of 4 right, level 1 2/2, level 2 1/2; dotted keys nest."""
    plugin = AnswerKey()
    with registered(plugin, "answer-key"):
        status = main(["eval", "polm-tiny", "--data", str(data_file), "--max-new-tokens", "5",
                       "--method", "answer_key", "--option", "right=3",
                       "--option", "style.case=upper", "--option", "style.width=3"])
    assert status == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):]) == {"exact_match": 0.75, "exact_match/level_1": 1.0,
                                               "exact_match/level_2": 0.5}
    assert plugin.calls == [{"rows": 4, "max_new_tokens": 5, "right": 3, "style": {"case": "upper", "width": 3}}]


def test_an_unknown_option_fails_before_the_model_loads(capsys):
    """A mistyped option is one line naming the method, the option and the valid ones; the checkpoint,
    which does not exist, is never opened and the method never runs."""
    plugin = AnswerKey()
    with registered(plugin, "answer-key"):
        status = main(["eval", "no/such/checkpoint", "--data", "polm:arithmetic", "--method", "answer_key",
                       "--option", "rihgt=3"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == ("polm: error: inference method 'answer_key' has no option 'rihgt'. "
                   "Did you mean 'right'? Valid options: right, style\n")
    assert plugin.calls == []


@pytest.mark.parametrize("arguments, expected", [
    (["--method", "beam"], "unknown inference method 'beam'. Available: best_of_n, self_consistency, self_refine"),
    (["--option", "k=3"], "options k belong to an inference method; name it (polm eval: --method NAME)"),
    (["--method", "self_consistency", "--option", "k"], "--option expects KEY=VALUE, got 'k'"),
    (["--method", "self_consistency", "--option", "max_new_tokens=3"], "(polm eval: --max-new-tokens N)"),
    (["--method", "best_of_n", "--option", "n=2", "--option", "n.x=1"], "'n' is already set to a value"),
])
def test_method_and_option_mistakes_are_one_line_with_status_2(arguments, expected, capsys):
    assert main(["eval", "no/such/checkpoint", "--data", "polm:arithmetic", *arguments]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and expected in err, err


class MarkerLoader:
    """Claims folders holding ``MARKER_FILE`` and answers them with the objects it was given."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.asked: list[Path] = []

    @polm.hookimpl
    def polm_load_model(self, path, tokenizer):
        self.asked.append(path)
        return (self.model, self.tokenizer) if (path / MARKER_FILE).is_file() else None


def test_a_plugin_loader_claims_its_folders_and_leaves_the_others(random_model, tokenizer, tmp_path):
    """A folder with the marker (directly, or as a run's stage folder) gives the plugin's model; a
    saved transformers folder next to it, which the plugin declines, still loads with from_pretrained."""
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / MARKER_FILE).write_text("mine")
    (tmp_path / "stage" / "final").mkdir(parents=True)
    (tmp_path / "stage" / "final" / MARKER_FILE).write_text("mine")
    random_model.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    loader = MarkerLoader(random_model, tokenizer)
    with registered(loader, "marker-loader"):
        assert load_model(tmp_path / "custom") == (random_model, tokenizer)
        assert load_model(str(tmp_path / "stage"))[0] is random_model
        plain, _ = load_model(tmp_path / "plain")
    assert loader.asked == [tmp_path / "custom", tmp_path / "stage" / "final", tmp_path / "plain"]
    assert plain is not random_model and type(plain) is type(random_model)
    torch.testing.assert_close(plain.state_dict(), random_model.state_dict())


def test_a_saved_prompt_tuning_adapter_is_claimed_by_the_finetuning_plugin(random_model, tokenizer, tmp_path):
    """The fine-tuning plugin loads a saved prompt adapter (its base named by path) with peft and the generation
    fix: greedy generation from the loaded folder equals that of the model that was saved. Larger random
    weights make the next token depend on the context, so that a prompt inserted again at every token shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in random_model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.3)
    random_model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base = type(random_model).from_pretrained(tmp_path / "base")
    method = polm.components("tuning_methods")["prompt"]
    model = method.prepare(base, method.Options(num_virtual_tokens=3)).eval()
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")

    claimed = polm.plugin_manager().hook.polm_load_model(path=tmp_path / "adapter", tokenizer=None)
    assert claimed is not None, "no plugin claimed the prompt adapter"
    assert polm.plugin_manager().hook.polm_load_model(path=tmp_path / "base", tokenizer=None) is None
    loaded, _ = load_model(tmp_path / "adapter")
    prompts = ["What is 1 + 2?", "What is 12 + 7?"]
    assert polm.generate(loaded.eval(), tokenizer, prompts, max_new_tokens=5) == \
        polm.generate(model, tokenizer, prompts, max_new_tokens=5)


class Hello:
    """Contributes ``polm hello [--name NAME]``, which prints a greeting and exits 3 (to tell it from 0)."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", default="world")

    @staticmethod
    def run(arguments: argparse.Namespace) -> int:
        if arguments.name == "nobody":
            raise polm.PolmError("hello: --name nobody greets no one; give a name")
        print(f"hello {arguments.name}")
        return 3

    @polm.hookimpl
    def polm_register_commands(self, register):
        register("hello", Command("greet someone", self.add_arguments, self.run))


def test_a_plugin_command_runs_and_its_errors_are_one_line(capsys):
    with registered(Hello(), "hello-plugin"):
        assert main(["hello", "--name", "polm"]) == 3
        assert capsys.readouterr().out == "hello polm\n"
        assert main(["hello", "--name", "nobody"]) == 2
        assert capsys.readouterr().err == "polm: error: hello: --name nobody greets no one; give a name\n"
    with pytest.raises(SystemExit):
        _parser().parse_args(["hello"])


def test_a_plugin_command_cannot_shadow_a_builtin_nor_be_something_else(caplog):
    """A plugin's ``run``, and a command that is a bare function, are ignored with a warning naming the
    plugin; ``polm run`` stays the built-in and the other commands keep working."""

    class Shadow:
        @polm.hookimpl
        def polm_register_commands(self, register):
            register("run", Command("shadow the built-in", Hello.add_arguments, Hello.run))
            register("greet", Hello.run)

    with registered(Shadow(), "shadow-plugin"):
        assert _parser().parse_args(["run", "recipe.yaml"]).recipe == "recipe.yaml"
        with pytest.raises(SystemExit):
            _parser().parse_args(["greet"])
    assert "plugin \"shadow-plugin\" registers the command 'run', which is built in; ignored" in caplog.text
    assert "plugin \"shadow-plugin\" registers the command 'greet' as a function; ignored" in caplog.text


def test_the_app_command_comes_from_the_apps_plugin():
    assert registry("commands").entry("app").plugin == "polm.apps"
    assert _parser().parse_args(["app"]).port == 7860


def _plugin_section() -> str:
    text = README.read_text()
    start = text.index("## Writing a plugin")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


@pytest.mark.parametrize("hook", [name for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
                                  if hasattr(function, f"{hookspecs.PROJECT_NAME}_spec")])
def test_plugin_hooks_are_documented(hook):
    """Every hookspec is named in full in the README's plugin section."""
    assert re.search(rf"`{hook}\b", _plugin_section()), f"README's 'Writing a plugin' does not name {hook}"

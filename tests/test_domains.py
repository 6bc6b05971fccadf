"""Domains (``polm_register_domains``): the built-in ``code`` and ``math``, and the example plugin polm-domain-units.

Bits per byte is checked against hand-worked values on stand-in models whose logits are known; the stdlib
corpus against a fake standard-library folder; the first-line task on a small hand-made source. The recipes
validate, and ``code``'s runs two steps on the tiny random model. The example distribution is pip-installed
into a temporary folder, as ``tests/test_third_party_plugin.py`` installs polm-shout, and ``polm plugins
--json`` runs in a subprocess with it on the path.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import polm
from polm.adapters.domains import code
from polm.engine import cli
from polm.engine.cli import main
from polm.engine.domains import Domain, bits_per_byte, domain_recipe, evaluate_domain
from polm.engine.plugins import AUTOLOAD_SWITCH, plugins_report
from tests.helpers import registered

UNITS_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "polm-domain-units"
TEXT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5 é\n"


class KnownLogits(torch.nn.Module):
    """A stand-in causal LM over ``vocab`` tokens with a context of ``positions``: uniform logits, or with
    ``echo`` a logit of ``echo`` on the token it reads (so it bets that the next token repeats the current one)."""

    def __init__(self, vocab: int, positions: int, echo: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.echo = vocab, echo
        self.config = SimpleNamespace(max_position_embeddings=positions)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls: list[int] = []

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        assert input_ids.shape[1] <= self.config.max_position_embeddings, "a window longer than the context"
        self.calls.append(input_ids.shape[1])
        logits = self.echo * torch.nn.functional.one_hot(input_ids, self.vocab).float()  # (B, T, V)
        return SimpleNamespace(logits=logits)


def test_bits_per_byte_of_uniform_logits_is_log2_vocab_per_token(tokenizer):
    """Uniform logits over V tokens cost log2(V) bits per token, so bpb = tokens * log2(V) / UTF-8 bytes; every
    token is scored once whatever the window (8 tokens, advancing by 3, or the whole text at once)."""
    vocab = len(tokenizer)
    tokens = len(tokenizer(TEXT)["input_ids"])
    expected = tokens * math.log2(vocab) / len(TEXT.encode("utf-8"))
    assert len(TEXT.encode("utf-8")) > len(TEXT), "the text should hold a multi-byte character"
    windowed = KnownLogits(vocab, positions=8)
    torch.testing.assert_close(bits_per_byte(windowed, tokenizer, [TEXT]), expected)
    assert len(windowed.calls) > 3, "the text should need several windows"
    torch.testing.assert_close(bits_per_byte(KnownLogits(vocab, 8), tokenizer, [TEXT], window=8, stride=3), expected)
    torch.testing.assert_close(bits_per_byte(KnownLogits(vocab, 4096), tokenizer, [TEXT, TEXT]), expected)


def test_bits_per_byte_scores_each_token_after_the_one_before_it(tokenizer):
    """The echo model gives p(y | x) = e^5 / (e^5 + V - 1) when y == x, else 1 / (e^5 + V - 1): the sum of
    -log2 p over the pairs (previous, next), the first pair starting from the EOS token, over the bytes."""
    vocab = len(tokenizer)
    ids = [tokenizer.eos_token_id, *tokenizer("aaaa bbbb aaaa 1111")["input_ids"]]
    norm = math.exp(5) + vocab - 1
    bits = sum(-math.log2((math.exp(5) if after == before else 1) / norm) for before, after in itertools.pairwise(ids))
    assert any(after == before for before, after in itertools.pairwise(ids)), "the text should repeat a token"
    result = bits_per_byte(KnownLogits(vocab, 6, echo=5.0), tokenizer, ["aaaa bbbb aaaa 1111"], stride=2)
    torch.testing.assert_close(result, bits / 19)


def test_bits_per_byte_refuses_empty_text_and_bad_windows(tokenizer):
    with pytest.raises(polm.PolmError, match="the texts are empty"):
        bits_per_byte(KnownLogits(len(tokenizer), 8), tokenizer, [""])
    with pytest.raises(polm.PolmError, match="stride in"):
        bits_per_byte(KnownLogits(len(tokenizer), 8), tokenizer, [TEXT], window=8, stride=8)


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    """A standard-library folder: thirty modules, a test folder, site-packages and a file too large to read."""
    root = tmp_path / "lib"
    for index in range(30):
        (root / "pkg").mkdir(parents=True, exist_ok=True)
        (root / "pkg" / f"module_{index}.py").write_text(f"def f{index}(x):\n    return x * {index}\n" * 40)
    for folder in ("test", "site-packages/numpy", "idlelib/idle_test"):
        (root / folder).mkdir(parents=True)
        (root / folder / "ignored.py").write_text("x = 1\n")
    (root / "tables.py").write_text("x = 1\n" * (code.MAX_FILE_BYTES // 6 + 1))
    (root / "notes.txt").write_text("not python\n")
    return root


def test_stdlib_corpus_is_split_by_file_deterministically(fake_stdlib):
    """Tests, site-packages, large files and non-Python files are left out; each file lands wholly in one split,
    decided by a hash of its relative path alone; building twice gives the same files."""
    files = code.source_files(fake_stdlib)
    assert files == sorted(f"pkg/module_{index}.py" for index in range(30))
    code.split_files.cache_clear()
    train = code.split_files("train", fake_stdlib)
    test = code.split_files("test", fake_stdlib)
    assert {path for path, _ in train} | {path for path, _ in test} == set(files)
    assert not {path for path, _ in train} & {path for path, _ in test}
    assert all(code.split_of(path) == "test" for path, _ in test)
    # The hash of the path decides, the same on any machine; files come in the order of that hash.
    assert sorted(path for path, _ in test) == [f"pkg/module_{index}.py" for index in (12, 16, 18, 22)]
    assert dict(train)["pkg/module_0.py"] == (fake_stdlib / "pkg" / "module_0.py").read_text()
    code.split_files.cache_clear()
    assert code.split_files("train", fake_stdlib) == train
    assert [code.split_of(path) for path in ("json/decoder.py", "email/utils.py")] == ["test", "train"]
    with pytest.raises(polm.PolmError, match="splits train, test; got 'validation'"):
        code.split_files("validation", fake_stdlib)


def test_chunks_are_whole_lines_within_the_limit_and_give_the_text_back():
    text = "a = 1\n" * 10 + "b" * 25 + "\n" + "c = 2\n"
    pieces = code.chunks(text, size=12)
    assert "".join(pieces) == text
    assert all(len(piece) <= 12 for piece in pieces)
    assert pieces[:2] == ["a = 1\na = 1\n", "a = 1\na = 1\n"]
    assert pieces[5:] == ["b" * 12, "b" * 12, "b\nc = 2\n"]


def test_stdlib_datasets_of_this_machine():
    """``polm:stdlib-code``'s text rows come from train files only, its chunks within CHUNK_CHARS; the
    first-line rows are tasks on test files."""
    code.split_files.cache_clear()
    rows = code.code_rows("train")
    assert rows and all(len(row["text"]) <= code.CHUNK_CHARS and code.split_of(row["file"]) == "train"
                        for row in rows)
    tasks = polm.engine.data.load_rows("polm:stdlib-firstline", "test")
    assert len(tasks) > 100
    assert all(code.split_of(row["file"]) == "test" and row["prompt"].endswith("\n") for row in tasks)


SOURCE = '''import os


def plain(x):
    return x + 1


@decorator
def documented(a,
               b):
    """Add them.

    Twice."""
    # a comment
    total = a + b
    return total


def one_liner(): return 1


def only_docstring():
    """Nothing else."""


class Box:
    async def method(self):
        await self.x
'''


def test_first_line_rows_of_a_hand_made_source():
    """Prompts end before the body's first statement (after the docstring and comments), answers are that
    line stripped; one-liners and docstring-only functions give no row; context lines are whole and fit."""
    rows = code.first_line_rows(SOURCE, "hand.py")
    assert [(row["function"], row["answer"]) for row in rows] == [
        ("plain", "return x + 1"), ("documented", "total = a + b"), ("method", "await self.x")]
    assert rows[0]["prompt"] == "import os\n\n\ndef plain(x):\n"
    assert SOURCE.startswith(rows[1]["prompt"]) and rows[1]["prompt"].endswith('Twice."""\n    # a comment\n')
    assert rows[2]["prompt"].endswith("class Box:\n    async def method(self):\n")
    assert all(row["file"] == "hand.py" for row in rows)
    short = code.first_line_rows(SOURCE, prompt_chars=40)
    assert [row["function"] for row in short] == ["plain", "method"]  # documented's header is longer
    assert short[0]["prompt"] == "import os\n\n\ndef plain(x):\n"
    assert short[1]["prompt"] == "\nclass Box:\n    async def method(self):\n"  # 40 characters
    assert code.first_line_rows("def broken(:\n") == []


def test_first_nonblank_line():
    assert code.first_nonblank_line("\n   \n    return x\n    y") == "return x"
    assert code.first_nonblank_line(" \n") == ""


def test_polm_plugins_lists_the_builtin_domains_and_what_they_contribute(capsys):
    """``polm plugins --json`` has a domains list (datasets, recipe stages, metrics), the plugin contributes them,
    and the table shows them."""
    assert main(["plugins", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    domains = {entry["name"]: entry for entry in report["domains"]}
    assert domains["code"]["datasets"] == ["polm:stdlib-code", "polm:stdlib-firstline"]
    assert domains["code"]["recipe"] == ["sft (lora) on polm:stdlib-code"]
    assert domains["code"]["metrics"] == ["bits_per_byte", "first_line_exact_match"]
    assert domains["math"]["recipe"] == ["sft (lora) on polm:arithmetic"]
    adapters = {plugin["name"]: plugin for plugin in report["plugins"]}["polm.adapters"]["contributes"]
    assert adapters["domains"] == ["code", "math"]
    assert {"stdlib-code", "stdlib-firstline"} <= set(adapters["datasets"])
    assert "domain" in adapters["commands"]
    assert not [problem for problem in report["problems"] if "domain" in problem]
    with cli.console.capture() as captured:
        main(["plugins"])
    table = captured.get()
    assert "domains" in table and "polm:stdlib-code" in table and "bits_per_byte" in table


def test_a_malformed_domain_is_reported_by_name():
    """A domain that is not a Domain, or that names a dataset nobody registers, is a problem line, not a crash."""
    class Plugin:
        @polm.hookimpl
        def polm_register_domains(self, register):
            register("not-a-domain", object())
            register("orphan", Domain(description="x", recipe={"stages": [{"name": "sft"}]},
                                      evaluator=lambda model, tokenizer: {}, datasets=("nowhere",)))

    with registered(Plugin(), "malformed"):
        problems = plugins_report()["problems"]
    assert any("'not-a-domain' as a object" in problem for problem in problems)
    assert any("'polm:nowhere', which no plugin registers" in problem for problem in problems)


def test_domain_command_recipe_and_errors(capsys):
    """``polm domain recipe code`` prints the YAML ``polm run`` reads; an unknown domain lists the known ones, a
    mistyped evaluator option lists the valid ones before any model loads."""
    assert main(["domain", "recipe", "code"]) == 0
    assert "data: polm:stdlib-code" in capsys.readouterr().out
    assert main(["domain", "recipe", "cod"]) == 2
    assert "unknown domain 'cod'. Did you mean 'code'? Available: code, math" in capsys.readouterr().err
    assert main(["domain", "eval", "code", "no/such/model", "--option", "max_byte=10"]) == 2
    assert "has no option 'max_byte'. Valid options: max_bytes, tasks, max_new_tokens" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["code", "math"])
def test_builtin_recipes_validate(name, model_dir):
    """Each built-in domain's recipe reads as a file ``polm run`` reads, and every stage validates."""
    recipe = domain_recipe(name, [f"model={model_dir}"])
    pipeline = recipe.pipeline()
    assert [stage.name for stage in pipeline.stages] == ["sft"]
    assert pipeline.stages[0].options.tuning == "lora"


@pytest.fixture
def small_stdlib(monkeypatch):
    """The stdlib corpus cut to 30 kB of train files and 10 kB of test files, so that a recipe encodes it fast."""
    monkeypatch.setitem(code.SPLIT_BYTES, "train", 30_000)
    monkeypatch.setitem(code.SPLIT_BYTES, "test", 10_000)
    code.split_files.cache_clear()
    yield
    code.split_files.cache_clear()


def test_code_recipe_runs_two_steps_and_is_evaluated(small_stdlib, model_dir, tmp_path):
    """The code recipe trains the tiny random model two LoRA steps on polm:stdlib-code (a small sample of it);
    the domain's evaluator then reports finite bits per byte and a first-line fraction."""
    recipe = domain_recipe("code", [f"model={model_dir}", "stages.0.max_steps=2", "stages.0.batch_size=2",
                                    "stages.0.max_length=64"])
    result = recipe.pipeline().run(tmp_path / "run")
    assert (tmp_path / "run" / "00-sft" / "final" / "adapter_config.json").is_file()
    assert result.stages[0].metrics
    model, tokenizer = polm.load_model(tmp_path / "run" / "00-sft")
    metrics = evaluate_domain("code", model, tokenizer, max_bytes=500, tasks=2, max_new_tokens=3)
    assert math.isfinite(metrics["bits_per_byte"]) and metrics["bits_per_byte"] > 0
    assert metrics["tasks"] == 2 and 0 <= metrics["first_line_exact_match"] <= 1


@pytest.fixture(scope="module")
def units_site(tmp_path_factory) -> Path:
    """A folder holding polm-domain-units, pip-installed."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building polm-domain-units offline (--no-build-isolation) needs setuptools")
    root = tmp_path_factory.mktemp("domain-plugin")
    source = root / "polm-domain-units"  # build from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(UNITS_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=False, capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert installed.returncode == 0, installed.stderr
    return target


def test_example_domain_plugin_installs_and_is_listed_with_its_contributions(units_site):
    """Installed with pip, polm-domain-units is an entry point that contributes the dataset and the domain
    ``units``, listed with its recipe and metric."""
    env = {key: value for key, value in os.environ.items() if key != AUTOLOAD_SWITCH}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(units_site), env.get("PYTHONPATH")]))
    completed = subprocess.run([sys.executable, "-m", "polm.engine.cli", "plugins", "--json"], check=False,
                               capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr
    listing = json.loads(completed.stdout)
    units = {plugin["name"]: plugin for plugin in listing["plugins"]}["units"]
    assert units["source"] == "entry point polm-domain-units==0.1.0"
    assert units["contributes"] == {"datasets": ["units"], "domains": ["units"]}
    domain = {entry["name"]: entry for entry in listing["domains"]}["units"]
    assert domain == {"name": "units", "plugin": "units", "description": "unit conversions (lengths, masses, "
                      "volumes, times)", "datasets": ["polm:units"], "recipe": ["sft (lora) on polm:units"],
                      "metrics": ["exact_match"], "tokenizer": None}
    assert not [problem for problem in listing["problems"] if "units" in problem]


@pytest.fixture
def units_plugin(monkeypatch):
    """The polm_domain_units module from the example's source folder, registered as a user would at runtime."""
    monkeypatch.syspath_prepend(str(UNITS_SOURCE))
    import polm_domain_units

    with registered(polm_domain_units, "units-at-runtime"):
        yield polm_domain_units
    sys.modules.pop("polm_domain_units", None)


def test_example_domain_recipe_runs_and_evaluates(units_plugin, model_dir, tmp_path, capsys):
    """The example's recipe (a mapping) prints as YAML, runs two steps on the tiny random model, and ``polm domain
    eval`` grades the result with its evaluator; the dataset's splits share no question."""
    train, test = units_plugin.units_rows("train"), units_plugin.units_rows("test")
    assert len(train) + len(test) == 360 and not {row["prompt"] for row in train} & {row["prompt"] for row in test}
    assert main(["domain", "recipe", "units"]) == 0
    assert "data: polm:units" in capsys.readouterr().out
    recipe = domain_recipe("units", [f"model={model_dir}", "stages.0.max_steps=2", "stages.0.eval_size=4",
                                     "stages.0.max_new_tokens=2"])
    result = recipe.pipeline().run(tmp_path / "run")
    assert "eval/exact_match" in result.stages[0].metrics
    capsys.readouterr()
    assert main(["domain", "eval", "units", str(tmp_path / "run" / "00-sft"), "--option", "size=4",
                 "--option", "max_new_tokens=2"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"exact_match"}

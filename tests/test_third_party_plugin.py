"""Third-party plugins arrive through the ``polm`` entry-point group.

The example distribution ``examples/plugins/polm-shout`` is pip-installed into
a temporary folder, next to a broken distribution written on the fly, and
``polm plugins --json`` runs in a subprocess with that folder on
``PYTHONPATH``: once with autoload on (the test process turns it off) and
once with ``POLM_DISABLE_PLUGIN_AUTOLOAD=1``. Each subprocess imports torch,
so this file takes seconds rather than milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polm
from polm.engine.lm import completion_loss
from polm.engine.plugins import AUTOLOAD_SWITCH, DEFAULT_PLUGINS

SHOUT_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "polm-shout"
BROKEN_MESSAGE = "polm_broken needs libfoo, which is not installed"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding polm-shout (pip-installed) and polm-broken (whose import raises)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building polm-shout offline (--no-build-isolation) needs setuptools in this environment")
    root = tmp_path_factory.mktemp("third-party")
    source = root / "polm-shout"  # build from a copy: the build leaves build/ and *.egg-info behind
    shutil.copytree(SHOUT_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=False, capture_output=True, text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert installed.returncode == 0, installed.stderr
    # A distribution as an installer leaves it: the package and a .dist-info with the entry point.
    (target / "polm_broken").mkdir()
    (target / "polm_broken" / "__init__.py").write_text(f"raise ImportError({BROKEN_MESSAGE!r})\n")
    dist_info = target / "polm_broken-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: polm-broken\nVersion: 0.1.0\n")
    (dist_info / "entry_points.txt").write_text("[polm]\nbroken = polm_broken\n")
    return target


def polm_plugins_json(site: Path, autoload: bool) -> dict:
    """The parsed output of ``polm plugins --json`` run with ``site`` on the path."""
    env = {key: value for key, value in os.environ.items() if key != AUTOLOAD_SWITCH}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if not autoload:
        env[AUTOLOAD_SWITCH] = "1"
    completed = subprocess.run([sys.executable, "-m", "polm.engine.cli", "plugins", "--json"],
                               check=False, capture_output=True, text=True, env=env, timeout=300)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.fixture(scope="module")
def autoloaded(site) -> dict:
    return polm_plugins_json(site, autoload=True)


def by_name(listing: dict) -> dict[str, dict]:
    return {plugin["name"]: plugin for plugin in listing["plugins"]}


def test_installed_plugin_is_listed_with_its_source_and_contributions(autoloaded):
    """``polm plugins --json`` shows the entry point ``shout`` from polm-shout==0.1.0 and what it registers."""
    shout = by_name(autoloaded)["shout"]
    assert shout["source"] == "entry point polm-shout==0.1.0"
    assert shout["contributes"] == {"objectives": ["smoothed_completion"], "rewards": ["shout"]}
    assert not [problem for problem in autoloaded["problems"] if '"shout"' in problem]


def test_plugin_that_fails_to_import_is_reported_and_the_rest_still_load(autoloaded):
    """A plugin raising ImportError is reported by name; built-ins and the other third-party plugin are listed."""
    broken = [problem for problem in autoloaded["problems"] if '"broken"' in problem]
    assert broken == [f'Error importing plugin "broken": ImportError: {BROKEN_MESSAGE}']
    plugins = by_name(autoloaded)
    assert "broken" not in plugins
    assert set(DEFAULT_PLUGINS) <= set(plugins)
    assert all(plugins[name]["source"] == "built-in" for name in DEFAULT_PLUGINS)
    assert "sft" in plugins["polm.plugins.finetuning"]["contributes"]["stages"]
    assert "shout" in plugins


def test_autoload_switch_skips_third_party_plugins(site):
    """With ``POLM_DISABLE_PLUGIN_AUTOLOAD=1`` neither third-party plugin is loaded; the built-ins are."""
    listing = polm_plugins_json(site, autoload=False)
    plugins = by_name(listing)
    assert "shout" not in plugins and "broken" not in plugins
    assert not [problem for problem in listing["problems"] if '"broken"' in problem]
    assert set(DEFAULT_PLUGINS) <= set(plugins)


@pytest.fixture
def polm_shout(monkeypatch):
    """The polm_shout module, imported from the example's source folder and forgotten afterwards."""
    monkeypatch.syspath_prepend(str(SHOUT_SOURCE))
    import polm_shout

    yield polm_shout
    sys.modules.pop("polm_shout", None)


def test_shout_reward_is_the_fraction_of_upper_case_letters(polm_shout):
    """HELLO is all upper case, Hello one letter in five; no letters scores 0."""
    completions = ["HELLO", "Hello", "ABcd 12!", "42!", ""]
    prompts = ["Say hello"] * len(completions)
    assert polm_shout.shout_reward(prompts, completions) == [1.0, 0.2, 0.5, 0.0, 0.0]


def test_smoothed_objective_without_smoothing_is_the_sft_loss(polm_shout):
    """With ``smoothing=0`` the objective equals ``sft``'s completion loss; smoothing raises a confident loss."""
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)  # (B, T, V)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])  # (B, T)
    loss, metrics = polm_shout.smoothed_completion_loss(logits, labels, smoothing=0.0)
    expected, expected_metrics = completion_loss(logits, labels)
    torch.testing.assert_close(loss, expected)
    assert metrics == expected_metrics
    confident = torch.full((1, 2, 3), -10.0)
    confident[0, 0, 1] = 10.0  # predicts token 1 almost surely
    sharp, _ = polm_shout.smoothed_completion_loss(confident, torch.tensor([[-100, 1]]), smoothing=0.0)
    smoothed, _ = polm_shout.smoothed_completion_loss(confident, torch.tensor([[-100, 1]]), smoothing=0.1)
    assert smoothed > sharp


def test_shout_plugin_registers_like_any_plugin(polm_shout):
    """Registered at runtime, the module's hooks put ``shout`` in the rewards and its objective in the objectives,
    where ``sft`` finds it by name: it is of the language_modelling family."""
    manager = polm.plugin_manager()
    manager.register(polm_shout, name="shout-at-runtime")
    try:
        assert polm.components("rewards")["shout"] is polm_shout.shout_reward
        assert polm.components("objectives")["smoothed_completion"] is polm_shout.smoothed_completion_loss
        stage = polm.Pipeline("polm-tiny").add("sft", data="polm:arithmetic", objective="smoothed_completion",
                                               objective_options={"smoothing": 0.2}).stages[0]
        assert stage.objective().fn is polm_shout.smoothed_completion_loss
    finally:
        manager.unregister(polm_shout)
    assert "shout" not in polm.components("rewards")

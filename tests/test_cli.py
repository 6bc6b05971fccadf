"""The ``polm`` command line, driven through ``polm.engine.cli.main`` (and once as a real process).

A user error is one line on stderr (``polm: error: ...``) naming the problem,
exit status 2, and nothing trained or written: an existing output folder is
left exactly as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from polm.engine.cli import main
from polm.engine.plugins import DEFAULT_PLUGINS
from polm.engine.recipe import load_recipe

KEPT_FILE, KEPT_TEXT = "notes.txt", "results of an earlier run\n"

# The second stage of this recipe starts on line 7; error messages must point there.
TWO_STAGES = """\
model: {model}
seed: 0
stages:
  - name: sft
    data: {data}
    max_steps: 4
  - name: {name}
    data: {data2}
    {extra}
"""

FAILING_RECIPES = {
    "unknown-stage": ({"name": "sfft"}, "unknown stage 'sfft'. Did you mean 'sft'?", 7),
    "unknown-option": ({"extra": "lrr: 1.0e-3"}, "stage 1 'sft': unknown option 'lrr'. Did you mean 'lr'?", 7),
    "missing-data-file": ({"data2": "{tmp}/missing.jsonl"}, "option 'data': data file not found", 7),
    "invalid-yaml": ({"extra": " max_steps: 4"}, "invalid YAML: mapping values are not allowed here", 9),
    "unknown-recipe-key": ("output: runs/elsewhere\n", "unknown recipe key 'output'. Did you mean 'output_dir'?", None),
}


@pytest.fixture
def data_file(tmp_path) -> Path:
    """Eight arithmetic questions with answers, as JSONL."""
    rows = [{"prompt": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(1, 9)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """An existing output folder holding a file that must survive every failed command."""
    path = tmp_path / "out"
    path.mkdir()
    (path / KEPT_FILE).write_text(KEPT_TEXT)
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its content (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def write_recipe(tmp_path: Path, model_dir: Path, data_file: Path, case: dict | str = "") -> Path:
    """A two-stage sft recipe, changed by ``case``: template fields to replace, or lines to prepend."""
    fields = {"model": model_dir, "data": data_file, "name": "sft", "data2": data_file, "extra": ""}
    text = TWO_STAGES
    if isinstance(case, dict):
        fields.update({key: value.format(tmp=tmp_path) for key, value in case.items()})
    else:
        text = case + text
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(**fields))
    return path


def assert_untouched(output_dir: Path, before: dict[str, bytes | None]) -> None:
    assert snapshot(output_dir) == before
    assert (output_dir / KEPT_FILE).read_text() == KEPT_TEXT
    assert not list(output_dir.parent.rglob("metrics.jsonl")), "something trained"


@pytest.mark.parametrize("case, expected, line", FAILING_RECIPES.values(), ids=FAILING_RECIPES.keys())
def test_broken_recipe_is_one_line_exit_2_and_nothing_written(
    case, expected, line, tmp_path, model_dir, data_file, output_dir, capsys
):
    """Unknown stage/option, missing data, bad YAML, unknown key: one stderr line with file (and line), exit 2."""
    recipe = write_recipe(tmp_path, model_dir, data_file, case)
    before = snapshot(output_dir)

    status = main(["run", str(recipe), "--output", str(output_dir)])

    out, err = capsys.readouterr()
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"polm: error: {recipe}{f':{line}' if line else ''}: ")
    assert expected in lines[0]
    assert_untouched(output_dir, before)


def test_console_script_reports_a_broken_recipe_with_exit_status_2(tmp_path, model_dir, data_file, output_dir):
    """The installed ``polm`` command prints the one-line error and exits 2 as a real process."""
    recipe = write_recipe(tmp_path, model_dir, data_file, {"name": "sfft"})
    script = Path(sys.executable).with_name("polm")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "polm.engine.cli"]
    before = snapshot(output_dir)

    completed = subprocess.run([*command, "run", str(recipe), "--output", str(output_dir)],
                               check=False, capture_output=True, text=True, timeout=300)

    assert completed.returncode == 2
    assert completed.stdout == ""
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith(f"polm: error: {recipe}:7: unknown stage 'sfft'. Did you mean 'sft'?")
    assert_untouched(output_dir, before)


def test_valid_recipe_into_a_non_empty_folder_needs_resume(tmp_path, model_dir, data_file, output_dir, capsys):
    """Without ``--resume``, a folder with other files is refused, one line, exit 2, and left as it was."""
    recipe = write_recipe(tmp_path, model_dir, data_file)
    before = snapshot(output_dir)

    status = main(["run", str(recipe), "--output", str(output_dir)])

    err = capsys.readouterr().err
    assert status == 2
    assert len(err.splitlines()) == 1 and f"output folder {output_dir} is not empty" in err
    assert "--resume" in err
    assert_untouched(output_dir, before)


def test_set_overrides_a_stage_option(tmp_path, model_dir, data_file):
    """``--set stages.0.lr=1e-4`` reaches the stage as lr 0.0001 and leaves the recipe file alone."""
    recipe = write_recipe(tmp_path, model_dir, data_file)
    text = recipe.read_text()

    loaded = load_recipe(recipe, ["stages.0.lr=1e-4", "seed=3"])

    assert loaded.stages[0]["lr"] == "1e-4"  # read as YAML, which keeps 1e-4 a string
    assert loaded.pipeline().stages[0].options.lr == pytest.approx(1e-4)
    assert loaded.seed == 3
    assert "lr" not in load_recipe(recipe).stages[0]
    assert recipe.read_text() == text


def test_set_errors_reach_the_command_line(tmp_path, model_dir, data_file, output_dir, capsys):
    """A bad ``--set`` (unknown option, stage out of range) fails like a bad recipe: one line, exit 2."""
    recipe = write_recipe(tmp_path, model_dir, data_file)
    before = snapshot(output_dir)
    for override, expected in [("stages.0.lrr=1", "unknown option 'lrr'"), ("stages.5.lr=1", "is not a stage index")]:
        status = main(["run", str(recipe), "--output", str(output_dir), "--set", override])
        err = capsys.readouterr().err
        assert status == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert_untouched(output_dir, before)


def test_plugins_table_lists_builtins_and_sft(capsys):
    """``polm plugins`` prints a table with every built-in plugin and the ``sft`` stage."""
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DEFAULT_PLUGINS)
    assert "stages: sft" in out


def test_plugins_json_lists_builtins_and_sft(capsys):
    """``polm plugins --json`` lists every built-in plugin with its source and contributions."""
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    plugins = {plugin["name"]: plugin for plugin in listing["plugins"]}
    assert set(DEFAULT_PLUGINS) <= set(plugins)
    assert all(plugins[name]["source"] == "built-in" for name in DEFAULT_PLUGINS)
    assert "sft" in plugins["polm.plugins.finetuning"]["contributes"]["stages"]
    assert isinstance(listing["problems"], list)


def test_run_trains_and_eval_scores_the_final_checkpoint(tmp_path, model_dir, data_file, capsys):
    """A valid recipe exits 0 with metrics.jsonl and a final checkpoint; ``polm eval`` on it prints exact_match."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {model_dir}\nseed: 0\nstages:\n  - name: sft\n    data: {data_file}\n"
        "    max_steps: 4\n    batch_size: 4\n    log_every: 2\n    lr: 1.0e-3\n"
    )
    output = tmp_path / "run"

    assert main(["run", str(recipe), "--output", str(output)]) == 0

    stage_dir = output / "00-sft"
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    assert all("loss" in record for record in records)
    final = stage_dir / "final"
    assert (final / "polm_stage.json").is_file() and list(final.glob("*.safetensors"))
    capsys.readouterr()

    assert main(["eval", str(final), "--data", str(data_file), "--max-new-tokens", "4", "--size", "4"]) == 0

    out = capsys.readouterr().out
    metrics = json.loads(out[out.index("{"):])
    assert 0.0 <= metrics["exact_match"] <= 1.0


def test_a_run_that_fails_before_keeping_anything_does_not_block_the_corrected_rerun(tmp_path, model_dir, capsys):
    """A data file whose second line is not JSON: exit 2 naming the line, and no output folder is left behind
    (run.json used to be written first, so the rerun was refused as a non-empty folder); once the line is
    fixed the same command runs."""
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "What is 1 + 2?", "answer": "3"})
    data.write_text(good + "\n{not json\n", encoding="utf-8")
    recipe = write_recipe(tmp_path, model_dir, data)
    output = tmp_path / "fresh-output"
    assert main(["run", str(recipe), "--output", str(output)]) == 2
    assert f"{data}:2: invalid JSON" in capsys.readouterr().err
    assert not output.exists()
    data.write_text(good + "\n" + good + "\n", encoding="utf-8")
    assert main(["run", str(recipe), "--output", str(output)]) == 0


def test_overwrite_replaces_a_polm_run_and_never_a_folder_that_holds_something_else(
        tmp_path, model_dir, data_file, output_dir, capsys):
    """``--overwrite`` into a folder of unrelated files: refused, one line, the folder as it was. Into a finished
    polm run with a recipe whose data has a bad line: refused, the old run as it was (it used to be deleted
    before the rows were read). With a good recipe: the old run is replaced (its stale stage folder gone,
    run.json the new recipe's)."""
    recipe = write_recipe(tmp_path, model_dir, data_file)
    before = snapshot(output_dir)
    assert main(["run", str(recipe), "--output", str(output_dir), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "holds no polm run (run.json is missing), so it is left alone" in err
    assert_untouched(output_dir, before)

    run = tmp_path / "run"
    assert main(["run", str(recipe), "--output", str(run)]) == 0
    (run / "07-stale").mkdir()
    finished = snapshot(run)
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "What is 1 + 2?", "answer": "3"}\n{not json\n', encoding="utf-8")
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(run), "--overwrite", "--set", f"stages.0.data={bad_data}"]) == 2
    assert f"{bad_data}:2: invalid JSON" in capsys.readouterr().err
    assert snapshot(run) == finished
    assert main(["run", str(recipe), "--output", str(run), "--overwrite", "--set", "stages.0.max_steps=2"]) == 0
    assert not (run / "07-stale").exists()
    assert json.loads((run / "run.json").read_text())["stages"][0]["max_steps"] == 2

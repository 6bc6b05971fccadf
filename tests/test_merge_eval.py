"""Scoring and searching merges: ``polm merge ... --eval DATA [--search]`` and the functions behind them.

The models are conftest-shaped random Llamas (``tests/test_merge.py``'s ``models``: ``base``, ``a``, ``b``). A
task whose answers are model ``a``'s own greedy completions is one ``a`` scores 1.0 on, so the table's columns
can be checked against who answers what. The search is checked against a scorer whose optimum is known: the
negative distance of a candidate's weights to a target merge on the grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import polm
from polm.engine.cli import main
from polm.engine.errors import PolmError
from polm.engine.evaluation import generate
from polm.plugins.integration.merge import (
    merge_models,
    read_merge_config,
    search_grid,
    search_merge,
)
from polm.plugins.integration.merge.evaluate import evaluate_merge
from polm.plugins.integration.merge.search import describe_grid
from tests.test_merge import models, one_error_line, tensors, write_config  # noqa: F401 (fixture)

PROMPTS = [f"What is {a} + {b}?" for a, b in ((1, 2), (3, 4), (12, 7), (5, 9), (40, 2), (8, 8))]
MAX_NEW_TOKENS = 4


def answered_by(folder: Path, path: Path) -> Path:
    """A task file whose answers are the greedy completions of the model in ``folder``."""
    model, tokenizer = polm.load_model(folder)
    completions = generate(model, tokenizer, PROMPTS, MAX_NEW_TOKENS)
    path.write_text("".join(json.dumps({"prompt": prompt, "answer": completion}) + "\n"
                            for prompt, completion in zip(PROMPTS, completions)))
    return path


def linear_config(tmp_path: Path, models: dict[str, Path], method: str = "linear") -> Path:  # noqa: F811
    return write_config(tmp_path, f"""\
merge_method: {method}
models:
  - model: {models['a']}
    parameters: {{weight: 0.5}}
  - model: {models['b']}
    parameters: {{weight: 0.5}}
""")


def test_eval_scores_every_input_and_the_merge_in_one_table(models, tmp_path, capsys):  # noqa: F811
    """Each model scores 1.0 on the task of its own answers; the merge's figures are ``polm.evaluate``'s on the
    merged folder; the table and ``merge_eval.json`` hold a row per model and a column per task, named after
    the files."""
    task_a = answered_by(models["a"], tmp_path / "skill_a.jsonl")
    task_b = answered_by(models["b"], tmp_path / "skill_b.jsonl")
    output = tmp_path / "merged"

    assert main(["merge", str(linear_config(tmp_path, models)), "--output", str(output), "--eval", str(task_a),
                 "--eval", str(task_b), "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0

    out, _ = capsys.readouterr()
    document = json.loads((output / "merge_eval.json").read_text())
    rows = {row["label"]: row for row in document["models"]}
    assert list(rows) == ["input 1", "input 2", "merge"]
    assert rows["input 1"]["scores"]["skill_a"] == 1.0
    assert rows["input 2"]["scores"]["skill_b"] == 1.0
    for task, name in ((task_a, "skill_a"), (task_b, "skill_b")):
        expected = polm.evaluate(output, str(task), max_new_tokens=MAX_NEW_TOKENS)["exact_match"]
        assert rows["merge"]["scores"][name] == expected
    assert rows["merge"]["mean"] == pytest.approx(sum(rows["merge"]["scores"].values()) / 2)
    assert document["settings"]["tasks"][0] == {"name": "skill_a", "data": str(task_a), "split": "test",
                                                "rows": len(PROMPTS)}
    assert "skill_a" in out and "skill_b" in out and "merge" in out and "1.000" in out
    assert f"polm merge: wrote {output}" in out


def test_a_model_named_as_base_and_input_is_scored_once(models, tmp_path):  # noqa: F811
    """``task_arithmetic`` with the base among the models (mergekit's habit): the base row and its input row
    have the same figures, and the scorer ran once for them."""
    config = read_merge_config({"merge_method": "task_arithmetic", "base_model": str(models["base"]), "models": [
        {"model": str(models["base"])}, {"model": str(models["a"]), "parameters": {"weight": 0.5}}]})
    calls: list[str] = []

    def counted(model: str) -> dict[str, float]:
        calls.append(model)
        return {"size": float(len(model))}

    evaluation = evaluate_merge(config, tmp_path / "merged", scorer=counted)

    assert [row.label for row in evaluation.rows] == ["base", "input 1", "merge"]
    assert calls == [str(models["base"]), str(models["a"]), str(tmp_path / "merged")]
    assert (tmp_path / "merged" / "merge_eval.json").is_file()


def weight_distance_scorer(target: dict[str, torch.Tensor]):
    """``{"closeness": -||theta - theta_target||}``: highest for the model nearest the target."""

    def closeness(model: str) -> dict[str, float]:
        theta = tensors(Path(model))
        distance = sum(float((theta[name].double() - target[name].double()).pow(2).sum()) for name in target)
        return {"closeness": -distance ** 0.5}

    return closeness


def test_search_finds_the_grid_point_of_a_known_target(models, tmp_path):  # noqa: F811
    """A linear merge of ``a`` and ``b`` searched against the distance to ``0.3 a + 0.7 b``: the 7 weight
    candidates (0.3 / 0.5 / 0.7 per model, scaled to sum to 1, duplicates once) are tried, the chosen one is
    weights 0.3 / 0.7 at distance 0, the output holds exactly that merge, ``merge.json`` records the choice and
    only the output is left beside it."""
    config_path = linear_config(tmp_path, models)
    target_folder = tmp_path / "target"
    merge_models(read_merge_config({"merge_method": "linear", "models": [
        {"model": str(models["a"]), "parameters": {"weight": 0.3}},
        {"model": str(models["b"]), "parameters": {"weight": 0.7}}]}), target_folder)
    output = tmp_path / "searched"
    before = set(tmp_path.iterdir())

    result = search_merge(read_merge_config(config_path), output,
                          scorer=weight_distance_scorer(tensors(target_folder)))

    assert len(result.candidates) == 7
    chosen = result.candidates[result.chosen]
    assert chosen.weights == (0.3, 0.7)
    assert result.scores[result.chosen].scores["closeness"] == pytest.approx(0.0, abs=1e-4)
    assert all(score.mean < -1e-3 for index, score in enumerate(result.scores) if index != result.chosen)
    merged, target = tensors(output), tensors(target_folder)
    for name in target:
        assert_close(merged[name], target[name], msg=name)
    record = json.loads((output / "merge.json").read_text())
    assert record["search"]["parameters"] == {"weight": [0.3, 0.7]}
    assert record["search"]["candidates"] == 7
    searched = json.loads((output / "merge_search.json").read_text())
    assert searched["chosen"] == result.chosen + 1 and len(searched["candidates"]) == 7
    assert set(tmp_path.iterdir()) - before == {output}


def test_search_grid_follows_the_method(models, tmp_path):  # noqa: F811
    """``ties`` searches weights times density (7 x 3), ``slerp`` its ``t`` (3), ``model_stock`` nothing."""
    ties = read_merge_config({"merge_method": "ties", "base_model": str(models["base"]),
                              "models": [{"model": str(models["a"])}, {"model": str(models["b"])}]})
    grid = search_grid(ties)
    assert len(grid) == 21 and {candidate.density for candidate in grid} == {0.3, 0.5, 0.7}
    assert describe_grid(ties, grid).startswith("21 candidates (weight in 0.3, 0.5, 0.7 per model, scaled")
    slerp = read_merge_config({"merge_method": "slerp", "base_model": str(models["a"]),
                               "models": [{"model": str(models["a"])}, {"model": str(models["b"])}],
                               "parameters": {"t": 0.5}})
    assert [candidate.t for candidate in search_grid(slerp)] == [0.3, 0.5, 0.7]
    stock = read_merge_config({"merge_method": "model_stock", "base_model": str(models["base"]),
                               "models": [{"model": str(models["a"])}, {"model": str(models["b"])}]})
    with pytest.raises(PolmError, match="model_stock' has no weight, density or t to search"):
        search_grid(stock)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--search"], "--search ranks merges by their --eval score; give --eval DATA as well"),
    (["--eval", "missing.jsonl"], "missing.jsonl"),
    (["--eval", "polm:no-such-task"], "no-such-task"),
    (["--eval", "polm:arithmetic", "--eval-size", "0"], "--eval-size must be at least 1"),
    (["--eval", "polm:arithmetic", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--eval", "polm:arithmetic", "--eval", "polm:arithmetic"], "is given twice"),
])
def test_bad_eval_options_fail_in_one_line_before_anything_is_written(models, tmp_path, capsys, arguments,  # noqa: F811
                                                                      message):
    output = tmp_path / "merged"

    assert main(["merge", str(linear_config(tmp_path, models)), "--output", str(output), *arguments]) == 2

    assert message in one_error_line(capsys)
    assert not output.exists()


def test_a_scorer_that_returns_no_figures_is_named(models, tmp_path):  # noqa: F811
    def silent(model: str) -> dict[str, float]:
        return {}

    with pytest.raises(PolmError, match="scorer .*silent returned {} for"):
        evaluate_merge(read_merge_config(linear_config(tmp_path, models)), tmp_path / "merged", scorer=silent)

"""``--resume`` follows the run's recipe: a change is named and refused unless accepted; what a resume may
change (what is logged and kept, a larger ``max_steps`` of a constant schedule) goes through, and a larger
``max_steps`` trains exactly the extra steps."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polm
from polm.engine.cli import main


def _pipeline(model, tokenizer, rows, stages: int = 1, seed: int = 0, **options) -> polm.Pipeline:
    settings = {"data": rows, "max_steps": 6, "batch_size": 4, "lr": 3e-3, "lr_scheduler": "constant",
                "eval_size": 0, "log_every": 1, "save_every": 3, **options}
    pipeline = polm.Pipeline(copy.deepcopy(model), tokenizer=tokenizer, seed=seed)
    for _ in range(stages):
        pipeline.add("sft", **settings)
    return pipeline


def _stopped_at(step: int, pipeline: polm.Pipeline, run_dir: Path, stage_dir: str = "00-sft") -> None:
    stop = threading.Event()
    pipeline.run(run_dir, on_log=lambda record: record["stage_dir"] == stage_dir and record["step"] == step
                 and stop.set(), stop=stop)


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [(record["step"], record["loss"]) for record in records if "loss" in record]


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(stage_dir / "final" / "model.safetensors")


def test_a_resume_with_another_lr_or_seed_is_refused_naming_each_change_unless_accepted(
        random_model, tokenizer, arithmetic, tmp_path):
    """Stopped after step 2, then resumed with lr 3e-3 -> 1e-3 and seed 0 -> 1: one line names both changes
    and how to go on, and the folder is left as it was. With ``accept_changes`` the run finishes and
    ``run.json`` records the recipe it now follows."""
    rows = arithmetic[0]
    run_dir = tmp_path / "run"
    _stopped_at(2, _pipeline(random_model, tokenizer, rows, save_every=2), run_dir)
    before = {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")}
    changed = _pipeline(random_model, tokenizer, rows, seed=1, save_every=2, lr=1e-3)
    with pytest.raises(polm.PolmError) as raised:
        changed.run(run_dir, resume=True)
    message = str(raised.value)
    assert "\n" not in message
    assert "seed 0 -> 1; stage 0 'sft' lr 0.003 -> 0.001." in message, message
    assert "--accept-changes" in message
    assert {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")} == before

    assert not changed.run(run_dir, resume=True, accept_changes=True).interrupted
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["seed"] == 1 and recorded["stages"][0]["lr"] == 1e-3


def test_a_resume_may_change_what_is_logged_and_kept(random_model, tokenizer, arithmetic, tmp_path):
    """save_every, keep_last and log_every decide what is written, not what is trained: changed on resume,
    they are taken without a word, and the weights equal the uninterrupted run's."""
    rows = arithmetic[0]
    _pipeline(random_model, tokenizer, rows).run(tmp_path / "whole")
    _stopped_at(3, _pipeline(random_model, tokenizer, rows), tmp_path / "split")
    _pipeline(random_model, tokenizer, rows, save_every=1, keep_last=1, log_every=2).run(
        tmp_path / "split", resume=True)
    expected, actual = _weights(tmp_path / "whole" / "00-sft"), _weights(tmp_path / "split" / "00-sft")
    assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items())
    assert [path.name for path in (tmp_path / "split" / "00-sft").glob("checkpoint-*")] == ["checkpoint-000006"]


def test_a_larger_max_steps_trains_exactly_the_extra_steps(random_model, tokenizer, arithmetic, tmp_path):
    """A finished 6-step run (constant lr; checkpoints at 3 and at its last step, 6) resumed with max_steps 10
    trains steps 7 to 10 only, from checkpoint 6, and ends with the weights and the step losses of a run
    made with 10 steps from the start."""
    rows = arithmetic[0]
    _pipeline(random_model, tokenizer, rows, max_steps=10).run(tmp_path / "ten")
    run_dir = tmp_path / "six-then-ten"
    _pipeline(random_model, tokenizer, rows).run(run_dir)
    stage_dir = run_dir / "00-sft"
    assert sorted(path.name for path in stage_dir.glob("checkpoint-*")) == ["checkpoint-000003", "checkpoint-000006"]
    six = _losses(stage_dir)

    steps_trained = []
    _pipeline(random_model, tokenizer, rows, max_steps=10).run(
        run_dir, resume=True, on_log=lambda record: "loss" in record and steps_trained.append(record["step"]))
    assert steps_trained == [7, 8, 9, 10]
    assert _losses(stage_dir)[:6] == six
    assert _losses(stage_dir) == _losses(tmp_path / "ten" / "00-sft")
    expected, actual = _weights(tmp_path / "ten" / "00-sft"), _weights(stage_dir)
    assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items())
    assert json.loads((run_dir / "run.json").read_text())["stages"][0]["max_steps"] == 10


@pytest.mark.parametrize("case, options, stages, max_steps, reason", [
    ("cosine schedule", {"lr_scheduler": "cosine"}, 1, 8,
     "the 'cosine' schedule would give the steps already trained other learning rates"),
    ("a later stage has started", {}, 2, 8, "01-sft has already started from this stage's model"),
    ("fewer steps", {}, 1, 4, "only a larger max_steps"),
])
def test_a_max_steps_that_cannot_extend_the_run_is_refused_with_the_reason(
        random_model, tokenizer, arithmetic, tmp_path, case, options, stages, max_steps, reason):
    """max_steps 6 -> 8 (4 for fewer steps) where the extra steps would not continue the same run."""
    rows = arithmetic[0]
    run_dir = tmp_path / "run"
    first = _pipeline(random_model, tokenizer, rows, stages=stages, **options)
    if stages == 2:
        _stopped_at(2, first, run_dir, "01-sft")  # the first stage finished, the second started
    else:
        first.run(run_dir)
    changed = _pipeline(random_model, tokenizer, rows, stages=stages, **{**options, "max_steps": max_steps})
    with pytest.raises(polm.PolmError, match=f"stage 0 'sft' max_steps 6 -> {max_steps} ") as raised:
        changed.run(run_dir, resume=True)
    assert f"({reason}" in str(raised.value), str(raised.value)


def test_the_command_line_refuses_a_changed_recipe_on_resume_and_goes_on_when_told(model_dir, tmp_path, capsys):
    """``polm run --resume`` with ``--set stages.0.lr=...``: exit 2 and one line naming the change; with
    ``--accept-changes``, exit 0."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\nstages:\n  - name: sft\n    data: polm:arithmetic\n    max_steps: 4\n"
                      "    batch_size: 4\n    eval_size: 0\n    save_every: 2\n")
    output = tmp_path / "run"
    assert main(["run", str(recipe), "--output", str(output)]) == 0
    capsys.readouterr()
    assert main(["run", str(recipe), "--output", str(output), "--resume", "--set", "stages.0.lr=5e-4"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "stage 0 'sft' lr 0.0001 -> 0.0005" in error, error
    assert main(["run", str(recipe), "--output", str(output), "--resume", "--set", "stages.0.lr=5e-4",
                 "--accept-changes"]) == 0


def test_a_resume_after_the_data_file_changed_is_refused_naming_the_file(random_model, tokenizer, arithmetic,
                                                                        tmp_path):
    """The same recipe, but its JSONL data file was edited after the run stopped: the resume names the file
    (run.json stamps each data file's size and modification time) instead of training on other rows."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in arithmetic[0]))
    run_dir = tmp_path / "run"
    _stopped_at(2, _pipeline(random_model, tokenizer, str(data), save_every=2), run_dir)
    data.write_text("".join(json.dumps(row) + "\n" for row in arithmetic[0][:32]))
    with pytest.raises(polm.PolmError, match=rf"stage 0 'sft' data file {data} changed since the run began"):
        _pipeline(random_model, tokenizer, str(data), save_every=2).run(run_dir, resume=True)

"""Checkpoints that survive crashes: verified on resume (a damaged newest one gives way to the previous one),
written whole or not at all, cleaned up after a kill, rotated without losing the newest good one."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polm
from polm.engine import checkpoint as checkpoints
from polm.engine.checkpoint import rotate_checkpoints, verify_checkpoint


def _pipeline(model, tokenizer, rows, save_every: int = 2, **options) -> polm.Pipeline:
    return polm.Pipeline(copy.deepcopy(model), tokenizer=tokenizer, seed=0).add(
        "sft", data=rows, max_steps=6, batch_size=4, lr=3e-3, eval_size=0, log_every=1, save_every=save_every,
        **options)


def _stopped_at(step: int, pipeline: polm.Pipeline, run_dir: Path) -> Path:
    """Run ``pipeline`` and stop it after ``step`` (it checkpoints there); returns the stage folder."""
    stop = threading.Event()
    pipeline.run(run_dir, on_log=lambda record: record["step"] == step and stop.set(), stop=stop)
    return run_dir / "00-sft"


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [(record["step"], record["loss"]) for record in records if "loss" in record]


def _assert_same_run(stage_dir: Path, expected_dir: Path) -> None:
    expected = load_file(expected_dir / "final" / "model.safetensors")
    actual = load_file(stage_dir / "final" / "model.safetensors")
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items())
    assert _losses(stage_dir) == _losses(expected_dir)


@pytest.fixture
def uninterrupted(random_model, tokenizer, arithmetic, tmp_path) -> Path:
    """The stage folder of the six-step run straight through: what every resumed run must equal."""
    _pipeline(random_model, tokenizer, arithmetic[0]).run(tmp_path / "whole")
    return tmp_path / "whole" / "00-sft"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _same_size_garbage(path: Path) -> None:
    path.write_text("x" * path.stat().st_size)


DAMAGE = {
    "truncated model": (lambda folder: _truncate(folder / "model.safetensors"),
                        "model.safetensors is"),
    "empty model": (lambda folder: (folder / "model.safetensors").write_bytes(b""),
                    "model.safetensors is 0 bytes"),
    "model header garbled, same size": (lambda folder: _same_size_garbage(folder / "model.safetensors"),
                                        "model.safetensors cannot be read"),
    "truncated optimizer": (lambda folder: _truncate(folder / "optimizer.pt"), "optimizer.pt is"),
    "missing rng state": (lambda folder: (folder / "rng_state_0.pt").unlink(), "rng_state_0.pt is missing"),
    "invalid trainer state, same size": (lambda folder: _same_size_garbage(folder / "trainer_state.json"),
                                         "trainer_state.json is missing or unreadable"),
    "no manifest": (lambda folder: (folder / "manifest.json").unlink(), "manifest.json is missing or unreadable"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_resumed(
        random_model, tokenizer, arithmetic, tmp_path, uninterrupted, damage, caplog):
    """Stopped after step 4 (checkpoints 2 and 4, ``latest`` naming 4), then checkpoint 4 damaged: ``--resume``
    says in one line what is wrong with it and that it resumes from checkpoint 2, and ends equal to the
    uninterrupted run, weights bit for bit and losses step for step."""
    pipeline = _pipeline(random_model, tokenizer, arithmetic[0])
    stage_dir = _stopped_at(4, pipeline, tmp_path / "split")
    assert sorted(path.name for path in stage_dir.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    assert (stage_dir / "latest").read_text() == "checkpoint-000004\n"
    assert verify_checkpoint(stage_dir / "checkpoint-000004") is None
    spoil, problem = DAMAGE[damage]
    spoil(stage_dir / "checkpoint-000004")

    with caplog.at_level("WARNING", logger="polm"):
        assert not _pipeline(random_model, tokenizer, arithmetic[0]).run(tmp_path / "split", resume=True).interrupted
    warnings = [record.getMessage() for record in caplog.records if record.name == "polm"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"checkpoint-000004 is damaged ({problem}" in warnings[0], warnings
    assert warnings[0].endswith("); resuming from checkpoint-000002"), warnings
    _assert_same_run(stage_dir, uninterrupted)


FAULTS = {
    # A full disk in the middle of the checkpoint, after the model and the optimizer state were written.
    "disk full between two files": ("_save", "scheduler.pt", "No space left on device"),
    # safetensors writing to a full disk can end without an error and leave a short file.
    "model written short, silently": ("save_model", "model.safetensors", "it does not read back: model.safetensors"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_checkpoint_that_cannot_be_written_fails_naming_it_and_leaves_the_previous_one_intact(
        random_model, tokenizer, arithmetic, tmp_path, uninterrupted, monkeypatch, fault):
    """The write of checkpoint 4 fails: the stage stops with one line naming that checkpoint, the reason and
    the previous checkpoint (2), which still verifies and is still ``latest``; nothing of 4 is left, and a
    resume ends equal to the uninterrupted run."""
    function, file_name, reason = FAULTS[fault]
    original = getattr(checkpoints, function)

    def failing_save(value, path: Path) -> None:
        if path.name == file_name and path.parent.name == ".checkpoint-000004.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(value, path)

    def short_save_model(model, tokenizer_, directory: Path) -> None:
        original(model, tokenizer_, directory)
        if directory.name == ".checkpoint-000004.tmp":
            _truncate(directory / file_name)

    with monkeypatch.context() as patch:
        if function == "_save":
            patch.setattr(checkpoints, "_save", failing_save)
        else:
            patch.setattr("polm.engine.trainer.save_model", short_save_model)
        with pytest.raises(polm.PolmError) as raised:
            _pipeline(random_model, tokenizer, arithmetic[0]).run(tmp_path / "split")
    stage_dir = tmp_path / "split" / "00-sft"
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"cannot write checkpoint {stage_dir / 'checkpoint-000004'}: {reason}"), message
    assert f"the previous checkpoint {stage_dir / 'checkpoint-000002'} is intact" in message
    assert sorted(path.name for path in stage_dir.iterdir() if "checkpoint" in path.name) == ["checkpoint-000002"]
    assert verify_checkpoint(stage_dir / "checkpoint-000002") is None
    assert (stage_dir / "latest").read_text() == "checkpoint-000002\n"

    assert not _pipeline(random_model, tokenizer, arithmetic[0]).run(tmp_path / "split", resume=True).interrupted
    _assert_same_run(stage_dir, uninterrupted)


def test_resume_after_a_kill_mid_write_cleans_up_and_restores_a_folder_caught_between_renames(
        random_model, tokenizer, arithmetic, tmp_path, uninterrupted):
    """What kills leave: a half-written ``.final.tmp``, and checkpoint 4 rewritten at the moment it was moved
    aside (``.checkpoint-000004.old``) with its replacement not yet renamed in. ``--resume`` puts checkpoint 4
    back, removes the temporary folders, and ends equal to the uninterrupted run."""
    stage_dir = _stopped_at(4, _pipeline(random_model, tokenizer, arithmetic[0]), tmp_path / "split")
    os.replace(stage_dir / "checkpoint-000004", stage_dir / ".checkpoint-000004.old")
    shutil.copytree(stage_dir / "checkpoint-000002", stage_dir / ".checkpoint-000004.tmp")
    (stage_dir / ".final.tmp").mkdir()
    (stage_dir / ".final.tmp" / "model.safetensors").write_bytes(b"half")

    assert not _pipeline(random_model, tokenizer, arithmetic[0]).run(tmp_path / "split", resume=True).interrupted
    assert not [path.name for path in stage_dir.iterdir() if path.name.startswith(".")]
    assert (stage_dir / "checkpoint-000004").is_dir()
    _assert_same_run(stage_dir, uninterrupted)


def test_a_run_killed_before_its_first_checkpoint_resumes_without_repeating_metrics(
        random_model, tokenizer, arithmetic, tmp_path):
    """A run with no checkpoint, killed while it wrote step 4's line: its folder holds ``run.json`` and three
    whole lines of ``metrics.jsonl`` and half of the fourth. ``--resume`` starts the stage again, drops those
    lines (they used to appear twice), and ends with the uninterrupted run's metrics and weights."""
    _pipeline(random_model, tokenizer, arithmetic[0], save_every=0).run(tmp_path / "whole")
    lines = (tmp_path / "whole" / "00-sft" / "metrics.jsonl").read_text().splitlines()
    split = tmp_path / "split"
    (split / "00-sft").mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / "run.json", split / "run.json")
    (split / "00-sft" / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:3]) + lines[3][:20])

    assert not _pipeline(random_model, tokenizer, arithmetic[0], save_every=0).run(split, resume=True).interrupted
    _assert_same_run(split / "00-sft", tmp_path / "whole" / "00-sft")


def test_rotation_counts_only_good_checkpoints(random_model, tokenizer, arithmetic, tmp_path):
    """Checkpoints 2 and 4, the newer one damaged: keeping the last one keeps checkpoint 2, the newest good
    one, and does not count (nor delete) the damaged 4."""
    stage_dir = _stopped_at(4, _pipeline(random_model, tokenizer, arithmetic[0]), tmp_path / "run")
    _truncate(stage_dir / "checkpoint-000004" / "model.safetensors")
    assert rotate_checkpoints(stage_dir, 1) == []
    assert sorted(path.name for path in stage_dir.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"]
    (stage_dir / "checkpoint-000004" / "manifest.json").unlink()
    shutil.copytree(stage_dir / "checkpoint-000002", stage_dir / "checkpoint-000006")
    assert rotate_checkpoints(stage_dir, 1) == [stage_dir / "checkpoint-000002"]

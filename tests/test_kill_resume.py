"""Every stage resumes exactly after a SIGKILL: a ``polm`` run in a child process kills itself at a chosen step,
``--resume`` finishes it, and every tensor the run saved (``torch.equal``) and every ``metrics.jsonl`` record
(but the wall-clock speeds, ``tokens_per_s`` and ``sampling_tokens_per_s``) equal an uninterrupted run's.

Each stage trains 6 steps of the random two-layer Llama of ``random_model`` with a checkpoint every 3, and is
killed at two points: step 2 (before the first checkpoint: the stage starts again and its logged lines must
not appear twice) and step 5 (resumed from checkpoint 3). For ``grpo`` (``num_iterations`` 2) and ``ppo``
(``ppo_epochs`` 2) checkpoint 3 falls between the two updates of a generation batch. Multimodal ``sft`` and
``grpo`` follow a two-step ``align`` and are killed in their own stage.

About 30 s per case on two cores, so the default suite runs three cases that no other test covers (``align``
from checkpoint 3, multimodal ``sft`` from checkpoint 3 after its finished ``align``, ``prm`` killed before its
first checkpoint); the whole table is ``slow``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

import polm
from tests.helpers import final_tensors, run_in_child

COMMON = {"max_steps": 6, "batch_size": 2, "lr": 1e-3, "log_every": 1, "eval_size": 0, "save_every": 3}
SAMPLING = {"data": "polm:arithmetic", "rewards": {"length": 1.0}, "max_new_tokens": 4}
IMAGE = {"encoders": {"image": "open_clip:polm-tiny-vit"}, "connectors": {"image": "mlp2x_gelu"}}
ALIGN = ["align", {**COMMON, "data": "polm:shapes-captions", **IMAGE, "max_steps": 2, "save_every": 0}]

#: case -> the run's stages, as ``[name, options]``; the last one is killed.
STAGES = {
    "sft": [["sft", {"data": "polm:arithmetic"}]],
    "sft lora": [["sft", {"data": "polm:arithmetic", "tuning": "lora", "tuning_options": {"r": 4}}]],
    "rft": [["rft", {**SAMPLING, "threshold": 0.0, "samples": 2}]],
    "dpo": [["dpo", {"data": "polm:arithmetic-prefs"}]],
    "simpo": [["simpo", {"data": "polm:arithmetic-prefs"}]],
    "orpo": [["orpo", {"data": "polm:arithmetic-prefs"}]],
    "kto": [["kto", {"data": "polm:arithmetic-prefs"}]],
    "reward_model": [["reward_model", {"data": "polm:arithmetic-prefs"}]],
    "ppo": [["ppo", {**SAMPLING, "samples": 2, "ppo_epochs": 2}]],
    "online_dpo": [["online_dpo", SAMPLING]],
    "grpo num_iterations 2": [["grpo", {**SAMPLING, "num_generations": 4, "num_iterations": 2, "beta": 0.04}]],
    "prm": [["prm", {"data": "polm:arithmetic-steps"}]],
    "distill": [["distill", {"data": "polm:arithmetic", "student": {"num_hidden_layers": 1}}]],
    "prune wanda + mlp, recovery": [["prune", {"data": "polm:arithmetic", "sparsity": 0.5, "mlp_fraction": 0.25,
                                               "calibration_rows": 8}]],
    "align": [["align", {"data": "polm:shapes-captions", **IMAGE}]],
    "multimodal sft": [ALIGN, ["sft", {"data": "polm:shapes"}]],
    "multimodal grpo": [ALIGN, ["grpo", {"data": "polm:shapes", "rewards": {"length": 1.0}, "max_new_tokens": 4,
                                         "num_generations": 4}]],
}
KILL_STEPS = (2, 5)
DEFAULT_SUITE = {("align", 5), ("multimodal sft", 5), ("prm", 2)}


def _records(stage_dir: Path) -> list[dict]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if not key.endswith("_per_s")} for line in lines]


@pytest.mark.parametrize("case, kill_step", [
    pytest.param(case, step, marks=() if (case, step) in DEFAULT_SUITE else pytest.mark.slow)
    for case in STAGES for step in KILL_STEPS])
def test_a_run_killed_at_any_step_resumes_to_the_uninterrupted_result(model_dir, tmp_path, case, kill_step):
    stages = [[name, {**COMMON, **options}] for name, options in STAGES[case]]
    pipeline = polm.Pipeline(str(model_dir), seed=0)
    for name, options in stages:
        pipeline.add(name, **options)
    pipeline.run(tmp_path / "whole")
    stage_dir = f"{len(stages) - 1:02d}-{stages[-1][0]}"
    spec = {"model": str(model_dir), "stages": stages, "run_dir": str(tmp_path / "split")}

    killed = run_in_child(tmp_path, {**spec, "kill_at": [stage_dir, kill_step], "resume": False})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    checkpoints = sorted(path.name for path in (tmp_path / "split" / stage_dir).glob("checkpoint-*"))
    assert checkpoints == ([] if kill_step < 3 else ["checkpoint-000003"])
    resumed = run_in_child(tmp_path, {**spec, "kill_at": None, "resume": True})
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    expected, actual = final_tensors(tmp_path / "whole"), final_tensors(tmp_path / "split")
    assert actual.keys() == expected.keys() and expected
    different = [key for key, tensor in expected.items() if not tensor.equal(actual[key])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"
    for index in range(len(stages)):
        folder = f"{index:02d}-{stages[index][0]}"
        assert _records(tmp_path / "split" / folder) == _records(tmp_path / "whole" / folder), folder

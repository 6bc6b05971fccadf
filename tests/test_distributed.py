"""Several processes: the same pipeline on 2 CPU processes (``torchrun``, gloo) as on one.

Each run is a child ``python -m torch.distributed.run --nproc_per_node 2`` (or a plain child for one process)
running :data:`CHILD` on a tiny random-init Llama saved to a folder, so this file takes tens of seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CHILD = """
import atexit, json, os, signal, sys
import torch
# Registered first, so it runs last: whether the process group outlived polm's own exit handler. One write
# call, so that the two processes' lines do not interleave in the shared pipe (print writes its parts apart).
atexit.register(lambda: os.write(1, f"PROCESS GROUP AT EXIT {torch.distributed.is_initialized()}\\n".encode()))
spec = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(1)
import polm

class RankReward:
    @polm.hookimpl
    def polm_register_rewards(self, register):
        def rank_dependent(prompts, completions, **fields):
            if int(os.environ.get("RANK", "0")) == 1:  # every group of rank 1 ties: dynamic sampling drops them
                return [1.0] * len(completions)
            return [float(len(completion)) for completion in completions]
        register("rank_dependent", rank_dependent)

polm.plugin_manager().register(RankReward(), name="test-distributed")

def on_log(record):
    if record["step"] == spec["kill_at"] and "loss" in record:
        os.killpg(os.getpgid(0), signal.SIGKILL)  # this rank's process group; the launcher then stops the other

pipeline = polm.Pipeline(spec["model"], seed=0)
for name, options in spec["stages"]:
    pipeline.add(name, **options)
pipeline.run(spec["run_dir"], resume=spec["resume"], on_log=on_log)
print("RUN DONE", flush=True)
"""


def _run(tmp_path: Path, name: str, spec: dict, processes: int) -> subprocess.CompletedProcess:
    spec_file = tmp_path / f"{name}.json"
    spec_file.write_text(json.dumps({"kill_at": 0, "resume": False, **spec}))
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                 "--master_port", str(29500 + os.getpid() % 1000)] if processes > 1 else [sys.executable])
    return subprocess.run([*launcher, str(child), str(spec_file)], capture_output=True, text=True, timeout=300,
                          check=False, start_new_session=True,
                          env={**os.environ, "POLM_DISABLE_PLUGIN_AUTOLOAD": "1", "OMP_NUM_THREADS": "1"})


def _weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(next((stage_dir / "final").glob("*.safetensors")))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


def _losses(stage_dir: Path) -> list[tuple[int, float]]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["loss"]) for record in map(json.loads, lines) if "loss" in record]


def test_sft_then_dpo_on_two_processes_matches_one_process_at_the_same_global_batch(model_dir, arithmetic,
                                                                                     tmp_path):
    """2 processes x 4 rows against 1 x 8: both stages run (one process group for the whole pipeline), each
    step is logged once with the losses of all 8 rows, and the final weights agree. sft's token-level loss is
    normalised over both processes' label tokens: equal within 1e-5 (measured 5.8e-7 with polm-tiny). dpo's
    logged losses agree to float rounding; its weights are held to 1e-4, because AdamW's first steps move a
    weight whose gradient is rounding noise by about lr either way (measured 2.7e-5 with polm-tiny at lr 2e-5)."""
    rows, _ = arithmetic
    pairs = [{"prompt": row["prompt"], "chosen": row["answer"], "rejected": str(int(row["answer"]) + 1)}
             for row in rows]
    common = {"max_steps": 4, "lr": 1e-3, "eval_size": 0, "log_every": 1}

    def spec(batch_size: int, run: str) -> dict:
        return {"model": str(model_dir), "run_dir": str(tmp_path / run),
                "stages": [("sft", {"data": rows, "batch_size": batch_size, **common}),
                           ("dpo", {"data": pairs, "batch_size": batch_size, **common, "lr": 2e-5})]}

    two = _run(tmp_path, "two", spec(4, "two"), processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("RUN DONE") == 2, "both processes finished the pipeline"
    # Left to the interpreter's teardown, gloo's threads can abort a process after a run that succeeded.
    assert two.stdout.count("PROCESS GROUP AT EXIT False") == 2, "each process destroyed its group at exit"
    one = _run(tmp_path, "one", spec(8, "one"), processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    for stage, tolerance in (("00-sft", 1e-5), ("01-dpo", 1e-4)):
        logged_two, logged_one = _losses(tmp_path / "two" / stage), _losses(tmp_path / "one" / stage)
        assert [step for step, _ in logged_two] == [1, 2, 3, 4], "one record per step, from the main process"
        assert [loss for _, loss in logged_two] == pytest.approx([loss for _, loss in logged_one], rel=1e-5), stage
        difference = _max_difference(_weights(tmp_path / "two" / stage), _weights(tmp_path / "one" / stage))
        assert difference <= tolerance, f"{stage}: 2 x 4 and 1 x 8 differ by {difference:.1e}"


def test_a_run_killed_on_two_processes_resumes_there_exactly(model_dir, arithmetic, tmp_path):
    """SIGKILL of the main process when step 3 is logged (the launcher then stops the other; checkpoint 2
    holds each rank's RNG state). ``resume`` on 1 process is refused, naming the count; on 2 processes every
    final tensor equals the uninterrupted 2-process run's."""
    rows, _ = arithmetic
    options = {"data": rows, "batch_size": 4, "max_steps": 5, "lr": 1e-3, "eval_size": 0, "log_every": 1,
               "save_every": 2}
    spec = {"model": str(model_dir), "stages": [("sft", options)]}
    whole = _run(tmp_path, "whole", {**spec, "run_dir": str(tmp_path / "whole")}, processes=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    split = {**spec, "run_dir": str(tmp_path / "split")}
    killed = _run(tmp_path, "killed", {**split, "kill_at": 3}, processes=2)
    assert killed.returncode != 0 and "RUN DONE" not in killed.stdout, killed.stderr[-3000:]
    checkpoint = tmp_path / "split" / "00-sft" / "checkpoint-000002"
    assert sorted(path.name for path in checkpoint.glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    one = _run(tmp_path, "one", {**split, "resume": True}, processes=1)  # another count cannot continue it
    assert one.returncode != 0 and "written by 2 process(es) and this run has 1" in one.stderr, one.stderr[-3000:]
    resumed = _run(tmp_path, "resumed", {**split, "resume": True}, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, actual = _weights(tmp_path / "whole" / "00-sft"), _weights(tmp_path / "split" / "00-sft")
    assert all(torch.equal(actual[key], tensor) for key, tensor in expected.items())
    assert _losses(tmp_path / "split" / "00-sft") == _losses(tmp_path / "whole" / "00-sft")


def test_grpo_finishes_when_one_process_drops_all_its_groups(model_dir, arithmetic, tmp_path):
    """DAPO's dynamic sampling on 2 processes, every group of rank 1 tied (its reward is constant): rank 1
    still takes part in each backward pass (a zero loss over every parameter), so the run ends instead of
    waiting for ever; the logged share of kept groups is at most rank 0's half."""
    rows, _ = arithmetic
    options = {"data": rows[:8], "rewards": {"rank_dependent": 1.0}, "objective": "dapo", "batch_size": 2,
               "num_generations": 2, "max_new_tokens": 4, "max_steps": 2, "eval_size": 0, "log_every": 1}
    run = _run(tmp_path, "grpo", {"model": str(model_dir), "run_dir": str(tmp_path / "grpo"),
                                  "stages": [("grpo", options)]}, processes=2)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "grpo" / "00-grpo" / "metrics.jsonl").read_text().splitlines()]
    kept = [record["groups_kept"] for record in records if "groups_kept" in record]
    assert len(kept) == 2 and all(share <= 0.5 for share in kept), kept  # rank 1 kept none of its groups


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_an_fsdp_or_deepspeed_launch_is_refused_before_anything_is_written(model_dir, tmp_path, variable):
    """``accelerate launch`` with an FSDP or DeepSpeed config sets these switches; polm, which drives DDP only,
    exits 2 with one line naming the config to use instead, and writes nothing."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\nstages:\n  - name: sft\n    data: polm:arithmetic\n    max_steps: 1\n")
    run = subprocess.run([sys.executable, "-m", "polm.engine.cli", "run", str(recipe), "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, check=False, env={**os.environ, variable: "true"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert "does not drive" in run.stderr and "examples/accelerate/multi_gpu.yaml" in run.stderr
    assert not (tmp_path / "out").exists()


def test_the_shipped_accelerate_config_is_a_two_process_data_parallel_launch():
    """``examples/accelerate/multi_gpu.yaml`` parses with accelerate's own loader as DDP on 2 processes (the README's
    command; run here on CPU it trains as ``torchrun --nproc_per_node 2``)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[1] / "examples" / "accelerate" / "multi_gpu.yaml"))
    assert (config.distributed_type.value, config.num_processes, config.use_cpu) == ("MULTI_GPU", 2, False)

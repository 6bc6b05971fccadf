"""The training loop: the SFT loss, checkpoints that load with plain transformers, exact resume."""

from __future__ import annotations

import copy
import json
import math
import re
import threading

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, AutoTokenizer

import polm
from polm.engine.encoding import IGNORE_INDEX
from polm.engine.lm import completion_loss
from polm.engine.trainer import optimizer_groups
from tests.helpers import registered


def test_completion_loss_matches_hand_computation():
    """Cross-entropy over labelled next tokens only.

    Vocabulary 2, one sequence of 3 positions, labels [-100, 0, 1]:
    position 0 predicts label[1]=0 with logits (0, 0): loss ln 2;
    position 1 predicts label[2]=1 with logits (ln 3, 0): p(1) = 1/4, loss ln 4;
    position 2 predicts nothing. Mean over the two labelled targets: (ln 2 + ln 4) / 2 = 1.5 ln 2.
    Greedy hits: position 0 argmax is 0 (tie -> first) = target 0; position 1 argmax 0 != 1: accuracy 1/2.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]], requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    loss, metrics = completion_loss(logits, labels)
    torch.testing.assert_close(loss, torch.tensor(1.5 * math.log(2.0)))
    assert metrics["token_accuracy"] == 0.5 and metrics["label_tokens"] == 2
    loss.backward()
    # d loss / d logits at position 1 = (softmax - onehot(1)) / 2 = ((3/4, 1/4) - (0, 1)) / 2
    torch.testing.assert_close(logits.grad[0, 1], torch.tensor([0.375, -0.375]))
    torch.testing.assert_close(logits.grad[0, 2], torch.zeros(2))


def _two_stage_pipeline(model, tokenizer, rows, test_rows):
    return (
        polm.Pipeline(model, tokenizer=tokenizer, seed=3)
        .add("sft", data=rows, eval_data=test_rows, max_steps=4, batch_size=4, lr=3e-3, eval_size=4,
             max_new_tokens=2)
        .add("sft", data=rows, eval_data=test_rows, max_steps=7, batch_size=4, grad_accum=2, lr=3e-3,
             warmup_ratio=0.2, log_every=1, eval_size=4, max_new_tokens=2)
    )


def test_interrupted_then_resumed_run_equals_uninterrupted_run(random_model, tokenizer, arithmetic, tmp_path):
    """Stop the second stage after step 3, resume: every weight equals the uninterrupted run's, bit for bit."""
    rows, test_rows = arithmetic
    straight = _two_stage_pipeline(copy.deepcopy(random_model), tokenizer, rows, test_rows).run(tmp_path / "straight")

    stop = threading.Event()

    def stop_at_step_3(record):
        if record["stage_dir"] == "01-sft" and record["step"] == 3:
            stop.set()

    first = _two_stage_pipeline(copy.deepcopy(random_model), tokenizer, rows, test_rows).run(
        tmp_path / "resumed", on_log=stop_at_step_3, stop=stop)
    assert first.interrupted and first.stages[1].interrupted
    assert (tmp_path / "resumed" / "01-sft" / "checkpoint-000003").is_dir()
    assert not (tmp_path / "resumed" / "01-sft" / "final").exists()

    resumed = _two_stage_pipeline(copy.deepcopy(random_model), tokenizer, rows, test_rows).run(
        tmp_path / "resumed", resume=True)
    assert not resumed.interrupted

    expected = AutoModelForCausalLM.from_pretrained(straight.checkpoint).state_dict()
    actual = AutoModelForCausalLM.from_pretrained(resumed.checkpoint).state_dict()
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"tensors differ after resume: {different}"
    # The resumed metrics log has each step once, as the uninterrupted one does.
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed/01-sft/metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 8))


def test_resumed_run_differs_when_not_resumed_from_checkpoint(random_model, tokenizer, arithmetic, tmp_path):
    """The equality above is not vacuous: another seed gives other weights."""
    rows, test_rows = arithmetic
    one = _two_stage_pipeline(copy.deepcopy(random_model), tokenizer, rows, test_rows).run(tmp_path / "a")
    other = _two_stage_pipeline(copy.deepcopy(random_model), tokenizer, rows, test_rows)
    other.seed = 4
    two = other.run(tmp_path / "b")
    first = AutoModelForCausalLM.from_pretrained(one.checkpoint).state_dict()
    second = AutoModelForCausalLM.from_pretrained(two.checkpoint).state_dict()
    assert any(not torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("option", ["lr", "max_grad_norm", "warmup_ratio"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_option_values_are_refused_when_the_stage_is_added(option, value):
    """YAML's .inf and .nan pass as floats; each is refused with one line naming the option (a NaN
    max_grad_norm used to turn clipping off silently)."""
    with pytest.raises(polm.PolmError, match=rf"option '{option}' must be a finite number, got {value}"):
        polm.Pipeline("polm-tiny").add("sft", data="polm:arithmetic", **{option: value})


def test_a_loss_that_is_not_finite_stops_the_stage_before_it_is_applied(random_model, tokenizer, arithmetic,
                                                                        tmp_path):
    """lr 1e30 without clipping: the first updates overflow the weights and within a few steps the loss is
    not finite (step 3 here). The stage stops at that step, names it and the newest checkpoint (the step
    before: a checkpoint every step), and writes no final model."""
    rows, _ = arithmetic
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer, seed=0).add(
        "sft", data=rows, max_steps=6, batch_size=4, lr=1e30, max_grad_norm=0, eval_size=0, save_every=1)
    with pytest.raises(polm.PolmError, match=r"the loss is not finite at step \d+ ") as raised:
        pipeline.run(tmp_path / "run")
    step, checkpoint = re.search(r"at step (\d+) .*checkpoint-(\d+)", str(raised.value)).groups()
    assert int(checkpoint) == int(step) - 1 < 5
    assert not (tmp_path / "run" / "00-sft" / "final").exists()


class _NaNAtSteps:
    """A language-modelling objective plugin: the completion loss, made NaN at the given training steps (its
    calls on batches of more than one row; the engine's option check calls it once on a one-row sample)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.step = steps, 0

    @polm.hookimpl
    def polm_register_objectives(self, register):
        register("nan_at_steps", self.loss, family="language_modelling", description="NaN on chosen steps")

    def loss(self, logits, labels):
        self.step += logits.shape[0] > 1
        loss, metrics = completion_loss(logits, labels)
        return (loss * float("nan") if self.step in self.steps and logits.shape[0] > 1 else loss), metrics


def test_nonfinite_loss_skip_drops_those_steps_counts_them_and_finishes(random_model, tokenizer, arithmetic, tmp_path):
    """With ``nonfinite_loss: skip`` an objective whose loss is NaN at steps 2 and 4 of 6: the stage finishes,
    no weight turns non-finite, each record logs a finite loss, and the last counts skipped_steps 2. Without
    it the same run stops at step 2."""
    rows, _ = arithmetic
    options = {"data": rows, "max_steps": 6, "batch_size": 4, "eval_size": 0, "log_every": 1,
               "objective": "nan_at_steps", "lr": 1e-3}
    with registered(_NaNAtSteps({2, 4}), "nan-at-steps"):
        with pytest.raises(polm.PolmError, match="the loss is not finite at step 2 .*set nonfinite_loss: skip"):
            polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer).add("sft", **options).run(tmp_path / "stop")
    with registered(_NaNAtSteps({2, 4}), "nan-at-steps"):
        result = polm.Pipeline(copy.deepcopy(random_model), tokenizer=tokenizer).add(
            "sft", nonfinite_loss="skip", **options).run(tmp_path / "skip")
    weights = AutoModelForCausalLM.from_pretrained(result.checkpoint).state_dict()
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    records = [json.loads(line) for line in (tmp_path / "skip/00-sft/metrics.jsonl").read_text().splitlines()]
    assert [record.get("skipped_steps", 0) for record in records] == [0, 1, 1, 2, 2, 2]
    assert all(math.isfinite(record["loss"]) for record in records if "loss" in record)
    assert "loss" not in records[1] and "loss" not in records[3]  # a window of only skipped steps has no loss


class _WritesAMarker:
    """Unpickling this would create the marker file: what a malicious optimizer.pt could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_resume_refuses_a_checkpoint_file_that_would_run_code(random_model, tokenizer, arithmetic, tmp_path):
    """A checkpoint's optimizer.pt replaced by a pickle that would write a file, its manifest updated to match
    (a crafted checkpoint, not a damaged one): --resume stops with one line naming the file, and the file is
    never written (the state loads with weights_only)."""
    rows, _ = arithmetic
    stop = threading.Event()
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer, seed=0).add(
        "sft", data=rows, max_steps=4, batch_size=4, eval_size=0, log_every=1, save_every=2)
    pipeline.run(tmp_path / "run", on_log=lambda record: record["step"] == 2 and stop.set(), stop=stop)
    marker, checkpoint = tmp_path / "marker", tmp_path / "run" / "00-sft" / "checkpoint-000002"
    torch.save(_WritesAMarker(marker), checkpoint / "optimizer.pt")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"]["optimizer.pt"] = (checkpoint / "optimizer.pt").stat().st_size
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(polm.PolmError, match=r"optimizer.pt: refused, it holds more than tensors") as raised:
        pipeline.run(tmp_path / "run", resume=True)
    assert "\n" not in str(raised.value)
    assert not marker.exists()


def test_sft_checkpoint_loads_with_plain_transformers_and_generates(random_model, tokenizer, arithmetic, tmp_path):
    """The final folder is a Hugging Face checkpoint: same logits, and it generates."""
    rows, test_rows = arithmetic
    result = polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows, eval_data=test_rows, max_steps=3, batch_size=4, eval_size=2, max_new_tokens=2
    ).run(tmp_path / "run")
    trained = result.stages[0]
    loaded = AutoModelForCausalLM.from_pretrained(trained.checkpoint)
    loaded_tokenizer = AutoTokenizer.from_pretrained(trained.checkpoint)
    assert (trained.checkpoint / "model.safetensors").is_file()
    ids = loaded_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
    random_model.eval()
    torch.testing.assert_close(loaded(**ids).logits, random_model(**ids).logits)
    output = loaded.generate(**ids, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > ids["input_ids"].shape[1]


def test_training_lowers_the_loss_and_logs_metrics(random_model, tokenizer, arithmetic, tmp_path):
    """Fifty steps on a fixed batch lower the SFT loss; metrics.jsonl holds loss, lr and tokens/s."""
    rows, _ = arithmetic
    polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows[:8], max_steps=50, batch_size=8, lr=3e-3, log_every=10, eval_size=0
    ).run(tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run/00-sft/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "token_accuracy"} <= records[0].keys()
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], (records[0]["loss"], records[-1]["loss"])


def test_output_folder_of_another_run_is_not_overwritten(random_model, tokenizer, arithmetic, tmp_path):
    """Running into a non-empty folder without resume fails before writing anything."""
    rows, _ = arithmetic
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer).add("sft", data=rows, max_steps=1, eval_size=0)
    with pytest.raises(polm.PolmError, match="not empty"):
        pipeline.run(tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_weight_decay_shrinks_weight_matrices_but_not_norm_weights(random_model):
    """One AdamW step on zero gradients at lr 0.1 and weight_decay 0.5 scales every weight matrix (and the
    embedding) by 1 - 0.1 x 0.5 = 0.95 and leaves the RMSNorm weights, the Llama's only 1-D tensors, as
    they were."""
    before = {name: parameter.detach().clone() for name, parameter in random_model.named_parameters()}
    optimizer = torch.optim.AdamW(optimizer_groups(list(random_model.parameters()), 0.5), lr=0.1)
    for parameter in random_model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    not_decayed = {name for name, parameter in random_model.named_parameters() if parameter.dim() < 2}
    assert not_decayed and all("norm" in name for name in not_decayed), not_decayed
    for name, parameter in random_model.named_parameters():
        assert_close(parameter.detach(), before[name] if name in not_decayed else 0.95 * before[name])


def test_the_training_loop_decays_only_weight_matrices(random_model, tokenizer, arithmetic, tmp_path):
    """The optimizer a stage checkpoints holds two groups: the matrices at the stage's weight_decay, the rest at 0."""
    rows, _ = arithmetic
    polm.Pipeline(random_model, tokenizer=tokenizer).add(
        "sft", data=rows, max_steps=2, save_every=1, batch_size=4, eval_size=0, weight_decay=0.1,
    ).run(tmp_path / "run")
    groups = torch.load(tmp_path / "run/00-sft/checkpoint-000001/optimizer.pt", weights_only=False)["param_groups"]
    matrices = sum(parameter.dim() >= 2 for parameter in random_model.parameters())
    assert [(group["weight_decay"], len(group["params"])) for group in groups] == [
        (0.1, matrices), (0.0, len(list(random_model.parameters())) - matrices)]


@pytest.mark.parametrize("packing", [False, True])
def test_sft_at_batch_8_and_at_batch_4_with_grad_accum_2_gives_the_same_gradient(random_model, tokenizer, arithmetic,
                                                                                 tmp_path, packing):
    """One step of 8 rows as one micro-batch and as two of 4: each micro-batch's mean over its label tokens
    weighs its share of the step's label tokens, so the gradient is that of one mean over all 8 rows (as
    transformers' Trainer divides by the step's label tokens). The two halves differ in label tokens, so the
    plain average of their means, what grad_accum gave before, is checked to differ.

    Over ten steps of polm-tiny on polm:arithmetic (lr 1e-3) the final weights of batch 8 and 4 x 2 differ by
    at most 3.9e-6 at seed 0 and 2.5e-5 at seed 3 (AdamW amplifies float rounding where a gradient is near
    zero), against 6.6e-3 before, for an update of 5.5e-3.
    """
    from polm.engine.trainer import SupervisedSteps, make_accelerator

    layout = {"packing": True, "max_length": 40} if packing else {}  # packs of a few rows each
    stage = polm.Pipeline(random_model, tokenizer=tokenizer).add("sft", data=arithmetic[0], **layout).stages[0]
    task = stage.training_task(tokenizer)
    accelerator = make_accelerator("no", tmp_path)
    parameters = list(random_model.parameters())

    def gradients(micro_batches: list[list]) -> list[torch.Tensor]:
        steps = SupervisedSteps(task, accelerator)
        for parameter in parameters:
            parameter.grad = None
        steps.prepare(random_model, micro_batches)
        for micro in range(len(micro_batches)):
            steps.loss(random_model, micro)[0].backward()
        return [parameter.grad.clone() for parameter in parameters]

    by_tokens = sorted(task.rows[:16], key=lambda row: task.weigh(task.collate([row])))
    rows = by_tokens[:4] + by_tokens[-4:]  # the shortest four, then the longest four
    whole = gradients([rows])
    halves = gradients([rows[:4], rows[4:]])
    scale = max(float(grad.abs().max()) for grad in whole)
    for half, full in zip(halves, whole):
        assert_close(half, full, rtol=1e-4, atol=1e-6 * scale)
    first, second = (task.weigh(task.collate(part)) for part in (rows[:4], rows[4:]))
    assert first != second, "the halves must differ in label tokens for the check to tell"
    for parameter in parameters:
        parameter.grad = None
    for part in (rows[:4], rows[4:]):
        (task.compute_loss(random_model, task.collate(part))[0] / 2).backward()
    with pytest.raises(AssertionError):
        for averaged, full in zip((parameter.grad for parameter in parameters), whole):
            assert_close(averaged, full, rtol=1e-4, atol=1e-6 * scale)


def test_sigterm_checkpoints_and_resume_equals_the_uninterrupted_run(model_dir, tmp_path):
    """``polm run`` sent SIGTERM (a scheduler's preemption) once step 3 is logged: it checkpoints after the step
    in progress and exits 143; ``--resume`` then ends with the weights of an uninterrupted run, bit for bit."""
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {model_dir}\nseed: 0\nstages:\n  - name: sft\n    data: polm:arithmetic\n"
                      "    max_steps: 20\n    batch_size: 4\n    eval_size: 0\n    log_every: 1\n")
    command = [sys.executable, "-m", "polm.engine.cli", "run", str(recipe), "--output"]
    whole = subprocess.run([*command, str(tmp_path / "whole")], capture_output=True, text=True, timeout=300,
                           check=False)
    assert whole.returncode == 0, whole.stderr[-2000:]
    metrics = tmp_path / "split" / "00-sft" / "metrics.jsonl"
    run = subprocess.Popen([*command, str(tmp_path / "split")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert run.poll() is None, run.stderr.read()[-2000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 143 and "continue with" in stderr, stderr[-2000:]
    assert list((tmp_path / "split" / "00-sft").glob("checkpoint-*"))
    resumed = subprocess.run([*command, str(tmp_path / "split"), "--resume"], capture_output=True, text=True,
                             timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = load_file(tmp_path / "whole" / "00-sft" / "final" / "model.safetensors")
    actual = load_file(tmp_path / "split" / "00-sft" / "final" / "model.safetensors")
    assert all(torch.equal(actual[key], value) for key, value in expected.items())


def test_keep_last_rotates_checkpoints_and_resume_uses_the_newest(random_model, tokenizer, arithmetic, tmp_path):
    """save_every 1 with keep_last 2 over 6 steps, stopped after step 5: only checkpoints 4 and 5 remain; a
    folder polm did not write (checkpoint-best) is ignored by --resume. transformers' name for the option,
    save_total_limit, points to it."""
    rows, _ = arithmetic
    stop = threading.Event()
    pipeline = polm.Pipeline(random_model, tokenizer=tokenizer, seed=0).add(
        "sft", data=rows, max_steps=6, batch_size=4, eval_size=0, log_every=1, save_every=1, keep_last=2)
    pipeline.run(tmp_path / "run", on_log=lambda record: record["step"] == 5 and stop.set(), stop=stop)
    kept = sorted(path.name for path in (tmp_path / "run" / "00-sft").glob("checkpoint-*"))
    assert kept == ["checkpoint-000004", "checkpoint-000005"]
    (tmp_path / "run" / "00-sft" / "checkpoint-best").mkdir()
    assert not pipeline.run(tmp_path / "run", resume=True).interrupted
    with pytest.raises(polm.PolmError, match="unknown option 'save_total_limit'. Did you mean 'keep_last'?"):
        polm.Pipeline("polm-tiny").add("sft", data="polm:arithmetic", save_total_limit=2)


def test_the_package_loads_no_pickle_runs_no_remote_code_and_reads_yaml_safely():
    """A scan of polm's sources: no ``weights_only=False``, no ``pickle.load``, no ``yaml.load`` without the safe
    loader, no ``trust_remote_code=True``, and every ``torch.load`` asks for ``weights_only=True``."""
    from pathlib import Path

    unsafe = ("weights_only=False", "pickle.load", "pickle.loads", "yaml.load(", "yaml.unsafe_load", "FullLoader",
              "trust_remote_code=True")
    found = []
    for path in sorted(Path(polm.__file__).parent.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if any(text in line for text in unsafe) or ("torch.load(" in line and "weights_only=True" not in line):
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, found

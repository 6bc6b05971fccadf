"""The Accelerate training loop every training stage shares.

A stage gives the loop one of two tasks. A :class:`TrainingTask` has rows, a
``collate`` that turns a list of rows into a batch, a
``compute_loss(model, batch) -> (loss, metrics)`` and a ``weigh(batch)`` of
what that loss is a mean over (label tokens, rows). An :class:`OnPolicyTask`
(GRPO, PPO, online DPO, RFT) has prompt rows, a ``collect(model, rows) ->
RolloutBuffer`` that samples and scores without gradients, and a
``loss(model, micro_batch) -> (loss, metrics, tokens)``; the loop collects a
generation batch and makes the buffer's updates one optimizer step each.
Either way each optimizer step's loss is normalised over the whole step, every
micro-batch on every process, by those weights (see
:mod:`polm.engine.rl.on_policy`), so ``grad_accum`` and the process count change
the memory a step needs, not its gradient. The loop does the rest: data order,
gradient accumulation, clipping, the LR schedule, mixed precision where the device
supports it, periodic evaluation, progress, ``metrics.jsonl``, trackers,
checkpoints and exact resume.

Exact resume: the order of rows is a pure function of the seed and the epoch,
so a resumed run recomputes where it was instead of replaying the data; the
optimizer, scheduler and RNG states (of every process) and an on-policy
stage's unfinished rollout buffer are restored from the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object, is_tensorboard_available
from rich.progress import Progress, TextColumn
from transformers import get_scheduler

from polm.engine.checkpoint import (
    checkpoint_directory,
    latest_checkpoint,
    load_rollout_buffer,
    load_training_state,
    remove_stale_temporaries,
    rng_state,
    rotate_checkpoints,
    save_model,
    save_rollout_buffers,
    save_training_state,
)
from polm.engine.data import Row
from polm.engine.distributed import cpu_launch
from polm.engine.errors import PolmError
from polm.engine.log import progress_bar
from polm.engine.options import StageOptions
from polm.engine.rl.on_policy import Collect, MicroBatchLoss, OnPolicySteps, normalising_shares
from polm.engine.stage import StageContext, StageOutput
from polm.engine.tuning import tuning_method

Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, dict[str, float]]"]
METRICS_FILE = "metrics.jsonl"


@dataclass(kw_only=True)
class Task:
    """What every task gives the loop besides its losses.

    Attributes:
        rows: the training items (encoded examples, prompts, pairs, ...).
        evaluate: ``model -> held-out metrics``; called every ``eval_every`` steps and at the end.
        extra_parameters: trained with the model's (a value head); on several processes the loop averages
            their gradients, which no DDP wrapper does for them.
        save_state: ``folder -> None`` writes the stage's own state beyond the model (a value head) into each
            checkpoint folder; called by the main process only.
        load_state: ``folder -> None`` reads it back when a run resumes from that checkpoint.
        after_step: ``model -> None``, called after each optimizer step (after the tuning method's own
            ``after_step``) with the unwrapped model: what must hold of the weights throughout training, such
            as a pruned model's zeros, is restored here.
    """

    rows: Sequence[Any]
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None
    extra_parameters: Sequence[torch.nn.Parameter] = ()
    save_state: Callable[[Path], None] | None = None
    load_state: Callable[[Path], None] | None = None
    after_step: Callable[[torch.nn.Module], None] | None = None


@dataclass(kw_only=True)
class TrainingTask(Task):
    """What a stage that trains on its rows gives the loop (and ``rows``, ``evaluate``, ... of :class:`Task`).

    Attributes:
        collate: ``list of items -> batch``.
        compute_loss: ``(model, batch) -> (scalar loss, metrics)``: a mean over what ``weigh`` counts.
        weigh: ``batch -> float``, what the batch's loss is a mean over (its label tokens, for a token mean);
            by default its rows. The loop scales each micro-batch's loss by its share of the weight of the
            whole optimizer step, all micro-batches on all processes (:func:`normalising_shares`), so that the
            step's gradient is that of one mean over all of it: batch 8 and batch 4 x ``grad_accum`` 2 (or 2
            processes x 4) give the same update.
        count_tokens: tokens in a batch for tokens/s; defaults to the attention mask's sum.
    """

    collate: Callable[[list[Any]], Batch]
    compute_loss: LossFn
    weigh: Callable[[Batch], float] | None = None
    count_tokens: Callable[[Batch], int] | None = None


@dataclass(kw_only=True)
class OnPolicyTask(Task):
    """What an on-policy stage gives the loop: it trains on samples of the policy it trains.

    ``rows`` are prompts. Each generation batch takes the prompts of the step that collects it (``batch_size``
    per micro-batch, ``grad_accum`` micro-batches, on each process); see :mod:`polm.engine.rl.on_policy`.

    Attributes:
        collect: ``(model, rows) -> RolloutBuffer``, called without gradients: sample, score, and compute what
            the updates compare against (advantages, reference and sampling-policy log-probs); the buffer lists
            its updates and weighs its samples for the loss normalisation.
        loss: ``(model, micro_batch) -> (loss, metrics, tokens)``: the micro-batch's loss reduced over its own
            samples as their weights say, its metrics, and the prompt and completion tokens trained (tokens/s).
    """

    collect: Collect
    loss: MicroBatchLoss


class SupervisedSteps:
    """A :class:`TrainingTask`'s micro-batches: each one collated from its rows, its loss scaled by its share of
    the step's weight (see :attr:`TrainingTask.weigh`).

    It answers the loop as :class:`~polm.engine.rl.on_policy.OnPolicySteps` does: ``prepare`` with the rows of a
    step's micro-batches, ``loss`` of each micro-batch, and ``state`` / ``load_state`` for checkpoints (none here).
    """

    def __init__(self, task: TrainingTask, accelerator: Accelerator) -> None:
        self.task = task
        self.accelerator = accelerator
        self.count_tokens = task.count_tokens or (lambda batch: int(batch["attention_mask"].sum()))
        self.batches: list[Batch] = []
        self.shares: list[float] = []

    def prepare(self, model: torch.nn.Module, micro_batch_rows: list[list[Row]]) -> dict[str, float]:
        """Collate the step's micro-batches and weigh them (all before the first backward pass needs its share)."""
        device = self.accelerator.device
        self.batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in self.task.collate(rows).items()}
                        for rows in micro_batch_rows]
        weigh = self.task.weigh
        weights = [float(weigh(batch)) if weigh else float(len(rows))
                   for batch, rows in zip(self.batches, micro_batch_rows)]
        self.shares = normalising_shares(weights, self.accelerator)
        return {}

    def loss(self, model: torch.nn.Module, micro: int) -> tuple[torch.Tensor, dict[str, float], int]:
        """Micro-batch ``micro`` of the step: ``(its loss scaled by its share, metrics, tokens)``."""
        batch = self.batches[micro]
        loss, metrics = self.task.compute_loss(model, batch)
        return loss * self.shares[micro], metrics, self.count_tokens(batch)

    def state(self) -> None:
        return None

    def load_state(self, state: None) -> None:
        pass


def resolve_mixed_precision(setting: str) -> str:
    """``auto`` means bf16 on a GPU that supports it and full fp32 elsewhere (the CPU)."""
    if setting != "auto":
        if setting in ("fp16", "bf16") and not torch.cuda.is_available():
            raise PolmError(f"mixed_precision '{setting}' needs a CUDA GPU; use 'auto' or 'no' on this machine")
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str, project_dir: Path) -> Accelerator:
    """An Accelerator for one stage; stages of one run may differ in precision."""
    precision = resolve_mixed_precision(mixed_precision)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state()  # the state is a process-wide singleton
    log_with = ["tensorboard"] if is_tensorboard_available() else None
    return Accelerator(mixed_precision=precision, log_with=log_with, project_dir=str(project_dir), cpu=cpu_launch())


def optimizer_groups(parameters: Sequence[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``weight_decay`` on weight matrices (and other tensors of two or more
    dimensions: embeddings, LoRA factors, resampler queries), none on biases, norm weights and scalar gates.

    Decaying a norm's gain or a bias pulls it towards zero, which is no regularisation of the function the
    model computes (transformers' Trainer and nanoGPT exclude them too; nanoGPT by the same dimension rule).
    Empty groups are left out.
    """
    decayed = [parameter for parameter in parameters if parameter.dim() >= 2]
    not_decayed = [parameter for parameter in parameters if parameter.dim() < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def total_steps(options: StageOptions, micro_batches_per_epoch: int) -> int:
    if options.max_steps:
        return options.max_steps
    return max(1, math.ceil(options.epochs * micro_batches_per_epoch / options.grad_accum))


def _stop_at_nonfinite_loss(name: str, step: int, loss: float, stage_dir: Path) -> None:
    """Stop the stage, before the optimizer applies anything of ``step``, whose loss is NaN or infinite on some
    process (each process calls this, having learnt it from all, so none waits at the next collective).

    Raises:
        PolmError: naming the step and the newest checkpoint to resume from.
    """
    checkpoint = latest_checkpoint(stage_dir)
    raise PolmError(f"{name}: the loss is not finite at step {step} (this process: {loss}); the step was not "
                    f"applied. Newest checkpoint: {checkpoint or 'none'}; lower lr or check the data, or set "
                    "nonfinite_loss: skip, then resume")


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """``flag`` of any process, known to all (a stop asked for on one, by SIGTERM or an event, stops every one
    after the same step, so they checkpoint together)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum").item() > 0)


class _RowOrder:
    """Which rows make micro-batch ``m``: a fresh permutation each epoch, seeded."""

    def __init__(self, n_rows: int, rows_per_micro_batch: int, seed: int) -> None:
        if n_rows == 0:
            raise PolmError("the training data is empty after encoding (every row longer than max_length?)")
        self.n_rows = n_rows
        self.size = min(rows_per_micro_batch, n_rows)
        self.per_epoch = n_rows // self.size  # the remainder is dropped; the next epoch reshuffles
        self.seed = seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def indices(self, micro_batch: int) -> list[int]:
        epoch, position = divmod(micro_batch, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(self.n_rows, generator=generator)
        return self._order[position * self.size : (position + 1) * self.size].tolist()


def _across_processes(accelerator: Accelerator, window: dict[str, list[float]], tokens: int,
                      elapsed: float) -> tuple[dict[str, float], float]:
    """The window's metrics averaged over every value of every process, and the tokens per second of all
    processes together: what ``metrics.jsonl`` logs (each process holds only its own shard's values)."""
    own = {key: (sum(values), len(values)) for key, values in window.items()}
    shards = gather_object([(own, tokens)]) if accelerator.num_processes > 1 else [(own, tokens)]
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for values, _ in shards:
        for key, (total, count) in values.items():
            sums[key][0] += total
            sums[key][1] += count
    speed = sum(count for _, count in shards) / elapsed if elapsed > 0 else 0.0
    return {key: total / count for key, (total, count) in sums.items()}, speed


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _drop_metrics_after(path: Path, step: int) -> None:
    """On resume, forget what the interrupted run logged after its checkpoint, and the half-written last line
    a kill can leave."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if _record_step(line) <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _record_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; infinite for one that does not parse (cut short by a kill)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _progress(name: str, enabled: bool) -> Progress:
    return progress_bar(name, enabled, TextColumn("loss {task.fields[loss]}"),
                        TextColumn("{task.fields[speed]} tok/s"))


def train(name: str, context: StageContext, options: StageOptions, task: TrainingTask | OnPolicyTask) -> StageOutput:
    """Train ``context.model`` on ``task`` following ``options``; see the module docstring."""
    stage_dir = context.stage_dir
    accelerator = make_accelerator(options.mixed_precision, stage_dir)
    torch.manual_seed(context.seed)
    model = context.model
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    trainable += list(task.extra_parameters)
    if not trainable:
        raise PolmError(f"stage '{name}': the tuning method left no trainable parameters")
    optimizer = torch.optim.AdamW(optimizer_groups(trainable, options.weight_decay), lr=options.lr)
    order = _RowOrder(len(task.rows), options.batch_size * accelerator.num_processes, context.seed)
    steps = total_steps(options, order.per_epoch)
    scheduler = get_scheduler(
        options.lr_scheduler, optimizer, num_warmup_steps=int(options.warmup_ratio * steps), num_training_steps=steps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    tuning = tuning_method(options)
    metrics_path = stage_dir / METRICS_FILE
    if isinstance(task, OnPolicyTask):
        source: SupervisedSteps | OnPolicySteps = OnPolicySteps(task.collect, task.loss, options.grad_accum,
                                                                 accelerator)
    else:
        source = SupervisedSteps(task, accelerator)

    start, skipped_steps = 0, 0  # skipped: steps whose loss was not finite, with nonfinite_loss: skip
    checkpoint = None
    if context.resume:
        if accelerator.is_main_process:
            remove_stale_temporaries(stage_dir)
        accelerator.wait_for_everyone()
        checkpoint = latest_checkpoint(stage_dir, report=accelerator.is_main_process)
    if checkpoint is not None:
        tuning.load_weights(accelerator.unwrap_model(model), checkpoint)
        state = load_training_state(checkpoint, optimizer, scheduler, accelerator.process_index)
        start, skipped_steps = state["step"], state.get("skipped_steps", 0)
        source.load_state(load_rollout_buffer(checkpoint, accelerator.process_index))
        if task.load_state is not None:
            task.load_state(checkpoint)
    if context.resume and accelerator.is_main_process:
        _drop_metrics_after(metrics_path, start)  # also when killed before the first checkpoint: start is 0
    if accelerator.log_with:
        accelerator.init_trackers(name)

    def save_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        rng_states, buffers = gather_object([rng_state()]), gather_object([source.state()])  # one per process
        if accelerator.is_main_process:
            with checkpoint_directory(stage_dir, step) as directory:
                save_model(accelerator.unwrap_model(model), context.tokenizer, directory)
                save_training_state(directory, step, optimizer, scheduler, rng_states,
                                    {"stage": name, "skipped_steps": skipped_steps})
                save_rollout_buffers(directory, buffers)
                if task.save_state is not None:
                    task.save_state(directory)
            rotate_checkpoints(stage_dir, options.keep_last)

    def log(record: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            _append_metrics(metrics_path, record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])
            if context.on_log is not None:
                context.on_log({"stage": name, "stage_dir": stage_dir.name, **record})

    def run_eval(step: int) -> dict[str, float]:
        if task.evaluate is None:
            return {}
        accelerator.wait_for_everyone()
        model.eval()
        with torch.no_grad():
            results = task.evaluate(accelerator.unwrap_model(model)) if accelerator.is_main_process else {}
        model.train()
        results = {f"eval/{key}": value for key, value in results.items()}
        if results:
            log({"step": step, **results})
        return results

    window: dict[str, list[float]] = defaultdict(list)
    window_tokens, window_start = 0, time.perf_counter()
    last_metrics: dict[str, float] = {}
    interrupted = False
    step = start
    with _progress(name, accelerator.is_main_process) as progress:
        bar = progress.add_task(name, total=steps, completed=start, loss="-", speed="-")
        model.train()
        try:
            while step < steps:
                micro_batch_rows = []
                for micro in range(options.grad_accum):
                    indices = order.indices(step * options.grad_accum + micro)
                    shard = indices[accelerator.process_index :: accelerator.num_processes] or indices
                    micro_batch_rows.append([task.rows[i] for i in shard])
                with accelerator.autocast():
                    collected = source.prepare(model, micro_batch_rows)
                for key, value in collected.items():
                    window[key].append(float(value))
                step_loss = 0.0  # this process's part of the step's normalised loss (averaged over processes: the loss)
                for micro in range(options.grad_accum):
                    sync = nullcontext() if micro == options.grad_accum - 1 else accelerator.no_sync(model)
                    with sync, accelerator.autocast():
                        scaled_loss, metrics, tokens = source.loss(model, micro)
                        accelerator.backward(scaled_loss)
                    step_loss += float(scaled_loss.detach())
                    for key, value in metrics.items():
                        window[key].append(float(value))
                    window_tokens += tokens
                if _any_process(accelerator, not math.isfinite(step_loss)):
                    if options.nonfinite_loss == "stop":
                        _stop_at_nonfinite_loss(name, step + 1, step_loss, stage_dir)
                    skipped_steps += 1  # no update: the gradients are dropped, the schedule moves on
                else:
                    window["loss"].append(step_loss)
                    if accelerator.num_processes > 1:
                        for parameter in task.extra_parameters:
                            if parameter.grad is not None:
                                parameter.grad = accelerator.reduce(parameter.grad, "mean")
                    if options.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainable, options.max_grad_norm)
                        window["grad_norm"].append(float(grad_norm))
                    optimizer.step()
                    tuning.after_step(accelerator.unwrap_model(model), step + 1, steps)
                    if task.after_step is not None:
                        task.after_step(accelerator.unwrap_model(model))
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                elapsed = time.perf_counter() - window_start
                speed = window_tokens * accelerator.num_processes / elapsed if elapsed > 0 else 0.0  # estimate
                losses = window.get("loss", [])  # get: indexing the defaultdict would log an empty loss
                progress.update(bar, advance=1, loss=f"{sum(losses) / len(losses):.4f}" if losses else "-",
                                speed=f"{speed:,.0f}")
                if step % options.log_every == 0 or step == steps:
                    last_metrics, speed = _across_processes(accelerator, window, window_tokens, elapsed)
                    log({"step": step, "epoch": step * options.grad_accum / order.per_epoch,
                         "lr": scheduler.get_last_lr()[0], "tokens_per_s": speed, **last_metrics,
                         **({"skipped_steps": skipped_steps} if skipped_steps else {})})
                    window.clear()
                    window_tokens, window_start = 0, time.perf_counter()
                if options.eval_every and step % options.eval_every == 0 and step < steps:
                    run_eval(step)
                if _any_process(accelerator, context.stop.is_set()) and step < steps:
                    save_checkpoint(step)
                    interrupted = True
                    break
                if options.save_every and (step % options.save_every == 0 or step == steps):
                    save_checkpoint(step)  # the last step's too: a larger max_steps continues from it
        except KeyboardInterrupt:
            if step > start:
                save_checkpoint(step)  # Ctrl-C keeps the work done; --resume continues from here
            raise
    final = {} if interrupted else run_eval(step)
    for tracker in accelerator.trackers:  # not end_training(): it destroys the process group the next stage needs
        tracker.finish()
    model = accelerator.unwrap_model(model)
    return StageOutput(model=model, metrics={**last_metrics, **final}, interrupted=interrupted)

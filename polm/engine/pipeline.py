"""Pipelines: a model and a list of stages, each starting from the previous stage's model."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState

from polm.engine.checkpoint import (
    CHECKPOINT_PREFIX,
    atomic_directory,
    checkpoint_processes,
    latest_checkpoint,
    save_model,
)
from polm.engine.data import file_stamps
from polm.engine.distributed import on_main_process, process_state, release_process_group_at_exit
from polm.engine.errors import PolmError
from polm.engine.models import FINAL_DIR, STAGE_FILE, load_model
from polm.engine.options import parse_options
from polm.engine.stage import Stage, StageContext
from polm.engine.tuning import is_peft

RUN_FILE = "run.json"
MERGED_DIR = "merged"


@dataclass
class StageResult:
    """One stage of a finished run.

    Attributes:
        name: the stage name.
        metrics: the final training metrics and held-out ``eval/...`` metrics.
        checkpoint: the folder with the stage's final model (loads with ``from_pretrained``).
        before: held-out metrics of the starting model, when the run evaluated it.
    """

    name: str
    metrics: dict[str, float]
    checkpoint: Path | None
    before: dict[str, float] | None = None
    interrupted: bool = False


@dataclass
class RunResult:
    """What :meth:`Pipeline.run` returns."""

    output_dir: Path
    stages: list[StageResult] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return any(stage.interrupted for stage in self.stages)

    @property
    def checkpoint(self) -> Path | None:
        """The last stage's final model."""
        return self.stages[-1].checkpoint if self.stages else None


def _parse_stage_options(name: str, options: dict[str, Any], position: int | None) -> Any:
    """The stage's options (its tuning method's parsed too), validated field by field but not yet checked as a
    whole (:meth:`Stage.check`)."""
    from polm.engine.plugins import registry

    where = f"stage {position} '{name}'" if position is not None else f"stage '{name}'"
    if not isinstance(name, str):
        raise PolmError(f"stage {position}: 'name' must be a string, got {name!r}")
    parsed = parse_options(where, registry("stages").get(name).Options, options)
    if hasattr(parsed, "tuning"):
        method = registry("tuning_methods").get(parsed.tuning)
        parsed.tuning_options = parse_options(f"{where} tuning '{parsed.tuning}'", method.Options,
                                              parsed.tuning_options)
    return parsed


def build_stage(name: str, options: dict[str, Any], position: int | None = None) -> Stage:
    """Look up a stage by name and validate its options (including the tuning method's).

    Raises:
        PolmError: unknown stage, unknown option, wrong type or invalid value.
    """
    from polm.engine.plugins import registry

    where = f"stage {position} '{name}'" if position is not None else f"stage '{name}'"
    parsed = _parse_stage_options(name, options, position)
    if hasattr(parsed, "tuning"):
        registry("tuning_methods").get(parsed.tuning).check(parsed.tuning_options)
    stage = registry("stages").get(name)(name, parsed)
    try:
        stage.check()
    except PolmError as error:
        raise PolmError(f"{where}: {error}") from None
    return stage


class Pipeline:
    """A post-training pipeline.

    Example::

        result = (
            polm.Pipeline("polm-tiny", seed=0)
            .add("sft", data="polm:arithmetic", max_steps=300, lr=1e-3)
            .run("runs/demo")
        )
        print(result.stages[0].metrics["eval/exact_match"])

    Args:
        model: a registered model name (``"polm-tiny"``), a Hugging Face id or
            local path, or a ``PreTrainedModel`` (then pass ``tokenizer``).
        tokenizer: the tokenizer for a model object; loaded with the model otherwise.
        seed: seeds data order, initialisation and sampling; stage ``i`` uses ``seed + i``.
    """

    def __init__(self, model: Any = "polm-tiny", tokenizer: Any = None, seed: int = 0) -> None:
        self.model_spec = model
        self.tokenizer = tokenizer
        self.seed = seed
        self.stages: list[Stage] = []
        self._raw: list[dict[str, Any]] = []

    def add(self, stage: str, **options: Any) -> Pipeline:
        """Append a stage; its options are validated now. Returns the pipeline for chaining."""
        if self.stages:
            from polm.engine.plugins import registry

            previous = self.stages[-1]
            if previous.terminal:
                raise PolmError(f"stage {len(self.stages)} '{stage}' cannot follow stage {len(self.stages) - 1} "
                                f"'{previous.name}', whose result is final (a quantized model is served, not "
                                f"trained); make '{previous.name}' the last stage")
            tuning = getattr(previous.options, "tuning", None)
            if tuning is not None and not registry("tuning_methods").get(tuning).mergeable:
                raise PolmError(
                    f"stage {len(self.stages)} '{stage}' cannot follow stage {len(self.stages) - 1} "
                    f"'{previous.name}' tuned with '{tuning}', whose virtual tokens cannot be merged into the "
                    "weights; make that stage the last one or tune it with lora"
                )
        self.stages.append(build_stage(stage, options, len(self.stages)))
        self._raw.append({"name": stage, **options})
        return self

    def describe(self) -> dict[str, Any]:
        """The recipe as ``run.json`` records it, with each stage's local data files stamped (size and
        modification time), so that a resume can tell a changed file."""
        model = self.model_spec if isinstance(self.model_spec, (str, Path)) else type(self.model_spec).__name__
        stamps: dict[str, dict[str, dict[str, list[int]]]] = {}
        for index, stage in enumerate(self.stages):
            files = {option: file_stamps(getattr(stage.options, option, None)) for option in DATA_OPTIONS}
            if any(files.values()):
                stamps[str(index)] = {option: found for option, found in files.items() if found}
        return {"model": str(model), "seed": self.seed, "stages": self._raw, "data_files": stamps}

    def run(
        self,
        output_dir: str | Path,
        resume: bool = False,
        evaluate_before: bool = False,
        on_log: Callable[[dict[str, Any]], None] | None = None,
        stop: threading.Event | None = None,
        accept_changes: bool = False,
        overwrite: bool = False,
    ) -> RunResult:
        """Run every stage, writing checkpoints and metrics under ``output_dir``.

        Args:
            resume: continue an interrupted run in ``output_dir``: finished
                stages are reloaded, the current one continues from its newest
                checkpoint at the same step, data order and RNG state.
            evaluate_before: also evaluate each stage's starting model (the
                "before" column of ``polm quickstart``).
            on_log: receives every metrics record as it is written.
            stop: set it (from another thread) to checkpoint and return early; SIGTERM sets it too, when the
                run is in the main thread (see :func:`checkpoint_on_sigterm`).
            accept_changes: with ``resume``, go on even if this pipeline's recipe differs from the run's
                (``run.json`` then records this one). Without it such a resume is refused, naming each
                difference, except for the changes a resume may make (:data:`CHANGEABLE_ON_RESUME`, and a
                larger ``max_steps`` of a constant-schedule stage, which then trains exactly the extra steps).
            overwrite: replace the polm run in ``output_dir`` (a folder with ``run.json``); a folder that holds
                anything else is never deleted.

        Raises:
            PolmError: before anything is written, if the folder holds another run and ``resume`` is false,
                the folder's run differs from this one (see ``accept_changes``), a stage's data holds a bad row,
                or the first stage's inputs do not suit the model (:meth:`Stage.check_inputs`); a later stage
                checks its inputs at its start.
        """
        if not self.stages:
            raise PolmError("the pipeline has no stages; add one with Pipeline.add('sft', data=...)")
        output_dir = Path(output_dir)
        if output_dir.exists() and not output_dir.is_dir():
            raise PolmError(f"output folder {output_dir} is a file; choose another --output")
        processes = process_state()  # one per device under `accelerate launch`; only the main one writes
        existed = output_dir.exists()
        if resume and overwrite:
            raise PolmError("--resume continues the run in the folder and --overwrite replaces it; pass one of them")
        on_main_process(lambda: self._claim(output_dir, resume, processes.num_processes, accept_changes, overwrite,
                                            write=False), processes)
        on_main_process(lambda: [stage.check_rows() for stage in self.stages], processes)
        claimed = False

        def claim() -> None:  # once the first stage has checked its inputs, nothing wrong was found to write
            nonlocal claimed
            on_main_process(lambda: self._claim(output_dir, resume, processes.num_processes, accept_changes,
                                                overwrite, write=True), processes)
            claimed = True

        stop = stop or threading.Event()
        try:
            with checkpoint_on_sigterm(stop):
                result = self._run_stages(output_dir, resume, evaluate_before, on_log, stop, processes, claim)
        except BaseException:
            if claimed and not resume and processes.is_main_process:
                _discard_if_nothing_kept(output_dir, existed)
            raise
        release_process_group_at_exit()
        return result

    def _run_stages(self, output_dir: Path, resume: bool, evaluate_before: bool,
                    on_log: Callable[[dict[str, Any]], None] | None, stop: threading.Event,
                    processes: PartialState, claim: Callable[[], None]) -> RunResult:
        """The stages in order; ``claim`` writes the run's folder, called once the first stage has checked its
        inputs, so that nothing is written for a run that cannot start."""
        model, tokenizer = load_model(self.model_spec, self.tokenizer)
        result = RunResult(output_dir)
        for index, stage in enumerate(self.stages):
            stage_dir = output_dir / f"{index:02d}-{stage.name}"
            final_dir = stage_dir / FINAL_DIR
            before = stage.evaluate(model, tokenizer) if evaluate_before else None
            torch.manual_seed(self.seed + index)  # adapters initialise from the pipeline seed
            model = stage.prepare(model)
            finished = resume and (final_dir / STAGE_FILE).is_file() and not _extended(stage, final_dir)
            if not finished:
                on_main_process(functools.partial(stage.check_inputs, model), processes)
            if index == 0:
                claim()
            if finished:
                if stage.trains_policy:
                    model = stage.load_finished(model, final_dir)
                    tokenizer = stage.load_finished_tokenizer(tokenizer, final_dir)
                metrics = json.loads((final_dir / STAGE_FILE).read_text())["metrics"]
                result.stages.append(StageResult(stage.name, metrics, final_dir, before))
                continue
            stage_dir.mkdir(parents=True, exist_ok=True)
            context = StageContext(model, tokenizer, stage_dir, self.seed + index, resume, on_log, stop)
            output = stage.run(context)
            starting, model = model, output.model
            if output.interrupted:
                result.stages.append(StageResult(stage.name, output.metrics, None, before, interrupted=True))
                break
            starting_tokenizer = tokenizer
            if output.tokenizer is not None:  # the stage changed the vocabulary (and the model's embeddings)
                tokenizer = output.tokenizer
            if processes.is_main_process:
                with atomic_directory(final_dir) as directory:
                    save_model(model, tokenizer, directory)
                    if getattr(stage.options, "merge_adapters", False) and is_peft(model):
                        # A copy, so that the next stage still gets the adapter model it expects.
                        save_model(copy.deepcopy(model).merge_and_unload(), tokenizer, directory / MERGED_DIR)
                    record = {"stage": stage.name, "options": _jsonable(asdict(stage.options)),
                              "metrics": output.metrics}
                    (directory / STAGE_FILE).write_text(json.dumps(record, indent=2))
            processes.wait_for_everyone()
            result.stages.append(StageResult(stage.name, output.metrics, final_dir, before))
            if not stage.trains_policy:
                model = starting  # its final/ holds a side model; the next stage continues from the policy
                tokenizer = starting_tokenizer
        return result

    def _changes_from(self, previous: dict[str, Any], description: dict[str, Any], output_dir: Path) -> list[str]:
        """What this pipeline (``description``, its :meth:`describe`) changes in the run ``previous`` (its
        ``run.json``), one phrase per option, leaving out what a resume may change: :data:`CHANGEABLE_ON_RESUME`,
        and a larger ``max_steps`` that :func:`_extension_problem` allows (the stage then trains the extra steps)."""
        description = _jsonable(description)
        changes = [f"{key} {previous.get(key)!r} -> {description[key]!r}" for key in ("model", "seed")
                   if previous.get(key) != description[key]]
        for index, (raw, stage) in enumerate(zip(previous["stages"], self.stages)):
            where = f"stage {index} '{stage.name}'"
            try:
                before = _jsonable(asdict(_parse_stage_options(raw["name"], _without_name(raw), index)))
            except PolmError as error:
                changes.append(f"{where}: the run's own options no longer validate ({error})")
                continue
            for option, files in previous.get("data_files", {}).get(str(index), {}).items():
                now = description["data_files"].get(str(index), {}).get(option, {})
                changes += [f"{where} {option} file {file} changed since the run began (size or modification time)"
                            for file, stamp in files.items() if file in now and now[file] != stamp]
            after = _jsonable(asdict(stage.options))
            for key in sorted(before.keys() | after.keys()):
                if key in CHANGEABLE_ON_RESUME or before.get(key) == after.get(key):
                    continue
                change = f"{where} {key} {before.get(key)!r} -> {after.get(key)!r}"
                if key == "max_steps":
                    problem = _extension_problem(before, after, output_dir, index)
                    if problem is None:
                        continue
                    change += f" ({problem})"
                changes.append(change)
        return changes

    def _claim(self, output_dir: Path, resume: bool, processes: int, accept_changes: bool, overwrite: bool,
               write: bool) -> None:
        """Refuse an output folder this run may not write to (:class:`PolmError`); with ``write``, check again
        and claim it: replace the run it holds (``overwrite``), and write ``run.json``."""
        run_file = output_dir / RUN_FILE
        description = self.describe()
        if resume:
            if not run_file.is_file():
                raise PolmError(f"--resume: {output_dir} holds no polm run ({RUN_FILE} is missing)")
            previous = json.loads(run_file.read_text())
            if [s["name"] for s in previous["stages"]] != [s["name"] for s in description["stages"]]:
                raise PolmError(f"--resume: {output_dir} holds a run with other stages; resume it with its own recipe")
            changes = self._changes_from(previous, description, output_dir)
            if changes and not accept_changes:
                raise PolmError(
                    f"--resume: this recipe differs from the run in {output_dir} ({RUN_FILE}): {'; '.join(changes)}. "
                    "Resume with the run's own recipe, start a new --output, or pass --accept-changes to go on "
                    "under this one")
            _check_resumable_by(output_dir, processes)
            if write:
                run_file.write_text(json.dumps(_jsonable(description), indent=2))  # the recipe the run now follows
            return
        if output_dir.exists() and any(output_dir.iterdir()):
            if not overwrite:
                raise PolmError(
                    f"output folder {output_dir} is not empty; pass --resume to continue the run in it, "
                    "--overwrite to replace the polm run in it, or choose another --output"
                )
            if not run_file.is_file():
                raise PolmError(f"--overwrite: {output_dir} holds no polm run ({RUN_FILE} is missing), so it is "
                                "left alone; choose another --output")
            if write:
                shutil.rmtree(output_dir)
        if not write:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(_jsonable(description), indent=2))


#: Stage options that name data, whose files ``run.json`` stamps.
DATA_OPTIONS = ("data", "eval_data")

#: Options a resume may change: they decide what is logged and kept, not what is trained (and nonfinite_loss,
#: so that a stage stopped by a NaN loss can resume skipping such steps).
CHANGEABLE_ON_RESUME = frozenset({"save_every", "keep_last", "log_every", "nonfinite_loss"})


def _without_name(raw: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in raw.items() if key != "name"}


def _extension_problem(before: dict[str, Any], after: dict[str, Any], output_dir: Path, index: int) -> str | None:
    """Why stage ``index`` cannot go from ``before``'s ``max_steps`` to ``after``'s by training the extra steps
    (None when it can): the steps already trained must be the first steps of the longer run, so the
    learning rate may not depend on the total (a ``constant`` schedule), and no later stage may have started
    from the shorter stage's model."""
    if not before["max_steps"] or after["max_steps"] < before["max_steps"]:
        return "only a larger max_steps, of a stage that has one, continues the run"
    if after["lr_scheduler"] != "constant":
        return (f"the '{after['lr_scheduler']}' schedule would give the steps already trained other learning "
                "rates; only a constant schedule extends")
    later = [path.name for path in sorted(output_dir.glob("[0-9][0-9]-*")) if int(path.name[:2]) > index]
    if later:
        return f"{later[0]} has already started from this stage's model"
    return None


def _extended(stage: Stage, final_dir: Path) -> bool:
    """Whether the finished stage whose model is in ``final_dir`` is now to train more steps than it did."""
    finished = json.loads((final_dir / STAGE_FILE).read_text())["options"].get("max_steps") or 0
    return bool(finished) and (getattr(stage.options, "max_steps", 0) or 0) > finished


def _discard_if_nothing_kept(output_dir: Path, existed: bool) -> None:
    """After a run failed before it kept anything (no checkpoint, no final model), remove what it wrote
    (``run.json``, stage folders with their metrics), so that the corrected rerun is not refused as a
    non-empty folder. A folder the run did not create is emptied, not removed."""
    if any(output_dir.glob(f"*/{CHECKPOINT_PREFIX}*")) or any(output_dir.glob(f"*/{FINAL_DIR}")):
        return
    if not existed:
        shutil.rmtree(output_dir, ignore_errors=True)
        return
    for path in output_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


@contextmanager
def checkpoint_on_sigterm(stop: threading.Event) -> Iterator[None]:
    """While the block runs, SIGTERM (what a cluster scheduler sends before preemption) sets ``stop``: the
    training loop checkpoints after the current step and the run returns interrupted, to be resumed. Only
    the main thread can take signals; elsewhere (the app's runs) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_resumable_by(output_dir: Path, processes: int) -> None:
    """Refuse to resume a stage's checkpoint with another process count than wrote it: each process continues
    its own shard of the data order and its own RNG state, so another count could not continue the same run."""
    for stage_dir in sorted(path for path in output_dir.iterdir() if path.is_dir()):
        checkpoint = None if (stage_dir / FINAL_DIR / STAGE_FILE).is_file() else latest_checkpoint(stage_dir)
        written = checkpoint_processes(checkpoint) if checkpoint is not None else 0
        if written and written != processes:
            raise PolmError(
                f"--resume: {checkpoint} was written by {written} process(es) and this run has {processes}; each "
                f"process continues its own data shard and RNG state, so resume with {written} (torchrun "
                f"--nproc_per_node {written}, or accelerate launch --num_processes {written})")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))

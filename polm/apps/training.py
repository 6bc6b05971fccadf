"""The Train tab's runs: one recipe at a time, trained in a background thread, stoppable.

A run writes to its run folder exactly as ``polm run`` does (``run.json``,
``<NN>-<stage>/metrics.jsonl``, checkpoints and ``final/``), so the folder
can be resumed with ``polm run --resume`` and evaluated with ``polm eval``.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from polm.engine.errors import PolmError
from polm.engine.pipeline import Pipeline
from polm.engine.recipe import load_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")


def bundled_recipes() -> dict[str, Path]:
    """The recipes shipped in ``polm.recipes``, by file name."""
    folder = files("polm.recipes")
    return {item.name: Path(str(item)) for item in sorted(folder.iterdir(), key=lambda item: item.name)
            if item.name.endswith(RECIPE_SUFFIXES)}


@dataclass
class TrainingRun:
    """One run started from the app.

    Attributes:
        recipe: the recipe file's name.
        output_dir: the run folder (absolute).
        pipeline: the validated pipeline being run.
        records: every metrics record so far (what ``on_log`` received), in order.
        state: ``running``, ``stopping``, ``finished``, ``stopped`` or ``failed``.
        error: why a failed run failed.
        checkpoint: the last stage's final model, once the run finished.
    """

    recipe: str
    output_dir: Path
    pipeline: Pipeline
    stop: threading.Event = field(default_factory=threading.Event)
    records: list[dict[str, Any]] = field(default_factory=list)
    state: str = "running"
    error: str | None = None
    checkpoint: Path | None = None

    @property
    def active(self) -> bool:
        return self.state in ("running", "stopping")

    def progress(self) -> str:
        """One line: the stage, the step out of the planned steps, and the latest loss."""
        if not self.records:
            return "no metrics yet"
        last = self.records[-1]
        stage_count = len({record["stage_dir"] for record in self.records})
        planned = self.pipeline.stages[stage_count - 1].options.max_steps
        line = (f"stage {stage_count}/{len(self.pipeline.stages)} '{last['stage']}': "
                f"step {last['step']}/{planned or '?'}")
        losses = [record["loss"] for record in self.records if "loss" in record]
        return line + (f", loss {losses[-1]:.4f}" if losses else "")

    def status(self) -> str:
        """What the page shows: the state, the run folder, progress, and the error or the result."""
        lines = [f"{self.state}: {self.recipe} -> {self.output_dir}", self.progress()]
        if self.error:
            lines.append(f"error: {self.error}")
        if self.state == "stopped":
            lines.append(f"checkpointed; continue with: polm run <recipe> --output {self.output_dir} --resume")
        if self.checkpoint:
            lines.append(f"final model: {self.checkpoint} (now in the Chat tab's model list)")
        return "\n".join(lines)


class TrainingRuns:
    """Starts and stops the app's runs and remembers their folders for the Chat tab."""

    def __init__(self) -> None:
        self.current: TrainingRun | None = None
        self.folders: list[Path] = []
        self._lock = threading.Lock()

    def start(self, recipe_path: str | Path, output_dir: str = "", overrides: list[str] = ()) -> TrainingRun:
        """Validate a recipe and start training it in a background thread.

        Args:
            recipe_path: a YAML recipe.
            output_dir: the run folder; default the recipe's ``output_dir``, else ``runs/<recipe>-<time>``.
            overrides: ``KEY=VALUE`` changes, as ``polm run --set`` takes them.

        Raises:
            PolmError: a run is in progress, or the recipe is invalid (the message names file and line).
        """
        path = Path(recipe_path)
        if path.suffix.lower() not in RECIPE_SUFFIXES:
            raise PolmError(f"'{path.name}' is not a YAML recipe; upload a {' or '.join(RECIPE_SUFFIXES)} file")
        with self._lock:
            if self.current is not None and self.current.active:
                raise PolmError(f"a run is in progress ({self.current.output_dir}); stop it before starting another")
            recipe = load_recipe(path, list(overrides))
            pipeline = recipe.pipeline()
            output = Path(output_dir.strip() or recipe.output_dir
                          or f"runs/{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}").expanduser().resolve()
            run = TrainingRun(path.name, output, pipeline)
            self.current = run
            if output not in self.folders:
                self.folders.append(output)
        threading.Thread(target=self._train, args=(run,), name="polm-app-train", daemon=True).start()
        return run

    def stop(self) -> TrainingRun | None:
        """Ask the current run to checkpoint and return at its next step."""
        run = self.current
        if run is not None and run.state == "running":
            run.state = "stopping"
            run.stop.set()
        return run

    @staticmethod
    def _train(run: TrainingRun) -> None:
        try:
            result = run.pipeline.run(run.output_dir, on_log=run.records.append, stop=run.stop)
        except PolmError as error:
            run.error, run.state = str(error), "failed"
        except Exception as error:  # a crash inside a stage must reach the page, not end the thread silently
            traceback.print_exc()
            run.error, run.state = f"{type(error).__name__}: {error}", "failed"
        else:
            run.checkpoint = result.checkpoint
            run.state = "stopped" if result.interrupted else "finished"

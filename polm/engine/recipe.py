"""YAML recipes: a model, a seed, an output folder and a list of stages.

Example::

    model: polm-tiny
    seed: 0
    output_dir: runs/arithmetic
    stages:
      - name: sft
        data: polm:arithmetic
        max_steps: 300
        lr: 1.0e-3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from polm.engine.errors import PolmError, did_you_mean
from polm.engine.pipeline import Pipeline

RECIPE_KEYS = ("model", "seed", "output_dir", "stages")
PATH_OPTIONS = ("data", "eval_data")


@dataclass
class Recipe:
    """A parsed recipe; ``stage_lines`` maps each stage to its line in the file, for messages."""

    path: Path | None
    model: Any = "polm-tiny"
    seed: int = 0
    output_dir: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    stage_lines: list[int] = field(default_factory=list)

    def pipeline(self) -> Pipeline:
        """Build the pipeline, validating every stage; errors name the recipe file and line."""
        pipeline = Pipeline(self.model, seed=self.seed)
        for index, stage in enumerate(self.stages):
            options = {key: self._resolve(value) if key in PATH_OPTIONS else value
                       for key, value in stage.items() if key != "name"}
            try:
                pipeline.add(stage["name"], **options)
            except PolmError as error:
                raise PolmError(f"{self._where(index)}: {error}") from None
        return pipeline

    def _resolve(self, value: Any) -> Any:
        """A relative data path is looked up beside the recipe first, then in the working folder."""
        if self.path is None or not isinstance(value, str) or value.startswith("polm:") or Path(value).is_absolute():
            return value
        beside = self.path.parent / value
        return str(beside) if beside.exists() else value

    def _where(self, index: int) -> str:
        line = self.stage_lines[index] if index < len(self.stage_lines) else None
        return f"{self.path}:{line}" if self.path and line else str(self.path or "recipe")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stages.0.lr=1e-4"`` -> ``(["stages", "0", "lr"], 0.0001)``; values are read as YAML."""
    if "=" not in text:
        raise PolmError(f"--set '{text}': expected KEY=VALUE, for example --set stages.0.lr=1e-4")
    key, value = text.split("=", 1)
    return key.split("."), yaml.safe_load(value)


def apply_override(document: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    target: Any = document
    for depth, key in enumerate(keys[:-1]):
        if isinstance(target, list):
            if not key.isdigit() or int(key) >= len(target):
                raise PolmError(f"--set '{text}': '{'.'.join(keys[:depth + 1])}' is not a stage index "
                                f"(the recipe has {len(target)} stages)")
            target = target[int(key)]
        elif isinstance(target, dict):
            target = target.setdefault(key, {})
        else:
            raise PolmError(f"--set '{text}': '{'.'.join(keys[:depth])}' is not a mapping")
    if isinstance(target, list):
        raise PolmError(f"--set '{text}': name a field of a stage, e.g. stages.0.lr")
    target[keys[-1]] = value


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and check the shape of a recipe (stages are validated by :meth:`Recipe.pipeline`).

    Raises:
        PolmError: missing file, invalid YAML (with its line), unknown keys, or a malformed stage.
    """
    path = Path(path)
    if not path.is_file():
        raise PolmError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        document = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PolmError(f"{where}: invalid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(document, dict):
        raise PolmError(f"{path}: a recipe is a mapping with keys {', '.join(RECIPE_KEYS)}")
    for override in overrides:
        keys, value = parse_override(override)
        apply_override(document, keys, value, override)
    for key in document:
        if key not in RECIPE_KEYS:
            raise PolmError(f"{path}: unknown recipe key '{key}'.{did_you_mean(key, RECIPE_KEYS)} "
                            f"Recipe keys: {', '.join(RECIPE_KEYS)}")
    stages = document.get("stages")
    if not isinstance(stages, list) or not stages:
        raise PolmError(f"{path}: 'stages' must be a non-empty list of {{name: <stage>, <option>: <value>}}")
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict) or "name" not in stage:
            raise PolmError(f"{path}: stage {index} needs a 'name' (for example 'name: sft')")
    seed = document.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise PolmError(f"{path}: 'seed' must be an integer, got {seed!r}")
    return Recipe(path, document.get("model", "polm-tiny"), seed, document.get("output_dir"), stages,
                  _stage_lines(node))


def _stage_lines(node: yaml.Node | None) -> list[int]:
    if not isinstance(node, yaml.MappingNode):
        return []
    for key, value in node.value:
        if key.value == "stages" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []

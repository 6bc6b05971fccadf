"""The models the app offers to chat with, and loading each of them once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polm.engine.errors import PolmError
from polm.engine.models import load_model

#: A folder holding one of these files loads with ``from_pretrained`` (a model or a peft adapter).
MODEL_FILES = ("config.json", "adapter_config.json")
#: How deep below a run folder to look: ``<runs>/<run>/<stage>/final/merged`` is four levels.
SEARCH_DEPTH = 4


def find_checkpoints(folders: Iterable[Path]) -> list[str]:
    """Model folders in or below ``folders`` (run folders, stage folders, checkpoints), sorted.

    A folder of runs, a run folder and a checkpoint folder all work: every
    ``final``, ``final/merged`` and ``checkpoint-*`` folder is listed.
    """
    found: set[Path] = set()
    for folder in folders:
        folder = Path(folder).expanduser()
        pending = [(folder, 0)] if folder.is_dir() else []
        while pending:
            current, depth = pending.pop()
            if any((current / name).is_file() for name in MODEL_FILES):
                found.add(current.resolve())
            if depth < SEARCH_DEPTH:
                pending += [(child, depth + 1) for child in current.iterdir() if child.is_dir()]
    return sorted(str(path) for path in found)


def registered_models() -> list[str]:
    """Names registered through ``polm_register_models`` (read now, so plugins added later appear)."""
    from polm.engine.plugins import registry

    return list(registry("models"))


def check_model_spec(spec: str) -> str:
    """A registered model name or an existing local folder; never a hub id, so the app stays offline.

    Raises:
        PolmError: the spec is empty, or neither a registered name nor a folder.
    """
    spec = (spec or "").strip()
    if not spec:
        raise PolmError("choose a model: a registered name such as polm-tiny, or a checkpoint folder")
    if spec in registered_models() or Path(spec).expanduser().is_dir():
        return spec
    raise PolmError(f"model '{spec}' is neither a registered model nor a folder on this machine; "
                    f"registered models: {', '.join(registered_models()) or 'none'}")


class ModelCache:
    """Loaded ``(model, tokenizer)`` pairs by spec, the most recently used ``capacity`` kept.

    Loading is serialised so that two chats asking for the same checkpoint load it once.
    """

    def __init__(self, capacity: int = 3) -> None:
        self.capacity = capacity
        self._loaded: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: str) -> tuple[Any, Any]:
        """The model and tokenizer for ``spec`` (see :func:`check_model_spec`), in eval mode.

        Raises:
            PolmError: an unknown spec, or a folder that does not load.
        """
        spec = check_model_spec(spec)
        key = spec if spec in registered_models() else str(Path(spec).expanduser().resolve())
        with self._lock:
            if key not in self._loaded:
                try:
                    model, tokenizer = load_model(key)
                except PolmError:
                    raise
                except Exception as error:  # a broken folder must reach the page as a message, not a crash
                    raise PolmError(f"could not load model '{spec}': {type(error).__name__}: {error}") from error
                self._loaded[key] = (model.eval(), tokenizer)
                while len(self._loaded) > self.capacity:
                    self._loaded.popitem(last=False)
            self._loaded.move_to_end(key)
            return self._loaded[key]

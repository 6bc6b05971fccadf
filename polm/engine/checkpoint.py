"""Checkpoints: Hugging Face folders written atomically, plus the training state.

A checkpoint folder holds the model as ``save_pretrained`` writes it
(safetensors; a peft adapter for adapter methods), the tokenizer, and
``trainer_state.json`` / ``optimizer.pt`` / ``scheduler.pt`` /
``rng_state_<rank>.pt`` (one per process) and, for an on-policy stage in the
middle of a generation batch, ``rollout_buffer.pt`` (each process's buffer and
the updates it has made), so that a resumed run continues bit for bit.

A checkpoint survives a crash: it is written to a temporary sibling folder, every file is flushed to disk,
``manifest.json`` (each file's size) is written last, the folder is verified (every file present at its
recorded size, safetensors headers readable) and only then renamed into place; the stage folder's
``latest`` file then names it, for scripts and tools. On resume a checkpoint that fails verification is
reported in one line and the previous good one is used (:func:`latest_checkpoint`).

The training state is read with ``torch.load(weights_only=True)``: tensors, containers and plain values
(and polm's own rollout records) only, so a checkpoint from elsewhere cannot run code when it is resumed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.engine.quiet import no_transformers_progress

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
BUFFER_FILE = "rollout_buffer.pt"
MANIFEST_FILE = "manifest.json"
LATEST_FILE = "latest"


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``target`` only when the block succeeds, flushed to disk
    first (so that a power cut after the rename cannot leave empty files under the final name)."""
    target = Path(target)
    temporary, old = _temporary(target), _old(target)
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        _fsync_tree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(temporary, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, target)
    _fsync(target.parent)


def _temporary(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*"), reverse=True):  # files before the folders that hold them
        _fsync(path)
    _fsync(directory)


def remove_stale_temporaries(stage_dir: Path) -> None:
    """Clean up after a run killed while it wrote a folder: temporary folders go, and a folder caught between
    the two renames of :func:`atomic_directory` (moved aside, its replacement not yet in place) is put back."""
    for old in Path(stage_dir).glob(".*.old"):
        target = old.with_name(old.name[1: -len(".old")])
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    for temporary in Path(stage_dir).glob(".*.tmp"):
        shutil.rmtree(temporary, ignore_errors=True)


@contextmanager
def checkpoint_directory(stage_dir: Path, step: int) -> Iterator[Path]:
    """Yield the temporary folder of step ``step``'s checkpoint; when the block has written it, record the
    manifest, verify the folder, move it into place and point ``latest`` at it.

    Raises:
        PolmError: the checkpoint could not be written (disk full, no permission, a file that does not read
            back); it names the folder and the previous checkpoint, which is left as it was.
    """
    target = Path(stage_dir) / checkpoint_name(step)
    try:
        with atomic_directory(target) as directory:
            yield directory
            _write_manifest(directory)
            problem = verify_checkpoint(directory)
            if problem is not None:
                raise OSError(f"it does not read back: {problem}")
        latest = Path(stage_dir) / LATEST_FILE
        pointer = latest.with_name(f".{LATEST_FILE}.tmp")
        pointer.write_text(target.name + "\n")
        os.replace(pointer, latest)
    except OSError as error:
        previous = latest_checkpoint(stage_dir)
        reason = f"{error.strerror} ({error.filename})" if error.strerror else str(error)
        raise PolmError(f"cannot write checkpoint {target}: {reason}; the previous checkpoint "
                        f"{previous or '(none yet)'} is intact. Free space or fix permissions, then resume") from None


def _write_manifest(directory: Path) -> None:
    files = {path.relative_to(directory).as_posix(): path.stat().st_size
             for path in sorted(directory.rglob("*")) if path.is_file()}
    with open(directory / MANIFEST_FILE, "w", encoding="utf-8") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def verify_checkpoint(directory: Path) -> str | None:
    """What is wrong with the checkpoint folder ``directory``, in a few words, or None when it is whole: its
    manifest readable, every file it lists present at the recorded size, safetensors headers and
    ``trainer_state.json`` readable. Reads headers only, not the tensors."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST_FILE} is missing or unreadable"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {MANIFEST_FILE} says {size}"
        if name.endswith(".safetensors"):
            try:
                with safe_open(path, "pt"):
                    pass
            except (SafetensorError, OSError) as error:
                return f"{name} cannot be read ({str(error).splitlines()[0]})"
    try:
        step = json.loads((directory / STATE_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is missing or unreadable"
    return None if isinstance(step, int) else f"{STATE_FILE} holds no step"


def save_model(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """``save_pretrained`` for the model (safetensors) and its tokenizer."""
    with no_transformers_progress():
        model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process, as tensors and plain values (NumPy's key as a tensor, so that the
    state loads with ``weights_only``)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position,
                                                     has_gauss, cached_gaussian), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(path: Path) -> Any:
    """``torch.load`` of a training-state file with ``weights_only``: tensors, containers, plain values and
    polm's rollout records, nothing that runs code.

    Raises:
        PolmError: the file holds anything else (it is refused unread), or it is damaged.
    """
    from polm.engine.rl.rollout import Rollout

    try:
        with torch.serialization.safe_globals([Rollout]):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        unsupported = next((line.strip() for line in str(error).splitlines() if "Unsupported" in line), "")
        raise PolmError(f"{path}: refused, it holds more than tensors and plain values, which could run code "
                        f"when loaded ({unsupported or 'not a weights-only file'}); resume only checkpoints "
                        "polm wrote") from None
    except (RuntimeError, EOFError) as error:
        raise PolmError(f"{path}: cannot be read ({str(error).splitlines()[0]})") from None


def save_training_state(
    directory: Path, step: int, optimizer: torch.optim.Optimizer, scheduler: Any, rng_states: list[dict[str, Any]],
    extra: dict,
) -> None:
    """Write the step, the optimizer and scheduler states and ``rng_states`` (one :func:`rng_state` per process,
    by rank)."""
    _save(optimizer.state_dict(), directory / "optimizer.pt")
    _save(scheduler.state_dict(), directory / "scheduler.pt")
    for rank, state in enumerate(rng_states):
        _save(state, directory / f"rng_state_{rank}.pt")
    (directory / STATE_FILE).write_text(json.dumps({"step": step, **extra}, indent=2))


def _save(value: Any, path: Path) -> None:
    """``torch.save`` through a Python file, so that a full disk raises ``OSError`` (No space left on device)
    rather than torch's opaque ``RuntimeError`` from its own writer."""
    with open(path, "wb") as handle:
        torch.save(value, handle)


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int) -> dict:
    optimizer.load_state_dict(load_state_file(directory / "optimizer.pt"))
    scheduler.load_state_dict(load_state_file(directory / "scheduler.pt"))
    set_rng_state(load_state_file(directory / f"rng_state_{rank}.pt"))
    return json.loads((directory / STATE_FILE).read_text())


def checkpoint_processes(directory: Path) -> int:
    """How many processes wrote the checkpoint in ``directory`` (one RNG state each)."""
    return len(list(Path(directory).glob("rng_state_*.pt")))


def save_rollout_buffers(directory: Path, states: list[dict[str, Any] | None]) -> None:
    """Write each process's rollout buffer state (by rank; None where a process has none), if any has one."""
    if any(state is not None for state in states):
        _save(states, directory / BUFFER_FILE)


def load_rollout_buffer(directory: Path, rank: int) -> dict[str, Any] | None:
    """The buffer state process ``rank`` saved in ``directory``, or None."""
    path = directory / BUFFER_FILE
    return load_state_file(path)[rank] if path.is_file() else None


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def rotate_checkpoints(stage_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` good checkpoints of ``stage_dir`` (none when it is 0); damaged
    ones are not counted, so the newest good checkpoint is never deleted. Returns the deleted folders."""
    if keep_last <= 0:
        return []
    good = [path for path in _checkpoints_newest_first(stage_dir) if verify_checkpoint(path) is None]
    for folder in good[keep_last:]:
        shutil.rmtree(folder)
    return good[keep_last:]


def _checkpoints_newest_first(stage_dir: Path) -> list[Path]:
    """The checkpoint folders polm named (``checkpoint-<step>``; not ``checkpoint-best`` or temporary ones)."""
    folders = [path for path in Path(stage_dir).glob(f"{CHECKPOINT_PREFIX}*")
               if path.is_dir() and path.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(folders, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX):]), reverse=True)


def latest_checkpoint(stage_dir: Path, report: bool = False) -> Path | None:
    """The newest checkpoint of ``stage_dir`` that passes :func:`verify_checkpoint` (temporary folders, and
    folders such as ``checkpoint-best`` that polm does not write, are ignored). With ``report``, each newer
    one that fails is logged in one line, with what is wrong and which checkpoint is used instead."""
    damaged = []
    for folder in _checkpoints_newest_first(stage_dir):
        problem = verify_checkpoint(folder)
        if problem is None:
            break
        damaged.append((folder, problem))
    else:
        folder = None
    if report:
        for bad, problem in damaged:
            instead = f"resuming from {folder.name}" if folder is not None else "starting the stage from step 0"
            get_logger().warning(f"checkpoint {bad} is damaged ({problem}); {instead}")
    return folder

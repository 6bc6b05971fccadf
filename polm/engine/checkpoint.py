"""Checkpoints: Hugging Face folders written atomically, plus the training state.

A checkpoint folder holds the model as ``save_pretrained`` writes it
(safetensors; a peft adapter for adapter methods), the tokenizer, and
``trainer_state.json`` / ``optimizer.pt`` / ``scheduler.pt`` /
``rng_state_<rank>.pt`` (one per process) and, for an on-policy stage in the
middle of a generation batch, ``rollout_buffer.pt`` (each process's buffer and
the updates it has made), so that a resumed run continues bit for bit.

The training state is read with ``torch.load(weights_only=True)``: tensors, containers and plain values
(and polm's own rollout records) only, so a checkpoint from elsewhere cannot run code when it is resumed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polm.engine.errors import PolmError
from polm.engine.quiet import no_transformers_progress

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
BUFFER_FILE = "rollout_buffer.pt"


@contextmanager
def atomic_directory(target: Path):
    """Yield a temporary sibling folder that replaces ``target`` only when the block succeeds."""
    target = Path(target)
    temporary = target.with_name(f".{target.name}.tmp")
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(temporary, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temporary, target)


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
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    for rank, state in enumerate(rng_states):
        torch.save(state, directory / f"rng_state_{rank}.pt")
    (directory / STATE_FILE).write_text(json.dumps({"step": step, **extra}, indent=2))


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
        torch.save(states, directory / BUFFER_FILE)


def load_rollout_buffer(directory: Path, rank: int) -> dict[str, Any] | None:
    """The buffer state process ``rank`` saved in ``directory``, or None."""
    path = directory / BUFFER_FILE
    return load_state_file(path)[rank] if path.is_file() else None


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def rotate_checkpoints(stage_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints of ``stage_dir`` (none when it is 0); the
    newest is never deleted. Returns the deleted folders."""
    if keep_last <= 0:
        return []
    complete = sorted(_complete_checkpoints(stage_dir), key=_checkpoint_step)
    doomed = complete[: max(len(complete) - keep_last, 0)]
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def _complete_checkpoints(stage_dir: Path) -> list[Path]:
    return [path for path in Path(stage_dir).glob(f"{CHECKPOINT_PREFIX}*")
            if path.is_dir() and (path / STATE_FILE).is_file() and path.name[len(CHECKPOINT_PREFIX):].isdigit()]


def _checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``stage_dir`` (temporary folders, and folders such as
    ``checkpoint-best`` that polm does not write, are ignored)."""
    return max(_complete_checkpoints(stage_dir), key=_checkpoint_step, default=None)

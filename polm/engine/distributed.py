"""The processes of a run: which launch this is, and the one process group every stage shares.

Under ``accelerate launch`` or ``torchrun`` each process runs the whole pipeline on its shard of every
batch; the main process alone writes. On a machine without CUDA, accelerate forms a process group (gloo)
only when asked for the CPU explicitly, so :func:`process_state` and the training loop's Accelerator ask
for it whenever several processes were launched there: ``torchrun --nproc_per_node 2 -m polm.engine.cli run
recipe.yaml`` then trains data-parallel on 2 CPU processes (what the tests do).
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Callable
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from polm.engine.errors import PolmError

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 for a plain ``python`` / ``polm`` run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_launch() -> bool:
    """Several processes launched where there is no CUDA device: they train on the CPU, joined by gloo."""
    return launched_processes() > 1 and not torch.cuda.is_available()


#: The environment switches ``accelerate launch`` sets for the sharding back-ends polm does not drive yet.
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed"}


def process_state() -> PartialState:
    """The run's process state (one per launched process, shared by every stage's Accelerator).

    Raises:
        PolmError: the launcher asked for FSDP or DeepSpeed, before anything is written.
    """
    for variable, backend in SHARDED_LAUNCHES.items():
        if os.environ.get(variable, "false").lower() in ("1", "true"):
            raise PolmError(
                f"polm trains several processes data-parallel (DDP) and does not drive {backend} yet: its sharded "
                "parameters need a gathered state dict to save and every process in evaluation and generation; "
                "launch with a multi-GPU config instead (examples/accelerate/multi_gpu.yaml)")
    return PartialState(cpu=cpu_launch())


@functools.cache  # once per process, however many runs it makes
def release_process_group_at_exit() -> None:
    """Destroy the process group when this process exits, once the run has finished on it.

    Left to the interpreter's own teardown, gloo's worker threads can still hold finished work whose tensors
    reference Python objects, and freeing them then aborts the process ("terminate called without an active
    exception", SIGABRT) after a run that succeeded; torch leaves the call to the program (its docs ask for
    ``destroy_process_group`` at the end of main). At exit rather than at the end of the run, because a script
    may run several pipelines on the one process group (accelerate's state is shared); only after a run that
    finished, because destroying it while another process still waits in a collective can hang.
    """
    if launched_processes() > 1:
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def on_main_process(action: Callable[[], T], processes: PartialState) -> T:
    """Run ``action`` on the main process only and hand its result, or its :class:`PolmError`, to every
    process, so that a refusal (a non-empty output folder, a bad recipe) stops them all instead of leaving
    the others waiting at the next barrier."""
    outcome: list[object] = [None]
    if processes.is_main_process:
        try:
            outcome = [("value", action())]
        except PolmError as error:
            outcome = [("error", str(error))]
    if processes.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]  # type: ignore[misc]
    if kind == "error":
        raise PolmError(value)
    return value  # type: ignore[return-value]

"""Measuring one variant of a model: its size, its held-out metric, its generation speed and its memory.

:func:`measure_variant` measures in the calling process; :func:`measure_in_fresh_process` runs it in a new
(spawned) Python process, so that the peak resident memory it reports is that one model's and not what the
caller (or an earlier variant) held. The imports a load needs are made before the baseline is read, so the
peak minus the baseline is what the model itself took: its weights, the evaluation and the generation.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from polm.engine.data import Row
from polm.engine.distributed import process_state
from polm.engine.encoding import encode_prompt
from polm.engine.errors import PolmError
from polm.engine.evaluation import exact_match
from polm.engine.models import count_parameters, load_model, stage_model_folder
from polm.engine.quiet import no_transformers_progress
from polm.engine.rl.rollout import stop_token_ids

#: The files of a model folder counted as its weights ("bytes on disk"); tokenizer and config files are not.
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: Held-out prompts the generation speed is timed on, one at a time.
SPEED_PROMPTS = 4


@dataclass
class VariantFigures:
    """What :func:`measure_variant` measured of one variant.

    Attributes:
        name: the variant's name in the table.
        spec: what the user named: a folder, a run's stage folder or a registered model.
        parameters: the logical parameter count (a quantized weight counts the values it stands for).
        disk_bytes: the bytes of the weight files (:data:`WEIGHT_SUFFIXES`) of the model's folder; a
            registered model is saved with ``save_pretrained`` (safetensors) to a temporary folder first.
        weight_files: those files' names.
        metrics: ``exact_match`` (and per ``level``) of greedy answers to the held-out rows.
        tokens_per_s: the median over the timed runs of generated tokens per second (greedy, batch 1).
        tokens_per_s_runs: each timed run's figure; a run generates ``generated_tokens`` tokens.
        generated_tokens: tokens one timed run generates: ``SPEED_PROMPTS`` prompts x the new tokens each.
        baseline_rss_bytes: the process's peak resident memory once the imports are made, before the load.
        peak_rss_bytes: its peak resident memory after the load, the evaluation and the timed generation.
        cuda_peak_bytes: ``torch.cuda.max_memory_allocated`` on a GPU; None on the CPU.
        device: where the model ran.
        seconds: wall time of the whole measurement.
    """

    name: str
    spec: str
    parameters: int
    disk_bytes: int
    weight_files: list[str]
    metrics: dict[str, float]
    tokens_per_s: float
    tokens_per_s_runs: list[float]
    generated_tokens: int
    baseline_rss_bytes: int
    peak_rss_bytes: int
    cuda_peak_bytes: int | None = None
    device: str = "cpu"
    seconds: float = 0.0

    @property
    def exact_match(self) -> float:
        return self.metrics["exact_match"]

    @property
    def model_rss_bytes(self) -> int:
        """The resident memory the model's load, evaluation and generation added to the baseline."""
        return self.peak_rss_bytes - self.baseline_rss_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "model_rss_bytes": self.model_rss_bytes}


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (``getrusage``: KiB on Linux, bytes on macOS)."""
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder (:data:`WEIGHT_SUFFIXES`), by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES)


def tokens_per_second(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str | list[Row]],
                      new_tokens: int, repeats: int) -> tuple[list[float], int]:
    """Greedy generation speed: each prompt alone (batch 1), exactly ``new_tokens`` tokens each (the end token
    is held back by ``min_new_tokens``, so every variant generates as many), after one warm-up generation.

    Returns:
        tokens per second of each of the ``repeats`` timed runs over all prompts, and the tokens one run made.
    """
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = [torch.tensor([encode_prompt(tokenizer, prompt)], device=device)  # (1, P) each
               for prompt in prompts]

    def one_run(inputs: list[torch.Tensor]) -> tuple[int, float]:
        generated, started = 0, time.perf_counter()
        for input_ids in inputs:
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    eos_token_id=stops, pad_token_id=pad_id)
            generated += output.shape[1] - input_ids.shape[1]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return generated, time.perf_counter() - started

    one_run(encoded[:1])  # warm-up: first-call allocations and kernel selection are not timed
    runs = [one_run(encoded) for _ in range(repeats)]
    return [generated / max(seconds, 1e-9) for generated, seconds in runs], runs[0][0]


def measure_variant(name: str, spec: str, rows: Sequence[Row], max_new_tokens: int, *, speed_tokens: int = 32,
                    repeats: int = 3, batch_size: int = 32) -> VariantFigures:
    """Load ``spec`` and measure it (see :class:`VariantFigures`); run it in a fresh process for the memory
    figures to be the model's (:func:`measure_in_fresh_process`).

    Args:
        rows: held-out rows with a reference answer; ``exact_match`` is graded on all of them and the speed
            timed on the first :data:`SPEED_PROMPTS` prompts.
        max_new_tokens: tokens generated per held-out answer.
        speed_tokens: tokens generated per prompt in each timed run.
        repeats: timed runs; the median is reported.

    Raises:
        PolmError: the model does not load (see :func:`polm.engine.models.load_model`).
    """
    started = time.perf_counter()
    _import_what_a_load_needs()
    device = process_state().device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_rss_bytes()
    model, tokenizer = load_model(spec)
    model.to(device).eval()
    with torch.no_grad():
        metrics = exact_match(model, tokenizer, rows, max_new_tokens, batch_size)
        runs, generated = tokens_per_second(model, tokenizer, [row["prompt"] for row in rows[:SPEED_PROMPTS]],
                                            speed_tokens, repeats)
    peak = peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    _, parameters = count_parameters(model)
    disk_bytes, files = _weights_on_disk(model, spec)
    return VariantFigures(name, spec, parameters, disk_bytes, files, metrics, statistics.median(runs), runs,
                          generated, baseline, peak, cuda_peak, str(device), time.perf_counter() - started)


def _weights_on_disk(model: torch.nn.Module, spec: str) -> tuple[int, list[str]]:
    """The bytes and names of the weight files of ``spec``'s folder; a registered model (no folder) is saved
    as ``save_pretrained`` writes it (safetensors) to a temporary folder and measured there."""
    from polm.engine.plugins import registry

    folder = stage_model_folder(Path(spec))
    if spec not in registry("models") and folder.is_dir():  # load_model looks the name up first too
        files = weight_files(folder)
        return sum(file.stat().st_size for file in files), [file.name for file in files]
    with tempfile.TemporaryDirectory(prefix="polm-compress-") as temporary, no_transformers_progress():
        model.save_pretrained(temporary, safe_serialization=True)
        files = weight_files(Path(temporary))
        return sum(file.stat().st_size for file in files), [file.name for file in files]


def measure_in_fresh_process(name: str, spec: str, rows: Sequence[Row], max_new_tokens: int, *,
                             speed_tokens: int = 32, repeats: int = 3,
                             batch_size: int = 32) -> VariantFigures:
    """:func:`measure_variant` in a new spawned process running this process's torch thread count.

    Raises:
        PolmError: the variant's own errors, or the process died (out of memory, for one).
    """
    options = {"speed_tokens": speed_tokens, "repeats": repeats, "batch_size": batch_size}
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        future = pool.submit(_measure_with_threads, torch.get_num_threads(), name, spec, list(rows),
                             max_new_tokens, options)
        try:
            return future.result()
        except BrokenProcessPool:
            raise PolmError(f"variant '{name}': the process measuring {spec} died before it finished (out of "
                            "memory?); measure it on its own, or on a larger machine") from None


def _measure_with_threads(threads: int, name: str, spec: str, rows: list[Row], max_new_tokens: int,
                          options: dict[str, Any]) -> VariantFigures:
    torch.set_num_threads(threads)
    return measure_variant(name, spec, rows, max_new_tokens, **options)


def _import_what_a_load_needs() -> None:
    """Import now what loading a model imports (transformers, the plugins, torchao when installed), so that
    the baseline already holds them and the peak minus the baseline is the model's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from polm.engine.plugins import registry

    registry("models")
    if importlib.util.find_spec("torchao") is not None:
        import torchao  # noqa: F401

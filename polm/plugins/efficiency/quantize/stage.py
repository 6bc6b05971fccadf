"""The ``quantize`` stage: post-training quantization of a model's Linear weights with torchao.

No training and no calibration: the stage takes the model it starts from (an earlier stage's result, its
adapters merged in), saves it to a temporary folder and reloads it through transformers' ``TorchAoConfig``
with the chosen :data:`~polm.engine.plugins.efficiency.quantize.methods.METHODS` entry, which is how a
transformers user quantizes, so that the saved ``final/`` reloads with plain
``AutoModelForCausalLM.from_pretrained`` (torchao installed) as well as with ``polm.load_model``. Every
``nn.Linear`` of the model is quantized except ``skip_modules`` and the output layer (transformers keeps
the output embeddings in full precision). The stage then scores the quantized model on its held-out rows
(``eval_data``), so that a run with ``evaluate_before`` shows the metric before and after quantization.

A quantized model is served, not trained further: ``quantize`` must be a recipe's last stage.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from polm.engine.data import Row, check_data_spec, iter_rows
from polm.engine.distributed import process_state
from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.engine.media import reads_media
from polm.engine.models import load_model
from polm.engine.quiet import no_transformers_progress
from polm.engine.stage import Stage, StageContext, StageOutput
from polm.engine.tuning import unwrap_peft
from polm.plugins.efficiency.quantize.methods import METHODS, check_torchao, find_method


@dataclass
class QuantizeOptions:
    """Options of ``quantize``: the method, what it leaves alone, and the held-out rows it is scored on."""

    method: str = field(default="int8_weight_only", metadata={
        "help": "int8_weight_only, int8_dynamic (int8 activations too) or int4_weight_only (CUDA only)",
        "choices": tuple(METHODS)})
    group_size: int = field(default=128, metadata={
        "help": "int4_weight_only: input channels sharing one scale (must divide each Linear's input size)",
        "min": 1})
    skip_modules: list = field(default_factory=list, metadata={
        "help": "names of modules kept in full precision, e.g. [model.layers.0.mlp]; the output layer always is"})
    eval_data: Any = field(default=None, metadata={
        "help": "held-out rows the quantized model is scored on ('polm:<name>' takes its test split, or a file)"})
    eval_size: int = field(default=200, metadata={"help": "held-out rows scored (0: none)", "min": 0})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per held-out answer", "min": 1})


class QuantizeStage(Stage):
    """Quantize the starting model's Linear weights (int8 or int4) with torchao; no training."""

    Options = QuantizeOptions
    terminal = True

    def check(self) -> None:
        """torchao imports, the method runs on this machine, and ``eval_data`` loads."""
        super().check()
        check_torchao()
        find_method(self.options.method)
        if self.options.eval_data is not None:
            check_data_spec(self.options.eval_data, "eval_data")

    def input_rows(self) -> Iterator[tuple[Row, str]]:
        spec = self._eval_spec()
        if spec is not None:
            yield from islice(iter_rows(spec, "test", None), self.options.eval_size)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The starting model with an earlier stage's adapters merged in.

        Raises:
            PolmError: a model that reads media (quantize takes text language models).
        """
        if reads_media(model):
            raise PolmError(f"{self.name}: {type(model).__name__} reads media; quantize takes text language models")
        return unwrap_peft(model)

    def check_inputs(self, model: torch.nn.Module) -> None:
        """``group_size`` divides the input size of each Linear an int4 method quantizes; then the base checks."""
        if self.options.method == "int4_weight_only":
            for name, module in quantized_linears(model, self.options.skip_modules):
                if module.in_features % self.options.group_size:
                    raise PolmError(f"option 'group_size': {self.options.group_size} does not divide the "
                                    f"{module.in_features} input features of {name}; choose a divisor")
        super().check_inputs(model)

    def run(self, context: StageContext) -> StageOutput:
        model = quantize(context.model, self.options.method, self.options.group_size, self.options.skip_modules)
        metrics = linear_bytes(model)
        get_logger().info("%s: %s; Linear weights %s bytes, %.1f%% of their float32 size", self.name,
                          self.options.method, f"{int(metrics['linear_bytes']):,}", 100 * metrics["linear_bytes_ratio"])
        model.eval()
        with torch.no_grad():
            metrics.update({f"eval/{key}": value for key, value in self.evaluate(model, context.tokenizer).items()})
        return StageOutput(model=model, metrics=metrics)

    def load_finished(self, model: torch.nn.Module, final_dir: Path) -> torch.nn.Module:
        """The quantized model saved in ``final_dir`` (its tensors are not those of the model prepared)."""
        return load_model(final_dir)[0]


def quantized_linears(model: torch.nn.Module, skip_modules: list[str]) -> Iterator[tuple[str, torch.nn.Linear]]:
    """The ``(name, Linear)`` pairs that quantization replaces: every Linear but the output layer and those
    inside ``skip_modules``."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if any(name == skipped or name.startswith(f"{skipped}.") for skipped in skip_modules):
            continue
        yield name, module


def quantize(model: torch.nn.Module, method: str, group_size: int = 128,
             skip_modules: list[str] | None = None) -> torch.nn.Module:
    """``model`` with its Linear weights quantized by ``method`` (a name of :data:`METHODS`): saved and reloaded
    through transformers' ``TorchAoConfig``, on this process's device, in the model's own dtype.

    Raises:
        PolmError: unknown method, a CUDA-only one without a GPU, or torchao missing.
    """
    check_torchao()
    from transformers import TorchAoConfig

    config = find_method(method).make_config(group_size)
    skipped = list(skip_modules or [])
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skipped += [name for name, module in model.named_modules() if output is not None and module is output]
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="polm-quantize-") as folder, no_transformers_progress():
        model.save_pretrained(folder, safe_serialization=True)
        return type(model).from_pretrained(
            folder, quantization_config=TorchAoConfig(config, modules_to_not_convert=skipped or None), dtype=dtype,
            device_map={"": process_state().device})


def linear_bytes(model: torch.nn.Module) -> dict[str, float]:
    """What the model's quantized Linear weights take in memory, against the same weights in float32.

    Returns:
        ``quantized_linears`` (Linear layers whose weight is a torchao tensor), ``linear_bytes`` (their integers,
        scales and zero points), ``linear_bytes_fp32`` (4 bytes per weight) and ``linear_bytes_ratio``.
    """
    count, stored, full = 0, 0, 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or not hasattr(weight, "__tensor_flatten__"):
            continue
        inner, _ = weight.__tensor_flatten__()
        count += 1
        stored += sum(getattr(weight, name).numel() * getattr(weight, name).element_size() for name in inner)
        full += weight.numel() * 4
    return {"quantized_linears": float(count), "linear_bytes": float(stored), "linear_bytes_fp32": float(full),
            "linear_bytes_ratio": stored / full if full else 1.0}

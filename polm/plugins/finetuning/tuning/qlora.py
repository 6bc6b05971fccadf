"""QLoRA: LoRA on a base model whose weights are stored in 4 bits (bitsandbytes NF4).

Dettmers et al. 2023, https://arxiv.org/abs/2305.14314. bitsandbytes' 4-bit kernels run on CUDA
GPUs only, so :meth:`QLoraTuning.check` refuses other machines when the pipeline is built, before
anything loads or trains.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass, field

import torch

from polm.engine.errors import PolmError
from polm.engine.tuning import unwrap_peft
from polm.plugins.finetuning.tuning.lora import LoraOptions, LoraTuning

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class QLoraOptions(LoraOptions):
    """Options of ``qlora``: those of ``lora`` and the 4-bit storage."""

    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 (the paper's) or fp4"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the quantization constants too"})
    compute_dtype: str = field(
        default="bfloat16", metadata={"help": f"precision of the matrix products: {', '.join(COMPUTE_DTYPES)}"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"'quant_type' must be one of {', '.join(QUANT_TYPES)}, got '{self.quant_type}'")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"'compute_dtype' must be one of {', '.join(COMPUTE_DTYPES)}, got '{self.compute_dtype}'")


class QLoraTuning(LoraTuning):
    """QLoRA: a 4-bit frozen base and LoRA adapters in ``compute_dtype``."""

    name = "qlora"
    Options = QLoraOptions

    def check(self, options: QLoraOptions) -> None:
        if not torch.cuda.is_available():
            raise PolmError(
                "tuning 'qlora' needs a CUDA GPU (bitsandbytes' 4-bit kernels run only there) and this machine has "
                "none; use tuning 'lora', the same adapters on an unquantized base"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise PolmError(
                "tuning 'qlora' needs the bitsandbytes package for its 4-bit base (pip install bitsandbytes); "
                "or use tuning 'lora', the same adapters on an unquantized base"
            )
        if options.compute_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise PolmError("qlora: this GPU has no bfloat16; set the tuning option compute_dtype: float16")

    def prepare(self, model: torch.nn.Module, options: QLoraOptions) -> torch.nn.Module:
        from peft import prepare_model_for_kbit_training

        model = unwrap_peft(model)
        if not getattr(model, "is_loaded_in_4bit", False):
            model = _reload_in_4bit(model, options)
        # Norms in fp32, input gradients on, the 4-bit base frozen, gradient checkpointing.
        model = prepare_model_for_kbit_training(model)
        return super().prepare(model, options)


def _reload_in_4bit(model: torch.nn.Module, options: QLoraOptions) -> torch.nn.Module:
    """``model`` quantized by transformers' own 4-bit loading, from a temporary copy.

    The pipeline hands tuning methods a loaded model (possibly changed by earlier stages), and
    ``from_pretrained`` is the supported way to quantize, so the weights make a round trip through disk.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, options.compute_dtype)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant, bnb_4bit_compute_dtype=dtype,
    )
    source = getattr(model, "name_or_path", "")
    with tempfile.TemporaryDirectory(prefix="polm-qlora-") as folder:
        model.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=quantization, dtype=dtype, device_map={"": torch.cuda.current_device()}
        )
    model.name_or_path = model.config._name_or_path = source  # not the deleted copy, in adapter_config.json
    return model

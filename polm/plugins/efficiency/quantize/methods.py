"""The quantization methods of the ``quantize`` stage: each a torchao configuration and where it runs.

torchao (PyTorch's own quantization library) replaces each Linear weight by a tensor subclass that holds
the integers and their scales, and transformers saves and loads such models through its ``TorchAoConfig``
(safetensors, with torchao's metadata). With torchao 0.18:

- ``int8_weight_only``: int8 weights with one scale per output channel, computed in the activations' dtype.
- ``int8_dynamic``: int8 weights, and activations quantized to int8 per token at run time (W8A8).
- ``int4_weight_only``: int4 weights in groups of ``group_size`` input channels. torchao 0.18 packs int4
  for CUDA kernels only (its x86 CPU packing is gone, and its "unpacked" int4 keeps one value per byte, so
  it saves nothing over int8), hence a CUDA GPU is required.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from polm.engine.errors import PolmError, did_you_mean


@dataclass(frozen=True)
class QuantizationMethod:
    """A named torchao configuration.

    Attributes:
        description: one line for ``polm components``' listing and the errors.
        make_config: ``group_size -> torchao config`` (torchao imported only when called).
        needs_cuda: the method has no CPU kernel in torchao; refused without a CUDA GPU.
    """

    description: str
    make_config: Callable[[int], Any]
    needs_cuda: bool = False


def _int8_weight_only(group_size: int) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8_dynamic(group_size: int) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int4_weight_only(group_size: int) -> Any:
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=group_size)


METHODS: dict[str, QuantizationMethod] = {
    "int8_weight_only": QuantizationMethod("int8 weights, one scale per output channel (CPU and CUDA)",
                                           _int8_weight_only),
    "int8_dynamic": QuantizationMethod("int8 weights and per-token int8 activations, W8A8 (CPU and CUDA)",
                                       _int8_dynamic),
    "int4_weight_only": QuantizationMethod("int4 weights in groups of group_size input channels (CUDA only)",
                                           _int4_weight_only, needs_cuda=True),
}


def find_method(name: str) -> QuantizationMethod:
    """The method called ``name``.

    Raises:
        PolmError: an unknown name (the known ones listed), or a CUDA-only method without a CUDA GPU (naming
            what runs on the CPU).
    """
    if name not in METHODS:
        raise PolmError(f"option 'method': unknown quantization method '{name}'.{did_you_mean(name, METHODS)} "
                        f"Available: {', '.join(METHODS)}")
    method = METHODS[name]
    if method.needs_cuda and not torch.cuda.is_available():
        on_cpu = ", ".join(known for known, other in METHODS.items() if not other.needs_cuda)
        raise PolmError(f"option 'method': {name} needs a CUDA GPU (torchao has no CPU kernel for it) and none is "
                        f"available; on the CPU use {on_cpu}")
    return method


def check_torchao() -> None:
    """Raises PolmError naming the extra to install when torchao cannot be imported."""
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        raise PolmError(f"quantize needs torchao ({error}); install it with pip install 'polm[quantize]'") from None

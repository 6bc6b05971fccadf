"""Post-training quantization with torchao: the ``quantize`` stage (:mod:`.stage`) and its methods
(:mod:`.methods`: int8 weight-only, dynamic int8, int4 weight-only on CUDA)."""

from polm.plugins.efficiency.quantize.methods import METHODS, QuantizationMethod, find_method
from polm.plugins.efficiency.quantize.stage import QuantizeOptions, QuantizeStage, linear_bytes, quantize

__all__ = ["METHODS", "QuantizationMethod", "QuantizeOptions", "QuantizeStage", "find_method", "linear_bytes",
           "quantize"]

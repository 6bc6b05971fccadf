"""Export: a checkpoint written for another runtime, ``polm export`` (:mod:`.command`).

``gguf_export`` writes a Llama-architecture checkpoint and its byte-level BPE tokenizer as a GGUF file that
llama.cpp loads, at f32, f16 or q8_0. The ``gguf`` package (extra ``export``) is imported only when a file is
written.
"""

from polm.plugins.efficiency.export.command import EXPORT_COMMAND
from polm.plugins.efficiency.export.gguf_export import (
    ExportReport,
    GgufVocab,
    LlamaHyperparameters,
    export_gguf,
    gguf_tensor_name,
    gguf_tensors,
    gguf_vocab,
    llama3_rope_factors,
    llama_hyperparameters,
    permute_for_rope,
    pre_tokenizer_name,
    unpermute_for_rope,
)

__all__ = ["EXPORT_COMMAND", "ExportReport", "GgufVocab", "LlamaHyperparameters", "export_gguf", "gguf_tensor_name",
           "gguf_tensors", "gguf_vocab", "llama3_rope_factors", "llama_hyperparameters", "permute_for_rope",
           "pre_tokenizer_name", "unpermute_for_rope"]

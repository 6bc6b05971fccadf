"""The efficiency paradigm: the ``distill`` stage and its objectives ``forward_kl``, ``reverse_kl`` and ``jsd``
(:mod:`polm.plugins.efficiency.distill`), a smaller student trained towards a teacher's next-token
distributions; and the ``polm export`` command (:mod:`polm.plugins.efficiency.export`), a checkpoint as a
GGUF file for llama.cpp; the ``quantize`` stage (:mod:`polm.plugins.efficiency.quantize`), int8 / int4
Linear weights through torchao; the ``prune`` stage (:mod:`polm.plugins.efficiency.prune`), magnitude or
Wanda sparsity and structured removal of MLP neurons and attention heads, with optional recovery fine-tuning;
and the ``polm compress`` command (:mod:`polm.plugins.efficiency.compress`), variants of a model measured side
by side (parameters, bytes on disk, held-out metric, tokens/s, peak memory)."""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl
from polm.engine.objectives import DISTILLATION
from polm.plugins.efficiency.compress import COMPRESS_COMMAND
from polm.plugins.efficiency.distill import DistillStage, forward_kl, jsd, reverse_kl
from polm.plugins.efficiency.export import EXPORT_COMMAND
from polm.plugins.efficiency.prune import PruneStage
from polm.plugins.efficiency.quantize import QuantizeStage


@hookimpl
def polm_register_objectives(register: Register) -> None:
    register("forward_kl", forward_kl, family=DISTILLATION,
             description="KL(teacher || student) per token at a temperature, x T^2, mixed with the hard "
                         "labels by alpha (Hinton et al. 2015)")
    register("reverse_kl", reverse_kl, family=DISTILLATION,
             description="KL(student || teacher) per token (mode-seeking); temperature and alpha as "
                         "forward_kl")
    register("jsd", jsd, family=DISTILLATION,
             description="GKD's generalised Jensen-Shannon divergence; beta 0: forward_kl, 1: reverse_kl "
                         "(Agarwal et al. 2024)")


@hookimpl
def polm_register_stages(register: Register) -> None:
    register("distill", DistillStage,
             description="a smaller student (teacher config + overrides, from the teacher's layers) trained towards "
                         "the teacher's next-token distributions on the completions of data")
    register("prune", PruneStage,
             description="magnitude or Wanda sparsity, per layer or global, and structured removal of MLP neurons "
                         "and attention heads (a smaller saved model); optional recovery fine-tuning, zeros kept")
    register("quantize", QuantizeStage,
             description="post-training quantization of the Linear weights with torchao: int8 weight-only, "
                         "dynamic int8, int4 weight-only (CUDA); the last stage of a recipe")


@hookimpl
def polm_register_commands(register: Register) -> None:
    register("export", EXPORT_COMMAND, description="a Llama-architecture checkpoint as a GGUF file for llama.cpp "
                                                   "(f32, f16, q8_0)")
    register("compress", COMPRESS_COMMAND, description="variants of a model side by side: parameters, bytes on "
                                                       "disk, held-out exact_match, tokens/s, peak memory")

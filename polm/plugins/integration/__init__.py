"""The integration paradigm: joining encoders of other modalities to a language model.

Registers the ``align`` stage (LLaVA stage 1: connectors trained on captions);
LLaVA's stage 2 is the ordinary ``sft`` stage on a multimodal model.
"""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl


@hookimpl
def polm_register_stages(register: Register) -> None:
    from polm.plugins.integration.align.stage import AlignStage

    register("align", AlignStage, description="train connectors between encoders and a frozen LM on captions (LLaVA 1)")

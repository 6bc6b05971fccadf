"""The integration paradigm: joining encoders of other modalities to a language model.

Registers the ``align`` stage (LLaVA stage 1: connectors trained on captions);
LLaVA's stage 2 is the ordinary ``sft`` stage on a multimodal model.
Also registers mergekit's merge methods (``linear``, ``ties``, ``dare_ties``, ``slerp``, ...).
The ``merge`` stage and the ``polm merge`` command apply them to whole models (:mod:`.merge`).
Retrieval: the ``bm25`` retriever and the ``rag_sft`` stage, tuning on retrieved passages (:mod:`.retrieval`).
Knowledge editing: the ``edit`` stage, ROME and MEMIT writing facts into MLP weights (:mod:`.editing`).
"""

from __future__ import annotations

from polm.engine.hookspecs import Register, hookimpl


@hookimpl
def polm_register_stages(register: Register) -> None:
    from polm.plugins.integration.align.stage import AlignStage
    from polm.plugins.integration.editing.stage import EditStage
    from polm.plugins.integration.merge.stage import MergeStage
    from polm.plugins.integration.retrieval.stage import RagSFTStage

    register("align", AlignStage, description="train connectors between encoders and a frozen LM on captions (LLaVA 1)")
    register("edit", EditStage, description="write {prompt, subject, target} facts into MLP weights (ROME, MEMIT)")
    register("merge", MergeStage, description="merge the starting model with other saved models (ties, linear, ...)")
    register("rag_sft", RagSFTStage, description="SFT on questions with their retrieved passages in the prompt (RA-DIT)")


@hookimpl
def polm_register_retrievers(register: Register) -> None:
    from polm.plugins.integration.retrieval.bm25 import BM25Retriever

    register("bm25", BM25Retriever, description="Okapi BM25 over word tokens (bm25s)")


@hookimpl
def polm_register_merge_methods(register: Register) -> None:
    from polm.plugins.integration.merge.methods import register_merge_methods

    register_merge_methods(register)


@hookimpl
def polm_register_commands(register: Register) -> None:
    from polm.plugins.integration.merge.command import MERGE_COMMAND

    register("merge", MERGE_COMMAND, description="merge models as a mergekit-style YAML config says")

"""polm-tiny, the default model that ships with polm.

A 3.3M-parameter Llama with a 512-token byte-level BPE, pretrained from scratch
on a synthetic corpus by :mod:`polm.modalities.text.tiny.build`. It knows
arithmetic notation and the arithmetic itself but has never seen a chat turn
nor the question format of the arithmetic task, so post-training has something
real to teach it, in minutes on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

TINY_MODEL_DIR = Path(__file__).parent / "weights"


def load_tiny() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load polm-tiny the way any hub model is loaded, from ``TINY_MODEL_DIR``."""
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR), AutoTokenizer.from_pretrained(TINY_MODEL_DIR)

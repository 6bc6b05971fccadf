"""What several test modules share that is not a fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import polm
from polm.engine.encoding import IGNORE_INDEX, Encoded


@contextmanager
def registered(plugin: object, name: str) -> Iterator[object]:
    """``plugin`` registered under ``name`` for the duration of the block, the way a user adds one at runtime."""
    manager = polm.plugin_manager()
    manager.register(plugin, name=name)
    try:
        yield plugin
    finally:
        manager.unregister(name=name)


def labelled_spans(tokenizer, example: Encoded) -> list[str]:
    """The decoded runs of consecutive labelled tokens, in order."""
    spans: list[list[int]] = []
    previous_labelled = False
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token, "a label differs from its input id"
            if not previous_labelled:
                spans.append([])
            spans[-1].append(token)
        previous_labelled = label != IGNORE_INDEX
    return [tokenizer.decode(span) for span in spans]


# A pipeline run in a child process that SIGKILLs itself when the training record of a chosen stage folder and
# step is logged: the step after a checkpoint (or before the first), so its work is lost, as in a crash.
KILLABLE_RUN = """
import json, os, signal, sys
os.environ["POLM_DISABLE_PLUGIN_AUTOLOAD"] = "1"
import torch
spec = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(spec["threads"])
import polm

def on_log(record):
    if spec["kill_at"] == [record["stage_dir"], record["step"]] and "loss" in record:
        os.kill(os.getpid(), signal.SIGKILL)

pipeline = polm.Pipeline(spec["model"], seed=0)
for name, options in spec["stages"]:
    pipeline.add(name, **options)
pipeline.run(spec["run_dir"], resume=spec["resume"], on_log=on_log)
"""


def run_in_child(tmp_path: Path, spec: dict) -> subprocess.CompletedProcess:
    """Run :data:`KILLABLE_RUN` on ``spec`` (``model``, ``stages`` as ``[name, options]`` pairs, ``run_dir``,
    ``resume``, ``kill_at``: ``[stage folder, step]`` or None) with this process's torch thread count."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**spec, "threads": torch.get_num_threads()}))
    return subprocess.run([sys.executable, "-c", KILLABLE_RUN, str(spec_file)], capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "POLM_DISABLE_PLUGIN_AUTOLOAD": "1"})


def final_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file under ``folder`` but the checkpoints', keyed by file and name."""
    return {f"{file.relative_to(folder)}/{key}": tensor for file in sorted(folder.rglob("*.safetensors"))
            if "checkpoint-" not in str(file) for key, tensor in load_file(file).items()}


def tiny_llama(tokenizer, seed: int, **overrides) -> LlamaForCausalLM:
    """A random-init Llama (two layers, width 32, ~70k parameters; conftest's ``random_model`` is seed 0) after
    ``torch.manual_seed(seed)``, its config changed by ``overrides``."""
    settings = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
                "tie_word_embeddings": True, "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))


def save(model, tokenizer, folder: Path) -> Path:
    """``model`` and ``tokenizer`` saved to ``folder``, which is returned."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

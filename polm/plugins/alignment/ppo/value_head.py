"""PPO's value head: one linear map from the policy's last hidden state to a value per token.

It is saved on its own (``value_head/model.safetensors`` and ``config.json``)
so that the policy's folder stays a plain transformers model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from polm.engine.errors import PolmError

VALUE_HEAD_DIR = "value_head"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ValueHead(torch.nn.Module):
    """``V(h) = w . h + b`` for hidden states ``h`` of width ``hidden_size``; starts at 0 everywhere."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) hidden states to (...) float32 values."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()

    def save(self, directory: Path) -> None:
        """Write ``directory/value_head/{model.safetensors, config.json}``."""
        folder = Path(directory) / VALUE_HEAD_DIR
        folder.mkdir(parents=True, exist_ok=True)
        save_file({key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()},
                  folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({"hidden_size": self.hidden_size}))

    def load(self, directory: Path) -> None:
        """Read the weights :meth:`save` wrote into ``directory`` back in place.

        Raises:
            PolmError: no value head there, or one of another width.
        """
        folder = Path(directory) / VALUE_HEAD_DIR
        if not (folder / WEIGHTS_FILE).is_file():
            raise PolmError(f"no value head in {directory} (expected {VALUE_HEAD_DIR}/{WEIGHTS_FILE})")
        hidden_size = json.loads((folder / CONFIG_FILE).read_text())["hidden_size"]
        if hidden_size != self.hidden_size:
            raise PolmError(f"the value head in {directory} has width {hidden_size}, the policy {self.hidden_size}")
        self.load_state_dict(load_file(folder / WEIGHTS_FILE))


def hidden_size(model: torch.nn.Module) -> int:
    """The width of the hidden states ``model``'s output layer reads."""
    return model.get_output_embeddings().weight.shape[1]


@contextmanager
def last_hidden_states(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Inside the block, each forward pass of ``model`` appends the (B, T, H) input of its output layer.

    That input is the final (normalised) hidden state, which the value head reads,
    obtained from the same forward pass that gives the logits.
    """
    captured: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()

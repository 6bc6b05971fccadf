"""Where an edit reaches into a model: the MLP output projections, the tokens of a request, and hooks that read
or shift the activations at one token.

Llama-style models (Llama, Mistral, Qwen2, ...) keep their decoder layers at ``model.model.layers`` and each MLP's
output projection at ``layers[i].mlp.down_proj``: a Linear ``(d_model x d_mlp)`` whose input is the MLP's
hidden activation, the *key* ``k`` of ROME, and whose output is added to the residual stream, the *value*.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from polm.engine.errors import PolmError


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The decoder layers of a Llama-style causal LM.

    Raises:
        PolmError: the model keeps them elsewhere.
    """
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(getattr(layer, "mlp", None), "down_proj") for layer in layers):
        raise PolmError(f"{type(model).__name__}: editing needs a Llama-style model whose layers[i].mlp.down_proj "
                        "is each MLP's output projection")
    return layers


def down_proj(model: torch.nn.Module, layer: int) -> torch.nn.Linear:
    """The MLP output projection of decoder layer ``layer``: weight ``(d_model, d_mlp)``."""
    return decoder_layers(model)[layer].mlp.down_proj


def default_layers(model: torch.nn.Module, method: str) -> list[int]:
    """The layers an edit writes when none are given: ROME one early-middle layer, MEMIT the early half.

    ROME found factual recall in the early-middle MLPs of GPT-2 XL (layer 17 of 48) and MEMIT spreads its update
    over layers 3-8 of GPT-J's 28; the same fractions of a model's depth: ``round(0.3 * (n - 1))`` for ROME and
    the layers below ``n / 2`` (at least one) for MEMIT.
    """
    count = len(decoder_layers(model))
    if method == "rome":
        return [round(0.3 * (count - 1))]
    return list(range(max(1, count // 2)))


@dataclass(frozen=True)
class Tokens:
    """A prompt tokenized for editing: ``ids`` of ``prefix + prompt`` then the target but its last token.

    Attributes:
        ids: the model's input.
        subject: the index of the subject's last token in ``ids``.
        answer_start: the index in ``ids`` whose next-token prediction is the target's first token.
        target: the target's token ids.
    """

    ids: list[int]
    subject: int
    answer_start: int
    target: list[int]


def target_ids(tokenizer: Any, prompt: str, target: str) -> list[int]:
    """The token ids of ``target`` as it continues ``prompt``: after a space unless either side has one."""
    joined = target if target[:1].isspace() or prompt[-1:].isspace() else f" {target}"
    return tokenizer(joined, add_special_tokens=False)["input_ids"]


def tokenize(tokenizer: Any, prompt: str, subject: str | None, target: str, prefix: str = "") -> Tokens:
    """``prefix + prompt`` (tokenized whole, as text is in training) followed by the target's tokens but the last.

    The subject's last token is the token holding the last character of the subject's first occurrence in the
    prompt (ROME's "last subject token"); with ``subject`` None it is the prompt's last token.
    """
    ids = tokenizer(prefix + prompt)["input_ids"]
    answer = target_ids(tokenizer, prompt, target)
    position = len(ids) - 1 if subject is None else subject_span(tokenizer, prompt, subject, prefix)[1]
    return Tokens(ids + answer[:-1], position, len(ids) - 1, answer)


def subject_span(tokenizer: Any, prompt: str, subject: str, prefix: str = "") -> tuple[int, int]:
    """The indices of the first and the last token of ``prefix + prompt`` that hold characters of the subject's
    first occurrence in the prompt."""
    text = prefix + prompt
    begin = len(prefix) + prompt.index(subject)
    end = begin + len(subject)
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        inside = [index for index, (first, last) in enumerate(offsets) if first < end and last > begin and last > first]
        return inside[0], inside[-1]
    # The tokens of the text up to each end of the subject, as ROME counts them.
    return len(tokenizer(text[:begin])["input_ids"]), len(tokenizer(text[:end])["input_ids"]) - 1


def padded(batch: Sequence[Tokens], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, each ``(B, T)``, right-padded so that positions keep their indices."""
    width = max(len(tokens.ids) for tokens in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, tokens in enumerate(batch):
        ids[row, :len(tokens.ids)] = torch.tensor(tokens.ids)
        mask[row, :len(tokens.ids)] = 1
    return ids.to(device), mask.to(device)


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@contextmanager
def reading_residual(model: torch.nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Inside the block, each forward pass appends the residual stream after decoder layer ``layer``
    ``(B, T, d_model)`` to the list yielded (read from the layer itself: the model's last ``hidden_states`` entry
    is normalised)."""
    seen: list[torch.Tensor] = []

    def record(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        seen.append((output[0] if isinstance(output, tuple) else output).detach())

    handle = decoder_layers(model)[layer].register_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def shifting_output(module: torch.nn.Module, positions: Sequence[int], delta: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``delta`` ``(d_out,)`` (or ``(B, d_out)``, one per row) is added to the output of
    ``module`` at token ``positions[b]`` of each row ``b``; a position of -1 leaves its row alone."""
    rows = [row for row, position in enumerate(positions) if position >= 0]
    columns = [positions[row] for row in rows]

    def shift(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        change = torch.zeros_like(output)
        change[rows, columns] = (delta[rows] if delta.dim() == 2 else delta).to(output.dtype)
        return output + change

    handle = module.register_forward_hook(shift)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's parameters need no gradient inside the block (only an edit's delta does), and it is in eval
    mode; both are restored after."""
    wanted = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    training = model.training
    model.eval()
    for parameter, _ in wanted:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in wanted:
            parameter.requires_grad_(flag)
        model.train(training)


def keys_at(model: torch.nn.Module, tokenizer: Any, layer: int, batch: Sequence[Tokens]) -> torch.Tensor:
    """The inputs of layer ``layer``'s ``down_proj`` at each row's subject token: ``(B, d_mlp)``."""
    device = next(model.parameters()).device
    ids, mask = padded(batch, pad_id(tokenizer), device)
    with torch.no_grad(), reading_inputs({layer: down_proj(model, layer)}) as seen:
        model(input_ids=ids, attention_mask=mask)
    rows = torch.arange(len(batch), device=device)
    return seen[layer][rows, torch.tensor([tokens.subject for tokens in batch], device=device)].float()


def outputs_at(model: torch.nn.Module, tokenizer: Any, layer: int, batch: Sequence[Tokens]) -> torch.Tensor:
    """The residual stream after decoder layer ``layer`` at each row's subject token: ``(B, d_model)``."""
    device = next(model.parameters()).device
    ids, mask = padded(batch, pad_id(tokenizer), device)
    with torch.no_grad(), reading_residual(model, layer) as seen:
        model(input_ids=ids, attention_mask=mask)
    hidden = seen[0]
    rows = torch.arange(len(batch), device=device)
    return hidden[rows, torch.tensor([tokens.subject for tokens in batch], device=device)].float()


def second_moment(model: torch.nn.Module, tokenizer: Any, layers: Sequence[int], texts: Sequence[str],
                  max_length: int = 128, batch_size: int = 16, ridge: float = 1e-3) -> dict[int, torch.Tensor]:
    """``C = E[k k^T]`` ``(d_mlp, d_mlp)`` of each layer's ``down_proj`` inputs over every token of ``texts``
    (ROME's uncentred second moment, estimated in float64, returned in float32), plus ``ridge`` times its mean
    eigenvalue on the diagonal: a corpus of fewer distinct tokens than ``d_mlp`` gives a singular estimate,
    which neither update could invert.

    Raises:
        PolmError: no text gives a token.
    """
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    count = 0
    modules = {layer: down_proj(model, layer) for layer in layers}
    for start in range(0, len(texts), batch_size):
        chunk = [Tokens(tokenizer(text)["input_ids"][:max_length], 0, 0, []) for text in texts[start:start + batch_size]]
        ids, mask = padded([tokens for tokens in chunk if tokens.ids], pad_id(tokenizer), device)
        with torch.no_grad(), reading_inputs(modules) as seen:
            model(input_ids=ids, attention_mask=mask)
        mask = mask.bool()
        for layer, keys in seen.items():
            flat = keys[mask].double()  # (N, d_mlp): the real tokens only
            sums[layer] = sums.get(layer, 0) + flat.T @ flat
        count += int(mask.sum())
    if count == 0:
        raise PolmError("covariance_corpus: its texts give no tokens to estimate the keys' second moment from")
    moments = {layer: total / count for layer, total in sums.items()}
    return {layer: (moment + ridge * moment.diagonal().mean() * torch.eye(len(moment), dtype=moment.dtype,
                                                                         device=moment.device)).float()
            for layer, moment in moments.items()}


@contextmanager
def reading_inputs(modules: dict[int, torch.nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, a forward pass stores each module's input ``(B, T, d_in)`` under its key."""
    seen: dict[int, torch.Tensor] = {}
    handles = [module.register_forward_hook(
        lambda _module, inputs, _output, layer=layer: seen.__setitem__(layer, inputs[0].detach()))
        for layer, module in modules.items()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()

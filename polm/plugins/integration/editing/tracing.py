"""Causal tracing: which layer's MLP, at the subject's last token, carries a fact (ROME, arXiv 2202.05262,
section 2).

Each prompt is run three ways: clean; with Gaussian noise (``noise`` times the standard deviation of the
token embeddings, ROME's 3) added to the embeddings of the subject's tokens, which makes the model forget what
it would answer; and corrupted again with one layer's MLP output at the subject's last token put back to its
clean value. That layer's *indirect effect* is how much of the answer's probability the restoration gives back,
``P_restored(a) - P_corrupted(a)``, with ``a`` the first token the clean model predicts; the layer with the
largest mean effect is where ROME writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from polm.plugins.integration.editing.model import decoder_layers, down_proj, subject_span
from polm.plugins.integration.editing.requests import EditRequest


def mlp_effects(model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest], samples: int = 8,
                noise: float = 3.0, seed: int = 0) -> list[float]:
    """The mean indirect effect of each layer's MLP at the subject's last token, one float per layer, over
    ``requests`` and ``samples`` noise draws each."""
    scale = noise * float(model.get_input_embeddings().weight.detach().float().std())
    generator = torch.Generator().manual_seed(seed)
    training = model.training
    model.eval()
    with torch.no_grad():
        total = sum(_effects(model, tokenizer, request, samples, scale, generator) for request in requests)
    model.train(training)
    return (total / max(1, len(requests))).tolist()


def _effects(model: torch.nn.Module, tokenizer: Any, request: EditRequest, samples: int, scale: float,
             generator: torch.Generator) -> torch.Tensor:
    """One request's indirect effect of each layer's MLP: ``(layers,)``."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    ids = torch.tensor([tokenizer(request.prompt)["input_ids"]] * samples, device=device)  # (S, T)
    first, last = subject_span(tokenizer, request.prompt, request.subject)
    corruption = torch.randn((samples, last + 1 - first, embeddings.weight.shape[1]), generator=generator) * scale
    clean: dict[int, torch.Tensor] = {}
    count = len(decoder_layers(model))

    def corrupt(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[:, first:last + 1] += corruption.to(device, output.dtype)
        return output

    def record(layer: int) -> Any:
        return lambda _module, _inputs, output: clean.__setitem__(layer, output[:1, last].clone())

    def restore(layer: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[:, last] = clean[layer]
            return output
        return hook

    def answer_probability(*hooks: tuple[torch.nn.Module, Any]) -> torch.Tensor:
        handles = [module.register_forward_hook(hook) for module, hook in hooks]
        try:
            return model(input_ids=ids).logits[:, -1].softmax(-1)[:, answer].mean()
        finally:
            for handle in handles:
                handle.remove()

    handles = [down_proj(model, layer).register_forward_hook(record(layer)) for layer in range(count)]
    try:
        answer = int(model(input_ids=ids[:1]).logits[0, -1].argmax())
    finally:
        for handle in handles:
            handle.remove()
    corrupted = answer_probability((embeddings, corrupt))
    return torch.stack([answer_probability((embeddings, corrupt), (down_proj(model, layer), restore(layer)))
                        - corrupted for layer in range(count)]).float().cpu()


def traced_layer(model: torch.nn.Module, tokenizer: Any, requests: Sequence[EditRequest], **options: Any) -> int:
    """The layer whose MLP has the largest mean indirect effect (:func:`mlp_effects`)."""
    effects = mlp_effects(model, tokenizer, requests, **options)
    return max(range(len(effects)), key=effects.__getitem__)

"""``edit(model, tokenizer, requests, method=...)``: the Python API of knowledge editing, which the ``edit``
stage calls."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from polm.engine.data import load_rows
from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.plugins.integration.editing.memit import memit_edit
from polm.plugins.integration.editing.model import decoder_layers, default_layers, down_proj, second_moment
from polm.plugins.integration.editing.requests import EditRequest, load_requests
from polm.plugins.integration.editing.rome import rome_edit
from polm.plugins.integration.editing.scores import edit_scores
from polm.plugins.integration.editing.tracing import traced_layer
from polm.plugins.integration.editing.values import ValueOptions

METHODS = ("rome", "memit")


@dataclass
class EditResult:
    """What :func:`edit` returns.

    Attributes:
        model: the edited model (the one passed in, changed in place).
        metrics: ``efficacy``, ``paraphrase`` and ``neighbourhood`` after the edit and with ``_before`` before it
            (see :mod:`.scores`; the last two only where the requests carry paraphrases or neighbours), the
            value optimisation's mean final ``nll`` and ``delta_norm``, ``requests`` and ``seconds``.
        layers: the layers whose ``down_proj`` changed.
    """

    model: torch.nn.Module
    metrics: dict[str, float]
    layers: list[int]


def corpus_texts(spec: Any, samples: int) -> list[str]:
    """The first ``samples`` texts of a covariance corpus: ``polm:<name>`` (its ``train`` split), a data file, or a
    list of strings or rows; a row gives its ``text``, else its ``prompt`` (and ``answer`` or ``completion``)."""
    if isinstance(spec, (list, tuple)) and all(isinstance(item, str) for item in spec):
        return list(spec[:samples])
    texts = []
    for row in load_rows(spec, "train"):
        text = row.get("text") or " ".join(str(row.get(k, "")) for k in ("prompt", "answer", "completion")).strip()
        if isinstance(text, str) and text:
            texts.append(text)
        if len(texts) >= samples:
            break
    return texts


def edit(model: torch.nn.Module, tokenizer: Any, requests: Sequence[Any] | Any, method: str = "rome",
         layers: Sequence[int] | None = None, covariance_corpus: Any = None, covariance_samples: int = 1000,
         value_options: ValueOptions | None = None, prior_weight: float = 1.0, score: bool = True,
         covariances: dict[int, torch.Tensor] | None = None, trace: bool = False) -> EditResult:
    """Write ``requests`` into ``model`` by ROME (one request after another, one layer) or MEMIT (all at once,
    spread over ``layers``); the model is changed in place.

    Args:
        model: a Llama-style causal LM (:func:`~.model.decoder_layers`).
        tokenizer: its tokenizer.
        requests: what :func:`~.requests.load_requests` takes: ``{prompt, subject, target}`` rows, a ``.jsonl``
            file of them, or ``polm:<name>`` (its ``edits`` split).
        method: ``rome`` or ``memit``.
        layers: the layers edited: one for ROME, any for MEMIT; default :func:`~.model.default_layers`, or with
            ``trace`` the layers causal tracing finds.
        covariance_corpus: texts whose tokens give each layer's key second moment ``C`` (:func:`corpus_texts`);
            None takes ``C = I``, which makes ROME the minimum-norm rank-one update (its paper's ablation).
        covariance_samples: texts of the corpus read.
        value_options: how each target value is optimised (:class:`~.values.ValueOptions`).
        prior_weight: MEMIT's ``lambda``, the weight of ``C`` against the new keys (MEMIT's
            ``mom2_update_weight``); larger keeps more of the old behaviour and writes less of the new.
        score: score the requests before and after (:func:`~.scores.edit_scores`).
        covariances: each layer's ``C`` already estimated (:func:`~.model.second_moment`), for many edits of one
            model; it replaces ``covariance_corpus``.
        trace: with no ``layers``, choose them by causal tracing on the first 10 requests
            (:func:`~.tracing.traced_layer`): ROME edits the layer of the largest MLP effect, MEMIT every layer
            up to it (MEMIT's critical range ends where the effect peaks).

    Raises:
        PolmError: an unknown method, ROME with more than one layer, a layer the model does not have, a bad
            request (naming its row) or a model that is not Llama-style.
    """
    if method not in METHODS:
        raise PolmError(f"unknown editing method {method!r}; available methods = {list(METHODS)}")
    requests = load_requests(requests)
    count = len(decoder_layers(model))
    if layers:
        layers = sorted(set(layers))
    elif trace:
        peak = traced_layer(model, tokenizer, requests[:10])
        layers = [peak] if method == "rome" else list(range(peak + 1))
    else:
        layers = default_layers(model, method)
    if any(not 0 <= layer < count for layer in layers):
        raise PolmError(f"option 'layers': {layers} names a layer the model lacks; it has layers 0-{count - 1}")
    if method == "rome" and len(layers) != 1:
        raise PolmError(f"option 'layers': ROME edits one layer, got {layers}; use method memit for several")
    options = value_options or ValueOptions()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    if score:
        metrics.update({f"{key}_before": value for key, value in edit_scores(model, tokenizer, requests).items()})
    if covariances is not None:
        missing = [layer for layer in layers if layer not in covariances]
        if missing:
            raise PolmError(f"covariances: no second moment for layer(s) {missing}")
    elif covariance_corpus is None:
        covariances = {layer: torch.eye(down_proj(model, layer).in_features) for layer in layers}
    else:
        covariances = second_moment(model, tokenizer, layers, corpus_texts(covariance_corpus, covariance_samples))
    if method == "rome":
        found = [rome_edit(model, tokenizer, request, layers[0], covariances[layers[0]], options)
                 for request in requests]
        metrics["nll"] = sum(item["nll"] for item in found) / len(found)
        metrics["delta_norm"] = sum(item["delta_norm"] for item in found) / len(found)
    else:
        metrics.update(memit_edit(model, tokenizer, requests, layers, covariances, prior_weight, options))
    if score:
        metrics.update(edit_scores(model, tokenizer, requests))
    metrics.update(requests=float(len(requests)), seconds=time.perf_counter() - started)
    get_logger().info("edit: %s wrote %d request(s) into layer(s) %s%s", method, len(requests), layers,
                      f"; efficacy {metrics['efficacy']:.2f}" if score else "")
    return EditResult(model, metrics, layers)


__all__ = ["METHODS", "EditRequest", "EditResult", "corpus_texts", "edit"]

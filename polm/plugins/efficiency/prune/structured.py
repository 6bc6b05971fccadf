"""Structured pruning: a transformers decoder made smaller in place, MLP neurons and attention heads removed.

An MLP neuron ``j`` is row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of ``down_proj``; removing it
removes exactly its term of ``down_proj``'s output. A query head is its ``head_dim`` rows of ``q_proj`` and
columns of ``o_proj``; removing it removes exactly its term of ``o_proj``'s output.

Grouped-query attention (``num_key_value_heads < num_attention_heads``): every key/value head is kept and each
loses the same number of its query heads (:func:`~polm.plugins.efficiency.prune.methods.heads_to_keep`). That is
finer than removing whole key/value groups (with 14 query heads on 2 key/value heads, steps of 1/7 instead of
1/2), and a removed query head takes only its own output with it, where a removed key/value head would take
those of all its group; ``k_proj`` and ``v_proj`` (and the KV cache) keep their size. Multi-head attention
(as many key/value heads as query heads, groups of one) loses whole heads: a removed head's ``k_proj`` and
``v_proj`` rows go with it.

Every layer loses the same counts, so that the config can say the new shape: ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads`` and an explicit ``head_dim`` (heads x head_dim may then differ
from ``hidden_size``); plain ``transformers`` builds the saved model from it. The projections this knows are
those of the Llama family (Llama, Qwen2/3, Mistral, Gemma): ``mlp.{gate,up,down}_proj`` and
``self_attn.{q,k,v,o}_proj``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polm.engine.errors import PolmError
from polm.plugins.efficiency.prune.calibration import InputStatistics
from polm.plugins.efficiency.prune.methods import (
    head_importance,
    heads_to_keep,
    neuron_importance,
    neurons_to_keep,
)

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers of a transformers causal LM (``model.layers`` of its base model) and their name.

    Raises:
        PolmError: the model has no such list.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise PolmError(f"{type(model).__name__} has no model.layers, the decoder layers prune looks for "
                        "(those of Llama, Qwen2, Mistral, Gemma, Phi-3 and most transformers causal LMs)")
    return "model.layers", layers


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every Linear layer inside the decoder layers, by its name in ``model``: attention and MLP projections,
    never the embeddings or ``lm_head``.

    Raises:
        PolmError: no decoder layers, or no Linear layer in them.
    """
    prefix, layers = decoder_layers(model)
    linears = {f"{prefix}.{i}.{name}": module for i, layer in enumerate(layers)
               for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}
    if not linears:
        raise PolmError(f"the decoder layers of {type(model).__name__} hold no torch.nn.Linear to prune")
    return linears


def removed_count(fraction: float, total: int) -> int:
    """``fraction`` of ``total`` as a count: the nearest, a half rounded down (never more than asked by half)."""
    return max(0, math.ceil(fraction * total - 0.5 - 1e-9))


@dataclass(frozen=True)
class StructuredPlan:
    """What structured pruning removes from each decoder layer, and the shape it leaves.

    Attributes:
        neurons_removed: MLP neurons removed per layer.
        heads_removed: query heads removed per layer (with GQA, the same number from each key/value group).
        intermediate_size: MLP neurons per layer, before.
        heads: query heads per layer, before.
        kv_heads: key/value heads per layer, before.
        head_dim: features per head.
    """

    neurons_removed: int
    heads_removed: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def heads_left(self) -> int:
        return self.heads - self.heads_removed

    @property
    def kv_heads_left(self) -> int:
        """GQA keeps every key/value head; multi-head attention keeps one per query head left."""
        return self.heads_left if self.kv_heads == self.heads else self.kv_heads

    @property
    def neurons_left(self) -> int:
        return self.intermediate_size - self.neurons_removed


def structured_plan(model: torch.nn.Module, mlp_fraction: float, heads_fraction: float) -> StructuredPlan:
    """Check that ``model`` can lose ``mlp_fraction`` of each layer's MLP neurons and ``heads_fraction`` of its
    attention heads, and say how many that is.

    Raises:
        PolmError: naming the option: a layer without the projections looked for (naming the module), layers
            of unequal sizes, or a fraction that removes none or all of them.
    """
    try:
        _, layers = decoder_layers(model)
    except PolmError as error:
        raise PolmError(f"option '{'mlp_fraction' if mlp_fraction else 'heads_fraction'}': {error}") from None
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    intermediate = getattr(config, "intermediate_size", 0)
    for i, layer in enumerate(layers):
        if mlp_fraction:
            _projections("mlp_fraction", model, i, layer, "mlp", MLP_PROJECTIONS)
            if layer.mlp.up_proj.out_features != intermediate:
                raise PolmError(f"option 'mlp_fraction': decoder layer {i} has {layer.mlp.up_proj.out_features} MLP "
                                f"neurons and the config's intermediate_size is {intermediate}; prune removes the "
                                "same count from layers of one size")
        if heads_fraction:
            _projections("heads_fraction", model, i, layer, "self_attn", ATTENTION_PROJECTIONS)
            if layer.self_attn.q_proj.out_features != heads * head_dim:
                raise PolmError(f"option 'heads_fraction': decoder layer {i}'s q_proj has "
                                f"{layer.self_attn.q_proj.out_features} outputs, not num_attention_heads x head_dim "
                                f"= {heads} x {head_dim}")
    neurons = removed_count(mlp_fraction, intermediate) if mlp_fraction else 0
    if mlp_fraction and not 0 < neurons < intermediate:
        raise PolmError(f"option 'mlp_fraction': {mlp_fraction} of the {intermediate} MLP neurons of each layer "
                        f"removes {neurons}; choose a fraction that removes at least one and leaves one")
    if kv_heads == heads:  # multi-head attention: whole heads
        removed = removed_count(heads_fraction, heads) if heads_fraction else 0
        if heads_fraction and not 0 < removed < heads:
            raise PolmError(f"option 'heads_fraction': {heads_fraction} of the {heads} attention heads of each layer "
                            f"removes {removed}; choose a fraction that removes at least one and leaves one")
    else:
        group = heads // kv_heads
        per_group = removed_count(heads_fraction, group) if heads_fraction else 0
        if heads_fraction and not 0 < per_group < group:
            raise PolmError(f"option 'heads_fraction': {heads_fraction} of the {group} query heads of each of the "
                            f"{kv_heads} key/value groups removes {per_group} of them; each group loses the same "
                            f"number, so the fraction moves in steps of 1/{group} and must leave one head per group")
        removed = per_group * kv_heads
    return StructuredPlan(neurons, removed, intermediate, heads, kv_heads, head_dim)


def _projections(option: str, model: torch.nn.Module, index: int, layer: torch.nn.Module, block: str,
                 names: tuple[str, ...]) -> None:
    for name in names:
        if not isinstance(getattr(getattr(layer, block, None), name, None), torch.nn.Linear):
            raise PolmError(f"option '{option}': decoder layer {index} of {type(model).__name__} has no Linear "
                            f"{block}.{name}; structured pruning knows the {block}.{{{', '.join(names)}}} of the "
                            "Llama family (Llama, Qwen2, Mistral, Gemma)")


def structured_inputs(model: torch.nn.Module, plan: StructuredPlan) -> tuple[dict[str, torch.nn.Linear],
                                                                            dict[str, int]]:
    """The Linear layers whose input statistics rank the structures (``down_proj`` for neurons, ``o_proj`` for
    heads), by name, and the block size of those that need feature-block Gram matrices (``o_proj``: head_dim)."""
    prefix, layers = decoder_layers(model)
    watched, blocks = {}, {}
    for i, layer in enumerate(layers):
        if plan.neurons_removed:
            watched[f"{prefix}.{i}.mlp.down_proj"] = layer.mlp.down_proj
        if plan.heads_removed:
            watched[f"{prefix}.{i}.self_attn.o_proj"] = layer.self_attn.o_proj
            blocks[f"{prefix}.{i}.self_attn.o_proj"] = plan.head_dim
    return watched, blocks


def prune_structured(model: torch.nn.Module, plan: StructuredPlan, statistics: InputStatistics) -> None:
    """Remove the least important MLP neurons and query heads of every decoder layer of ``model`` in place, as
    ``plan`` counts them and ``statistics`` (of :func:`structured_inputs`' layers) rank them, and write the new
    shape into its config."""
    prefix, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if plan.neurons_removed:
            down = layer.mlp.down_proj
            importance = neuron_importance(down.weight, statistics.squares[f"{prefix}.{i}.mlp.down_proj"])
            shrink_mlp(layer.mlp, neurons_to_keep(importance, plan.neurons_removed))
        if plan.heads_removed:
            o_proj = layer.self_attn.o_proj
            importance = head_importance(o_proj.weight, statistics.grams[f"{prefix}.{i}.self_attn.o_proj"])
            keep = heads_to_keep(importance, plan.kv_heads, plan.heads_removed)
            shrink_attention(layer.self_attn, keep, plan.head_dim, plan.kv_heads)
    config = model.config
    if plan.neurons_removed:
        config.intermediate_size = plan.neurons_left
    if plan.heads_removed:
        config.num_attention_heads = plan.heads_left
        config.num_key_value_heads = plan.kv_heads_left
        config.head_dim = plan.head_dim  # explicit: heads x head_dim no longer equals hidden_size


def shrink_mlp(mlp: torch.nn.Module, keep: torch.Tensor) -> None:
    """Keep only the neurons ``keep`` (ascending indices) of a gated MLP: rows of ``gate_proj`` and ``up_proj``,
    columns of ``down_proj``."""
    _select(mlp.gate_proj, 0, keep)
    _select(mlp.up_proj, 0, keep)
    _select(mlp.down_proj, 1, keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


def shrink_attention(attention: torch.nn.Module, keep_heads: torch.Tensor, head_dim: int, kv_heads: int) -> None:
    """Keep only the query heads ``keep_heads`` (ascending; with GQA the same number from each of the
    ``kv_heads`` key/value groups): their rows of ``q_proj`` and columns of ``o_proj``. With GQA ``k_proj`` and
    ``v_proj`` stay whole; in multi-head attention (``kv_heads`` query heads before) they keep the same heads."""
    features = (keep_heads[:, None] * head_dim + torch.arange(head_dim, device=keep_heads.device)).reshape(-1)
    multi_head = attention.q_proj.out_features == kv_heads * head_dim
    _select(attention.q_proj, 0, features)
    _select(attention.o_proj, 1, features)
    heads = len(keep_heads)
    if multi_head:
        _select(attention.k_proj, 0, features)
        _select(attention.v_proj, 0, features)
        kv_heads = heads
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attention, name, None), int):  # kept by some architectures' attention modules
            setattr(attention, name, value)


def _select(linear: torch.nn.Linear, dim: int, index: torch.Tensor) -> None:
    """Keep the rows (``dim`` 0, with the bias) or columns (``dim`` 1) ``index`` of ``linear``, in place."""
    weight = linear.weight
    index = index.to(weight.device)
    linear.weight = torch.nn.Parameter(weight.data.index_select(dim, index).clone(),
                                       requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data.index_select(0, index).clone(),
                                             requires_grad=linear.bias.requires_grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)

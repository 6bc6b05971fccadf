"""Which modules an adapter wraps: defaults per architecture, and checks with helpful errors."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

import torch

from polm.engine.errors import PolmError, did_you_mean

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Modules LoRA-style adapters wrap, by ``model.config.model_type``: every linear layer of attention and MLP.
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": PROJECTIONS,
    "qwen2": PROJECTIONS,
    "mistral": PROJECTIONS,
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # Conv1D layers; c_proj is both the attention and the MLP output
}

#: peft's shorthand for every linear layer except the output head.
ALL_LINEAR = "all-linear"


def model_type(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def default_lora_targets(model: torch.nn.Module) -> list[str] | str:
    """The modules LoRA, DoRA, AdaLoRA and QLoRA wrap when ``target_modules`` is not given.

    An architecture outside :data:`LORA_TARGETS` gets ``"all-linear"`` rather than
    peft's own per-architecture defaults: those are only ``q_proj, v_proj`` for most
    models, so the same recipe would adapt attention and MLP on a Llama but only
    two attention projections on, say, a Phi. ``"all-linear"`` is what the table
    gives for the known architectures too.

    A mixture-of-experts model gets the same rule in every family: its linear layers outside the MoE
    blocks (attention), and its routed experts through :func:`fused_expert_parameters`; not the routers,
    and not the linear layers of the blocks' shared experts, nor the dense MLP layers that share their
    names. ``"all-linear"`` would adapt Mixtral's router and Qwen2-MoE's shared experts and shared-expert
    gate but not its routed experts; and for Qwen3-MoE, OLMoE, DeepSeek-V2/V3 and GLM-4-MoE, peft (for
    checkpoints of transformers 4) reads ``gate_proj`` / ``up_proj`` / ``down_proj`` as the routed experts
    and drops the shared and dense layers of those names, so naming them would mean one thing per family.
    """
    in_blocks = moe_block_layers(model)
    if in_blocks or fused_expert_parameters(model):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is head}
        return [name for name in adapter_layers(model) if name not in in_blocks | heads]
    targets = LORA_TARGETS.get(model_type(model) or "")
    return list(targets) if targets else ALL_LINEAR


def fused_expert_parameters(model: torch.nn.Module) -> list[str]:
    """The routed experts' fused weights of a mixture-of-experts model, as peft ``target_parameters`` names.

    transformers keeps each MoE block's experts as one ``experts`` module holding 3-d parameters,
    (experts, out, in): ``gate_up_proj`` and ``down_proj`` for Mixtral, Qwen2/3-MoE, OLMoE and
    DeepSeek-V3. Returns ``["experts.gate_up_proj", "experts.down_proj"]`` for those; empty for a dense model.
    """
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "experts":
            for parameter_name, parameter in module.named_parameters(recurse=False):
                if parameter.ndim == 3:
                    names[f"experts.{parameter_name}"] = None
    return list(names)


def moe_block_layers(model: torch.nn.Module) -> set[str]:
    """Short names of the linear layers inside a mixture-of-experts block (a module with an ``experts``
    child): its routers (Qwen2-MoE's ``shared_expert_gate``) and its shared experts' projections."""
    names: set[str] = set()
    for module in model.modules():
        if "experts" in dict(module.named_children()):
            names |= {name.rsplit(".", 1)[-1] for name, layer in module.named_modules()
                      if isinstance(layer, torch.nn.Linear)}
    return names


def adapter_layers(model: torch.nn.Module) -> list[str]:
    """Distinct short names of the layers adapters can wrap (linear and GPT-2 Conv1D), in model order."""
    from transformers.pytorch_utils import Conv1D

    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def module_overview(model: torch.nn.Module, limit: int = 12) -> str:
    """Some module names of ``model`` with layer numbers as ``*``, for error messages."""
    names: dict[str, None] = {}
    for name, _ in model.named_modules():
        if name:
            names[re.sub(r"\.\d+(?=\.|$)", ".*", name)] = None
    shown = list(names)[:limit]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more


def check_targets(method: str, model: torch.nn.Module, targets: Iterable[str] | str | None, option: str) -> None:
    """Fail if a target matches no module, the way peft matches them.

    peft matches a list entry against a module named exactly so or ending in
    ``".<entry>"``, and a string as a regular expression over the full name.

    Raises:
        PolmError: naming the target, the closest layer name and the layers there are.
    """
    if targets is None or targets == ALL_LINEAR:
        return
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        missing = [] if any(re.fullmatch(targets, name) for name in names) else [targets]
    else:
        missing = [t for t in targets if not any(name == t or name.endswith(f".{t}") for name in names)]
    if missing:
        layers = adapter_layers(model)
        raise PolmError(
            f"{method}: {option} {', '.join(repr(t) for t in missing)} match(es) no module of "
            f"{type(model).__name__}.{did_you_mean(missing[0], layers)} Its linear layers are: {', '.join(layers)}"
        )


def name_matches(name: str, pattern: str) -> bool:
    """``pattern`` (a glob) matches the full dotted ``name`` or its last components."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")

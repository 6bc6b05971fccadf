"""LoRA adapters as merge inputs: merged into their base, or into a new adapter (the ``lora`` key, :class:`LoraMerge`).

An adapter is a peft folder, ``adapter_config.json`` and ``adapter_model.safetensors`` (a polm LoRA stage's
``final/``). Each module it adapts, of base weight ``W`` (out, in), holds ``A`` (r, in) and ``B`` (out, r), and
its update is ``delta = s B A`` with ``s = alpha / r``, ``alpha / sqrt(r)`` with rsLoRA, ``alpha`` taken from
``alpha_pattern`` where a pattern names the module and ``r`` from the tensors (so ``rank_pattern`` needs no
reading); a base that stores ``W`` transposed (``fan_in_fan_out``, GPT-2's Conv1D) gets ``delta`` transposed.
The adapter's other tensors (``modules_to_save``, trained biases) replace the base's tensors of their names.

The adapters are turned into inputs of the ordinary tensor-by-tensor merge (:func:`prepare_lora_merge`):

- ``output: base``: each adapter stands for its full model, the base's tensors with ``W + delta_m``
  (:class:`AdaptedModel`), merged with the base exactly as full models are, into a transformers folder;
- ``output: adapter``: each adapter stands for its updates ``delta_m`` and its full tensors (:class:`AdapterUpdates`),
  the base for zeros and its own full tensors; the merged updates are factored back into a peft adapter
  (:meth:`LoraMerger.write_adapter`), by SVD to a rank or, for the methods linear in the updates, by stacking
  the adapters' scaled factors.

Refused, before anything is written, in one line naming the adapter and the field: other peft types (IA3,
prefix tuning, ...), DoRA (``use_dora``), LoRA on embeddings and fused parameters (``target_parameters``),
adapters trained on other bases (``base_model_name_or_path``), factors or tensors whose shapes are not the
base's, mixing adapters with full models, and for ``output: adapter`` adapters that adapt other modules
(``target_modules``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polm.engine.errors import PolmError
from polm.engine.log import get_logger
from polm.plugins.integration.merge.config import LoraMerge, MergeConfig, MergeMethod, same_model
from polm.plugins.integration.merge.inputs import (
    ADAPTER_CONFIG_FILE,
    CONFIG_FILE,
    INPUT_READERS,
    MergeInput,
    SafetensorsFolder,
    open_input,
)

LORA_KIND = "lora"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
#: What peft puts before a causal LM's tensor names in a saved adapter.
PEFT_PREFIX = "base_model.model."
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: the base weight it updates, the saved names of its factors, its rank and scale."""

    weight: str
    a: str
    b: str
    rank: int
    scaling: float


class LoraAdapter(MergeInput):
    """A peft LoRA adapter folder, its factors read lazily (their stored tensors are the peft names).

    Attributes:
        adapter_config: its ``adapter_config.json``.
        modules: the adapted modules by the name of the base weight they update.
        full: the saved name of each other tensor (``modules_to_save``, biases) by the base tensor it replaces.

    Raises:
        PolmError: naming the adapter and the field: not LoRA, DoRA, no safetensors weights, LoRA on embeddings
            or fused parameters, a factor without its pair, or names without peft's prefix.
    """

    kind = LORA_KIND

    def __init__(self, folder: Path, reference: str) -> None:
        super().__init__(reference, str(folder))
        self.folder = Path(folder)
        where = f"adapter '{reference}'"
        self.adapter_config = json.loads((self.folder / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        peft_type = self.adapter_config.get("peft_type")
        if peft_type != "LORA":
            raise PolmError(f"{where}: peft_type is {peft_type}; polm merges LoRA adapters (peft_type LORA) and "
                            "full models")
        for field in ("use_dora", "target_parameters"):
            if self.adapter_config.get(field):
                raise PolmError(f"{where}: {field} is set in {ADAPTER_CONFIG_FILE}; merging "
                                f"{'DoRA' if field == 'use_dora' else 'LoRA on fused parameters'} is not supported, "
                                "merge full models (a stage's final/merged, written with merge_adapters: true)")
        if not (self.folder / ADAPTER_WEIGHTS_FILE).is_file():
            raise PolmError(f"{where}: {self.folder} has no {ADAPTER_WEIGHTS_FILE}; save the adapter with "
                            "safe_serialization=True")
        self.stored = SafetensorsFolder(self.folder, reference)
        self.fan_in_fan_out = bool(self.adapter_config.get("fan_in_fan_out"))
        self.modules: dict[str, LoraModule] = {}
        self.full: dict[str, str] = {}
        names = set(self.stored.tensor_names())
        for name in self.stored.tensor_names():
            if not name.startswith(PEFT_PREFIX):
                raise PolmError(f"{where}: tensor {name} is not named as peft saves a causal LM's ({PEFT_PREFIX}...)")
            if "lora_embedding" in name:
                raise PolmError(f"{where}: tensor {name} is LoRA on an embedding layer; merging those is not "
                                "supported (target_modules without the embeddings)")
            if name.endswith(LORA_A):
                module = name[len(PEFT_PREFIX):-len(LORA_A)]
                pair = name[:-len(LORA_A)] + LORA_B
                if pair not in names:
                    raise PolmError(f"{where}: tensor {name} has no {pair}")
                rank = self.stored.shape(name)[0]
                self.modules[f"{module}.weight"] = LoraModule(f"{module}.weight", name, pair, rank,
                                                              self._scaling(module, rank))
            elif not name.endswith(LORA_B):
                if ".lora_" in name:
                    raise PolmError(f"{where}: tensor {name} is not a LoRA factor polm can merge")
                self.full[name[len(PEFT_PREFIX):]] = name

    def _scaling(self, module: str, rank: int) -> float:
        alpha = float(self.adapter_config.get("lora_alpha", 8))
        for pattern, value in (self.adapter_config.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):  # how peft matches a pattern (utils.other.get_pattern_key)
                alpha = float(value)
                break
        return alpha / (math.sqrt(rank) if self.adapter_config.get("use_rslora") else rank)

    @property
    def base_name(self) -> str | None:
        """The base the adapter was trained on, as its ``adapter_config.json`` names it."""
        return self.adapter_config.get("base_model_name_or_path") or None

    def update_shape(self, module: LoraModule) -> tuple[int, int]:
        """``(out, in)``: the shape of ``B A``."""
        return self.stored.shape(module.b)[0], self.stored.shape(module.a)[1]

    def update(self, module: LoraModule) -> torch.Tensor:
        """``s B A``, (out, in), in float32 (float64 for float64 factors)."""
        a, b = self.stored.tensor(module.a), self.stored.tensor(module.b)
        dtype = torch.promote_types(a.dtype, torch.float32)
        return module.scaling * (b.to(dtype) @ a.to(dtype))  # (out, r) @ (r, in)

    def tensor_names(self) -> list[str]:
        return self.stored.tensor_names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.stored.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self.stored.tensor(name)

    def config(self) -> dict[str, Any]:
        return dict(self.adapter_config)

    def tokenizer(self) -> Any | None:
        return self.stored.tokenizer()

    def checksums(self) -> dict[str, str]:
        return self.stored.checksums()


def read_lora_adapter(reference: str, folder: Path, stack: ExitStack) -> MergeInput | None:
    """A peft adapter folder (``adapter_config.json`` and no ``config.json``), as a :class:`LoraAdapter`."""
    if not (folder / ADAPTER_CONFIG_FILE).is_file() or (folder / CONFIG_FILE).is_file():
        return None
    return LoraAdapter(folder, reference)


if read_lora_adapter not in INPUT_READERS:
    INPUT_READERS.insert(0, read_lora_adapter)


class AdaptedModel(MergeInput):
    """An adapter's full model: the base's tensors, ``W + delta`` where the adapter updates ``W`` (in float32,
    so that a low-precision base loses nothing before the merge) and the adapter's own full tensors."""

    def __init__(self, adapter: LoraAdapter, base: MergeInput) -> None:
        super().__init__(adapter.reference, adapter.resolved)
        self.adapter = adapter
        self.base = base

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.adapter.full:
            return self.adapter.tensor(self.adapter.full[name])
        if name not in self.adapter.modules:
            return self.base.tensor(name)
        update = self.adapter.update(self.adapter.modules[name])
        if self.adapter.fan_in_fan_out:
            update = update.T
        weight = self.base.tensor(name)
        return weight.to(torch.promote_types(weight.dtype, update.dtype)) + update

    def config(self) -> dict[str, Any]:
        return self.base.config()

    def generation_config(self) -> dict[str, Any] | None:
        return self.base.generation_config()

    def tokenizer(self) -> Any | None:
        return self.adapter.tokenizer()

    def checksums(self) -> dict[str, str]:
        return self.adapter.checksums()

    def describe(self) -> dict[str, Any]:
        return self.adapter.describe()


class AdapterUpdates(MergeInput):
    """An adapter as the merge of ``output: adapter`` sees it: each adapted module's update ``delta`` (out, in)
    under the name of the base weight it updates, and its full tensors. With ``adapter=None``, the base: zeros
    in place of the updates and the base's own tensors in place of the full ones."""

    kind = LORA_KIND

    def __init__(self, adapter: LoraAdapter | None, base: MergeInput,
                 modules: dict[str, tuple[tuple[int, int], torch.dtype]], full: Sequence[str]) -> None:
        source = adapter if adapter is not None else base
        super().__init__(source.reference, source.resolved)
        self.adapter = adapter
        self.base = base
        self.modules = modules  # the update's (out, in) shape and the factors' dtype, by base weight name
        self.full = list(full)

    def tensor_names(self) -> list[str]:
        return [*self.modules, *self.full]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.modules[name][0] if name in self.modules else self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        if name in self.modules:
            return self.modules[name][1]
        if self.adapter is not None and name in self.adapter.full:
            return self.adapter.dtype(self.adapter.full[name])
        return self.base.dtype(name)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.modules:
            if self.adapter is None:
                return torch.zeros(self.modules[name][0])
            return self.adapter.update(self.adapter.modules[name])
        if self.adapter is not None and name in self.adapter.full:
            return self.adapter.tensor(self.adapter.full[name])
        return self.base.tensor(name)  # an adapter without this full tensor has the base's

    def config(self) -> dict[str, Any]:
        return self.base.config()

    def tokenizer(self) -> Any | None:
        return (self.adapter or self.base).tokenizer()

    def checksums(self) -> dict[str, str]:
        return (self.adapter or self.base).checksums()

    def describe(self) -> dict[str, Any]:
        return (self.adapter or self.base).describe()


def linear_coefficients(method: MergeMethod, keywords: dict[str, Any], count: int) -> list[float]:
    """The ``c_m`` of a method linear in the updates, ``merge(deltas, 0) = sum_m c_m delta_m``, read off the method
    itself by merging unit vectors (model m's tensor is ``e_m``), so that weights, ``normalize`` and ``lambda``
    mean what they mean for full weights."""
    units = list(torch.eye(count, dtype=torch.float64))  # M tensors of shape (M,)
    base = torch.zeros(count, dtype=torch.float64) if method.base != "unused" else None
    return [float(value) for value in method.function(units, base, **keywords)]


def factor(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank`` with ``B A`` the best rank-``rank`` approximation of ``update`` (out, in)
    (Eckart-Young): ``B = U_r sqrt(S_r)``, ``A = sqrt(S_r) Vh_r``, zero-padded past ``min(out, in)``."""
    u, s, vh = torch.linalg.svd(update.to(torch.promote_types(update.dtype, torch.float32)), full_matrices=False)
    kept = min(rank, s.numel())
    root = s[:kept].sqrt()
    b = torch.zeros(update.shape[0], rank, dtype=u.dtype)  # (out, r)
    a = torch.zeros(rank, update.shape[1], dtype=u.dtype)  # (r, in)
    b[:, :kept] = u[:, :kept] * root
    a[:kept] = root[:, None] * vh[:kept]
    return a, b


@dataclass
class LoraMerger:
    """LoRA adapters made ready for the tensor-by-tensor merge.

    Attributes:
        options: the ``lora`` key.
        adapters: the adapters, in the order of the models merged.
        base: the full base model they share.
        base_name: the base as the new adapter's ``adapter_config.json`` names it.
        merged_base: what the method takes as the base: the base (``output: base``) or zeros (``output: adapter``).
        merged: what it merges: the adapters as full models (``output: base``) or as their updates.
    """

    options: LoraMerge
    adapters: list[LoraAdapter]
    base: MergeInput
    base_name: str
    merged_base: MergeInput
    merged: list[MergeInput]

    @property
    def writes_adapter(self) -> bool:
        return self.options.output == "adapter"

    def record(self) -> dict[str, Any]:
        """What ``merge.json`` records under ``lora``: the output, and for an adapter how and to what rank."""
        if not self.writes_adapter:
            return {"output": "base"}
        return {"output": "adapter", "combine": self.options.combine, "rank": self.rank()}

    def rank(self) -> int:
        """The new adapter's rank: ``rank`` (default the largest of the adapters') for svd, for concat the largest
        sum over the adapters of one module's ranks."""
        if self.options.combine == "concat":
            return max(sum(adapter.modules[name].rank for adapter in self.adapters)
                       for name in self.adapters[0].modules)
        return self.options.rank or max(module.rank for adapter in self.adapters for module in adapter.modules.values())

    def write_adapter(self, folder: Path, method: MergeMethod, plans: Sequence[Any],
                      merge: Callable[[str], torch.Tensor], tokenizer_source: MergeInput) -> None:
        """Write the new adapter into ``folder``: ``adapter_model.safetensors`` (peft's names), ``adapter_config.json``
        (the first adapter's, with the new rank, ``lora_alpha`` equal to it so that the scale is 1, and the union of
        ``modules_to_save``) and the tokenizer of ``tokenizer_source``."""
        from safetensors.torch import save_file

        rank = self.rank()
        tensors: dict[str, torch.Tensor] = {}
        for plan in plans:
            module = self.adapters[0].modules.get(plan.name)
            if module is None:
                tensors[PEFT_PREFIX + plan.name] = merge(plan.name).contiguous()
                continue
            if self.options.combine == "concat":
                a, b = self._concatenate(method, plan, rank)
            else:
                a, b = factor(merge(plan.name), rank)
            tensors[module.a], tensors[module.b] = a.to(plan.dtype).contiguous(), b.to(plan.dtype).contiguous()
        save_file(tensors, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
        config = dict(self.adapters[0].adapter_config)
        saved = sorted({name for adapter in self.adapters
                        for name in adapter.adapter_config.get("modules_to_save") or ()})
        config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                      base_model_name_or_path=self.base_name, modules_to_save=saved or None, inference_mode=True)
        (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer = tokenizer_source.tokenizer()
        if tokenizer is None:
            get_logger().warning("polm merge: the tokenizer source '%s' has no tokenizer; the adapter has none",
                                 tokenizer_source.reference)
            return
        tokenizer.save_pretrained(folder)

    def _concatenate(self, method: MergeMethod, plan: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A' = [A_1; A_2; ...]``, ``B' = [c_1 s_1 B_1, c_2 s_2 B_2, ...]``, zero-padded to ``rank``: then
        ``B' A' = sum_m c_m s_m B_m A_m`` exactly."""
        try:
            coefficients = linear_coefficients(method, plan.keywords, len(self.adapters))
        except ValueError as error:
            raise PolmError(f"merge method '{method.name}' on tensor {plan.name}: {error}") from None
        blocks_a, blocks_b = [], []
        for adapter, coefficient in zip(self.adapters, coefficients):
            module = adapter.modules[plan.name]
            blocks_a.append(adapter.tensor(module.a).double())  # (r_m, in)
            blocks_b.append(coefficient * module.scaling * adapter.tensor(module.b).double())  # (out, r_m)
        a, b = torch.cat(blocks_a, dim=0), torch.cat(blocks_b, dim=1)
        padding = rank - a.shape[0]
        return (torch.cat([a, a.new_zeros(padding, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], padding)], 1))


def prepare_lora_merge(config: MergeConfig, base: MergeInput | None, models: Sequence[MergeInput],
                       stack: ExitStack) -> LoraMerger | None:
    """The merge of the LoRA adapters ``models`` are, or None for full models (see the module docstring).

    Args:
        base: the opened base, when the config (or a merge stage) gives one: the adapters' base.
        models: the opened models the method merges.
        stack: releases what opening the base opens.

    Raises:
        PolmError: one line, before anything is written: adapters mixed with full models (or an adapter as the
            base), ``lora`` set for full models, no base, adapters of other bases, or factors and tensors that do
            not fit the base (naming the adapter and the field or tensor).
    """
    options = config.lora_merge()
    adapters = [model for model in models if isinstance(model, LoraAdapter)]
    if isinstance(base, LoraAdapter):
        raise PolmError(f"base_model '{base.reference}' is a LoRA adapter; name the model the adapters were "
                        "trained on")
    if not adapters:
        if config.lora:
            raise PolmError("lora: applies to LoRA adapters, and the models are full models; remove the key")
        return None
    full = next((model for model in models if not isinstance(model, LoraAdapter)), None)
    if full is not None:
        raise PolmError(f"cannot merge '{adapters[0].reference}' and '{full.reference}': one is a LoRA adapter and "
                        f"the other a {full.kind} model; merge adapters with adapters (on their base_model) or full "
                        "models with full models")
    base_name = _shared_base(adapters)
    if base is not None:
        base_name = _loadable_name(str(config.base_model), base) if config.base_model is not None else base_name
    elif base_name is None:
        raise PolmError(f"adapter '{adapters[0].reference}': {ADAPTER_CONFIG_FILE} has no base_model_name_or_path; "
                        "set base_model to the model the adapters were trained on")
    else:
        base = open_input(base_name, stack)
    for adapter in adapters:
        _check_fits(adapter, base)
    if base_name is None:
        base_name = base.reference
    if options.output == "base":
        adapted = [AdaptedModel(adapter, base) for adapter in adapters]
        return LoraMerger(options, adapters, base, base_name, base, adapted)
    _check_same_modules(adapters)
    modules = {name: (adapters[0].update_shape(module), adapters[0].dtype(module.a))
               for name, module in adapters[0].modules.items()}
    full_names = sorted({name for adapter in adapters for name in adapter.full})
    return LoraMerger(options, adapters, base, base_name, AdapterUpdates(None, base, modules, full_names),
                      [AdapterUpdates(adapter, base, modules, full_names) for adapter in adapters])


def _shared_base(adapters: Sequence[LoraAdapter]) -> str | None:
    named = [adapter for adapter in adapters if adapter.base_name is not None]
    for other in named[1:]:
        if not same_model(named[0].base_name, other.base_name):
            raise PolmError(f"adapter '{other.reference}': base_model_name_or_path is {other.base_name!r}, and "
                            f"'{named[0].reference}' was trained on {named[0].base_name!r}; merge adapters of one "
                            "base")
    return named[0].base_name if named else None


def _loadable_name(reference: str, base: MergeInput) -> str:
    """The base as an adapter config names it so that peft loads it: a local folder by its absolute path."""
    folder = Path(base.resolved)
    return str(folder.resolve()) if folder.is_dir() else reference


def _check_fits(adapter: LoraAdapter, base: MergeInput) -> None:
    names = set(base.tensor_names())
    where = f"adapter '{adapter.reference}'"
    for name, module in adapter.modules.items():
        if name not in names:
            raise PolmError(f"{where}: it adapts {name[:-len('.weight')]}, and the base '{base.reference}' has no "
                            f"tensor {name}; is base_model the model the adapter was trained on?")
        expected = adapter.update_shape(module)
        expected = expected[::-1] if adapter.fan_in_fan_out else expected
        if tuple(base.shape(name)) != expected:
            raise PolmError(f"{where}: its factors of {name} make a [{expected[0]}, {expected[1]}] update and the "
                            f"base '{base.reference}' has shape {list(base.shape(name))}; is base_model the model "
                            "the adapter was trained on?")
    for name, stored in adapter.full.items():
        if name not in names or tuple(base.shape(name)) != tuple(adapter.shape(stored)):
            got = list(base.shape(name)) if name in names else "no such tensor"
            raise PolmError(f"{where}: tensor {stored} (modules_to_save) has shape {list(adapter.shape(stored))} and "
                            f"the base '{base.reference}' {got}; is base_model the model the adapter was trained on?")


def _check_same_modules(adapters: Sequence[LoraAdapter]) -> None:
    first = adapters[0]
    for other in adapters[1:]:
        if set(other.modules) == set(first.modules):
            continue
        module = next(iter(set(other.modules) ^ set(first.modules)))
        holder, lacking = (first, other) if module in first.modules else (other, first)
        raise PolmError(f"adapter '{lacking.reference}': target_modules differ from '{holder.reference}''s, which "
                        f"adapts {module[:-len('.weight')]} and it does not; a new adapter needs one set of "
                        "modules, so merge these with lora: {output: base}")

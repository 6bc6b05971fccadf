"""polm multimodal models as merge inputs and outputs: the language model, connectors and encoders as one model.

A folder saved by polm's multimodal model (:mod:`polm.modalities.multimodal.model`: ``multimodal.json``,
``language_model/``, ``connectors.safetensors``, ``encoders.safetensors``, tokenizer files) is read as a
:class:`MultimodalFolder`, of kind ``multimodal``, whose tensors are its three parts' under prefixed names:

- ``language_model.<name>``: the language model's; a peft adapter in ``language_model/`` is merged into its base
  (the one its ``adapter_config.json`` names) as it is read;
- ``connectors.<modality>.<name>``: ``connectors.safetensors``;
- ``encoders.<modality>.<name>``: ``encoders.safetensors``, where the model saved encoder weights (an encoder
  with a pretrained source is rebuilt from it and saves none).

So the plans, filters (``filter: connectors.``), gradients, checks and atomic write of :mod:`.merge` apply as
they are, and a config's ``parts`` gives a part its own method. The inputs of one merge must agree on
``multimodal.json``: the same modalities, encoder specs and options, connector names and options
(:meth:`MultimodalFolder.difference`). :func:`write_multimodal_folder` writes the merge in the same layout,
which :func:`polm.load_model` loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import torch

from polm.engine.errors import PolmError
from polm.modalities.multimodal.model import CONFIG_FILE, CONNECTORS_FILE, ENCODERS_FILE, LM_DIR
from polm.plugins.integration.merge.inputs import (
    ADAPTER_CONFIG_FILE,
    INPUT_READERS,
    MergeInput,
    SafetensorsFolder,
    file_sha256,
    model_input,
    state_dict_sha256,
)
from polm.plugins.integration.merge.writer import (
    DEFAULT_SHARD_BYTES,
    FOLDER_WRITERS,
    write_transformers_folder,
)

LANGUAGE_MODEL, CONNECTORS, ENCODERS = "language_model", "connectors", "encoders"
#: The sections of ``multimodal.json`` and what the key naming each modality's module is.
SECTIONS = {"encoders": ("encoder", "spec"), "connectors": ("connector", "name")}


class MultimodalFolder(MergeInput):
    """A saved polm multimodal model, its three parts read as one input (see the module docstring).

    Args:
        stack: releases the temporary folder of a language model merged from a peft adapter.
        by_state_dict: identify the input by the sha256 of its tensors (a folder saved from a model object).
    """

    kind: ClassVar[str] = "multimodal"
    parts: ClassVar[tuple[str, ...]] = (LANGUAGE_MODEL, CONNECTORS, ENCODERS)

    def __init__(self, folder: Path, reference: str, stack: ExitStack, resolved: str | None = None,
                 by_state_dict: bool = False) -> None:
        super().__init__(reference, resolved or str(folder))
        self.folder = Path(folder)
        self.by_state_dict = by_state_dict
        try:
            self.spec = json.loads((self.folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PolmError(f"model '{reference}': cannot read {self.folder / CONFIG_FILE} ({error})") from None
        self.language_model = _language_model(self.folder / LM_DIR, reference, stack)
        self.weights: dict[str, SafetensorsFolder] = {LANGUAGE_MODEL: self.language_model}
        for part, file in ((CONNECTORS, CONNECTORS_FILE), (ENCODERS, ENCODERS_FILE)):
            if (self.folder / file).is_file():
                self.weights[part] = SafetensorsFolder(self.folder, reference, files=[self.folder / file])
        if CONNECTORS not in self.weights:
            raise PolmError(f"model '{reference}': {self.folder} has {CONFIG_FILE} but no {CONNECTORS_FILE}; it is "
                            "not a complete polm multimodal model")
        self._where = {f"{part}.{name}": (source, name) for part, source in self.weights.items()
                       for name in source.tensor_names()}

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        source, inner = self._where[name]
        return source.shape(inner)

    def dtype(self, name: str) -> torch.dtype:
        source, inner = self._where[name]
        return source.dtype(inner)

    def tensor(self, name: str) -> torch.Tensor:
        source, inner = self._where[name]
        return source.tensor(inner)

    def part(self, name: str) -> str | None:
        return name.partition(".")[0]

    def config(self) -> dict[str, Any]:
        """The language model's ``config.json``: the architecture the inputs must share."""
        return self.language_model.config()

    def generation_config(self) -> dict[str, Any] | None:
        return self.language_model.generation_config()

    def tokenizer(self) -> Any | None:
        """The tokenizer saved beside ``multimodal.json``, else the language model's."""
        return self.weights[CONNECTORS].tokenizer() or self.language_model.tokenizer()

    def checksums(self) -> dict[str, str]:
        if self.by_state_dict:
            return {"state_dict": state_dict_sha256(self)}
        files = [self.folder / CONFIG_FILE, *(self.folder / name for name in (CONNECTORS_FILE, ENCODERS_FILE)),
                 *sorted((self.folder / LM_DIR).glob("*.safetensors")), *sorted((self.folder / LM_DIR).glob("*.bin"))]
        return {str(file.relative_to(self.folder)): file_sha256(file) for file in files if file.is_file()}

    def difference(self, other: MergeInput) -> str | None:
        """The first difference of the two ``multimodal.json``: the modalities, then each modality's encoder spec
        and options and connector name and options, naming the modality and the field."""
        assert isinstance(other, MultimodalFolder)
        for section, (module, key) in SECTIONS.items():
            ours, theirs = self.spec.get(section, {}), other.spec.get(section, {})
            if set(ours) != set(theirs):
                return (f"their {section} are for {', '.join(sorted(ours)) or 'nothing'} in '{self.reference}' and "
                        f"{', '.join(sorted(theirs)) or 'nothing'} in '{other.reference}'")
            for modality in sorted(ours):
                mine, yours = ours[modality], theirs[modality]
                fields = [(key, mine.get(key), yours.get(key))]
                options, their_options = mine.get("options") or {}, yours.get("options") or {}
                fields += [(f"option {option}", options.get(option), their_options.get(option))
                           for option in sorted(set(options) | set(their_options))]
                for field, value, their_value in fields:
                    if value != their_value:
                        return (f"their {modality} {module}s differ, {field} {value!r} in '{self.reference}' and "
                                f"{their_value!r} in '{other.reference}'; merge multimodal models whose "
                                f"{CONFIG_FILE} agree")
        return None


def _language_model(folder: Path, reference: str, stack: ExitStack) -> SafetensorsFolder:
    """The language model of a multimodal folder: its safetensors read lazily; a peft adapter merged into its
    base, or other weights loaded, and saved to a temporary folder (:func:`~.inputs.model_input`)."""
    from polm.engine.quiet import no_transformers_progress

    is_adapter = (folder / ADAPTER_CONFIG_FILE).is_file() and not (folder / "config.json").is_file()
    if not is_adapter and not (folder / "config.json").is_file():
        raise PolmError(f"model '{reference}': {folder} holds no language model (no config.json nor "
                        f"{ADAPTER_CONFIG_FILE}); it is not a complete polm multimodal model")
    if not is_adapter and any(folder.glob("*.safetensors")):
        return SafetensorsFolder(folder, reference)
    from transformers import AutoModelForCausalLM

    from polm.engine.tuning import unwrap_peft

    try:
        with no_transformers_progress():
            if is_adapter:
                from peft import AutoPeftModelForCausalLM

                model = unwrap_peft(AutoPeftModelForCausalLM.from_pretrained(folder))
            else:
                model = AutoModelForCausalLM.from_pretrained(folder)
    except (OSError, ValueError) as error:  # a base that cannot be found, a config transformers cannot read
        what = "the peft adapter of its language model on its base" if is_adapter else "its language model"
        raise PolmError(f"model '{reference}': cannot load {what} ({str(error).splitlines()[0]})") from None
    merged = model_input(model, None, reference, stack, resolved=str(folder))
    assert isinstance(merged, SafetensorsFolder)
    return merged


def read_multimodal_folder(reference: str, folder: Path, stack: ExitStack) -> MergeInput | None:
    """A folder with ``multimodal.json``; other folders are not this reader's."""
    if not (folder / CONFIG_FILE).is_file():
        return None
    return MultimodalFolder(folder, reference, stack)


def write_multimodal_folder(folder: Path, source: MergeInput, tokenizer_source: MergeInput | None,
                            dtype: str | None, names: Sequence[str], sizes: Sequence[int],
                            produce: Callable[[str], torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                            show_progress: bool = False) -> None:
    """The merge in the layout of a saved multimodal model: ``multimodal.json`` of ``source``, ``language_model/``
    a transformers folder (its config, weights and the tokenizer), ``connectors.safetensors``,
    ``encoders.safetensors`` where the inputs saved encoder weights, and the tokenizer beside them."""
    from safetensors.torch import save_file

    assert isinstance(source, MultimodalFolder)
    prefix = f"{LANGUAGE_MODEL}."
    language = [(name, size) for name, size in zip(names, sizes) if name.startswith(prefix)]
    (folder / LM_DIR).mkdir()
    write_transformers_folder(folder / LM_DIR, source.language_model, tokenizer_source, dtype,
                              [name[len(prefix):] for name, _ in language], [size for _, size in language],
                              lambda name: produce(prefix + name), max_shard_bytes, show_progress)
    for part, file in ((CONNECTORS, CONNECTORS_FILE), (ENCODERS, ENCODERS_FILE)):
        ours = [name for name in names if name.startswith(f"{part}.")]
        if ours:
            save_file({name[len(part) + 1:]: produce(name).contiguous() for name in ours}, folder / file,
                      metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(source.spec, indent=2) + "\n")
    tokenizer = tokenizer_source.tokenizer() if tokenizer_source is not None else None
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


INPUT_READERS.insert(0, read_multimodal_folder)
FOLDER_WRITERS[MultimodalFolder.kind] = write_multimodal_folder

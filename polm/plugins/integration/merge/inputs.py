"""The models a merge reads: each input resolved to a :class:`MergeInput`, read one tensor at a time.

A reference in a merge config is resolved in this order:

- a name registered through ``polm_register_models`` (``polm-tiny``): loaded with :func:`polm.load_model`, saved
  with ``save_pretrained`` to a temporary folder (so that its tensors carry the names and the tied weights its
  saved files would) and read from there;
- a local path, looked up beside the merge config first, then in the working folder; a run's stage folder
  (``runs/a/00-sft``) stands for its ``final/``. Each reader of :data:`INPUT_READERS` is asked in turn and the
  first that returns an input wins: a transformers folder with ``*.safetensors`` weights is read lazily with
  ``safetensors.safe_open``, so the inputs are never all in memory at once; one with other weights
  (``pytorch_model.bin``) is loaded and saved as above;
- anything else is a Hugging Face hub id, loaded with :func:`polm.load_model` (where the network allows).

Another kind of input (a LoRA adapter, a polm multimodal model) is a :class:`MergeInput` subclass with its own
``kind``, and a reader inserted at the front of :data:`INPUT_READERS`; :func:`check_compatible` refuses to mix
kinds. polm multimodal folders are read so (:mod:`.multimodal`), and peft LoRA adapter folders (:mod:`.lora`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

import torch

from polm.engine.errors import PolmError
from polm.engine.models import stage_model_folder

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
MULTIMODAL_CONFIG_FILE = "multimodal.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: The dtypes of safetensors headers.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_CHUNK = 1 << 20


class MergeInput:
    """One model of a merge, read one tensor at a time.

    Attributes:
        kind: what sort of model it is; inputs of one merge share it, and the output is written in its format.
        parts: the parts a config's ``parts`` may give a method of their own (a multimodal model's
            ``language_model``, ``connectors``, ``encoders``); none for a transformers model.
        reference: the model as the merge config names it, for messages and ``merge.json``.
        resolved: where it was read from (a folder, or ``registered model``).
    """

    kind: ClassVar[str] = "transformers"
    parts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, reference: str, resolved: str) -> None:
        self.reference = reference
        self.resolved = resolved

    def tensor_names(self) -> list[str]:
        """Every tensor name, in the order the output lists them."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        """The tensor's stored dtype, read without loading it."""
        raise NotImplementedError

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor, loaded now (on the CPU, in its stored dtype)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` as a mapping."""
        raise NotImplementedError

    def generation_config(self) -> dict[str, Any] | None:
        return None

    def tokenizer(self) -> Any | None:
        """Its tokenizer, or None for an input without one."""
        return None

    def checksums(self) -> dict[str, str]:
        """sha256 digests identifying the weights: of each weight file, or ``{"state_dict": ...}``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``merge.json`` records of the input."""
        return {"model": self.reference, "resolved": self.resolved, "kind": self.kind, "sha256": self.checksums()}

    def part(self, name: str) -> str | None:
        """The part (one of :attr:`parts`) the tensor ``name`` belongs to, or None for a model without parts."""
        return None

    def difference(self, other: MergeInput) -> str | None:
        """Why ``other``, an input of the same kind, cannot merge with this one beyond its config and tensors
        (a multimodal model's encoders and connectors), or None. Reads no tensor."""
        return None


class SafetensorsFolder(MergeInput):
    """A transformers model folder whose weights are ``*.safetensors`` files, opened lazily.

    Args:
        by_state_dict: identify the input by the sha256 of its state dict (a folder saved from a model object),
            rather than by its files' digests (a folder of the user's).
        files: the weight files to read, where not every ``*.safetensors`` of the folder (a part of a multimodal
            model); its config and tokenizer are still the folder's.
    """

    def __init__(self, folder: Path, reference: str, resolved: str | None = None, by_state_dict: bool = False,
                 files: Sequence[Path] | None = None) -> None:
        super().__init__(reference, resolved or str(folder))
        self.folder = Path(folder)
        self.files = sorted(files) if files is not None else sorted(self.folder.glob("*.safetensors"))
        self.by_state_dict = by_state_dict
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._tokenizer: Any = None
        for file in self.files:
            for name in self._handle(file).keys():  # noqa: SIM118 (safe_open is not iterable)
                self._where.setdefault(name, file)

    def _handle(self, file: Path) -> Any:
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(file, framework="pt")
            except (SafetensorError, OSError) as error:
                raise PolmError(f"{self.reference}: cannot read {file} ({str(error).splitlines()[0]})") from None
        return self._handles[file]

    def tensor_names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        stored = self._handle(self._where[name]).get_slice(name).get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise PolmError(f"{self.reference}: tensor {name} has dtype {stored}, which polm cannot merge")
        return SAFETENSORS_DTYPES[stored]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(self._where[name]).get_tensor(name)

    def config(self) -> dict[str, Any]:
        return json.loads((self.folder / CONFIG_FILE).read_text(encoding="utf-8"))

    def generation_config(self) -> dict[str, Any] | None:
        path = self.folder / GENERATION_CONFIG_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def tokenizer(self) -> Any | None:
        if self._tokenizer is None and any((self.folder / name).is_file() for name in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
            except (OSError, ValueError) as error:
                raise PolmError(f"{self.reference}: cannot read its tokenizer ({str(error).splitlines()[0]})") from None
        return self._tokenizer

    def checksums(self) -> dict[str, str]:
        if self.by_state_dict:
            return {"state_dict": state_dict_sha256(self)}
        return {file.name: file_sha256(file) for file in self.files}


InputReader = Callable[[str, Path, ExitStack], "MergeInput | None"]


def read_safetensors_folder(reference: str, folder: Path, stack: ExitStack) -> MergeInput | None:
    """A transformers folder with safetensors weights; a transformers folder with other weights is loaded and
    saved as safetensors (:func:`model_input`).

    Raises:
        PolmError: a folder with no ``config.json`` (peft adapters are :mod:`.lora`'s reader's).
    """
    if not (folder / CONFIG_FILE).is_file():
        raise PolmError(f"model '{reference}': {folder} is not a model folder (it has no {CONFIG_FILE}); give a "
                        "transformers model folder, a run's stage folder (runs/a/00-sft) or a registered model")
    if any(folder.glob("*.safetensors")):
        return SafetensorsFolder(folder, reference)
    from polm.engine.models import load_model

    model, tokenizer = load_model(folder)
    return model_input(model, tokenizer, reference, stack, resolved=str(folder))


#: The readers of local folders, asked in turn (see the module docstring); the first input returned wins.
INPUT_READERS: list[InputReader] = [read_safetensors_folder]


def local_path(reference: str, relative_to: Path | None = None) -> Path | None:
    """The local folder ``reference`` names, beside ``relative_to`` first and then in the working folder (a
    run's stage folder stands for its ``final/``), or None when it names none."""
    candidates = [Path(reference).expanduser()]
    if relative_to is not None and not candidates[0].is_absolute():
        candidates.insert(0, Path(relative_to) / reference)
    for candidate in candidates:
        if candidate.exists():
            return stage_model_folder(candidate)
    return None


def looks_like_path(reference: str) -> bool:
    """Whether a reference that names nothing local is meant as a path, not as a hub id (``org/name``)."""
    return reference.startswith((".", "/", "~")) or reference.count("/") > 1


def open_input(reference: str, stack: ExitStack, relative_to: Path | None = None) -> MergeInput:
    """The :class:`MergeInput` of ``reference`` (see the module docstring for the order); what it opens
    (temporary folders) is released when ``stack`` closes.

    Raises:
        PolmError: naming the reference, when it cannot be read.
    """
    from polm.engine.models import load_model
    from polm.engine.plugins import registry

    if reference in registry("models"):
        model, tokenizer = load_model(reference)
        return model_input(model, tokenizer, reference, stack, resolved="registered model")
    folder = local_path(reference, relative_to)
    if folder is not None:
        if not folder.is_dir():
            raise PolmError(f"model '{reference}': {folder} is a file; give a model folder")
        for reader in INPUT_READERS:
            found = reader(reference, folder, stack)
            if found is not None:
                return found
        raise PolmError(f"model '{reference}': no reader takes the folder {folder}")
    model, tokenizer = load_model(reference)  # a hub id; load_model names what is wrong
    return model_input(model, tokenizer, reference, stack, resolved=f"hub {reference}")


def model_input(model: torch.nn.Module, tokenizer: Any, reference: str, stack: ExitStack,
                resolved: str = "model object") -> MergeInput:
    """An input of a model object (a registered model, the pipeline's model): saved with ``save_pretrained``
    to a temporary folder that ``stack`` removes, so that its tensors are named, and tied weights left out,
    as in a folder of the same model; identified by the sha256 of its state dict.

    A polm multimodal model (whose ``save_pretrained`` writes ``multimodal.json``) is read as a
    :class:`~.multimodal.MultimodalFolder`.

    Raises:
        PolmError: a model that is neither a transformers model nor a polm multimodal model.
    """
    from polm.engine.quiet import no_transformers_progress

    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise PolmError(f"model '{reference}': a {type(model).__name__} is not a transformers model; merging "
                        "other models (polm multimodal models) is not supported yet")
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="polm-merge-input-")))
    with no_transformers_progress():
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if (folder / MULTIMODAL_CONFIG_FILE).is_file():
        from polm.plugins.integration.merge.multimodal import MultimodalFolder

        return MultimodalFolder(folder, reference, stack, resolved=resolved, by_state_dict=True)
    return SafetensorsFolder(folder, reference, resolved=resolved, by_state_dict=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(source: MergeInput) -> str:
    """sha256 over every tensor of ``source`` by name: its name, dtype, shape and bytes, one tensor at a time."""
    digest = hashlib.sha256()
    for name in sorted(source.tensor_names()):
        tensor = source.tensor(name).contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def architecture(source: MergeInput) -> str:
    """``LlamaForCausalLM (llama)``: the architectures and ``model_type`` of the input's config."""
    config = source.config()
    return f"{'/'.join(config.get('architectures') or ['?'])} ({config.get('model_type', '?')})"


def check_compatible(inputs: Sequence[MergeInput]) -> None:
    """Refuse inputs that cannot merge tensor by tensor, comparing each with the first: the same kind, the same
    architecture (``model_type`` and ``architectures``), the same tokenizer vocabulary (inputs without a
    tokenizer are not compared) and the same tensor names and shapes. Reads configs, tokenizers and headers,
    not tensors.

    Raises:
        PolmError: one line naming the two inputs and the architectures, the vocabularies or the tensor.
    """
    first = inputs[0]
    for other in inputs[1:]:
        pair = f"'{first.reference}' and '{other.reference}'"
        if other.kind != first.kind:
            raise PolmError(f"cannot merge {pair}: one is a {first.kind} model and the other a {other.kind}")
        difference = first.difference(other)
        if difference is not None:
            raise PolmError(f"cannot merge {pair}: {difference}")
        if architecture(other) != architecture(first):
            raise PolmError(f"cannot merge {pair}: their architectures differ, {architecture(first)} and "
                            f"{architecture(other)}; merge models of one architecture")
    _check_vocabularies(inputs)
    names = first.tensor_names()
    ours = set(names)
    for other in inputs[1:]:
        pair = f"'{first.reference}' and '{other.reference}'"
        theirs = set(other.tensor_names())
        missing = next((name for name in names if name not in theirs), None)
        extra = next((name for name in other.tensor_names() if name not in ours), None)
        if missing is not None or extra is not None:
            holder, lacking = (first, other) if missing is not None else (other, first)
            raise PolmError(f"cannot merge {pair}: tensor {missing or extra} is in '{holder.reference}' but not "
                            f"in '{lacking.reference}'")
        for name in names:
            if first.shape(name) != other.shape(name):
                raise PolmError(f"cannot merge {pair}: tensor {name} has shape {list(first.shape(name))} in "
                                f"'{first.reference}' and {list(other.shape(name))} in '{other.reference}'")


def _check_vocabularies(inputs: Sequence[MergeInput]) -> None:
    with_tokenizer = [(source, source.tokenizer()) for source in inputs]
    with_tokenizer = [(source, tokenizer.get_vocab()) for source, tokenizer in with_tokenizer if tokenizer is not None]
    if not with_tokenizer:
        return
    first, vocabulary = with_tokenizer[0]
    for other, theirs in with_tokenizer[1:]:
        if theirs == vocabulary:
            continue
        token = next((token for token in vocabulary if theirs.get(token) != vocabulary[token]), None)
        if token is None:
            token = next(token for token in theirs if token not in vocabulary)
            first_has, other_has = "absent", str(theirs[token])
        else:
            first_has, other_has = str(vocabulary[token]), str(theirs.get(token, "absent"))
        raise PolmError(f"cannot merge '{first.reference}' and '{other.reference}': their tokenizers differ, a "
                        f"vocabulary of {len(vocabulary)} tokens and one of {len(theirs)} (token {token!r} is "
                        f"{first_has} in the first, {other_has} in the second); merge models that share one "
                        "tokenizer")
